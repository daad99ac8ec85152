"""Convert a data set between the per-row and the joined layout, streaming.

``rows -> joined`` (:func:`rows_to_joined`)
    The per-row layout stores histories but not the behaviours' timestamps, so the log is
    rebuilt from the histories: per user, the impressions in (ts, impression_id) order
    form a chain of windows, each the last ``L`` behaviours before its ts. The behaviours
    that enter between two consecutive windows are the later window's last ``n``
    elements, ``n`` the smallest shift with ``last L of (previous window + those n) ==
    later window`` (found for all pairs at once with polynomial prefix hashes over the
    windows, every pick then checked element by element). Each such behaviour is stored
    with ``ts = (ts of the first impression that sees it) - 1``: the latest ts consistent
    with the histories, so joining the rebuilt log gives every impression exactly its
    history again. What is lost: behaviours no impression ever saw, and the original
    behaviour ts (only their order relative to impressions is kept). Histories that are
    not windows of one log (e.g. two impressions of a user at the same ts with different
    histories) are a DataError naming the day, user and impression.

``joined -> rows`` (:func:`joined_to_rows`)
    The joined reader's rows, put back in ``impression_id`` order and cut into files of
    ``data.rows_per_file`` rows: a per-row data set converted to joined and back is the
    same files' contents (same rows in the same order, same row groups).

Memory is bounded by one (day, bucket) of impressions with their histories plus one
bucket's last window per user (``rows -> joined``), or one output file plus one row group
per bucket (``joined -> rows``). Intermediate data is spilled to ``<dst>/_convert_tmp``
(about the size of the source), removed at the end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cdp_rec.config import JobConfig
from cdp_rec.data import joined as J
from cdp_rec.data.loader import DataError, ParquetBatchReader, _Columns, list_day_files
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, day_dir_name, table_schema
from cdp_rec.data.spec import DATASET_SPEC_FILE
from cdp_rec.data.writer import Behaviours, write_parquet

TMP_DIR = "_convert_tmp"
# Polynomial hash base (odd, so invertible modulo 2**64) and its inverse.
_BASE = 0x100000001B3
_INV_BASE = pow(_BASE, -1, 1 << 64)
# Candidate (pair, shift) tests held at once; bounds the hashing temporaries.
_MAX_CANDIDATES = 1 << 22


@dataclass
class ConvertSummary:
    days: list[int]
    impressions: int
    behaviours: int  # written (rows -> joined) or 0
    files: int


def convert(cfg: JobConfig, src: str | Path, dst: str | Path, to: str, force: bool = False) -> ConvertSummary:
    """Convert every day under ``src`` to layout ``to`` under ``dst`` (see module docstring)."""
    src, dst = Path(src), Path(dst)
    cfg.features.validate("convert")
    cfg.data.validate("convert")
    if to not in ("rows", "joined"):
        raise DataError(f"--to must be 'rows' or 'joined', got {to!r}")
    if not src.is_dir():
        raise DataError(f"{src}: source data root not found")
    if src.resolve() == dst.resolve():
        raise DataError(f"{dst}: destination must differ from the source")
    if dst.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(dst.resolve()):
        # Inside: its files would join the source (a stray entry in a day) or be replaced by it.
        raise DataError(f"{dst}: destination and source {src} must not lie inside one another")
    have = "joined" if J.read_layout(src) is not None else "rows"
    if have == to:
        raise DataError(f"{src}: already in the {to} layout")
    days = J.layout_days(src, have)
    if not days:
        raise DataError(f"{src}: no day=NN directories with {have}-layout files")
    _prepare(dst, force)
    tmp = dst / TMP_DIR
    tmp.mkdir()
    try:
        summary = rows_to_joined(cfg, src, dst, days, tmp) if to == "joined" else joined_to_rows(cfg, src, dst, days, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _copy_spec(cfg, src, dst, to)
    return summary


def _prepare(dst: Path, force: bool) -> None:
    """An empty (or, with ``force``, emptied of data-set entries) destination."""
    dst.mkdir(parents=True, exist_ok=True)
    ours = [p for p in dst.iterdir()
            if p.name.startswith("day=") or p.name in (J.BEHAVIORS_DIR, J.LAYOUT_FILE, DATASET_SPEC_FILE, TMP_DIR)]
    others = [p for p in dst.iterdir() if p not in ours]
    if (ours or others) and not force:
        raise DataError(f"{dst}: destination is not empty (use --force to replace the data set in it)")
    if others:
        raise DataError(f"{dst}: holds {sorted(p.name for p in others)[:3]}, not a data set; refusing to overwrite")
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _copy_spec(cfg: JobConfig, src: Path, dst: Path, to: str) -> None:
    """A synthetic data set's ``_dataset.json`` follows it, with the layout updated."""
    path = src / DATASET_SPEC_FILE
    if not path.is_file():
        return
    spec = json.loads(path.read_text())
    data = spec.setdefault("data", {})
    data["layout"] = to
    data.pop("num_user_buckets", None)
    if to == "joined":
        data["num_user_buckets"] = cfg.data.num_user_buckets
    (dst / DATASET_SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- arrow <-> numpy


def _spill_schema(cfg: JobConfig) -> pa.Schema:
    return pa.schema([pa.field(J.IMPRESSION_ID, pa.int64(), nullable=False), *table_schema(cfg.features)])


def _to_table(schema: pa.Schema, ids: np.ndarray | None, cols: _Columns) -> pa.Table:
    """``_Columns`` (+ ``[n]`` impression ids) -> a table of ``schema``'s columns."""
    offsets = pa.array(cols.offsets.astype(np.int32))
    arrays: dict[str, pa.Array] = {name: pa.array(v) for name, v in cols.single.items()}
    arrays[HIST_ITEMS] = pa.ListArray.from_arrays(offsets, pa.array(cols.hist_items, pa.int64()))
    arrays[HIST_CATEGORIES] = pa.ListArray.from_arrays(offsets, pa.array(cols.hist_cats, pa.int64()))
    if ids is not None:
        arrays[J.IMPRESSION_ID] = pa.array(ids)
    return pa.Table.from_arrays([arrays[n] for n in schema.names], schema=schema)


def _from_table(table: pa.Table, single: list[str]) -> tuple[np.ndarray, _Columns]:
    """A spilled table -> ``([n] impression ids, _Columns)`` (already validated on the way in)."""
    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
        arr = table.column(name).combine_chunks()
        return pc.list_value_length(arr).to_numpy(), pc.list_flatten(arr).to_numpy()

    lengths, items = flat(HIST_ITEMS)
    _, cats = flat(HIST_CATEGORIES)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    cols = _Columns({n: table.column(n).to_numpy() for n in single}, offsets, items, cats)
    return table.column(J.IMPRESSION_ID).to_numpy(), cols


def _empty_columns(single: list[str]) -> _Columns:
    z = np.zeros(0, dtype=np.int64)
    return _Columns({n: z for n in single}, np.zeros(1, dtype=np.int64), z, z)


def _take(cols: _Columns, idx: np.ndarray) -> _Columns:
    """Rows ``idx`` of ``cols`` (jagged histories gathered without a Python loop)."""
    offsets, flat = _windows(cols.offsets, idx)
    return _Columns({k: v[idx] for k, v in cols.single.items()}, offsets, cols.hist_items[flat], cols.hist_cats[flat])


def _windows(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``idx`` of a jagged store: ``[k + 1]`` new offsets and the ``[total]`` flat positions."""
    lengths = np.diff(offsets)[idx]
    new = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    return new, np.repeat(offsets[idx] - new[:-1], lengths) + np.arange(new[-1])


# --------------------------------------------------------------------------- rows -> joined


def rows_to_joined(cfg: JobConfig, src: Path, dst: Path, days: list[int], tmp: Path) -> ConvertSummary:
    """Pass 1 spills each day's validated rows by user bucket; pass 2 rebuilds each
    bucket's log day by day, carrying every user's last window to the next day."""
    n_buckets = cfg.data.num_user_buckets
    schema = _spill_schema(cfg)
    impressions = 0
    for day in days:
        reader = ParquetBatchReader(list_day_files(src, day, allow_empty=cfg.data.allow_empty_days), cfg.features,
                                    batch_size=1)
        next_id, chunk = 0, 0
        buffered: list[tuple[np.ndarray, _Columns]] = []

        def flush() -> None:
            nonlocal chunk, buffered
            if not buffered:
                return
            ids = np.concatenate([i for i, _ in buffered])
            cols = buffered[0][1]
            for _, c in buffered[1:]:
                cols = _Columns.concat(cols, c)
            buckets = J.user_bucket(cols.single["user_id"], n_buckets)
            for b in np.unique(buckets):
                idx = np.flatnonzero(buckets == b)
                folder = tmp / day_dir_name(day) / J.bucket_name(int(b))
                folder.mkdir(parents=True, exist_ok=True)
                pq.write_table(_to_table(schema, ids[idx], _take(cols, idx)), folder / f"chunk-{chunk:05d}.parquet")
            chunk += 1
            buffered = []

        rows = 0
        for block in reader._blocks():  # validated row groups, in day order
            buffered.append((next_id + np.arange(len(block)), block))
            next_id += len(block)
            rows += len(block)
            if rows >= cfg.data.rows_per_file:  # bounds the buffer (and int32 list offsets)
                flush()
                rows = 0
        flush()
        impressions += next_id

    single = [f.name for f in table_schema(cfg.features) if not pa.types.is_list(f.type)]
    imp_schema = J.impression_schema(cfg.features)
    behaviours = files = 0
    for b in range(n_buckets):
        state = _Windows.empty()
        for day in days:
            folder = tmp / day_dir_name(day) / J.bucket_name(b)
            chunks = sorted(folder.glob("chunk-*.parquet")) if folder.is_dir() else []
            if chunks:
                ids, cols = _from_table(pa.concat_tables(pq.read_table(c) for c in chunks), single)
            else:
                ids, cols = np.zeros(0, dtype=np.int64), _empty_columns(single)
            beh, state = _rebuild(cfg.features.max_seq_len, f"{src / day_dir_name(day)}", state, ids, cols)
            if len(beh.user_id):
                J.write_behaviour_part(dst, b, day + 1, beh)
                files += 1
            behaviours += len(beh.user_id)
            table = _to_table(_spill_schema(cfg), ids, cols).select(imp_schema.names).cast(imp_schema)
            (dst / day_dir_name(day)).mkdir(parents=True, exist_ok=True)
            write_parquet(table, J.impression_file(dst, day, b), cfg.data.row_group_size)
            files += 1
            shutil.rmtree(folder, ignore_errors=True)
    J.write_layout(dst, n_buckets)
    return ConvertSummary(days, impressions, behaviours, files)


@dataclass
class _Windows:
    """Each user's last history window so far: ``users`` ``[S]`` sorted, ``ts`` ``[S]`` of
    the impression it belongs to, ``offsets`` ``[S + 1]``, flat ``items`` / ``cats``."""

    users: np.ndarray
    ts: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    cats: np.ndarray

    @staticmethod
    def empty() -> "_Windows":
        z = np.zeros(0, dtype=np.int64)
        return _Windows(z, z, np.zeros(1, dtype=np.int64), z, z)


def _mix(items: np.ndarray, cats: np.ndarray) -> np.ndarray:
    """``[m]`` uint64 hash of each (item, category) behaviour (fmix64 of both)."""
    x = items.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ cats.astype(np.uint64)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    return x


def _rebuild(
    L: int, where: str, state: _Windows, ids: np.ndarray, cols: _Columns
) -> tuple[Behaviours, _Windows]:
    """One (day, bucket): the behaviours entering the log, sorted by (user, ts), and the new state.

    ``ids`` ``[n]`` and ``cols`` are the day's impressions of the bucket; ``state`` the
    bucket's users' last windows from earlier days.
    """
    u, ts = cols.single["user_id"], cols.single["ts"]
    n, S = len(ids), len(state.users)
    order = np.lexsort((ids, ts, u))  # chain order: user, then ts, then day order
    us, tss = u[order], ts[order]

    # One window store: state windows [0, S), today's [S, S + n), and an empty one at S + n.
    off = np.concatenate([state.offsets, cols.offsets[1:] + state.offsets[-1], [state.offsets[-1] + cols.offsets[-1]]])
    items = np.concatenate([state.items, cols.hist_items])
    cats = np.concatenate([state.cats, cols.hist_cats])
    cur = S + order
    same = np.zeros(n, dtype=bool)
    same[1:] = us[1:] == us[:-1]
    prev = np.empty(n, dtype=np.int64)
    prev_ts = np.empty(n, dtype=np.int64)
    prev[1:], prev_ts[1:] = S + order[:-1], tss[:-1]
    # The first impression of a user today follows its last window from earlier days, if any.
    sp = np.minimum(np.searchsorted(state.users, us), max(S - 1, 0))
    in_state = (state.users[sp] == us) if S else np.zeros(n, dtype=bool)
    first = ~same
    prev[first] = np.where(in_state[first], sp[first], S + n)
    prev_ts[first] = np.where(in_state[first], state.ts[sp[first]] if S else 0, np.iinfo(np.int64).min)
    back = tss < prev_ts
    if back.any():
        i = int(np.flatnonzero(back)[0])
        raise DataError(f"{where}: impression_id {ids[order[i]]} of user {us[i]} is at ts {tss[i]}, before the "
                        f"user's impression at ts {prev_ts[i]} of an earlier day")

    lens = np.diff(off)
    a, c = lens[prev], lens[cur]
    j = _max_overlap(L, off, _mix(items, cats), items, cats, prev, cur, a, c, where, ids[order], us)
    n_new = c - j
    # New behaviours must come after the previous impression: same ts, same history.
    clash = (n_new > 0) & (tss == prev_ts)
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        raise DataError(f"{where}: impression_id {ids[order[i]]} of user {us[i]} has another history than the "
                        f"user's impression at the same ts {tss[i]}; histories are not windows of one log")

    # Behaviours: the last n_new elements of each window, ts = impression ts - 1.
    starts = off[cur] + c - n_new
    bo = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_new, out=bo[1:])
    flat = np.repeat(starts - bo[:-1], n_new) + np.arange(bo[-1])
    beh = Behaviours(user_id=np.repeat(us, n_new), ts=np.repeat(tss - 1, n_new), item_id=items[flat],
                     category_id=cats[flat])

    # New state: each user's last window today, else the old one.
    last_today = np.flatnonzero(np.append(us[1:] != us[:-1], True)) if n else np.zeros(0, dtype=np.int64)
    keep_old = ~np.isin(state.users, us[last_today])
    users = np.concatenate([state.users[keep_old], us[last_today]])
    win = np.concatenate([np.flatnonzero(keep_old), S + order[last_today]])
    wts = np.concatenate([state.ts[keep_old], tss[last_today]])
    o = np.argsort(users, kind="stable")
    new_off, pos = _windows(off, win[o])
    return beh, _Windows(users[o], wts[o], new_off, items[pos], cats[pos])


def _max_overlap(
    L: int, off: np.ndarray, h: np.ndarray, items: np.ndarray, cats: np.ndarray,
    prev: np.ndarray, cur: np.ndarray, a: np.ndarray, c: np.ndarray, where: str,
    ids: np.ndarray, users: np.ndarray,
) -> np.ndarray:
    """``[k]`` largest ``j`` with ``cur[:j] == prev[a - j:]`` such that ``cur`` is the last
    ``L`` of ``prev + cur[j:]`` (pairs of windows ``prev`` / ``cur`` in the store ``off``).

    A window shorter than ``L`` is the whole log so far, so it must extend ``prev``
    (``j = a``); a full one may overlap ``prev`` by any ``j <= a`` (``j = 0`` always fits).
    """
    # Prefix hashes: H(w, t) = sum_{s < t} h[w][s] * BASE**s, as wrapping uint64 sums.
    pw = np.cumprod(np.full(L + 1, _BASE, dtype=np.uint64))
    pw = np.concatenate([[np.uint64(1)], pw[:-1]])
    ipw = np.cumprod(np.full(L + 1, _INV_BASE, dtype=np.uint64))
    ipw = np.concatenate([[np.uint64(1)], ipw[:-1]])
    lens = np.diff(off)
    pos = np.arange(len(h)) - np.repeat(off[:-1], lens)
    cs = np.concatenate([[np.uint64(0)], np.cumsum(h * pw[pos], dtype=np.uint64)])

    def prefix(w: np.ndarray, t: np.ndarray) -> np.ndarray:
        return cs[off[w] + t] - cs[off[w]]

    def suffix(w: np.ndarray, la: np.ndarray, t: np.ndarray) -> np.ndarray:
        s = la - t  # hash of w[s:la], rebased to power 0
        return (cs[off[w] + la] - cs[off[w] + s]) * ipw[s]

    k = len(prev)
    lo = np.where(c < L, a, 0)
    hi = np.minimum(a, c)
    count = np.maximum(hi - lo + 1, 0)
    best = np.full(k, -1, dtype=np.int64)
    # Identical windows (same request, or nothing new in between) are the common case.
    ident = (a == c) & (prefix(prev, a) == prefix(cur, c))
    idx = np.flatnonzero(ident)
    ident[idx[_verify(off, items, cats, prev[idx], cur[idx], a[idx], a[idx])]] = False  # hash collisions
    best[ident] = a[ident]
    todo = np.flatnonzero(~ident & (count > 0))
    rejected: set[tuple[int, int]] = set()
    while len(todo):
        ends = np.cumsum(count[todo])
        for s, e in _chunks(ends):
            p = todo[s:e]
            cnt = count[p]
            cstart = np.zeros(len(p) + 1, dtype=np.int64)
            np.cumsum(cnt, out=cstart[1:])
            rep = np.repeat(np.arange(len(p)), cnt)
            jj = np.repeat(hi[p], cnt) - (np.arange(cstart[-1]) - cstart[rep])  # descending per pair
            pr, cr, ar = prev[p][rep], cur[p][rep], a[p][rep]
            match = prefix(cr, jj) == suffix(pr, ar, jj)
            if rejected:
                match &= np.array([(int(x), int(y)) not in rejected for x, y in zip(p[rep], jj)])
            cand = np.where(match, jj, -1)
            best[p] = np.maximum.reduceat(cand, cstart[:-1])
        # Hash equality is not proof: check each pick element by element.
        wrong = _verify(off, items, cats, prev[todo], cur[todo], a[todo], best[todo])
        rejected |= {(int(todo[i]), int(best[todo[i]])) for i in np.flatnonzero(wrong)}
        todo = todo[wrong & (best[todo] >= 0)]
    bad = best < 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where}: the history of impression_id {ids[i]} (user {users[i]}) does not continue the user's "
            f"previous history; histories are not windows of one behaviour log"
        )
    return best


def _chunks(ends: np.ndarray) -> Iterator[tuple[int, int]]:
    """Split pairs (cumulative candidate counts ``ends``) into runs of at most ~_MAX_CANDIDATES."""
    s = 0
    while s < len(ends):
        base = ends[s - 1] if s else 0
        e = max(int(np.searchsorted(ends, base + _MAX_CANDIDATES, side="right")), s + 1)
        yield s, e
        s = e


def _verify(off: np.ndarray, items: np.ndarray, cats: np.ndarray, prev: np.ndarray, cur: np.ndarray,
            a: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``[k]`` bool: is ``cur[:j] != prev[a - j:a]`` (elementwise, items and categories)?"""
    j = np.maximum(j, 0)
    starts = np.zeros(len(j) + 1, dtype=np.int64)
    np.cumsum(j, out=starts[1:])
    rep = np.repeat(np.arange(len(j)), j)
    within = np.arange(starts[-1]) - starts[rep]
    ci = off[cur][rep] + within
    pi = off[prev][rep] + a[rep] - j[rep] + within
    diff = (items[ci] != items[pi]) | (cats[ci] != cats[pi])
    return np.bincount(rep[diff], minlength=len(j)) > 0


# --------------------------------------------------------------------------- joined -> rows


def joined_to_rows(cfg: JobConfig, src: Path, dst: Path, days: list[int], tmp: Path) -> ConvertSummary:
    """Join each bucket into a spill file (impression_id order), then cut the day's
    files by impression_id range, reading only the overlapping row groups of each spill."""
    reader = J.JoinedBatchReader(src, days, cfg.features, batch_size=1, allow_empty_days=cfg.data.allow_empty_days)
    schema = _spill_schema(cfg)
    rows_schema = table_schema(cfg.features)
    total = files = 0
    for day in days:
        spills: list[Path] = []
        n_day = 0
        for b in range(reader.num_buckets):
            path = tmp / f"{J.bucket_name(b)}.parquet"
            with pq.ParquetWriter(path, schema) as w:
                for ids, cols in reader.iter_bucket(day, b):
                    w.write_table(_to_table(schema, ids, cols), row_group_size=cfg.data.row_group_size)
                    n_day += len(ids)
            spills.append(path)
        R = cfg.data.rows_per_file
        day_dir = dst / day_dir_name(day)
        day_dir.mkdir(parents=True, exist_ok=True)
        pfs = [pq.ParquetFile(p) for p in spills]
        stats = [_id_ranges(pf) for pf in pfs]
        for k, lo in enumerate(range(0, n_day, R)):
            # One output file in memory at a time: the rows with ids [lo, hi) of every bucket.
            hi = min(lo + R, n_day)
            parts = []
            for pf, rng in zip(pfs, stats):
                for rg, (rlo, rhi) in enumerate(rng):
                    if rlo < hi and rhi >= lo:
                        t = pf.read_row_group(rg)
                        idv = t.column(J.IMPRESSION_ID).to_numpy()
                        parts.append(t.filter(pa.array((idv >= lo) & (idv < hi))))
            t = pa.concat_tables(parts)
            got = t.column(J.IMPRESSION_ID).to_numpy()
            o = np.argsort(got, kind="stable")
            if not np.array_equal(got[o], np.arange(lo, hi)):
                missing = np.setdiff1d(np.arange(lo, hi), got)
                what = f"missing {missing[0]}" if len(missing) else "duplicated"
                raise DataError(f"{src / day_dir_name(day)}: impression_id is not 0..{n_day - 1} across the "
                                f"buckets ({what}); cannot restore the per-row order")
            out = t.take(pa.array(o)).select(rows_schema.names).cast(rows_schema)
            write_parquet(out, day_dir / f"part-{k:05d}.parquet", cfg.data.row_group_size)
            files += 1
        if n_day == 0:  # an empty day stays a (0-row) day, as the importer writes one, not a bare directory
            write_parquet(rows_schema.empty_table(), day_dir / "part-00000.parquet", cfg.data.row_group_size)
            files += 1
        for pf in pfs:
            pf.close()
        for p in spills:
            p.unlink()
        total += n_day
    return ConvertSummary(days, total, 0, files)


def _id_ranges(pf: pq.ParquetFile) -> list[tuple[int, int]]:
    """(min, max) impression_id of each row group (from the statistics the writer keeps)."""
    idx = pf.schema_arrow.get_field_index(J.IMPRESSION_ID)
    out = []
    for rg in range(pf.metadata.num_row_groups):
        st = pf.metadata.row_group(rg).column(idx).statistics
        out.append((int(st.min), int(st.max)) if st is not None and st.has_min_max else (0, 1 << 62))
    return out
