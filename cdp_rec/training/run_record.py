"""What a finished run reports: the ``metrics.json`` record.

One pure function of what the run's units hold (the day split, the schedule, model
selection, the step recorder, the test metrics, timings), so the record can be checked
without training anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp_rec.config import JobConfig
from cdp_rec.metrics import CTRMetrics
from cdp_rec.training.loop import LoopEnd
from cdp_rec.training.progress import Progress
from cdp_rec.training.schedule import DaySplit, TrainSchedule
from cdp_rec.training.selection import ModelSelection, Restored


@dataclass(frozen=True)
class RunContext:
    """Run facts the record names: data root, world size, the sparse optimizer in words,
    the global step the run resumed from, the intra-op threads (count, source, detail)."""

    root: Path
    world: int
    optimizer_note: str
    start: int
    threads: dict[str, Any] | None = None


def run_metrics(cfg: JobConfig, run: RunContext, split: DaySplit, schedule: TrainSchedule, selection: ModelSelection,
                progress: Progress, end: LoopEnd, restored: Restored, test: CTRMetrics, eval_seconds: float
                ) -> dict[str, Any]:
    """The ``metrics.json`` record (NaN metrics as None)."""
    summary = restored.summary
    result: dict[str, Any] = {
        "model": cfg.model.name,
        "ablation": cfg.model.ablation,
        "config_hash": cfg.hash(),
        "data_root": str(run.root),
        "world_size": run.world,
        "sparse_optimizer": run.optimizer_note,
        "threads": run.threads,
        "train_days": split.train,
        "valid_days": split.valid,
        "valid_tail": None if split.tail_day is None else {"day": split.tail_day, "fraction": split.tail_fraction,
                                                           "split": split.tail_split},
        "test_days": split.test,
        **test.to_dict(),
        "num_train_samples": progress.seen,
        "resumed_from_step": run.start,
        "num_eval_samples": test.num_samples,
        "train_steps": progress.steps,
        "scheduled_steps": schedule.length,
        "epochs_run": schedule.epoch_of(end.weights_step) if end.weights_step else 0,
        "stopped_early": selection.stopped,
        # The weights the test days were scored with: the best validation point's ("restored":
        # its epoch, step and validation metrics), or the last step's when nothing was validated.
        "restored": restored.record(),
        "best_validation": summary,
        "validation": selection.history,
        "lr_schedule": cfg.train.lr_schedule.kind,
        "final_lr_factor": selection.lr_factor(max(end.weights_step - 1, 0)),
        "train_seconds": round(end.seconds, 3),
        "train_samples_per_s": round((progress.seen - progress.seen_at_start) / max(end.seconds, 1e-9), 1),
        "valid_seconds": round(selection.valid_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "final_train_loss": progress.loss,
        "peak_device_memory": peak_device_memory(),
    }
    return jsonable(result)


def peak_device_memory() -> int | None:
    """Peak bytes the CUDA caching allocator handed out on this rank's device (None off CUDA).

    What ``scripts/gpu_check.py`` holds against the plan's per-rank HBM estimate: tables,
    optimizer state, activations and the allocator's rounding, not its cached-but-free pool.
    """
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return int(torch.cuda.max_memory_allocated(torch.cuda.current_device()))


# What one invocation of a run measured (a resumed run is several invocations).
INVOCATION_KEYS = ("resumed_from_step", "train_steps", "train_seconds", "train_samples_per_s", "valid_seconds",
                   "final_train_loss")


def with_earlier_invocations(record: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``record`` of a resumed invocation, keeping what the run's earlier invocations measured.

    ``previous`` is the run directory's ``metrics.json`` before this invocation (None: none).
    When this invocation resumed (``resumed_from_step > 0``) the same config's run, the
    record lists every invocation's :data:`INVOCATION_KEYS` under ``invocations``, oldest
    first; and when it trained nothing (a finished run rerun), the top-level timing and loss
    stay those of the last invocation that trained, instead of 0 samples/s and no loss.
    """
    if not previous or not record.get("resumed_from_step") or previous.get("config_hash") != record["config_hash"]:
        return record
    earlier = previous.get("invocations") or [{k: previous.get(k) for k in INVOCATION_KEYS}]
    out = {**record, "invocations": [*earlier, {k: record.get(k) for k in INVOCATION_KEYS}]}
    if not record.get("train_seconds") and previous.get("train_seconds"):
        out.update({k: previous.get(k) for k in ("train_seconds", "train_samples_per_s", "valid_seconds",
                                                 "final_train_loss")})
    return out


def read_metrics(out_dir: Path) -> dict[str, Any] | None:
    """The run directory's ``metrics.json``, or None when absent or unreadable (then not carried over)."""
    try:
        data = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def write_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(jsonable(record), indent=2) + "\n")


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    # NaN is not JSON; a metric with no valid group is reported as null, not as a fake number.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
