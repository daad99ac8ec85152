"""Per-step bookkeeping of a training run: samples seen, smoothed loss, the progress bar
or log lines, and the divergence guard that stops a run whose loss blows up.

:class:`Progress` is the run's step recorder (``on_step`` sees every step's output dict);
its counts feed ``metrics.json`` (:func:`cdp_rec.training.run_record.run_metrics`).
"""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm import tqdm

from cdp_rec.config import JobConfig
from cdp_rec.training.schedule import TrainSchedule

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); says where it happened."""


class LossGuard:
    """Stops a diverging run instead of letting it finish with a meaningless model.

    Per training step (``update``), on the step's mean ``bce`` and total ``loss``:

    * the smoothed BCE (exponential moving average, weight ``1 - decay`` ~ the last 10
      steps) above ``max_bce`` nats (10): the BCE of predicting the base rate is at most
      ln 2 = 0.69 and a trained ranker's is ~0.1-0.6, so a smoothed 10 means confidently
      wrong logits batch after batch, i.e. the weights blew up (``train.sparse_lr=1e9``
      reaches a loss of ~1e28 in a few steps);
    * after ``warmup`` steps (50), the smoothed total loss (BCE plus any auxiliary term)
      above ``factor`` (100) x its smoothed level at the end of the warm-up (that level
      floored at 0.1, so a near-zero reference cannot make noise look like divergence).

    Non-finite losses are caught earlier, in :meth:`Trainer.train_steps`. Either way a
    :class:`TrainingError` names the step and what to change.
    """

    def __init__(self, max_bce: float = 10.0, factor: float = 100.0, warmup: int = 50, decay: float = 0.9) -> None:
        self.max_bce, self.factor, self.warmup, self.decay = max_bce, factor, warmup, decay
        self.bce: float | None = None
        self.loss: float | None = None
        self.reference: float | None = None
        self.steps = 0

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def update(self, loss: float, bce: float, step: int) -> None:
        self.steps += 1
        self.bce, self.loss = self._smooth(self.bce, bce), self._smooth(self.loss, loss)
        hint = "lower train.dense_lr / train.sparse_lr (or check the data)"
        if not (math.isfinite(self.bce) and math.isfinite(self.loss)):
            raise TrainingError(f"training diverged at step {step}: non-finite smoothed loss; {hint}")
        if self.bce > self.max_bce:
            raise TrainingError(
                f"training diverged at step {step}: smoothed BCE {self.bce:.4g} > {self.max_bce:g} "
                f"(a sane ranker is below 0.7); {hint}"
            )
        if self.steps == self.warmup:
            self.reference = max(self.loss, 0.1)
        if self.reference is not None and self.loss > self.factor * self.reference:
            raise TrainingError(
                f"training diverged at step {step}: smoothed loss {self.loss:.4g} > {self.factor:g} x its "
                f"level {self.reference:.4g} after {self.warmup} steps; {hint}"
            )


class Progress:
    """Per-step bookkeeping: samples seen, smoothed loss, progress bar / log lines, divergence guard.

    ``start`` / ``seen``: the global step and samples a resumed run starts from; ``steps``
    and ``seen`` count on from there (``seen_at_start`` keeps where this process began, for
    its samples/s). ``day`` is the training day of the batches being stepped (``set_day``).
    """

    def __init__(self, cfg: JobConfig, schedule: TrainSchedule, start: int, seen: int, world: int, bs: int,
                 is_main: bool) -> None:
        self.cfg, self.world, self.is_main = cfg, world, is_main
        self.day = schedule.entries[0][1] if schedule.entries else 0
        self.seen = self.seen_at_start = seen
        self.steps = start
        self.loss: float | None = None
        self.guard = LossGuard()
        per_step_rows = cfg.train.batch_size if cfg.train.batch_size_scope == "global" else bs * world
        self.bar = tqdm(total=schedule.stop * per_step_rows, initial=min(start, schedule.stop) * per_step_rows,
                        unit="sample", disable=not (cfg.train.progress and is_main), desc=f"train {cfg.model.name}")
        self.t0 = time.perf_counter()

    def set_day(self, day: int) -> None:
        self.day = day

    def current_day(self) -> int:
        return self.day

    def on_step(self, out: dict[str, torch.Tensor]) -> None:
        n = out["logits"].numel() * self.world  # global samples this step (ranks step together)
        self.seen += n
        self.steps += 1
        loss = out["loss"].item()
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        self.bar.update(n)
        step = self.steps
        self.guard.update(loss, out["bce"].item(), step)
        if step % self.cfg.train.log_every == 0:
            rate = (self.seen - self.seen_at_start) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{self.loss:.4f}", samples_s=f"{rate:,.0f}", day=self.day)
            if self.is_main and not self.cfg.train.progress:
                log.info("day %d step %d loss %.4f %.0f samples/s", self.day, step, self.loss, rate)

    def close(self) -> None:
        self.bar.close()
