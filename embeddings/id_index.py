"""A hash index raw id -> row beside a managed table's sorted id array, vectorized in torch.

TorchRec's ``MCHManagedCollisionModule`` finds an id's row by binary search in the sorted
array of the ids the table holds (``torch.searchsorted``: ~20 dependent cache misses per id,
~150 ns per id on one CPU thread at 1M held ids). :class:`IdIndex` answers the same question
with open addressing: ids live in a slot array of ``2 x`` the table's capacity (load <= 1/2),
an id's home slot is Fibonacci hashing of the id reduced to the slot range, collisions probe
the next slots (linear probing). One lookup of ``n`` ids is one gather at the home slots for
all of them (~90% resolve there in bench/id_mapping.py's steady state) and a few rounds over
the shrinking rest.

It is a *derived* structure: the sorted array stays TorchRec's state (checkpoints, eviction
order and tie-breaks are unchanged); the index only caches ``id -> row`` of the held ids and
can be rebuilt from them at any time. Correctness never depends on the hash spreading well:
a lookup that meets neither its id nor a free slot within :data:`LOOKUP_PROBES` slots (a
long cluster: rare, or adversarial ids) is answered by ``fallback`` (the binary search in
the sorted array, exact by definition), and an id that finds no free slot within
:data:`MAX_PROBES` on insertion stays out of the index (its probe path is then full, so a
lookup of it never meets a free slot and always reaches the fallback).

Deletion leaves a tombstone: the key stays, its row becomes the table's shared row (what a
miss returns); a later insertion may take the slot. A slot never becomes free again, so a
lookup that meets a free slot knows the id is absent. The owner rebuilds the index (in
priority order: popular ids nearest their home slot, where one gather finds them) when the
slots ever taken pass :data:`MAX_LOAD`.

All tensors are 1-D int64 unless noted; ``n`` is the number of queried ids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EMPTY = 2**63 - 1  # an unused slot (TorchRec's empty marker; never a raw id of a managed table)
MAX_PROBES = 64  # slots an insertion tries; an id that finds none free overflows (fallback only)
LOOKUP_PROBES = 8  # slots a lookup tries before the fallback (0.3% of ids in the bench's steady state)
MAX_LOAD = 0.625  # rebuild when occupied slots (live + tombstones) pass this share of the slots
_FIB = -7046029254386353131  # 0x9E3779B97F4A7C15 (2**64 / golden ratio) as int64
_M32 = 0xFFFFFFFF

Fallback = Callable[[torch.Tensor], torch.Tensor]


class IdIndex:
    """Open-addressing index ``raw id -> row`` for up to ``capacity`` ids.

    ``miss_row`` is what :meth:`lookup` returns for an id the index does not hold (the
    managed table's shared row). Scratch buffers are kept between calls: a fresh 64 MB
    temporary per op costs more in page faults than the op (8M ids per step at B=4096,
    L=2000).
    """

    def __init__(self, capacity: int, miss_row: int, device: torch.device | str = "cpu") -> None:
        self.num_slots = max(2 * capacity, 8)
        self.miss_row = miss_row
        self.device = torch.device(device)
        self.keys = torch.full((self.num_slots,), EMPTY, dtype=torch.int64, device=self.device)
        self.rows = torch.full((self.num_slots,), miss_row, dtype=torch.int64, device=self.device)
        self.used = 0  # slots with a key (live or tombstone): slots never become free again
        self.overflow = 0  # ids inserted without a slot (reachable through the fallback only)
        self._scratch: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ hashing

    def _buf(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 1024), dtype=dtype, device=self.device)
            self._scratch[name] = buf
        return buf[:n]

    def home(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Home slot of each id ``[n]``: the top 32 bits of ``id * 0x9E37..`` (Fibonacci
        hashing, wrapping int64) scaled to ``[0, num_slots)`` by a multiply and shift."""
        out = torch.mul(ids, _FIB, out=out) if out is not None else ids * _FIB
        if self.num_slots < 2**31:
            out.bitwise_right_shift_(32).bitwise_and_(_M32)  # the product's top 32 bits, unsigned
            return out.mul_(self.num_slots).bitwise_right_shift_(32)
        # (top 32 bits) * num_slots would overflow int64: the top 62 bits modulo num_slots
        return out.bitwise_right_shift_(2).bitwise_and_((1 << 62) - 1).remainder_(self.num_slots)

    def _next(self, slots: torch.Tensor) -> torch.Tensor:
        slots += 1
        return slots.masked_fill_(slots == self.num_slots, 0)

    # ------------------------------------------------------------------ queries

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor, fallback: Fallback) -> torch.Tensor:
        """Row of each id ``[n]`` (a fresh tensor); ``miss_row`` for ids not held."""
        n = ids.numel()
        out = torch.empty(n, dtype=torch.int64, device=self.device)
        if n == 0:
            return out
        slots = self.home(ids, self._buf("slots", n, torch.int64))
        keys = torch.index_select(self.keys, 0, slots, out=self._buf("keys", n, torch.int64))
        torch.index_select(self.rows, 0, slots, out=out)
        hit = torch.eq(keys, ids, out=self._buf("hit", n, torch.bool))
        out.masked_fill_(hit.logical_not_(), self.miss_row)  # hit now marks the misses
        cont = torch.ne(keys, EMPTY, out=self._buf("cont", n, torch.bool)).logical_and_(hit)
        idx = cont.nonzero().squeeze(1)
        if idx.numel():
            slots = self._next(slots[idx])
            self._probe(ids[idx], idx, slots, out, fallback)
        return out

    def _probe(self, ids: torch.Tensor, idx: torch.Tensor, slots: torch.Tensor, out: torch.Tensor,
               fallback: Fallback, probes: int = 1) -> None:
        """Continue the lookups of ``ids`` (positions ``idx`` of ``out``) from ``slots``."""
        while idx.numel() and probes < LOOKUP_PROBES:
            keys = self.keys[slots]
            hit = keys == ids
            if bool(hit.any()):
                out[idx[hit]] = self.rows[slots[hit]]
            cont = (keys != EMPTY) & ~hit
            idx, ids, slots = idx[cont], ids[cont], self._next(slots[cont])
            probes += 1
        if idx.numel():
            out[idx] = fallback(ids)

    @torch.no_grad()
    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot of each id's key (live or tombstone) ``[n]``, -1 where the index has none
        (absent, or an overflowed id). For updates; small ``n``."""
        out = torch.full_like(ids, -1)
        idx = torch.arange(ids.numel(), device=self.device)
        slots = self.home(ids)
        for _ in range(MAX_PROBES):
            if not idx.numel():
                break
            keys = self.keys[slots]
            hit = keys == ids
            out[idx[hit]] = slots[hit]
            cont = (keys != EMPTY) & ~hit
            idx, ids, slots = idx[cont], ids[cont], self._next(slots[cont])
        return out

    # ------------------------------------------------------------------ updates

    @torch.no_grad()
    def clear(self) -> None:
        self.keys.fill_(EMPTY)
        self.rows.fill_(self.miss_row)
        self.used = self.overflow = 0

    @torch.no_grad()
    def insert(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Add distinct ``ids`` that no live slot holds, with their ``rows``, in priority
        order: earlier ids get slots nearer their home (give the most looked-up first)."""
        chunk = max(self.num_slots // 16, 1024)  # within a chunk, contested slots go to any one
        for lo in range(0, ids.numel(), chunk):
            self._place(ids[lo:lo + chunk], rows[lo:lo + chunk])

    def _place(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Each probe round, an id takes the slot it meets if that slot is its own tombstone
        (revived), free, or another id's tombstone; ids contending for one slot all write
        their key and the one that reads back won it; the rest probe on.

        Taking a tombstone keeps lookups exact: an id's live slot is always the first slot
        with its key on its path (it goes to the first takeable slot, which comes before any
        older copy of its key), and a lookup stops at the first slot with its key.
        """
        pending = torch.arange(ids.numel(), device=self.device)
        slots = self.home(ids)
        for _ in range(MAX_PROBES):
            if not pending.numel():
                break
            keys = self.keys[slots]
            done = keys == ids[pending]
            if bool(done.any()):
                self.rows[slots[done]] = rows[pending[done]]
            empty = keys == EMPTY
            take = ((empty | (self.rows[slots] == self.miss_row)) & ~done).nonzero().squeeze(1)
            if take.numel():
                ts, tp = slots[take], pending[take]
                self.keys[ts] = ids[tp]
                won = self.keys[ts] == ids[tp]
                self.rows[ts[won]] = rows[tp[won]]
                self.used += int(empty[take[won]].sum())
                done[take[won]] = True
            pending, slots = pending[~done], self._next(slots[~done])
        self.overflow += pending.numel()

    @torch.no_grad()
    def delete(self, ids: torch.Tensor) -> None:
        """Tombstone ``ids`` (absent ones are ignored): they now look up as ``miss_row``."""
        if ids.numel():
            slots = self.find(ids)
            self.rows[slots[slots >= 0]] = self.miss_row

    def too_full(self) -> bool:
        return self.used > MAX_LOAD * self.num_slots

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.rows, *self._scratch.values()))
