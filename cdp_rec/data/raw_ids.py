"""Raw 64-bit ids and id churn for the synthetic generator (``data.raw_ids``, ``data.id_churn``).

Real logs carry ids like ``8410752310597361025``, not ``0..N-1``, and their catalogue
changes every day. Two generator options imitate that, applied to the finished rows of
:mod:`cdp_rec.data.synthetic` (no random draw of the generative story changes, so the
clicks, histories and every other column stay what they are without them):

``data.id_churn = c`` (needs ``data.raw_ids``)
    Every day ``d >= 1`` a share ``c`` of the item slots and of the query slots is
    relaunched under a new id: same category, latent and popularity, but an id never seen
    before (a new product listing, a reworded query). Slot ``s`` of a table of ``N`` slots
    has the versioned id ``s + N * g(s, day)``, ``g`` = how many of days ``1..day`` relaunched
    it; a slot relaunches on day ``d`` when ``u(s, d) < c``, ``u`` a hash of (seed, table,
    slot, day) mapped to ``[0, 1)``. A behaviour keeps the id its item had on the behaviour's
    own day (pre-history: day 0), so histories hold old ids of relaunched items. Over ``D``
    days a table sees about ``N * (1 + c * (D - 1))`` distinct ids.

``data.raw_ids = true``
    Every user, query, item and category id (target and history) is written as
    ``scramble62(id, table)``: a fixed bijection of ``[0, 2**62)`` (add a per-table
    constant, then SplitMix64-style xor-shift / odd-multiply rounds modulo ``2**62``), so
    ids are spread over 62 bits, distinct ids stay distinct and nothing about the dense
    numbering survives. Context and scene columns keep their small vocabularies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BITS = 62
_MASK = np.uint64((1 << BITS) - 1)
# Per-table constants (odd, arbitrary): the same dense id in two tables gets two raw ids.
_TABLE_SALT = {"user": 0x5BD1E9955BD1E995, "query": 0x2545F4914F6CDD1D, "item": 0x9E3779B97F4A7C15,
               "category": 0xD6E8FEB86659FD93}
_CHURN_SALT = {"item": 0x632BE59BD9B4E019, "query": 0x8CB92BA72F3D8DD7}


def scramble62(ids: np.ndarray, table: str) -> np.ndarray:
    """The fixed bijection of ``[0, 2**62)`` used for ``table``'s raw ids (int64 in, int64 out).

    Each step is invertible modulo ``2**62``: adding a constant, ``x ^= x >> k`` (k < 62)
    and multiplying by an odd constant.
    """
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    if x.size and (int(x.max()) >> BITS):
        raise ValueError(f"{table}: ids must be below 2**{BITS} to scramble, got {int(x.max())}")
    with np.errstate(over="ignore"):
        x = (x + np.uint64(_TABLE_SALT[table])) & _MASK
        x ^= x >> np.uint64(31)
        x = (x * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x ^= x >> np.uint64(29)
        x = (x * np.uint64(0x94D049BB133111EB)) & _MASK
        x ^= x >> np.uint64(32)
    return x.astype(np.int64)


def _uniform(seed: int, table: str, slots: np.ndarray, day: int) -> np.ndarray:
    """``[n]`` float64 in ``[0, 1)``: the churn draw of each slot on ``day`` (a hash, no RNG)."""
    with np.errstate(over="ignore"):
        x = slots.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.uint64((seed * 0x100000001B3 + day * 0xC2B2AE3D27D4EB4F + _CHURN_SALT[table]) & 0xFFFFFFFFFFFFFFFF)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def generation(seed: int, table: str, slots: np.ndarray, days: np.ndarray | int, churn: float) -> np.ndarray:
    """``[n]`` int64: how many of days ``1..day`` relaunched each slot (0 for day <= 0)."""
    slots = np.asarray(slots, dtype=np.int64)
    days = np.broadcast_to(np.asarray(days, dtype=np.int64), slots.shape)
    out = np.zeros(slots.shape, dtype=np.int64)
    if churn <= 0 or not slots.size:
        return out
    for d in range(1, int(days.max()) + 1):
        live = days >= d
        if live.any():
            out[live] += _uniform(seed, table, slots[live], d) < churn
    return out


def versioned(seed: int, table: str, slots: np.ndarray, days: np.ndarray | int, churn: float, n: int) -> np.ndarray:
    """Dense versioned ids ``slot + n * generation`` (``n`` = the table's number of slots)."""
    slots = np.asarray(slots, dtype=np.int64)
    return slots + n * generation(seed, table, slots, days, churn)


def new_on_day(seed: int, table: str, slots: np.ndarray, day: int, churn: float) -> np.ndarray:
    """``[n]`` bool: the slot got a new id on ``day`` (what a test of new-item AUC can check)."""
    if day < 1 or churn <= 0:
        return np.zeros(len(slots), dtype=bool)
    return _uniform(seed, table, np.asarray(slots, dtype=np.int64), day) < churn


def _ids(cfg: Any, table: str, dense: np.ndarray, days: np.ndarray | int) -> np.ndarray:
    f, d = cfg.features, cfg.data
    n = {"user": f.num_users, "query": f.num_queries, "item": f.num_items, "category": f.num_categories}[table]
    out = versioned(d.seed, table, dense, days, d.id_churn, n) if table in _CHURN_SALT else np.asarray(dense, np.int64)
    return scramble62(out, table) if d.raw_ids else out


def history_days(log: Any, users: np.ndarray, ts: np.ndarray, max_len: int) -> np.ndarray:
    """Day of every history behaviour, in the order of ``synthetic._histories``' flat items."""
    from cdp_rec.data import synthetic as S

    end = np.searchsorted(log.keys, S._Log.key(users, ts), side="left")
    first = np.searchsorted(log.keys, S._Log.key(users, np.full_like(ts, -S._TS_OFFSET)), side="left")
    start = np.maximum(first, end - max_len)
    lengths = end - start
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    behaviour_ts = (log.keys[flat] & ((1 << S._TS_BITS) - 1)) - S._TS_OFFSET
    return np.floor_divide(behaviour_ts, S.SECONDS_PER_DAY)


def apply_to_impressions(cfg: Any, day: int, table: Any, log: Any) -> Any:
    """Day ``day``'s generated impressions with raw / churned ids (``table`` as the generator built it
    from ``log``, before the log is truncated). Returns ``table`` itself when both options are off."""
    import pyarrow as pa

    from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS

    d = cfg.data
    if not (d.raw_ids or d.id_churn):
        return table
    cols = {name: table.column(name) for name in table.schema.names}
    for name, kind in (("user_id", "user"), ("query_id", "query"), ("item_id", "item"), ("category_id", "category")):
        cols[name] = pa.array(_ids(cfg, kind, cols[name].to_numpy(), day))
    hist = table.column(HIST_ITEMS).combine_chunks()
    offsets = hist.offsets
    users, ts = table.column("user_id").to_numpy(), table.column("ts").to_numpy()
    hdays = history_days(log, users, ts, cfg.features.max_seq_len)
    items = hist.flatten().to_numpy()
    cats = table.column(HIST_CATEGORIES).combine_chunks().flatten().to_numpy()
    cols[HIST_ITEMS] = pa.ListArray.from_arrays(offsets, pa.array(_ids(cfg, "item", items, np.maximum(hdays, 0))))
    cols[HIST_CATEGORIES] = pa.ListArray.from_arrays(offsets, pa.array(_ids(cfg, "category", cats, 0)))
    return pa.Table.from_arrays([cols[n] for n in table.schema.names], schema=table.schema)


def apply_to_behaviours(cfg: Any, behaviours: Any) -> Any:
    """A period's behaviour log (:class:`cdp_rec.data.writer.Behaviours`) with raw / churned ids."""
    d = cfg.data
    if behaviours is None or not (d.raw_ids or d.id_churn):
        return behaviours
    from cdp_rec.data.synthetic import SECONDS_PER_DAY

    days = np.maximum(np.floor_divide(behaviours.ts, SECONDS_PER_DAY), 0)
    users = _ids(cfg, "user", behaviours.user_id, 0)
    # The joined layout stores a log sorted by (user_id, ts): re-sort by the raw user id,
    # stably, so each user's behaviours keep their (ts, log) order.
    order = np.argsort(users, kind="stable")
    return type(behaviours)(
        user_id=users[order],
        ts=np.asarray(behaviours.ts)[order],
        item_id=_ids(cfg, "item", behaviours.item_id, days)[order],
        category_id=_ids(cfg, "category", behaviours.category_id, 0)[order],
    )
