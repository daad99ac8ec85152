"""Where a run writes, and moving an earlier run's checkpoints out of its way.

``<train.run_dir>/<run name>/`` holds ``config.yaml``, ``metrics.json``, ``plan.json``
(sharded) and ``pids/``; checkpoints go to ``checkpoint.dir`` or ``<run>/checkpoints``,
the best validation point's to ``<checkpoints>/best``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cdp_rec.config import JobConfig
from cdp_rec.training.checkpoint import list_checkpoints


@dataclass(frozen=True)
class RunPaths:
    out: Path  # the run directory
    checkpoints: Path

    @property
    def best(self) -> Path:
        return self.checkpoints / "best"


def run_name(cfg: JobConfig) -> str:
    return cfg.train.run_name or f"{cfg.model.name}-{cfg.hash()}"


def run_paths(cfg: JobConfig) -> RunPaths:
    out = Path(cfg.train.run_dir) / run_name(cfg)
    return RunPaths(out, Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints")


def move_aside_checkpoints(ckpt_dir: Path) -> Path | None:
    """A fresh start (``checkpoint.resume=never``) must not prune against, or later resume
    from, another run's checkpoints: rename the checkpoint directory, if it holds committed
    checkpoints, to the sibling ``<name>.replaced-<UTC time>``. Returns where they went.

    When the directory cannot be renamed (e.g. a mount point) its checkpoints are moved
    into ``<dir>/replaced-<UTC time>/`` instead (not listed as checkpoints either).
    """
    if not list_checkpoints(ckpt_dir):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = ckpt_dir.with_name(f"{ckpt_dir.name}.replaced-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = ckpt_dir.with_name(f"{ckpt_dir.name}.replaced-{stamp}-{n}")
    try:
        os.rename(ckpt_dir, dest)
    except OSError:
        dest = ckpt_dir / f"replaced-{stamp}"
        dest.mkdir()
        for old in list_checkpoints(ckpt_dir):
            os.rename(old, dest / old.name)
    return dest
