"""What a run trains on, in which order, and when it stops to validate or checkpoint.

* :func:`split_days`: which days train, validate and test (``data.valid_days`` /
  ``data.valid_fraction``);
* :class:`HeldOutTail`: the validation batches cut off the end of a training day;
  :func:`user_tail_mask` / :class:`MaskedRows`: each user's last rows of a day instead;
* :class:`TrainSchedule`: the fixed list of ``(epoch, day, steps)``, computed up front from
  Parquet footers, so a checkpoint's global step maps back to an exact (day, batch) on
  resume; it yields the batches of any step range and names the epoch and day ends;
* :class:`CheckpointPolicy`: at which steps a checkpoint is written.

The training loop (:func:`cdp_rec.training.trainer.train`) runs the schedule in
*segments* that end wherever something happens after a step (a validation, a checkpoint,
the end); the sharded pipeline drains at each segment end, so every rank has applied the
same updates when the model is evaluated or saved.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cdp_rec.config import CheckpointConfig, DataConfig
from cdp_rec.data.hashing import fmix64
from cdp_rec.data.loader import DataError, expand_histories
from cdp_rec.data.schema import Batch


class BatchSource(Protocol):
    def num_batches(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class DaySplit:
    """Days by role. ``tail_day`` (or None): the training day of which ``tail_fraction``
    is held out for validation instead of trained on: its last batches (``tail_split``
    "tail") or each user's last rows ("per_user")."""

    train: list[int]
    valid: list[int]
    test: list[int]
    tail_day: int | None = None
    tail_fraction: float = 0.0
    tail_split: str = "tail"

    @property
    def has_validation(self) -> bool:
        return bool(self.valid) or self.tail_day is not None


def split_days(data: DataConfig) -> DaySplit:
    """Days ``0 .. train_days-1`` are training data, minus the last ``valid_days`` (validation);
    the next ``test_days`` test. With ``valid_days`` 0 and ``valid_fraction`` > 0 the tail of
    the last training day validates."""
    n_train = data.train_days - data.valid_days
    train = list(range(n_train))
    valid = list(range(n_train, data.train_days))
    test = list(range(data.train_days, data.train_days + data.test_days))
    if not valid and data.valid_fraction > 0:
        return DaySplit(train, valid, test, train[-1], data.valid_fraction, data.valid_split)
    return DaySplit(train, valid, test)


def held_out_batches(n: int, fraction: float, where: str) -> int:
    """How many of a day's ``n`` batches (this rank's) its tail holds out: ``ceil(n * fraction)``,
    at least one, and at least one batch must remain to train on."""
    held = max(1, math.ceil(n * fraction))
    if held >= n:
        raise DataError(f"{where}: {n} batch(es) on this rank, too few to hold out data.valid_fraction={fraction:g} "
                        f"and still train; use data.valid_days, a smaller batch size or more data")
    return held


class HeldOutTail:
    """Batches ``first ..`` of ``reader`` (one pass per ``iter()``): the validation tail of a day."""

    def __init__(self, reader: BatchSource, first: int) -> None:
        self.reader, self.first = reader, first

    def num_batches(self) -> int:
        return max(0, self.reader.num_batches() - self.first)

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(iter(self.reader), self.first, None)


def select_rows(batch: Batch, keep: torch.Tensor) -> Batch:
    """The rows of ``batch`` where the bool ``[B]`` mask ``keep`` is true (order kept)."""
    batch = expand_histories(batch)  # a kept row may share the history of a dropped one
    kjt = batch.sparse
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), -1)
    value_keep = torch.repeat_interleave(keep.repeat(len(keys)), kjt.lengths())
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=kjt.values()[value_keep],
                                                 lengths=lengths[:, keep].reshape(-1))
    return Batch(sparse=sparse, labels=batch.labels[keep], user_ids=batch.user_ids[keep],
                 request_ids=batch.request_ids[keep])


def user_tail_mask(reader: BatchSource, fraction: float) -> np.ndarray:
    """Per row of ``reader`` (reading order): is it among its user's last ``k`` of the user's
    ``n`` rows, ``k = floor(fraction * n + u)`` with ``u`` in [0, 1) a fixed hash of the user id?
    One pass over the reader (no model).

    A plain ``floor(fraction * n)`` holds out nothing of a user with fewer than
    ``1 / fraction`` rows that day - on real logs most users: a probe's 10% validation of an
    ad log held out 89 of ~20,000 rows with one click. With the hashed offset each user's
    expected share is exactly ``fraction`` (a user of 3 rows gives its last one with
    probability 0.3 at 10%), the same users on every run and rank.
    """
    users = np.concatenate([b.user_ids.numpy() for b in reader]) if reader.num_batches() else np.empty(0, np.int64)
    if users.size == 0:  # a rank's empty share of a day: nothing to hold out (the caller says so)
        return np.zeros(0, dtype=bool)
    order = np.argsort(users, kind="stable")  # each user's rows together, in reading order
    sorted_users = users[order]
    starts = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    rank = np.arange(len(users)) - np.repeat(starts, counts)  # position within the user's rows
    offset = fmix64(sorted_users[starts]).astype(np.float64) / 2.0**64  # [0, 1) per user
    held = np.repeat(np.floor(fraction * counts + offset).astype(np.int64), counts)
    mask = np.zeros(len(users), dtype=bool)
    mask[order] = rank >= np.repeat(counts, counts) - held
    return mask


class MaskedRows:
    """The rows of ``reader`` where ``keep`` (one bool per row, reading order) is true,
    re-batched to ``batch_size`` (the last batch may be smaller)."""

    def __init__(self, reader: BatchSource, keep: np.ndarray, batch_size: int) -> None:
        self.reader, self.keep, self.batch_size = reader, keep, batch_size

    def num_batches(self) -> int:
        return -(-int(self.keep.sum()) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        pending: list[Batch] = []
        n_pending, offset = 0, 0
        for batch in self.reader:
            keep = torch.from_numpy(self.keep[offset:offset + len(batch)])
            offset += len(batch)
            if keep.any():
                part = batch if keep.all() else select_rows(batch, keep)
                pending.append(part)
                n_pending += len(part)
            while n_pending >= self.batch_size:
                merged = pending[0] if len(pending) == 1 else Batch.concat(pending)
                head = torch.zeros(len(merged), dtype=torch.bool)
                head[: self.batch_size] = True
                yield select_rows(merged, head) if len(merged) > self.batch_size else merged
                rest = len(merged) - self.batch_size
                pending = [select_rows(merged, ~head)] if rest else []
                n_pending = rest
        if n_pending:
            yield pending[0] if len(pending) == 1 else Batch.concat(pending)


class TrainSchedule:
    """``epochs`` passes over ``days``; day ``d`` is ``day_steps[d]`` steps (batches).

    Steps are counted globally from 1; "at step s" means after the s-th update. ``length``
    is the whole schedule, ``stop`` where this run stops (``max_steps``, if set, cuts it).
    """

    def __init__(self, epochs: int, days: list[int], day_steps: dict[int, int], max_steps: int = 0) -> None:
        self.entries = [(e, d, day_steps[d]) for e in range(epochs) for d in days]
        ends = list(itertools.accumulate(n for _, _, n in self.entries))
        self.length = ends[-1] if ends else 0
        self.stop = min(self.length, max_steps) if max_steps else self.length
        self.day_ends = set(ends)
        per_epoch = sum(day_steps[d] for d in days)
        self.epoch_ends = {per_epoch * (e + 1) for e in range(epochs)}
        self._starts = [0, *ends[:-1]]

    def epoch_of(self, step: int) -> int:
        """1-based epoch that global step ``step`` (1-based) belongs to."""
        for (epoch, _, n), start in zip(self.entries, self._starts):
            if step <= start + n:
                return epoch + 1
        return self.entries[-1][0] + 1 if self.entries else 0

    def day_start(self, step: int) -> int:
        """The global step before the first batch of the day that step ``step + 1`` is in."""
        for (_, _, n), start in zip(self.entries, self._starts):
            if start + n > step:
                return start
        return self.length

    def batches(self, start: int, stop: int, reader_of: Callable[[int], BatchSource],
                on_day: Callable[[int], Any] | None = None) -> Iterator[Batch]:
        """The batches of global steps ``start + 1 .. stop``, opening each day's reader lazily."""
        for (_, day, n), first in zip(self.entries, self._starts):
            lo, hi = max(start, first) - first, min(stop, first + n) - first
            if hi <= lo:
                continue
            if on_day is not None:
                on_day(day)
            yield from itertools.islice(iter(reader_of(day)), lo, hi)

    def segment_ends(self, start: int, every: list[int], at: set[int]) -> list[int]:
        """Sorted steps in ``(start, stop]`` where a segment ends: multiples of each non-zero
        ``every``, the steps of ``at``, and ``stop``."""
        points = {s for s in at if start < s <= self.stop} | {self.stop}
        for k in every:
            if k:
                points.update(range(start + k - start % k, self.stop + 1, k))
        return sorted(p for p in points if p > start)


class CheckpointPolicy:
    """When :class:`~cdp_rec.training.checkpoint.Checkpointer` saves (``checkpoint.*``):
    every ``every_steps``, at day ends (``at_day_end``), and — when either is on — at the
    step the run stops (its end, ``max_steps``, or an early stop)."""

    def __init__(self, cfg: CheckpointConfig, schedule: TrainSchedule) -> None:
        self.every, self.at_day_end, self.schedule = cfg.every_steps, cfg.at_day_end, schedule
        self.enabled = cfg.at_day_end or cfg.every_steps > 0

    def due(self, step: int, stopping: bool = False) -> bool:
        if not self.enabled:
            return False
        return (bool(self.every) and step % self.every == 0) or (self.at_day_end and step in self.schedule.day_ends) \
            or step == self.schedule.stop or stopping

    def points(self) -> set[int]:
        """Steps that end a segment because a save may be due there (multiples of
        ``every_steps`` are added by :meth:`TrainSchedule.segment_ends`)."""
        return set(self.schedule.day_ends) if self.enabled and self.at_day_end else set()


@dataclass
class Resumed:
    """Where a run continues: ``start`` global steps done, ``position`` as saved (``final``:
    nothing left to train), ``history``: the saved validation points (see
    :mod:`cdp_rec.training.early_stop`), ``path``: the checkpoint (None: a fresh start)."""

    start: int
    position: Any
    history: list[dict[str, Any]]
    path: Any = None


def config_changes(saved: Any, current: dict[str, Any]) -> list[str]:
    """``["train.epochs 1 -> 2", ...]``: the settings in which a checkpoint's saved config
    (``meta.json``'s ``config``) differs from ``current``, as dotted keys in sorted order.
    A run resumed under a fixed ``train.run_name`` / ``checkpoint.dir`` keeps the new values
    silently otherwise (more epochs on a finished run train nothing; a new lr applies midway)."""
    if not isinstance(saved, dict):
        return []

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
        return out

    # JSON round trip: the saved config holds lists where the dataclasses hold tuples.
    a, b = flat(saved), flat(json.loads(json.dumps(current)))
    return [f"{k} {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def resume(checkpointer: Any, trainer: Any, schedule: TrainSchedule, world: int, local_batch_size: int,
           enabled: bool, log: Any) -> Resumed:
    """Load the newest committed checkpoint (``checkpoint.resume=auto``) into ``trainer``.

    Another world size or batch size cuts the days into other batches: the run then
    restarts the day the checkpoint was in (day-end checkpoints therefore resume exactly)
    and keeps only the validation points up to there.
    """
    from cdp_rec.training.checkpoint import Position
    from cdp_rec.training.early_stop import check_history

    latest = checkpointer.latest() if enabled else None
    if latest is None:
        return Resumed(0, Position(), [])
    pos, meta = checkpointer.load(trainer, latest)
    start = pos.global_step
    same_batches = (meta.get("world_size"), meta.get("local_batch_size")) == (world, local_batch_size)
    if same_batches and start > schedule.length:
        from cdp_rec.training.checkpoint import CheckpointError

        raise CheckpointError(f"{latest}/meta.json: 'global_step' is {start}, but this config's schedule has "
                              f"{schedule.length} steps (a checkpoint of a longer run, or an edited meta.json); "
                              "set checkpoint.resume=never to start afresh")
    if not same_batches:
        start = schedule.day_start(start)
        log.warning("resuming a checkpoint of world size %s on %d ranks: restarting its day at step %d "
                    "(exact continuation needs the same world size and batch size)",
                    meta.get("world_size"), world, start)
    changed = config_changes(meta.get("config"), trainer.cfg.to_dict())
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        log.warning("resuming %s, which was saved with other settings (%s): the run continues from step %d "
                    "under this config's%s; checkpoint.resume=never starts afresh", latest, shown, start,
                    " - but it had finished, so nothing more is trained" if pos.final else "")
    state = meta.get("training_state")
    history: list[dict[str, Any]] = []
    if isinstance(state, dict) and "history" in state:
        history = check_history(state["history"], f"{latest}/meta.json")
    elif state is not None:
        from cdp_rec.training.checkpoint import CheckpointError

        raise CheckpointError(f"{latest}/meta.json: training_state is not an object with a history")
    return Resumed(start, pos, [p for p in history if p["step"] <= start], latest)
