"""Raw 64-bit ids -> embedding rows: ``dense``, ``hash`` and ``managed`` tables.

``features.id_mapping`` gives every table one of three mappings (unlisted: ``dense``):

* ``dense``: the ids are the row numbers ``0..N-1`` (the loader range-checks them).
* ``hash``: ``row = (splitmix64(id) >> 1) mod N`` (:func:`hash_rows`): SplitMix64's
  64-bit finalizer in wrapping int64 torch ops, the same on every machine, run and rank;
  no state. Distinct ids can share a row: with ``features.hash_collision_stats`` the
  table keeps the smallest raw id seen per row and counts the rows that have seen two or
  more ids (:class:`HashStats`).
* ``managed``: TorchRec's ``MCHManagedCollisionModule`` (zero-collision hashing,
  :class:`ManagedTable`): a sorted array of the raw ids the table holds and the row of
  each. Up to ``N - 1`` ids get a row of their own; row ``N - 1`` is shared by every id
  without one (not admitted yet, or unseen when evaluating). Ids are admitted in rounds,
  every ``features.zch.eviction_interval`` training steps; when the table is full the
  lowest-scored ids of ``features.zch.eviction_policy`` give up their rows to new ones,
  and ``features.zch.ttl_steps`` frees the rows of ids unseen for that many steps.
  Evaluation never changes the mapping. :class:`ManagedTable` computes exactly what
  TorchRec's module does (:class:`ReferenceManagedTable`) with a hash index beside the
  sorted array (:mod:`embeddings.id_index`) and cheaper rounds.

Where the mapping runs: :func:`attach_id_mapping` (called by ``build_model``) adds an
:class:`IdMapper` to the model and wraps its ``prepare_batch``: the model's own data-side
work (CDP's category filter, SIM's category search, the sequence models' last-N cut)
runs first, *on the raw ids*, then every KJT key that looks a table up is rewritten to
row numbers. Comparing raw category ids is exact whatever the mapping (two categories
that hash to one row stay distinct); the selected behaviours are then mapped with the
same table, so a history item and the same target item land on the same row. TWIN / QIN
score every behaviour with the item / category tables in ``forward``: they declare
``raw_id_features`` so their full history is mapped too.

Sharded training: the mapping runs before the batch reaches DistributedModelParallel,
so the sharded EmbeddingBagCollection only ever sees row numbers and shards like a dense
table (TorchRec's own sharded managed-collision EBC is not used; see
``docs/id_mapping.md``). Each rank holds a full replica of every managed table's state;
it stays identical on all ranks because every training step first all-gathers the raw
ids of the managed tables, and every rank admits the same global set (a managed table's
rounds depend only on the multiset of ids, not their order, so N ranks equal one
process fed the concatenated batches).

State: the managed tables' buffers (sorted raw ids, their rows, counts, last-seen step,
step counter, admitted / evicted totals) and the hash tables' collision statistics are
module buffers, so they are in ``state_dict()``: DCP checkpoints save them, a resume
continues the same mapping, a reshard to another world size loads them like any dense
buffer, and ``export`` writes ``tables/<table>.ids.npy`` (raw id, row) beside the table.

A row an id is admitted into (a never-used row or one freed by eviction) is reset before
the id uses it: weights to :func:`row_init` (the table's deterministic initial value for
that row: uniform in ±sqrt(1/N), from a hash of the table name, row and column), and
its optimizer state to zero when the optimizer is known (:func:`attach_optimizer`). A
returning id therefore starts from that fresh value, not from what it had learned. The
trainer defers each batch's resets to right before its forward (:class:`IdMapper`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from embeddings.id_index import EMPTY, IdIndex

INT64_MAX = 2**63 - 1
assert EMPTY == INT64_MAX  # TorchRec's marker of an empty managed slot; refused as a raw id


# --------------------------------------------------------------------------- hashing


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_SM1 = _signed(0xBF58476D1CE4E5B9)
_SM2 = _signed(0x94D049BB133111EB)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(ids: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 values, bit for bit the uint64 function.

    ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
    z ^= z >> 31`` with logical shifts and multiplication modulo 2**64 (int64 products
    wrap in two's complement). A bijection of the 64-bit values.
    """
    # In place on one copy plus one scratch buffer: at 8M ids, fresh temporaries per op made
    # it 3.5x slower (page faults of new 64 MB buffers; bench/id_mapping.py).
    x = ids.to(torch.int64, copy=True)
    t = torch.empty_like(x)
    for shift, mul in ((30, _SM1), (27, _SM2)):
        torch.bitwise_right_shift(x, shift, out=t)
        x.bitwise_xor_(t.bitwise_and_((1 << (64 - shift)) - 1)).mul_(mul)
    torch.bitwise_right_shift(x, 31, out=t)
    return x.bitwise_xor_(t.bitwise_and_((1 << 33) - 1))


def hash_rows(ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row of each raw id in a ``hash`` table of ``num_rows`` rows: ``(mix64(id) >> 1) mod num_rows``.

    Any int64 is a valid id (negative ones too). The top 63 bits of the hash are taken so
    the modulo acts on a non-negative value, as it would in uint64 arithmetic.
    """
    return mix64(ids).bitwise_right_shift_(1).bitwise_and_(INT64_MAX).remainder_(num_rows)


def _name_seed(name: str) -> int:
    """FNV-1a 64 of a table name (stable across processes, unlike ``hash(str)``)."""
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return _signed(h)


def row_init(table: str, rows: torch.Tensor, dim: int, num_rows: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic initial value ``[len(rows), dim]`` of rows of a mapped table.

    Uniform in ``[-sqrt(1/N), sqrt(1/N))`` like TorchRec's default table init, but drawn
    from ``mix64(seed(table) ^ (row * dim + column))`` instead of the RNG: the same on
    every rank and after a resume, and it consumes no random numbers.
    """
    rows = rows.to(torch.int64)
    x = rows[:, None] * dim + torch.arange(dim, dtype=torch.int64, device=rows.device)
    u = _srl(mix64(x ^ _name_seed(table)), 11).to(torch.float64) * 2.0**-53
    bound = math.sqrt(1.0 / num_rows)
    return ((2 * u - 1) * bound).to(dtype)


# --------------------------------------------------------------------------- managed


class _KthSelect:
    """TorchRec's choice of evicted and admitted ids, without sorting every score.

    TorchRec argsorts all ``pivot + m`` scores (the table's and the ``m`` new ids') every
    round, descending and stable, and keeps the top ``pivot``. Only the bottom ``m`` matter:
    they are the ``m`` smallest under (score ascending, index descending), found with one
    ``kthvalue`` and a tie cut. The two outputs are then put in TorchRec's order (score
    descending, index ascending) by sorting those few; the k-th evicted slot receives the
    k-th selected id, so the order is part of the result. Equal to TorchRec's bit for bit
    (``tests/test_id_mapping.py``).
    """

    def _compute_selected_eviction_and_replacement_indices(
        self, pivot: int, eviction_scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = eviction_scores.numel() - pivot
        if m <= 0:
            empty = torch.empty(0, dtype=torch.int64, device=eviction_scores.device)
            return empty, empty
        v = torch.kthvalue(eviction_scores, m).values
        bottom = eviction_scores < v
        ties = (eviction_scores == v).nonzero().squeeze(1)
        bottom[ties[ties.numel() - (m - int(bottom.sum())):]] = True  # ties: the largest indices sort last
        index = torch.arange(eviction_scores.numel(), device=eviction_scores.device)
        evicted = index[:pivot][bottom[:pivot]]
        selected = index[pivot:][~bottom[pivot:]]

        def ordered(i: torch.Tensor) -> torch.Tensor:  # (score desc, index asc): i is ascending
            return i[torch.argsort(eviction_scores[i], descending=True, stable=True)]

        return ordered(evicted), ordered(selected) - pivot


class FastDistanceLFU(_KthSelect, DistanceLFU_EvictionPolicy):
    pass


class FastLRU(_KthSelect, LRU_EvictionPolicy):
    pass


class FastLFU(_KthSelect, LFU_EvictionPolicy):
    pass


def eviction_policy(name: str, decay_exponent: float = 1.0, fast: bool = True) -> MCHEvictionPolicy:
    """TorchRec's policy ``name``; ``fast``: the same policy with :class:`_KthSelect`."""
    if name == "distance_lfu":
        return (FastDistanceLFU if fast else DistanceLFU_EvictionPolicy)(decay_exponent=decay_exponent)
    if name == "lru":
        return (FastLRU if fast else LRU_EvictionPolicy)(decay_exponent=decay_exponent)
    if name == "lfu":
        return (FastLFU if fast else LFU_EvictionPolicy)()
    raise ValueError(f"unknown eviction policy {name!r}")


class ReferenceManagedTable(MCHManagedCollisionModule):
    """TorchRec's ``MCHManagedCollisionModule`` with four changes (torchrec 1.8):

    * the history buffer grows when a step brings more ids than it has room for (the
      original sizes it from the first batch and silently drops the overflow, so a batch
      with longer histories would leave ids unadmitted);
    * rounds run at steps that are multiples of ``eviction_interval`` counted from the
      table's persistent step counter, so a resumed run keeps the same schedule (the
      original counts from the process's first step);
    * ``ttl_steps`` > 0 frees, before each round, the rows of ids unseen for more than
      that many steps;
    * persistent counters of admitted, evicted (a held id displaced by a new one) and
      expired (freed by the TTL) ids, for the per-day report.

    A table of ``zch_size`` rows holds at most ``zch_size - 1`` ids; row ``zch_size - 1``
    is the shared row of ids without one. Training uses :class:`ManagedTable`, the same
    mapping computed faster; this class is its reference (parity tests).
    """

    def __init__(self, name: str, zch_size: int, policy: MCHEvictionPolicy, eviction_interval: int,
                 ttl_steps: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(zch_size=zch_size, device=torch.device(device), eviction_policy=policy,
                         eviction_interval=eviction_interval, name=name)
        self.ttl_steps = ttl_steps
        for counter in ("_admitted_total", "_evicted_total", "_expired_total"):
            self.register_buffer(counter, torch.zeros(1, dtype=torch.int64, device=self.device))

    # ------------------------------------------------------------------ state

    def _apply(self, fn: Any, recurse: bool = True) -> "ReferenceManagedTable":
        # ``.to()`` / ``to_empty()`` replace the buffers; the policy's metadata dicts (and the
        # segment tensor validate_state restores) must follow, or they point at stale tensors.
        out = super()._apply(fn, recurse)
        for name in list(self._mch_metadata):
            self._mch_metadata[name] = getattr(self, "_mch_" + name)
        for name in list(self._history_metadata):
            self._history_metadata[name] = getattr(self, "_history_" + name)
        self._init_output_segments_tensor = self._output_segments_tensor
        self._device = self._mch_sorted_raw_ids.device
        return out

    @torch.no_grad()
    def init_state(self) -> None:
        """An empty table, in place: for buffers materialised from the meta device (zeros)."""
        start = self._output_global_offset
        self._mch_sorted_raw_ids.fill_(EMPTY)
        self._mch_remapped_ids_mapping.copy_(torch.arange(start, start + self._zch_size))
        for buf in self._mch_metadata.values():
            buf.zero_()
        self._mch_slots.fill_(self._zch_size - 1)
        self._delimiter.fill_(EMPTY)
        segments = torch.full_like(self._output_segments_tensor, -1)
        segments[0], segments[1] = start, start + self._zch_size
        self._output_segments_tensor.copy_(segments)
        for buf in (self._current_iter_tensor, self._admitted_total, self._evicted_total, self._expired_total):
            buf.zero_()
        self._current_iter = -1
        self._evicted = False

    # ------------------------------------------------------------------ history

    def _reserve(self, n: int) -> None:
        """Room for ``n`` more ids in the history buffers (allocated on first use, grown by doubling)."""
        need = self._current_history_buffer_offset + n
        if self._input_history_buffer_size == -1:
            size = max(int(n * self._eviction_interval * 1.25), 1)
        elif need > self._input_history_buffer_size:
            size = max(2 * self._input_history_buffer_size, need)
        else:
            return
        used = self._current_history_buffer_offset
        old = getattr(self, "_history_accumulator", None)
        acc = torch.empty(size, dtype=torch.int64, device=self.device)
        if old is not None and used:
            acc[:used] = old[:used]
        self._history_accumulator = acc
        for name, is_mch, is_history in self._eviction_policy.metadata_info:
            if is_history:
                buf = torch.zeros(size, dtype=torch.int64, device=self.device)
                old_buf = self._history_metadata.get(name)
                if old_buf is not None and used:
                    buf[:used] = old_buf[:used]
                self.register_buffer("_history_" + name, buf, persistent=False)
                self._history_metadata[name] = buf
        self._input_history_buffer_size = size

    def profile(self, features: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:  # type: ignore[override]
        """Record the ids of one training step; run a round at multiples of the interval."""
        if not self.training:
            return features
        if self._current_iter == -1:
            self._current_iter = int(self._current_iter_tensor.item())
        self._current_iter += 1
        self._current_iter_tensor.data += 1
        self._reserve(sum(f.values().numel() for f in features.values()))
        for feature in features.values():
            values = feature.values()
            start, n = self._current_history_buffer_offset, values.numel()
            self._history_accumulator[start:start + n] = values
            self._eviction_policy.record_history_metadata(
                self._current_iter, values,
                {k: buf[start:start + n] for k, buf in self._history_metadata.items()},
            )
            self._current_history_buffer_offset += n
        if self._current_iter % self._eviction_interval == 0:
            self._expire()
            if self._current_history_buffer_offset:
                self._coalesce_history()
            self._last_eviction_iter = self._current_iter
        return features

    # ------------------------------------------------------------------ rounds

    def _pending(self, rows: torch.Tensor) -> None:
        """Add ``rows`` to the rows :meth:`evict` hands out (to be reset before reuse)."""
        if self._evicted:
            rows = torch.unique(torch.cat([self._evicted_emb_indices.to(torch.int64), rows]))
        self._evicted_emb_indices = rows
        self._evicted = True

    @torch.no_grad()
    def _expire(self) -> None:
        if not self.ttl_steps:
            return
        last = self._mch_metadata["last_access_iter"]
        stale = (self._mch_sorted_raw_ids != EMPTY) & (last < self._current_iter - self.ttl_steps)
        n = int(stale.sum())
        if not n:
            return
        self._mch_sorted_raw_ids[stale] = EMPTY
        for buf in self._mch_metadata.values():
            buf[stale] = 0
        self._expired_total += n
        self._pending(self._mch_remapped_ids_mapping[stale])
        self._sort_mch_buffers()

    @torch.no_grad()
    def _update_and_evict(self, uniq_ids: torch.Tensor, uniq_ids_counts: torch.Tensor,
                          uniq_ids_metadata: dict[str, torch.Tensor]) -> None:
        # torchrec 1.8's MCHManagedCollisionModule._update_and_evict, plus the counters.
        order = torch.argsort(uniq_ids_counts, descending=True, stable=True)
        ids, counts = uniq_ids[order], uniq_ids_counts[order]
        matching, matched = self._match_indices(self._mch_sorted_raw_ids, ids)
        new_ids = ids[~matching]
        evicted, selected = self._eviction_policy.update_metadata_and_generate_eviction_scores(
            self._current_iter, self._zch_size, order, counts, matching, matched, self._mch_metadata,
            uniq_ids_metadata,
        )
        self._evicted_total += int((self._mch_sorted_raw_ids[evicted] != EMPTY).sum())
        self._admitted_total += int(selected.numel())
        self._mch_sorted_raw_ids[evicted] = new_ids[selected]
        self._pending(self._mch_remapped_ids_mapping[evicted])
        self._sort_mch_buffers()

    # ------------------------------------------------------------------ inspection

    def occupied(self) -> int:
        """Ids holding a row of their own."""
        return int(torch.searchsorted(self._mch_sorted_raw_ids, self._delimiter))

    def id_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(raw ids [n], rows [n])`` of the held ids, ascending by raw id."""
        n = self.occupied()
        return self._mch_sorted_raw_ids[:n].clone(), self._mch_remapped_ids_mapping[:n].clone()


class ManagedTable(ReferenceManagedTable):
    """:class:`ReferenceManagedTable`'s mapping, state and rounds, computed faster.

    The state (sorted ids, rows, policy metadata, counters) and every result (rows, admitted
    and evicted ids, the rows handed out, in which order) are those of the reference; what
    changes is how they are computed (bench/id_mapping.py has the costs):

    * **lookups** go through an :class:`~embeddings.id_index.IdIndex` (a hash index of the
      held ids beside the sorted array, updated at each round, rebuilt whenever the buffers
      changed behind its back: a checkpoint load, ``.to()``, ``init_state``) instead of a
      binary search per id;
    * **recording** a step: an id the table holds adds 1 to its row's count for the
      interval (and stamps the step: ``last`` below); only the others (misses) go to the
      history buffer. A round therefore sorts the misses' ids, not every id of the
      interval, and gives the policy the held ids' counts directly. Exact because the table
      only changes in rounds: between two rounds an id is a hit at every step or at none;
    * the round's **re-sort** merges the admitted ids into the kept ones (kept ones are still
      in order) instead of argsorting the whole table: the same permutation as the stable
      sort, since admitted ids are distinct and tie with nothing;
    * the policy's **selection** is :class:`_KthSelect` when built by :func:`eviction_policy`;
    * :meth:`record_and_remap` maps a training step with the lookup its recording already
      did, looking up again only ids whose row the round changed.
    """

    def __init__(self, name: str, zch_size: int, policy: MCHEvictionPolicy, eviction_interval: int,
                 ttl_steps: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(name, zch_size, policy, eviction_interval, ttl_steps, device)
        history = {m.metadata_name for m in policy.metadata_info if m.is_history_metadata}
        if not history <= {"last_access_iter"}:
            raise ValueError(f"table {name!r}: eviction policy {type(policy).__name__} records history metadata "
                             f"{sorted(history)}; ManagedTable knows only last_access_iter")
        self._track_last = bool(history)
        self._index: IdIndex | None = None
        self._index_key: tuple[int, ...] = ()
        self._hits: torch.Tensor | None = None  # [zch] times each row's id was seen this interval
        self._hit_last: torch.Tensor | None = None  # [zch] last step a row's id was seen (interval > 1)
        self._hit_before: torch.Tensor | None = None  # [zch] scratch: counts before this step's ids
        self._recorded = False  # ids recorded since the last round
        self._handed: list[torch.Tensor] = []  # rows handed out (to be reset) in this round

    # ------------------------------------------------------------------ state

    def _apply(self, fn: Any, recurse: bool = True) -> "ManagedTable":
        out = super()._apply(fn, recurse)
        self._index = None
        for name in ("_hits", "_hit_last", "_hit_before"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(self._device))
        return out

    def init_state(self) -> None:
        super().init_state()
        self._index, self._hits, self._hit_last, self._recorded = None, None, None, False

    @property
    def _miss_row(self) -> int:
        return self._output_global_offset + self._zch_size - 1

    def _buffers_key(self) -> tuple[int, ...]:
        ids, rows = self._mch_sorted_raw_ids, self._mch_remapped_ids_mapping
        return ids.data_ptr(), ids._version, rows.data_ptr(), rows._version

    def _synced_index(self) -> IdIndex | None:
        """The index, if it still matches the buffers (else None: it is rebuilt on next use)."""
        return self._index if self._index is not None and self._index_key == self._buffers_key() else None

    def _lookup_index(self) -> IdIndex:
        index = self._synced_index()
        if index is None:
            if self._output_global_offset:
                raise NotImplementedError("ManagedTable: a row range not starting at 0 (TorchRec's sharded MC "
                                          "modules) is not supported")
            index = self._index
            if index is None or index.device != self._device:
                index = IdIndex(self._zch_size - 1, self._miss_row, self._device)
            index.clear()
            n = self.occupied()
            # Most-seen (or most recent) ids first: they get their home slot, one gather away.
            meta = self._mch_metadata
            priority = (meta["counts"] if "counts" in meta else meta["last_access_iter"])[:n]
            order = torch.argsort(priority, descending=True, stable=True)
            index.insert(self._mch_sorted_raw_ids[:n][order], self._mch_remapped_ids_mapping[:n][order])
            self._index, self._index_key = index, self._buffers_key()
        return index

    def _sorted_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` by binary search in the sorted array (the reference; the index's fallback)."""
        pos = torch.searchsorted(self._mch_sorted_raw_ids[:-1], ids)
        hit = self._mch_sorted_raw_ids[pos] == ids
        return torch.where(hit, self._mch_remapped_ids_mapping[pos], self._miss_row)

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each raw id ``[n]`` (the shared row for ids the table does not hold)."""
        return self._lookup_index().lookup(ids, self._sorted_rows)

    def remap(self, features: dict[str, JaggedTensor], mutate_miss_lengths: bool = True,  # type: ignore[override]
              write_weights: torch.Tensor | None = None) -> dict[str, JaggedTensor]:
        return {name: JaggedTensor(values=self.lookup(f.values()), lengths=f.lengths(), offsets=f.offsets(),
                                   weights=f.weights_or_none()) for name, f in features.items()}

    # ------------------------------------------------------------------ recording

    def _tick(self) -> None:
        if self._current_iter == -1:
            self._current_iter = int(self._current_iter_tensor.item())
        self._current_iter += 1
        self._current_iter_tensor.data += 1

    @torch.no_grad()
    def _record(self, ids: torch.Tensor) -> torch.Tensor:
        """Record one feature's ids of this step; returns their rows ``[n]`` before any round."""
        rows = self.lookup(ids)
        if not ids.numel():
            return rows
        self._recorded = True
        if self._hits is None:
            self._hits = torch.zeros(self._zch_size, dtype=torch.int64, device=self._device)
        one = torch.ones(1, dtype=torch.int64, device=self._device).expand(rows.numel())
        if self._track_last and self._eviction_interval > 1:
            if self._hit_last is None:
                self._hit_last = torch.zeros_like(self._hits)
            if rows.numel() >= self._zch_size:
                # Which rows this step hit, from the counts' change: 3 passes over the table
                # instead of a second scatter of every id (the step's ids outnumber the rows).
                self._hit_before = before = (self._hit_before if self._hit_before is not None
                                             else torch.empty_like(self._hits)).copy_(self._hits)
                self._hits.index_add_(0, rows, one)
                self._hit_last.masked_fill_(self._hits != before, self._current_iter)
            else:
                self._hits.index_add_(0, rows, one)
                self._hit_last.index_fill_(0, rows, self._current_iter)
        else:
            self._hits.index_add_(0, rows, one)  # interval 1: every hit is this step's
        miss = rows == self._miss_row
        if bool(miss.any()):
            values = ids[miss]
            self._reserve(values.numel())
            start, n = self._current_history_buffer_offset, values.numel()
            self._history_accumulator[start:start + n] = values
            self._eviction_policy.record_history_metadata(
                self._current_iter, values, {k: buf[start:start + n] for k, buf in self._history_metadata.items()})
            self._current_history_buffer_offset += n
        return rows

    def profile(self, features: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:  # type: ignore[override]
        if not self.training:
            return features
        self._tick()
        for feature in features.values():
            self._record(feature.values())
        if self._current_iter % self._eviction_interval == 0:
            self._round()
        return features

    @torch.no_grad()
    def record_and_remap(self, ids: torch.Tensor, local: slice | None = None) -> torch.Tensor:
        """One training step: record ``ids`` (every rank's), run the round if due, and return
        the rows of ``ids[local]`` (this rank's; default all) after it, as :meth:`profile`
        then :meth:`remap` would, with one lookup instead of two."""
        self._tick()
        rows = self._record(ids)
        local = local if local is not None else slice(0, ids.numel())
        out, ids = rows[local], ids[local]
        if self._current_iter % self._eviction_interval:
            return out
        self._round()
        if any(h.numel() for h in self._handed):
            # Only ids without a row before the round, or whose row it handed out, may have moved.
            changed = torch.zeros(self._zch_size, dtype=torch.bool, device=self._device)
            changed[torch.cat(self._handed)] = True
            changed[self._miss_row] = True
            redo = changed[out].nonzero().squeeze(1)
            if redo.numel():
                out[redo] = self.lookup(ids[redo])
        return out

    # ------------------------------------------------------------------ rounds

    def _pending(self, rows: torch.Tensor) -> None:
        super()._pending(rows)
        self._handed.append(rows.to(torch.int64))

    @torch.no_grad()
    def _row_positions(self) -> torch.Tensor:
        """Position in the sorted arrays of every row ``[zch]``."""
        pos = torch.empty_like(self._mch_remapped_ids_mapping)
        pos[self._mch_remapped_ids_mapping - self._output_global_offset] = torch.arange(
            self._zch_size, device=self._device)
        return pos

    @torch.no_grad()
    def _round(self) -> None:
        """TTL expiry, then admission / eviction over the interval's ids (the reference's
        ``_expire`` + ``_coalesce_history`` + ``_update_and_evict``)."""
        self._handed = []
        recorded, self._recorded = self._recorded, False
        if recorded:
            hits = self._hits
            hits[self._miss_row] = 0  # the misses' sink
            h_rows = hits.nonzero().squeeze(1)
            h_cnt = hits[h_rows]
            hits.zero_()
            h_last = (self._hit_last[h_rows] if self._hit_last is not None
                      else torch.full_like(h_rows, self._current_iter))
            h_ids = self._mch_sorted_raw_ids[self._row_positions()[h_rows]]
            n_ids, n_cnt, n_last = self._coalesce_misses()
        self._expire()
        if recorded:
            h_pos = self._row_positions()[h_rows]
            if self._handed:  # the TTL freed some of the interval's ids: they are new again
                gone = self._mch_sorted_raw_ids[h_pos] != h_ids
                if bool(gone.any()):
                    n_ids = torch.cat([n_ids, h_ids[gone]])
                    order = torch.argsort(n_ids)
                    n_ids, n_cnt, n_last = n_ids[order], torch.cat([n_cnt, h_cnt[gone]])[order], \
                        torch.cat([n_last, h_last[gone]])[order]
                    h_pos, h_cnt, h_last = h_pos[~gone], h_cnt[~gone], h_last[~gone]
            self._admit(h_pos, h_cnt, h_last, n_ids, n_cnt, n_last)
        self._last_eviction_iter = self._current_iter

    def _coalesce_misses(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The interval's ids the table did not hold: (ids ascending, counts, last step seen)."""
        used = self._current_history_buffer_offset
        self._current_history_buffer_offset = 0
        if not used:
            empty = torch.empty(0, dtype=torch.int64, device=self._device)
            return empty, empty, empty
        ids, inverse, counts = torch.unique(self._history_accumulator[:used], return_inverse=True,
                                            return_counts=True)
        meta = self._eviction_policy.coalesce_history_metadata(
            self._current_iter, {k: buf[:used] for k, buf in self._history_metadata.items()}, counts, inverse)
        return ids, counts, meta.get("last_access_iter", torch.full_like(counts, self._current_iter))

    def _admit(self, h_pos: torch.Tensor, h_cnt: torch.Tensor, h_last: torch.Tensor,
               n_ids: torch.Tensor, n_cnt: torch.Tensor, n_last: torch.Tensor) -> None:
        """The reference's ``_update_and_evict`` given the held ids' positions ``h_pos`` and
        the new ids ``n_ids`` (ascending), each with its count and last step.

        TorchRec orders the round's ids by count (descending, stable over ascending ids) and
        passes the policy that order: the held ids' order only pairs them with their own
        counts (distinct positions), the new ids' order breaks ties, so only theirs is sorted.
        """
        index = self._synced_index()
        order = torch.argsort(n_cnt, descending=True, stable=True)
        new_ids = n_ids[order]
        n_h, n_n = h_pos.numel(), new_ids.numel()
        matching = torch.zeros(n_h + n_n, dtype=torch.bool, device=self._device)
        matching[:n_h] = True
        meta = {"last_access_iter": torch.cat([h_last, n_last[order]])} if self._track_last else {}
        evicted, selected = self._eviction_policy.update_metadata_and_generate_eviction_scores(
            self._current_iter, self._zch_size, torch.arange(n_h + n_n, device=self._device),
            torch.cat([h_cnt, n_cnt[order]]), matching, h_pos, self._mch_metadata, meta)
        displaced = self._mch_sorted_raw_ids[evicted]
        held = displaced != EMPTY
        self._evicted_total += int(held.sum())
        self._admitted_total += int(selected.numel())
        admitted, rows = new_ids[selected], self._mch_remapped_ids_mapping[evicted]
        self._pending(rows)  # also when empty, as the reference (its evict() then returns a tensor)
        if not evicted.numel():
            return  # (an empty write would still bump the buffer's version and drop the index)
        self._mch_sorted_raw_ids[evicted] = admitted
        self._merge_sorted(evicted)
        if index is not None:  # else it is rebuilt at the next lookup
            index.delete(displaced[held])
            index.insert(admitted, rows)
            if not index.too_full():
                self._index_key = self._buffers_key()

    @torch.no_grad()
    def _merge_sorted(self, changed: torch.Tensor) -> None:
        """Re-sort the buffers after the ids at positions ``changed`` were replaced by new,
        distinct, non-empty ids: the permutation of a stable argsort, in O(zch) passes."""
        ids = self._mch_sorted_raw_ids
        n, m = ids.numel(), changed.numel()
        keep = torch.ones(n, dtype=torch.bool, device=self._device)
        keep[changed] = False
        kept = keep.nonzero().squeeze(1)  # ascending: their ids are still in order
        new_keys, order = torch.sort(ids[changed])
        moved = changed[order]
        before = torch.searchsorted(ids[kept], new_keys)  # kept ids smaller than each new id
        perm = torch.empty(n, dtype=torch.int64, device=self._device)
        perm[before + torch.arange(m, device=self._device)] = moved
        shift = torch.bincount(before, minlength=n - m + 1)[: n - m].cumsum_(0)
        perm[torch.arange(n - m, device=self._device) + shift] = kept
        for buf in (ids, self._mch_remapped_ids_mapping, *self._mch_metadata.values()):
            buf.copy_(buf[perm])

    @torch.no_grad()
    def _expire(self) -> None:
        if not self.ttl_steps:
            return
        index = self._synced_index()
        stale = (self._mch_sorted_raw_ids != EMPTY) & (
            self._mch_metadata["last_access_iter"] < self._current_iter - self.ttl_steps)
        gone = self._mch_sorted_raw_ids[stale]
        if not gone.numel():
            return
        super()._expire()
        if index is not None:
            index.delete(gone)
            self._index_key = self._buffers_key()


# --------------------------------------------------------------------------- hash statistics


class HashStats(nn.Module):
    """Collision statistics of a ``hash`` table: per row the smallest raw id seen and
    whether another id was seen there too (exact, for the ids of training steps)."""

    def __init__(self, num_rows: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.register_buffer("owner", torch.full((num_rows,), EMPTY, dtype=torch.int64, device=device))
        self.register_buffer("shared", torch.zeros(num_rows, dtype=torch.bool, device=device))

    @torch.no_grad()
    def update(self, ids: torch.Tensor, num_rows: int) -> None:
        """Record a step's ids (repeats allowed: no ``unique`` needed, which would sort them)."""
        rows = hash_rows(ids, num_rows)
        before = self.owner[rows]
        self.owner.scatter_reduce_(0, rows, ids, reduce="amin", include_self=True)
        after = self.owner[rows]
        self.shared[rows[(ids != after) | ((before != EMPTY) & (before != after))]] = True

    def occupied(self) -> int:
        return int((self.owner != EMPTY).sum())

    def shared_rows(self) -> int:
        return int(self.shared.sum())


# --------------------------------------------------------------------------- the mapper


@dataclass(frozen=True)
class MappedTable:
    """A non-dense table: its name, mapping (``hash`` / ``managed``), rows, width and the
    KJT keys whose ids look it up."""

    name: str
    kind: str
    num_rows: int
    dim: int
    features: tuple[str, ...]


RowReset = Callable[[str, torch.Tensor], None]


class IdMapper(nn.Module):
    """Rewrites the raw ids of a KJT's hash / managed features to row numbers.

    ``forward(kjt)`` returns a new KJT (the input is not modified); keys of dense tables and
    keys that look no table up pass through. In training mode the managed tables record the
    step's ids (all ranks' ids when ``torch.distributed`` runs with more than one rank) and
    may admit / evict; the rows handed to new ids are then reset through ``row_reset``:
    at once, or with ``defer_resets`` (set by :func:`attach_optimizer` for a training loop)
    when :func:`apply_deferred_resets` runs before that batch's forward.

    Why deferred: a pipelined loop (TorchRec's TrainPipelineSparseDist) prepares batch
    ``j + 2`` before the update of batch ``j``; resetting a row then would let the updates of
    ``j`` and ``j + 1`` (by the id that just lost it) land in the new id's fresh row, and the
    result would depend on where the pipeline drains (checkpoints, validation) - a resumed
    run would differ from an uninterrupted one. Deferred, every reset happens after the
    previous step's update, as in an unpipelined loop.
    """

    def __init__(self, tables: list[MappedTable], zch: Any, hash_collision_stats: bool = True,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.specs = {t.name: t for t in tables}
        self.managed = nn.ModuleDict({
            t.name: ManagedTable(t.name, t.num_rows, eviction_policy(zch.eviction_policy, zch.decay_exponent),
                                 zch.eviction_interval, zch.ttl_steps, device)
            for t in tables if t.kind == "managed"
        })
        self.hashed = nn.ModuleDict({
            t.name: HashStats(t.num_rows, device) for t in tables if t.kind == "hash" and hash_collision_stats
        })
        self.feature_table = {f: t.name for t in tables for f in t.features}
        self.row_reset: RowReset | None = None
        self.defer_resets = False
        self._resets: deque[list[tuple[str, torch.Tensor]]] = deque()  # per prepared training batch
        self._built_on_meta = torch.device(device).type == "meta"

    def materialize(self) -> None:
        """Give buffers that were built on the meta device (``sharding.init: sharded``) and then
        materialised as zeros by DistributedModelParallel their empty-table values."""
        if not self._built_on_meta or any(b.is_meta for b in self.buffers()):
            return
        for mc in self.managed.values():
            mc.init_state()
        for h in self.hashed.values():
            h.owner.fill_(EMPTY)
            h.shared.zero_()
        self._built_on_meta = False

    def extra_repr(self) -> str:
        return ", ".join(f"{t.name}: {t.kind} ({t.num_rows} rows)" for t in self.specs.values())

    def _stateful(self) -> list[str]:
        return [*self.managed.keys(), *self.hashed.keys()]

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        resets: list[tuple[str, torch.Tensor]] = []
        if self.training and self.defer_resets:
            self._resets.append(resets)  # one entry per training batch, filled by _record
        keys = kjt.keys()
        if not any(k in self.feature_table for k in keys):
            return kjt
        values = kjt.values()
        offsets = kjt.offset_per_key()
        pieces: list[torch.Tensor] = [values[offsets[i]:offsets[i + 1]] for i in range(len(keys))]
        by_table: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k in self.feature_table:
                by_table.setdefault(self.feature_table[k], []).append(i)
        local = {t: torch.cat([pieces[i] for i in idx]) if len(idx) > 1 else pieces[idx[0]]
                 for t, idx in by_table.items()}
        for t in self.managed.keys() & local.keys():
            if bool((local[t] == EMPTY).any()):
                raise ValueError(f"table {t!r}: raw id {EMPTY} (2**63 - 1) is reserved (TorchRec's empty-slot "
                                 "marker in managed tables)")
        trained = self._record({t: local[t] for t in self._stateful() if t in local}, resets) if self.training else {}
        for t, idx in by_table.items():
            spec = self.specs[t]
            if spec.kind == "hash":
                rows = hash_rows(local[t], spec.num_rows)
            elif t in trained:
                rows = trained[t]
            else:
                mc = self.managed[t]
                rows = mc.lookup(local[t].to(mc._mch_sorted_raw_ids.device))  # CUDA: DMP moved the state
                rows = rows.to(local[t].device)
            start = 0
            for i in idx:
                n = pieces[i].numel()
                pieces[i] = rows[start:start + n]
                start += n
        return KeyedJaggedTensor(keys=keys, values=torch.cat(pieces) if pieces else values,
                                 lengths=kjt.lengths(), stride=kjt.stride())

    @torch.no_grad()
    def _record(self, ids: dict[str, torch.Tensor], resets: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Training step: every managed table records this step's ids (all ranks') and
        returns the rows of this rank's, hash tables update their statistics, and rows
        handed to new ids are reset (or, deferred, added to ``resets``). Returns
        ``{managed table: rows [n]}`` of ``ids``."""
        if not ids:
            return {}
        home = {t: v.device for t, v in ids.items()}
        ids, starts = _gather_global(ids)
        out: dict[str, torch.Tensor] = {}
        for t, values in ids.items():
            if t in self.hashed:
                self.hashed[t].update(values.to(self.hashed[t].owner.device), self.specs[t].num_rows)
                continue
            mc = self.managed[t]
            values = values.to(mc._mch_sorted_raw_ids.device)
            lo, hi = starts[t]
            out[t] = mc.record_and_remap(values, slice(lo, hi)).to(home[t])
            rows = mc.evict()
            if rows is not None and rows.numel() and self.row_reset is not None:
                if self.defer_resets:
                    resets.append((t, rows.to(torch.int64)))
                else:
                    self.row_reset(t, rows.to(torch.int64))
        return out

    def apply_resets(self) -> None:
        """Reset the rows handed out while preparing the oldest prepared training batch not
        yet run (deferred mode); call right before that batch's forward."""
        if self._resets:
            for table, rows in self._resets.popleft():
                if self.row_reset is not None:
                    self.row_reset(table, rows)

    def table_stats(self) -> dict[str, dict[str, Any]]:
        """Per mapped table: mapping, rows and occupancy (+ admitted / evicted / expired
        totals for managed, rows shared by >= 2 ids for hash with statistics)."""
        out: dict[str, dict[str, Any]] = {}
        for name, spec in self.specs.items():
            s: dict[str, Any] = {"mapping": spec.kind, "rows": spec.num_rows}
            if name in self.managed:
                mc = self.managed[name]
                s.update(capacity=spec.num_rows - 1, occupied=mc.occupied(),
                         admitted_total=int(mc._admitted_total), evicted_total=int(mc._evicted_total),
                         expired_total=int(mc._expired_total), step=int(mc._current_iter_tensor))
            elif name in self.hashed:
                h = self.hashed[name]
                s.update(occupied=h.occupied(), shared_rows=h.shared_rows())
            out[name] = s
        return out


def _gather_global(ids: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Each table's ids of every rank, concatenated in rank order (two all-gathers), and
    where this rank's ids lie in it (``{table: (start, end)}``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids, {t: (0, v.numel()) for t, v in ids.items()}
    world = dist.get_world_size()
    names = list(ids)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = torch.tensor([ids[t].numel() for t in names], dtype=torch.int64, device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    totals = [int(s.sum()) for s in all_sizes]
    longest = max(totals)
    payload = torch.zeros(longest, dtype=torch.int64, device=device)
    mine = torch.cat([ids[t] for t in names]).to(device)
    payload[:mine.numel()] = mine
    gathered = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(gathered, payload)
    out: dict[str, list[torch.Tensor]] = {t: [] for t in names}
    for rank_sizes, buf in zip(all_sizes, gathered):
        for t, part in zip(names, torch.split(buf[:int(rank_sizes.sum())], rank_sizes.tolist())):
            out[t].append(part)
    home = next(iter(ids.values())).device
    rank = dist.get_rank()
    starts = {t: sum(int(all_sizes[r][i]) for r in range(rank)) for i, t in enumerate(names)}
    return ({t: torch.cat(parts).to(home) for t, parts in out.items()},
            {t: (starts[t], starts[t] + ids[t].numel()) for t in names})


# --------------------------------------------------------------------------- attaching to a model


def model_tables(model: nn.Module) -> dict[str, tuple[int, int, tuple[str, ...]]]:
    """Table name -> (rows, dim, KJT features) over the model's EBC / EC modules (unsharded)."""
    found: dict[str, tuple[int, int, tuple[str, ...]]] = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            configs: list[Any] = list(module.embedding_bag_configs())
        elif isinstance(module, EmbeddingCollection):
            configs = list(module.embedding_configs())
        else:
            continue
        for c in configs:
            rows, dim, feats = found.get(c.name, (c.num_embeddings, c.embedding_dim, ()))
            found[c.name] = (rows, dim, tuple(dict.fromkeys([*feats, *c.feature_names])))
    return found


def attach_id_mapping(model: nn.Module, cfg: Any, device: torch.device | str = "cpu") -> nn.Module:
    """Give ``model`` an :class:`IdMapper` (``model.id_mapper``) for its hash / managed tables
    and make ``model.prepare_batch`` end with it. No-op when every table is dense.

    The model may declare ``raw_id_features = {kjt_key: table}``: keys it looks up itself
    (TWIN's GSU over the full history) that must be mapped too.
    """
    mapping = cfg.features.id_mapping
    if not any(kind != "dense" for kind in mapping.values()):
        return model
    tables = model_tables(model)
    extra: Mapping[str, str] = getattr(model, "raw_id_features", {})
    mapped = []
    for name, (rows, dim, feats) in tables.items():
        kind = mapping.get(name, "dense")
        if kind == "dense":
            continue
        feats = tuple(dict.fromkeys([*feats, *(k for k, t in extra.items() if t == name)]))
        mapped.append(MappedTable(name, kind, rows, dim, feats))
    if not mapped:
        return model
    mapper = IdMapper(mapped, cfg.features.zch, cfg.features.hash_collision_stats, device)
    model.id_mapper = mapper
    inner = model.prepare_batch
    model_ref = weakref.ref(model)

    def prepare_batch(batch: Any) -> Any:
        batch = inner(batch)
        return dataclasses.replace(batch, sparse=mapper(batch.sparse))

    prepare_batch.__doc__ = f"{inner.__doc__ or ''}\n\nThen raw ids -> rows ({mapper.extra_repr()})."
    model.prepare_batch = prepare_batch  # type: ignore[method-assign]
    mapper.row_reset = lambda table, rows: reset_rows(model_ref(), table, rows)
    return model


# --------------------------------------------------------------------------- resetting rows


def _optimizer_of(model: nn.Module) -> Any:
    ref = getattr(model, "_id_mapping_optimizer", None)
    return ref() if ref is not None else None


def attach_optimizer(model: nn.Module, optimizer: Any, sharded: nn.Module | None = None,
                     defer_resets: bool = False) -> None:
    """Let row resets also zero the optimizer state of the reset rows (and, sharded, find the
    shards through ``sharded``, the DistributedModelParallel wrapper). ``defer_resets``: the
    training loop calls :func:`apply_deferred_resets` right before each training forward
    (see :class:`IdMapper`). No-op without a mapper."""
    if getattr(model, "id_mapper", None) is None:
        return
    model.id_mapper.defer_resets = defer_resets
    model.id_mapper.materialize()  # after DMP: a table built on the meta device now exists, as zeros
    object.__setattr__(model, "_id_mapping_optimizer", weakref.ref(optimizer))
    if sharded is not None:
        object.__setattr__(model, "_id_mapping_sharded", weakref.ref(sharded))


def apply_deferred_resets(model: nn.Module) -> None:
    """Before a training forward: the row resets of that batch's newly admitted ids (no-op
    without a mapper or when resets are not deferred)."""
    mapper = getattr(model, "id_mapper", None)
    if mapper is not None:
        mapper.apply_resets()


@torch.no_grad()
def reset_rows(model: nn.Module | None, table: str, rows: torch.Tensor) -> None:
    """Reset ``rows`` of ``table`` to :func:`row_init` everywhere the table lives in ``model``
    (unsharded EBC / EC weights, or this rank's shards), and zero their optimizer state
    where the optimizer is known (:func:`attach_optimizer`)."""
    if model is None or rows.numel() == 0:
        return
    spec = model.id_mapper.specs[table]
    optimizer = _optimizer_of(model)
    params: list[torch.Tensor] = []
    for module in model.modules():
        weight = None
        if isinstance(module, EmbeddingBagCollection) and table in module.embedding_bags:
            weight = module.embedding_bags[table].weight
        elif isinstance(module, EmbeddingCollection) and table in module.embeddings:
            weight = module.embeddings[table].weight
        if weight is not None and weight.device.type != "meta":
            weight.data[rows] = row_init(table, rows, spec.dim, spec.num_rows, weight.dtype).to(weight.device)
            params.append(weight)
    if optimizer is not None:
        state = getattr(optimizer, "state", {})
        for p in params:
            for v in (state.get(p, {}) if isinstance(state, Mapping) else {}).values():
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == spec.num_rows:
                    v[rows] = 0
    sharded_ref = getattr(model, "_id_mapping_sharded", None)
    if sharded_ref is not None and sharded_ref() is not None:
        _reset_sharded(sharded_ref(), table, rows, spec)


def _reset_sharded(dmp: nn.Module, table: str, rows: torch.Tensor, spec: MappedTable) -> None:
    """Reset the rows in this rank's shards of ``table`` (weights; fused optimizer state too)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    # The table's weight in an EmbeddingBagCollection or an EmbeddingCollection (sequence models).
    suffix = (f".embedding_bags.{table}.weight", f".embeddings.{table}.weight")

    def reset(t: Any, fill: Callable[[torch.Tensor, int, int], torch.Tensor]) -> None:
        shards = [(s.tensor, list(s.metadata.shard_offsets)) for s in t.local_shards()] \
            if isinstance(t, ShardedTensor) else [(t, [0] * t.dim())]
        for tensor, offsets in shards:
            lo = offsets[0]
            hit = rows[(rows >= lo) & (rows < lo + tensor.shape[0])]
            if hit.numel():
                col0, width = (offsets[1], tensor.shape[1]) if tensor.dim() > 1 else (0, 0)
                tensor[hit - lo] = fill(hit, col0, width)

    for key, t in dmp.state_dict().items():
        if f".{key}".endswith(suffix) and (isinstance(t, ShardedTensor) or t.device.type != "meta"):
            reset(t, lambda hit, c0, width: row_init(table, hit, spec.dim, spec.num_rows)[:, c0:c0 + width])
    fused = getattr(dmp, "fused_optimizer", None)
    if fused is None:
        return
    for key, st in fused.state_dict().get("state", {}).items():
        if not f".{key}".endswith(suffix) or not isinstance(st, Mapping):
            continue
        for v in st.values():
            if isinstance(v, (torch.Tensor, ShardedTensor)):
                reset(v, lambda hit, c0, width: torch.zeros(hit.numel(), width) if width else torch.zeros(hit.numel()))


# --------------------------------------------------------------------------- capacity


def state_bytes(kind: str, rows: int, zch: Any, hash_collision_stats: bool = True) -> int:
    """Bytes of one table's mapping that grow with its rows (a full replica on every rank).

    managed: the persistent state - sorted raw ids + their rows + the policy's per-row
    metadata (distance_lfu: count and last-seen step; lru: last-seen; lfu: count), int64
    each - plus what :class:`ManagedTable` keeps beside it: the hash index (2 slots per
    row, id + row: 32 bytes per row) and the interval's hit count per row (8 bytes; with
    ``eviction_interval`` > 1 and a policy that records last-seen steps, 16 more: the
    rows' last-seen step and the counts before the step). hash: the collision statistics
    (8-byte smallest id + 1-byte flag per row) or nothing.
    """
    if kind == "managed":
        per_row = 2 + {"distance_lfu": 2, "lru": 1, "lfu": 1}[zch.eviction_policy]
        tracked = zch.eviction_interval > 1 and zch.eviction_policy != "lfu"
        return rows * 8 * per_row + (1025 + 4) * 8 + rows * (32 + 8 + (16 if tracked else 0))
    if kind == "hash":
        return rows * 9 if hash_collision_stats else 0
    return 0


def history_bytes(kind: str, ids_per_step: int, zch: Any) -> int:
    """Bytes of a managed table's mapping that grow with the ids of a step (every rank's):
    the history buffer - at most every id of ``eviction_interval`` steps (only ids the
    table does not hold go there, but a cold table holds none), x 1.25 as TorchRec sizes
    it, each with its last-seen step - and the lookup's scratch and output (34 bytes per id)."""
    if kind != "managed":
        return 0
    per_id = 8 * (1 + (0 if zch.eviction_policy == "lfu" else 1))
    return int(ids_per_step * zch.eviction_interval * 1.25) * per_id + 34 * ids_per_step
