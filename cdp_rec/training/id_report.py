"""Per-day id-mapping report of a training run (``metrics.json`` key ``id_mapping_days``).

For every training day, once its last step is done:

* per hash / managed table (:meth:`embeddings.id_mapping.IdMapper.table_stats`): rows
  held by an id (``occupied``, ``occupancy`` = occupied / rows that ids can hold), ids
  ``admitted`` / ``evicted`` (a held id displaced by a new one) / ``expired`` (freed by
  ``features.zch.ttl_steps``) during the day, and for hash tables the rows shared by two
  or more raw ids (``shared_rows``, cumulative; ``new_shared_rows`` during the day);
* the progressive AUC of the day's training impressions - each scored by the model
  *before* it trained on them (the training step's logits) - overall, on the impressions
  whose item id had not appeared in any earlier training day of this process
  (``auc_new_items``) and on the others (``auc_old_items``), with their counts.

AUCs are computed from histograms of the predicted probability (2**14 equal bins, ties
within a bin counted half), which ranks can sum with one all-reduce however large the
day; they differ from the exact AUC by well under 1e-3. "Seen before" is a sorted set of
every item id of earlier days (all ranks'), 8 bytes per distinct item. Each day is also
one log line.

Checkpoints carry the report (:meth:`IdMappingReport.checkpoint_state`, attached to the
:class:`~cdp_rec.training.checkpoint.Checkpointer`): the finished days, the seen set, the
table totals at the day's start and the unfinished day's histograms and item ids, summed
over ranks. A resume that continues at the checkpoint's step (same world size and batch
size) therefore reports every day as the uninterrupted run does; one that restarts the
day (another world size) keeps the finished days and the seen set and recounts the day.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from cdp_rec.data.schema import Batch

log = logging.getLogger(__name__)

BINS = 1 << 14
_GROUPS = ("all", "new", "old")


def _state_problem(state: Any) -> str | None:
    """Why a saved report state is not one :meth:`IdMappingReport.checkpoint_state` writes, or None."""
    if not isinstance(state, dict):
        return f"is a {type(state).__name__}, not a dict"
    if state.get("version") != 1:
        return f"has version {state.get('version')!r}; this cdp-rec reads version 1"

    def ids(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point() and not v.is_complex()

    checks = {
        "rows": lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
        "seen": ids,
        "today": ids,
        "last": lambda v: v is None or isinstance(v, dict),
        "day": lambda v: v is None or (type(v) is int and v >= 0),
        "steps": lambda v: type(v) is int and v >= 0,
        "hist": lambda v: isinstance(v, torch.Tensor) and tuple(v.shape) == (len(_GROUPS), 2, BINS),
    }
    for key, ok in checks.items():
        if key not in state:
            return f"has no {key!r}"
        if not ok(state[key]):
            what = state[key]
            shown = f"a tensor of shape {list(what.shape)}" if isinstance(what, torch.Tensor) else repr(what)[:60]
            return f"has an invalid {key!r}: {shown}"
    return None


def binned_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """AUC from per-bin positive / negative counts over ascending score bins (NaN if a class is empty)."""
    p, n = float(pos.sum()), float(neg.sum())
    if p == 0 or n == 0:
        return math.nan
    below = torch.cumsum(neg, 0) - neg
    return float((pos * (below + 0.5 * neg)).sum()) / (p * n)


def _in_sorted(values: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: which values are in ``sorted_set`` (ascending, unique); O(n log m)."""
    if not sorted_set.numel():
        return torch.zeros(values.shape, dtype=torch.bool)
    idx = torch.searchsorted(sorted_set, values).clamp_(max=sorted_set.numel() - 1)
    return sorted_set[idx] == values


class IdMappingReport:
    """Collects the per-day report; a no-op when the model has no id mapper and the data
    no churn (``active`` False).

    Use: ``batches = report.watch(batches, day_of)`` before ``prepare_batch`` (it sees the
    raw item ids), ``on_step = report.wrap(on_step)``, then ``report.finish()`` -> rows.
    """

    def __init__(self, model: torch.nn.Module, active: bool | None = None) -> None:
        self.mapper = getattr(model, "id_mapper", None)
        self.active = self.mapper is not None if active is None else active
        self.rows: list[dict[str, Any]] = []
        self._queue: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque()
        self._day: int | None = None
        self._seen = torch.empty(0, dtype=torch.int64)
        self._today: list[torch.Tensor] = []
        self._hist = torch.zeros(len(_GROUPS), 2, BINS, dtype=torch.float64)
        self._steps = 0
        self._last: dict[str, dict[str, int]] | None = None  # totals when the first batch is pulled
        self._saved: tuple[dict[str, Any], int] | None = None  # a loaded checkpoint's report, until resume_at

    def _totals(self) -> dict[str, dict[str, int]]:
        if self.mapper is None:
            return {}
        keep = ("admitted_total", "evicted_total", "expired_total", "shared_rows")
        return {t: {k: v for k, v in s.items() if k in keep} for t, s in self.mapper.table_stats().items()}

    def watch(self, batches: Iterable[Batch], day_of: Callable[[], int]) -> Iterator[Batch]:
        """Pass ``batches`` through, remembering each one's day, labels and raw item ids."""
        for batch in batches:
            if self.active and self._last is None:
                self._last = self._totals()  # before the first batch is mapped (and after a resume's load)
            if self.active:
                items = batch.sparse["item_id"].values()
                self._queue.append((day_of(), batch.labels.detach().clone(), items.detach().clone()))
            yield batch

    def wrap(self, on_step: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[dict[str, torch.Tensor]], None]:
        if not self.active:
            return on_step

        def step(out: dict[str, torch.Tensor]) -> None:
            self.on_step(out)
            on_step(out)

        return step

    def on_step(self, out: dict[str, torch.Tensor]) -> None:
        day, labels, items = self._queue.popleft()
        if self._day is not None and day != self._day:
            self._close_day()
        self._day = day
        self._steps += 1
        probs = torch.sigmoid(out["logits"].detach().to(torch.float64).cpu())
        bins = (probs * BINS).long().clamp_(0, BINS - 1)
        cls = (labels.cpu() > 0.5).long()
        new = ~_in_sorted(items, self._seen)
        for g, mask in enumerate((None, new, ~new)):
            b, c = (bins, cls) if mask is None else (bins[mask], cls[mask])
            self._hist[g].index_put_((1 - c, b), torch.ones(b.numel(), dtype=torch.float64), accumulate=True)
        self._today.append(torch.unique(items))

    def _close_day(self) -> None:
        hist = self._hist
        today = torch.unique(torch.cat(self._today)) if self._today else torch.empty(0, dtype=torch.int64)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(hist)
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, today.numpy())
            today = torch.unique(torch.cat([torch.from_numpy(p) for p in parts]))
        row: dict[str, Any] = {"day": self._day, "steps": self._steps}
        for g, name in enumerate(_GROUPS):
            pos, neg = hist[g, 0], hist[g, 1]
            suffix = "" if name == "all" else f"_{name}_items"
            row[f"auc{suffix}"] = binned_auc(pos, neg)
            row[f"samples{suffix}"] = int(pos.sum() + neg.sum())
        row["new_item_ids"] = int((~_in_sorted(today, self._seen)).sum())
        if self.mapper is not None:
            now, tables = self._totals(), {}
            for t, s in self.mapper.table_stats().items():
                entry: dict[str, Any] = {"mapping": s["mapping"], "rows": s["rows"]}
                if "occupied" in s:
                    cap = s.get("capacity", s["rows"])
                    entry.update(occupied=s["occupied"], occupancy=round(s["occupied"] / cap, 6))
                for key, out in (("admitted_total", "admitted"), ("evicted_total", "evicted"),
                                 ("expired_total", "expired"), ("shared_rows", "new_shared_rows")):
                    if key in s:
                        entry[out] = s[key] - (self._last or {}).get(t, {}).get(key, 0)
                if "shared_rows" in s:
                    entry["shared_rows"] = s["shared_rows"]
                tables[t] = entry
            row["tables"] = tables
            self._last = now
        self.rows.append(row)
        self._seen = torch.unique(torch.cat([self._seen, today]))
        self._hist = torch.zeros_like(hist)
        self._today, self._steps = [], 0
        if not distributed or dist.get_rank() == 0:
            log.info("%s", format_day(row))

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any] | None:
        """The report as a checkpoint keeps it (collective: every rank calls it at the same
        step): per-rank parts of the unfinished day are summed / united over ranks, so the
        state is the same on every rank and loads into any world size. None when inactive."""
        if not self.active:
            return None
        hist = self._hist.clone()
        today = torch.unique(torch.cat(self._today)) if self._today else torch.empty(0, dtype=torch.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(hist)
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, today.numpy())
            today = torch.unique(torch.cat([torch.from_numpy(p) for p in parts]))
        return {"version": 1, "rows": [dict(r) for r in self.rows], "seen": self._seen.clone(), "last": self._last,
                "day": self._day, "steps": self._steps, "hist": hist, "today": today}

    def load_checkpoint_state(self, state: dict[str, Any] | None, global_step: int) -> None:
        """Restore what :meth:`checkpoint_state` saved at ``global_step``; the unfinished day
        is applied by :meth:`resume_at`. None (a checkpoint without a report): start empty."""
        if state is not None:
            problem = _state_problem(state)
            if problem:  # a damaged or foreign states.pt: a KeyError / IndexError later, or a report silently lost
                raise ValueError(problem)
        self._saved = (state, global_step) if state is not None else None
        if self._saved is None:
            if self.active:
                log.warning("the checkpoint has no id-mapping report: its days before the resume are missing from "
                            "id_mapping_days and the first day counts every item as new")
            return
        self.rows = [dict(r) for r in state["rows"]]
        self._seen = state["seen"].to(torch.int64)
        self._last = state["last"]

    def resume_at(self, start: int) -> None:
        """The run continues at global step ``start``: at the checkpoint's own step the
        unfinished day goes on (its histograms and ids held by rank 0, so the day-end sum
        over ranks is the saved one); otherwise that day restarts and is counted afresh."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        state, step = saved
        if start != step or state["day"] is None:
            return
        self._day, self._steps = state["day"], int(state["steps"])
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            self._hist = state["hist"].to(torch.float64).clone()
            self._today = [state["today"].to(torch.int64)] if state["today"].numel() else []

    def finish(self) -> list[dict[str, Any]]:
        """Close the last day; the rows (one per training day seen), JSON-ready (NaN -> None)."""
        if self.active and self._day is not None and self._steps:
            self._close_day()
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in self.rows]


def format_day(row: dict[str, Any]) -> str:
    """One log line: the day's AUCs (new / old items) and each table's occupancy and churn."""
    def f(x: Any) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    parts = [f"day {row['day']} ids: auc {f(row['auc'])}, new items {f(row['auc_new_items'])} "
             f"({row['samples_new_items']} samples, {row['new_item_ids']} new ids), "
             f"old items {f(row['auc_old_items'])}"]
    for t, s in row.get("tables", {}).items():
        bits = [f"{t} {s['mapping']}"]
        if "occupied" in s:
            bits.append(f"{s['occupied']}/{s['rows']} rows ({100 * s['occupancy']:.1f}%)")
        if "admitted" in s:
            bits.append(f"+{s['admitted']} admitted, -{s['evicted']} evicted, -{s['expired']} expired")
        if "shared_rows" in s:
            bits.append(f"{s['shared_rows']} rows shared by >1 id (+{s['new_shared_rows']})")
        parts.append(" ".join(bits))
    return "; ".join(parts)
