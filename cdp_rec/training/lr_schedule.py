"""Learning-rate schedule: one multiplier per step for the dense and the sparse learning rate.

``lr(step) = base_lr * factor(step)`` for every parameter group, where ``base_lr`` is the
group's configured rate (``train.dense_lr`` / ``train.sparse_lr``) and ``step`` counts the
updates done before this one (the first update is step 0)::

    warmup(step) = min(1, (step + 1) / warmup_steps)        (1 when warmup_steps = 0)
    constant:  factor = warmup(step)
    cosine:    factor = warmup(step) * (r + (1 - r) * (1 + cos(pi * t)) / 2),
               t = clamp((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)
    plateau:   factor = warmup(step) * max(r, plateau_factor ** reductions)

with ``r = min_lr_ratio`` and ``total_steps`` the length of the whole schedule
(``train.epochs`` passes; not ``max_steps``, which only interrupts a run, nor an early
stop, so a resumed or early-stopped run follows the same curve). ``reductions`` grows by
one each time ``plateau_patience`` validations in a row bring no new best of the
monitored metric (the early-stopping comparison, :class:`Improvement`); the count then
starts again (Keras' ReduceLROnPlateau without cooldown).

Where the rate takes effect: unsharded, :class:`~cdp_rec.training.optim.RowLazyAdam` and
torch Adam read ``group["lr"]`` at every ``step()``; sharded, TorchRec's fused embedding
optimizers (the update runs inside backward) copy ``param_groups[0]["lr"]`` into the
fbgemm kernel on ``zero_grad()`` / ``step()``, and both the plain loop and
TrainPipelineSparseDist call ``zero_grad()`` before the backward pass (tested).
"""

from __future__ import annotations

import math
from typing import Any

from cdp_rec.config import LRScheduleConfig


class Improvement:
    """``better(value, best)``: is ``value`` a new best (by more than ``min_delta``)?"""

    def __init__(self, mode: str, min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, got {mode!r}")
        self.mode, self.min_delta = mode, min_delta

    def better(self, value: float, best: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        if best is None:
            return True
        return value > best + self.min_delta if self.mode == "max" else value < best - self.min_delta


class LRSchedule:
    """The step -> multiplier function of ``cfg`` plus its plateau state (checkpointed)."""

    def __init__(self, cfg: LRScheduleConfig, total_steps: int, improvement: Improvement) -> None:
        self.cfg, self.total_steps, self.improvement = cfg, total_steps, improvement
        self.reductions = 0
        self.best: float | None = None
        self.bad = 0

    def factor(self, step: int) -> float:
        c = self.cfg
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        if c.kind == "constant":
            return warm
        if c.kind == "cosine":
            span = max(1, self.total_steps - c.warmup_steps)
            t = min(1.0, max(0.0, (step - c.warmup_steps) / span))
            return warm * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
        if c.kind == "plateau":
            return warm * max(c.min_lr_ratio, c.plateau_factor**self.reductions)
        raise ValueError(f"unknown lr schedule {c.kind!r}")

    def on_validation(self, value: float) -> bool:
        """Plateau bookkeeping after a validation; True when the rate was just reduced."""
        if self.cfg.kind != "plateau":
            return False
        if self.improvement.better(value, self.best):
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad < self.cfg.plateau_patience:
            return False
        self.bad = 0
        if self.cfg.plateau_factor**self.reductions <= self.cfg.min_lr_ratio:
            return False  # already at the floor
        self.reductions += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"reductions": self.reductions, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reductions, self.best, self.bad = int(state["reductions"]), state["best"], int(state["bad"])


def base_learning_rates(optimizer: Any) -> list[float]:
    """Each parameter group's configured rate, in ``optimizer.param_groups`` order.

    Read once right after the optimizers are built (before a checkpoint restores the
    scaled rate of the step it was saved at).
    """
    return [float(g["lr"]) for g in optimizer.param_groups]


def set_learning_rates(optimizer: Any, bases: list[float], factor: float) -> None:
    """``group["lr"] = base * factor`` for every group (a CombinedOptimizer lists its children's)."""
    groups = list(optimizer.param_groups)
    if len(groups) != len(bases):
        raise RuntimeError(f"optimizer has {len(groups)} parameter groups, the schedule knows {len(bases)}")
    for group, base in zip(groups, bases):
        group["lr"] = base * factor
