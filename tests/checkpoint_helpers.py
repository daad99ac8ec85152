"""One legitimate single-process checkpoint of the base model, for the tests that damage or
tamper with copies of it (tests/test_safety_checkpoint.py, tests/test_safety_hostile.py).

Import the fixtures into a test module (``from checkpoint_helpers import ckpt, saved``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from cdp_rec.config import JobConfig
from cdp_rec.training.checkpoint import Checkpointer, Position


def base_config() -> JobConfig:
    cfg = JobConfig()
    cfg.model.name = "base"
    return cfg


def base_trainer() -> Any:
    from cdp_rec.training.trainer import Trainer

    return Trainer(base_config(), None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The checkpoint, saved once per test module; tests work on copies (:func:`ckpt`)."""
    trainer = base_trainer()
    with torch.no_grad():
        for p in trainer.module.parameters():
            p.add_(0.01)  # off the seeded init, so a load that silently did nothing would show
    trainer.optimizer.init_state()
    return Checkpointer(tmp_path_factory.mktemp("safety") / "ck", 1).save(trainer, Position(3, 768),
                                                                        {"local_batch_size": 256})


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ck" / saved.name
    shutil.copytree(saved, dst)
    return dst
