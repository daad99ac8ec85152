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
  Evaluation never changes the mapping.

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
returning id therefore starts from that fresh value, not from what it had learned.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
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

INT64_MAX = 2**63 - 1
EMPTY = INT64_MAX  # TorchRec's marker of an empty managed slot; refused as a raw id


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


def eviction_policy(name: str, decay_exponent: float = 1.0) -> MCHEvictionPolicy:
    if name == "distance_lfu":
        return DistanceLFU_EvictionPolicy(decay_exponent=decay_exponent)
    if name == "lru":
        return LRU_EvictionPolicy(decay_exponent=decay_exponent)
    if name == "lfu":
        return LFU_EvictionPolicy()
    raise ValueError(f"unknown eviction policy {name!r}")


class ManagedTable(MCHManagedCollisionModule):
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
    is the shared row of ids without one.
    """

    def __init__(self, name: str, zch_size: int, policy: MCHEvictionPolicy, eviction_interval: int,
                 ttl_steps: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(zch_size=zch_size, device=torch.device(device), eviction_policy=policy,
                         eviction_interval=eviction_interval, name=name)
        self.ttl_steps = ttl_steps
        for counter in ("_admitted_total", "_evicted_total", "_expired_total"):
            self.register_buffer(counter, torch.zeros(1, dtype=torch.int64, device=self.device))

    # ------------------------------------------------------------------ state

    def _apply(self, fn: Any, recurse: bool = True) -> "ManagedTable":
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
    may admit / evict; the rows handed to new ids are then reset through ``row_reset``.
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
        if self.training:
            self._record({t: local[t] for t in self._stateful() if t in local})
        for t, idx in by_table.items():
            spec = self.specs[t]
            if spec.kind == "hash":
                rows = hash_rows(local[t], spec.num_rows)
            else:
                mc = self.managed[t]
                ids = local[t].to(mc._mch_sorted_raw_ids.device)  # CUDA: DMP moved the state to the GPU
                rows = mc.remap({t: JaggedTensor(values=ids, lengths=ids.new_tensor([ids.numel()]))})[t].values()
                rows = rows.to(local[t].device)
            start = 0
            for i in idx:
                n = pieces[i].numel()
                pieces[i] = rows[start:start + n]
                start += n
        return KeyedJaggedTensor(keys=keys, values=torch.cat(pieces) if pieces else values,
                                 lengths=kjt.lengths(), stride=kjt.stride())

    @torch.no_grad()
    def _record(self, ids: dict[str, torch.Tensor]) -> None:
        """Training step: every managed table profiles this step's ids (all ranks'), hash
        tables update their statistics, and rows handed to new ids are reset."""
        if not ids:
            return
        ids = _gather_global(ids)
        for t, values in ids.items():
            if t in self.hashed:
                self.hashed[t].update(values.to(self.hashed[t].owner.device), self.specs[t].num_rows)
                continue
            mc = self.managed[t]
            values = values.to(mc._mch_sorted_raw_ids.device)
            mc.profile({t: JaggedTensor(values=values, lengths=values.new_tensor([values.numel()]))})
            rows = mc.evict()
            if rows is not None and rows.numel() and self.row_reset is not None:
                self.row_reset(t, rows.to(torch.int64))

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


def _gather_global(ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each table's ids of every rank, concatenated in rank order (two all-gathers)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
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
    return {t: torch.cat(parts).to(home) for t, parts in out.items()}


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


def attach_optimizer(model: nn.Module, optimizer: Any, sharded: nn.Module | None = None) -> None:
    """Let row resets also zero the optimizer state of the reset rows (and, sharded, find the
    shards through ``sharded``, the DistributedModelParallel wrapper). No-op without a mapper."""
    if getattr(model, "id_mapper", None) is None:
        return
    model.id_mapper.materialize()  # after DMP: a table built on the meta device now exists, as zeros
    object.__setattr__(model, "_id_mapping_optimizer", weakref.ref(optimizer))
    if sharded is not None:
        object.__setattr__(model, "_id_mapping_sharded", weakref.ref(sharded))


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

    suffix = f"embedding_bags.{table}.weight"

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
        if key.endswith(suffix) and (isinstance(t, ShardedTensor) or t.device.type != "meta"):
            reset(t, lambda hit, c0, width: row_init(table, hit, spec.dim, spec.num_rows)[:, c0:c0 + width])
    fused = getattr(dmp, "fused_optimizer", None)
    if fused is None:
        return
    for key, st in fused.state_dict().get("state", {}).items():
        if not key.endswith(suffix) or not isinstance(st, Mapping):
            continue
        for v in st.values():
            if isinstance(v, (torch.Tensor, ShardedTensor)):
                reset(v, lambda hit, c0, width: torch.zeros(hit.numel(), width) if width else torch.zeros(hit.numel()))


# --------------------------------------------------------------------------- capacity


def state_bytes(kind: str, rows: int, zch: Any, hash_collision_stats: bool = True) -> int:
    """Persistent bytes of one table's mapping state (a full replica on every rank).

    managed: sorted raw ids + their rows + the policy's per-row metadata (distance_lfu:
    count and last-seen step; lru: last-seen; lfu: count), int64 each; hash: the
    collision statistics (8-byte smallest id + 1-byte flag per row) or nothing.
    """
    if kind == "managed":
        per_row = 2 + {"distance_lfu": 2, "lru": 1, "lfu": 1}[zch.eviction_policy]
        return rows * 8 * per_row + (1025 + 4) * 8
    if kind == "hash":
        return rows * 9 if hash_collision_stats else 0
    return 0


def history_bytes(kind: str, ids_per_step: int, zch: Any) -> int:
    """Upper bound of a managed table's history buffer: the ids of ``eviction_interval``
    steps of every rank (x 1.25, TorchRec's sizing), with the last-seen step of each."""
    if kind != "managed":
        return 0
    per_id = 8 * (1 + (0 if zch.eviction_policy == "lfu" else 1))
    return int(ids_per_step * zch.eviction_interval * 1.25) * per_id
