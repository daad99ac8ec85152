"""Which weights a run ends with: validation-driven model selection.

:class:`ModelSelection` bundles the pieces that act on validation points - early stopping
(:class:`~cdp_rec.training.early_stop.EarlyStopping`), the learning-rate schedule
(:class:`~cdp_rec.training.lr_schedule.LRSchedule`, whose plateau variant listens to the
same points), the best checkpoint (:class:`~cdp_rec.training.early_stop.BestCheckpoint`)
and the scoring of the held-out rows (:class:`~cdp_rec.training.early_stop.Validation`) -
and answers the loop's three questions: is a validation due after this step, what is the
learning rate of the next one, should the run stop; then, after the loop, it puts the
best validated weights back before the test days are scored.

Without validation data (``valid_reader`` None) nothing is ever validated: the run
trains the whole schedule and is tested with its last weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp_rec.config import TrainConfig
from cdp_rec.training.checkpoint import list_checkpoints
from cdp_rec.training.early_stop import BestCheckpoint, EarlyStopping, Validation
from cdp_rec.training.lr_schedule import LRSchedule
from cdp_rec.training.run_dirs import move_aside_checkpoints
from cdp_rec.training.schedule import BatchSource, TrainSchedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """The weights the test days are scored with. ``summary``: the best validation point
    (:meth:`EarlyStopping.summary`; None when nothing was validated); ``step``: the step
    whose weights were restored for the test (None: the last weights, no restore);
    ``from_checkpoint``: whether they came from the best checkpoint (False when the best
    point is the last step, whose weights are already in memory)."""

    summary: dict[str, Any] | None
    step: int | None
    from_checkpoint: bool

    def record(self) -> dict[str, Any] | None:
        """``metrics.json``'s ``restored``: the best point and where its weights came from."""
        return None if self.step is None else {**(self.summary or {}), "from_checkpoint": self.from_checkpoint}


class ModelSelection:
    """Validation, early stopping, the learning-rate factor and the best checkpoint of one run.

    Args:
        cfg: ``train.*`` (``eval_every``, ``early_stop``, ``lr_schedule``).
        schedule: the run's step schedule (epoch ends, length).
        valid_reader: this rank's validation batches, or None (no validation data).
        best_root: where the best checkpoint lives (``<checkpoints>/best``).
        is_main: rank 0 (logs, moves files).
    """

    def __init__(self, cfg: TrainConfig, schedule: TrainSchedule, valid_reader: BatchSource | None, best_root: Path,
                 is_main: bool) -> None:
        self.is_main = is_main
        self.restore_best = cfg.early_stop.restore_best
        self.stopper = EarlyStopping(cfg.early_stop)
        self.lr = LRSchedule(cfg.lr_schedule, schedule.length, self.stopper.improvement)
        self.best = BestCheckpoint(best_root)
        self.eval_every = cfg.eval_every if valid_reader is not None else 0
        self.validation = None if valid_reader is None else Validation(
            valid_reader, self.stopper, self.lr, self.best, epoch_ends=schedule.epoch_ends, every=cfg.eval_every,
            last_step=schedule.length, restore_best=cfg.early_stop.restore_best, is_main=is_main)

    # ------------------------------------------------------------------ start

    def resume(self, history: list[dict[str, Any]], start: int, fresh: bool) -> None:
        """Continue from a checkpoint's validation ``history`` at global step ``start``.

        Early-stop and plateau state become what they were at ``start``. A ``fresh`` start
        moves an earlier run's best checkpoint aside (it is not this run's best point); a
        resumed one drops best checkpoints after ``start`` (the steps there are redone).
        Rank 0 moves files; the caller holds a barrier before anyone saves a best point.
        """
        for point in self.stopper.replay(history, start):
            self.lr.on_validation(point.get(self.stopper.monitor))
        if fresh:
            if self.is_main and list_checkpoints(self.best.root):
                moved = move_aside_checkpoints(self.best.root)
                log.warning("fresh start: moved the best checkpoint of an earlier run in %s aside to %s",
                            self.best.root, moved)
        else:
            self.best.drop_after(start, self.is_main)

    # ------------------------------------------------------------------ during the loop

    def segment_points(self) -> tuple[int, set[int]]:
        """What ends a training segment for a validation: every ``eval_every`` steps (0:
        none) and the epoch ends (none without validation data)."""
        return self.eval_every, self.validation.points() if self.validation is not None else set()

    def lr_factor(self, step: int) -> float:
        """The learning-rate factor of the update after global step ``step``."""
        return self.lr.factor(step)

    def after_segment(self, trainer: Any, step: int, epoch: int, samples: int, extra: dict[str, Any]) -> None:
        """Validate (collective) if a validation is due after ``step``; this may stop the
        run, lower the rate and save the best checkpoint."""
        if self.validation is not None and self.validation.due(step):
            self.validation.run(trainer, step, epoch, samples, extra)

    @property
    def stopped(self) -> bool:
        return self.stopper.stopped

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.stopper.history

    @property
    def valid_seconds(self) -> float:
        return self.validation.seconds if self.validation is not None else 0.0

    # ------------------------------------------------------------------ after the loop

    def restore_for_test(self, trainer: Any, weights_step: int) -> Restored:
        """Put the best validated weights into ``trainer`` (collective) when
        ``restore_best`` is on and they are not already there (``weights_step``: the step
        of the weights in memory)."""
        summary = self.stopper.summary()
        if summary is None or not self.restore_best:
            return Restored(summary, None, False)
        step = summary["step"]
        if step == weights_step:
            return Restored(summary, step, False)
        path = self.best.restore(trainer, step)
        if self.is_main:
            log.info("restored the best validation point (epoch %d, step %d, %s %.4f) from %s for the test days",
                     summary["epoch"], step, self.stopper.monitor, summary["value"], path)
        return Restored(summary, step, True)
