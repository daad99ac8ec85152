"""The training loop proper: run the step schedule segment by segment.

A *segment* is the steps up to the next point where something happens after a step: a
validation (:class:`~cdp_rec.training.selection.ModelSelection`), a checkpoint
(:class:`~cdp_rec.training.schedule.CheckpointPolicy`) or the end of the schedule. The
sharded pipeline drains at each segment end, so every rank has applied the same updates
when the model is validated or saved. After each segment, in this order: validate (which
may save the best checkpoint), write the regular checkpoint (after the best one, so a
regular checkpoint never names a best point that is not on disk), stop if early stopping
says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cdp_rec.training.checkpoint import Position
from cdp_rec.training.progress import Progress
from cdp_rec.training.schedule import BatchSource, CheckpointPolicy, TrainSchedule
from cdp_rec.training.selection import ModelSelection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopEnd:
    """Where the loop left the model. ``step``: the last global step trained to;
    ``weights_step``: the step whose weights are in memory (a resumed run that had
    nothing left to train holds the checkpoint's); ``seconds``: wall time of the training
    steps and checkpoints, validation excluded."""

    step: int
    weights_step: int
    seconds: float


class SegmentLoop:
    """Trains ``trainer`` over ``schedule`` from a start step (see the module docstring).

    Args:
        trainer: has ``train_steps(batches, on_step, first_step=, before_step=)``,
            ``set_lr_factor(f)`` and what checkpoints / validation need.
        schedule: the fixed step schedule.
        reader_of: day -> this rank's training batches of that day.
        selection: validation, early stopping, learning-rate factor.
        policy / checkpointer: when and where regular checkpoints are written.
        progress: the per-step recorder.
        id_report: the per-day id-mapping report (``watch`` / ``wrap``).
        meta: extra ``meta.json`` fields of every checkpoint (e.g. the local batch size).
    """

    def __init__(self, trainer: Any, schedule: TrainSchedule, reader_of: Callable[[int], BatchSource],
                 selection: ModelSelection, policy: CheckpointPolicy, checkpointer: Any, progress: Progress,
                 id_report: Any, meta: dict[str, Any], is_main: bool) -> None:
        self.trainer, self.schedule, self.reader_of = trainer, schedule, reader_of
        self.selection, self.policy, self.checkpointer = selection, policy, checkpointer
        self.progress, self.id_report, self.meta, self.is_main = progress, id_report, meta, is_main

    def segment_ends(self, start: int) -> list[int]:
        """The steps after ``start`` where a segment ends (checkpoint and validation points, the stop)."""
        eval_every, eval_points = self.selection.segment_points()
        return self.schedule.segment_ends(
            start, [self.policy.every if self.policy.enabled else 0, eval_every], self.policy.points() | eval_points)

    def run(self, start: int, final: Position | None = None) -> LoopEnd:
        """Train from global step ``start``. ``final``: the resumed checkpoint's position
        when it says nothing is left to train (the loop then trains nothing)."""
        t0 = time.perf_counter()
        step = start
        if final is None:
            step = self._segments(start)
        seconds = time.perf_counter() - t0 - self.selection.valid_seconds
        return LoopEnd(step, final.global_step if final is not None else step, seconds)

    def _segments(self, start: int) -> int:
        step = start
        on_step = self.id_report.wrap(self.progress.on_step)
        for end in self.segment_ends(start):
            batches = self.schedule.batches(step, end, self.reader_of, self.progress.set_day)
            self.trainer.train_steps(self.id_report.watch(batches, self.progress.current_day), on_step,
                                     first_step=step, before_step=self._set_lr)
            step = end
            self.selection.after_segment(self.trainer, step, self.schedule.epoch_of(step), self.progress.seen,
                                         dict(self.meta))
            stopping = self.selection.stopped
            if self.policy.due(step, stopping=stopping):
                final = step == self.schedule.length or stopping
                self.checkpointer.save(self.trainer, Position(step, self.progress.seen, final),
                                       {**self.meta, "training_state": {"history": self.selection.history}})
            if stopping:
                if self.is_main:
                    log.info("early stop at step %d (epoch %d): no better validation %s in %d validations",
                             step, self.schedule.epoch_of(step), self.selection.stopper.monitor,
                             self.selection.stopper.cfg.patience)
                break
        return step

    def _set_lr(self, step: int) -> None:
        # Before the update that follows `step` global steps (the fused kernels read the rate at zero_grad).
        self.trainer.set_lr_factor(self.selection.lr_factor(step))
