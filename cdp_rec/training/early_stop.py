"""Validation history, early stopping and the best checkpoint.

:class:`EarlyStopping` keeps the list of validation points (``{epoch, step, auc,
logloss, ...}``, written to ``metrics.json`` as ``validation``) and derives everything
else from it: the best point of ``train.early_stop.monitor``, how many validations in a
row brought none, and whether the run stops. Because the state *is* the history, a
checkpoint stores only the history (in ``meta.json``) and a resumed run replays it —
together with the plateau schedule's state (:class:`~cdp_rec.training.lr_schedule.LRSchedule`)
— to continue exactly where the interrupted run was, patience included.

:class:`BestCheckpoint` writes the best point's model and optimizer state to
``<checkpoints>/best/step-N/`` with the same :class:`~cdp_rec.training.checkpoint.Checkpointer`
as the regular checkpoints (DCP, every rank its shards, SHA-256 of every file, atomic
rename, one kept) and loads it back before the test days are scored.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from cdp_rec.config import EarlyStopConfig
from cdp_rec.metrics import auc_standard_error
from cdp_rec.training.checkpoint import Checkpointer, CheckpointError, Position, list_checkpoints
from cdp_rec.training.lr_schedule import Improvement

log = logging.getLogger(__name__)

METRIC_KEYS = ("auc", "logloss", "uauc", "gauc")


class EarlyStopping:
    """Early stopping over a history of validation points (see the module docstring).

    ``update(point)`` appends one point (a dict with ``step``, ``epoch`` and the
    metrics); ``improved`` tells whether it is the new best. ``stopped`` turns true once
    ``patience`` points in a row bring no new best and stopping is ``enabled``.
    """

    def __init__(self, cfg: EarlyStopConfig) -> None:
        self.cfg = cfg
        self.improvement = Improvement(cfg.resolved_mode(), cfg.min_delta)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.bad = 0
        self.stopped = False

    @property
    def monitor(self) -> str:
        return self.cfg.monitor

    def update(self, point: dict[str, Any]) -> bool:
        value = _number(point.get(self.monitor))
        improved = self.improvement.better(value, None if self.best is None else _number(self.best[self.monitor]))
        if improved:
            self.best, self.bad = point, 0
        else:
            self.bad += 1
            if self.cfg.enabled and self.bad >= self.cfg.patience:
                self.stopped = True
        point["best"] = improved
        self.history.append(point)
        return improved

    def replay(self, history: list[dict[str, Any]], upto: int) -> list[dict[str, Any]]:
        """Rebuild the state from a checkpoint's ``history`` (points at steps ``<= upto``);
        returns the points replayed, in order (for other state to replay, e.g. the plateau)."""
        kept = [dict(p) for p in history if p["step"] <= upto]
        self.history, self.best, self.bad, self.stopped = [], None, 0, False
        for point in kept:
            self.update(point)
        return kept

    def summary(self) -> dict[str, Any] | None:
        """The best point for metrics.json: its epoch, step and validation metrics."""
        if self.best is None:
            return None
        return {"epoch": self.best["epoch"], "step": self.best["step"], "monitor": self.monitor,
                "mode": self.improvement.mode, "value": self.best.get(self.monitor),
                **{k: self.best.get(k) for k in METRIC_KEYS}}


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def check_history(history: Any, where: str) -> list[dict[str, Any]]:
    """A checkpoint's validation history, checked to be what :class:`EarlyStopping` writes."""
    if not isinstance(history, list):
        raise CheckpointError(f"{where}: training_state.history is not a JSON array")
    for i, point in enumerate(history):
        ok = isinstance(point, dict) and all(type(point.get(k)) is int for k in ("step", "epoch")) and all(
            point.get(k) is None or isinstance(point.get(k), (int, float)) for k in METRIC_KEYS)
        if not ok:
            raise CheckpointError(f"{where}: training_state.history[{i}] is not a validation point "
                                  "(an object with integer step and epoch and numeric metrics)")
    return history


class BestCheckpoint:
    """The best validation point's checkpoint under ``root`` (``<checkpoints>/best``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.checkpointer = Checkpointer(self.root, keep_last=1)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:09d}"

    def save(self, trainer: Any, position: Position, extra: dict[str, Any]) -> Path:
        """Collective (every rank, same step)."""
        return self.checkpointer.save(trainer, position, extra)

    def drop_after(self, step: int, is_main: bool) -> None:
        """A resumed run repeats the steps after ``step``: best checkpoints saved there by the
        interrupted run are its own stale copies (they will be saved again)."""
        if not is_main:
            return
        for path in list_checkpoints(self.root):
            if int(path.name.split("-", 1)[1]) > step:
                log.info("resuming at step %d: removing the later best checkpoint %s (it is redone)", step, path)
                shutil.rmtree(path, ignore_errors=True)

    def restore(self, trainer: Any, step: int) -> Path:
        """Load the best point's model (and optimizer) state into ``trainer``. Collective."""
        path = self.path(step)
        if not (path / "meta.json").is_file():
            raise CheckpointError(f"{path}: the best validation point's checkpoint is missing (was it deleted?); "
                                  "set train.early_stop.restore_best=false to test the last weights")
        self.checkpointer.load(trainer, path)
        return path


# Fewer clicks (or non-clicks) than this in the validation rows, or a validation AUC whose
# standard error is above MAX_VALIDATION_AUC_SE: warned about once. Epochs of CTR models
# typically differ by 0.001-0.01 AUC; an error of 0.01 cannot rank them.
MIN_VALIDATION_LABELS = 30
MAX_VALIDATION_AUC_SE = 0.01


class Validation:
    """Scores the held-out data at the validation points and acts on the result.

    Due after every epoch and, with ``train.eval_every`` = k, after every k-th step.
    Each point is logged, appended to :class:`EarlyStopping`'s history, fed to the
    plateau schedule, and — when it is a new best that a later step could replace and
    ``restore_best`` is on — saved as the best checkpoint (before the regular checkpoint
    of the same step, so a regular checkpoint never names a best point that is not on
    disk).
    """

    def __init__(self, reader: Any, stopper: EarlyStopping, lr: Any, best: BestCheckpoint, *,
                 epoch_ends: set[int], every: int, last_step: int, restore_best: bool, is_main: bool) -> None:
        self.reader, self.stopper, self.lr, self.best = reader, stopper, lr, best
        self.epoch_ends, self.every, self.last_step = epoch_ends, every, last_step
        self.restore_best, self.is_main = restore_best, is_main
        self.seconds = 0.0
        self.warned = False

    def points(self) -> set[int]:
        """Steps that end a segment for a validation (multiples of ``every`` are added by the schedule)."""
        return set(self.epoch_ends)

    def due(self, step: int) -> bool:
        return step in self.epoch_ends or (bool(self.every) and step % self.every == 0)

    def run(self, trainer: Any, step: int, epoch: int, samples: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Validate the weights after global step ``step`` (collective) and update the state."""
        t0 = time.perf_counter()
        m = trainer.evaluate(self.reader)
        point: dict[str, Any] = {"epoch": epoch, "step": step, "epoch_end": step in self.epoch_ends,
                                 **{k: _json_number(getattr(m, k)) for k in METRIC_KEYS},
                                 "num_samples": m.num_samples, "lr_factor": self.lr.factor(max(step - 1, 0))}
        improved = self.stopper.update(point)
        reduced = self.lr.on_validation(point[self.stopper.monitor])
        self.seconds += time.perf_counter() - t0
        if self.is_main and not self.warned:
            self.warned = True
            pos = round(m.ctr * m.num_samples)
            se = auc_standard_error(m.auc, pos, m.num_samples - pos)
            # An AUC of a handful of clicks is mostly noise: the stopping point, the plateau
            # schedule and the restored weights would follow it.
            if min(pos, m.num_samples - pos) < MIN_VALIDATION_LABELS:
                log.warning("validation holds %d rows with %d clicks and %d non-clicks (under %d of either): its %s "
                            "is noise, and early stopping / the restored best point follow it; hold out more "
                            "(data.valid_fraction, data.valid_days)", m.num_samples, pos, m.num_samples - pos,
                            MIN_VALIDATION_LABELS, self.stopper.monitor)
            elif se > MAX_VALIDATION_AUC_SE:
                log.warning("validation holds %d rows with %d clicks and %d non-clicks: its AUC %.4f has a standard "
                            "error of about %.3f (Hanley-McNeil), so epochs closer than ~%.2f are not told apart and "
                            "early stopping / the restored best point may follow noise; hold out more "
                            "(data.valid_fraction, data.valid_days)", m.num_samples, pos, m.num_samples - pos,
                            m.auc, se, 2 * se)
        if self.is_main:
            best = self.stopper.best or {}
            bad, patience = self.stopper.bad, self.stopper.cfg.patience
            waited = f", {bad}/{patience} without a better one" if bad else ""
            log.info("validation epoch %d step %d: auc %s logloss %s%s (best %s %s at step %s%s)%s",
                     epoch, step, _fmt(point["auc"]), _fmt(point["logloss"]), " *" if improved else "",
                     self.stopper.monitor, _fmt(best.get(self.stopper.monitor)), best.get("step"), waited,
                     "; learning rate reduced" if reduced else "")
        if improved and self.restore_best and step != self.last_step:
            self.best.save(trainer, Position(step, samples, False), {**extra, "validation": point})
        return point


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _json_number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
