"""Single-process training loop: stream the training days in order, evaluate on the test days.

Writes ``<run_dir>/<run_name>/config.yaml`` and ``metrics.json`` (AUC, UAUC, GAUC and
their alternative weightings, model name, config hash, sample counts, timings).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from cdp_rec.config import JobConfig, save_config
from cdp_rec.data.loader import DataError, ParquetBatchReader, check_dataset_spec, list_day_files
from cdp_rec.data.schema import Batch
from cdp_rec.metrics import CTRMetrics, MetricAccumulator
from cdp_rec.models import build_model
from cdp_rec.training.optim import build_optimizers

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); says where it happened."""


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]


def num_rows(files: Iterable[Path]) -> int:
    """Row count from Parquet footers only (no data read)."""
    return sum(pq.read_metadata(f).num_rows for f in files)


def ensure_data(cfg: JobConfig, root: Path) -> None:
    """Make sure ``root`` holds data this config can read.

    A missing root is generated (synthetic) when ``data.generate_if_missing`` allows it,
    else an error. An existing root written by the generator for another feature spec is
    an error naming the differing key — never silently overwritten or misread.
    """
    if root.exists():
        check_dataset_spec(root, cfg.features)
        return
    if not cfg.data.generate_if_missing:
        raise DataError(
            f"{root}: data root not found (data.generate_if_missing is false); "
            f"write it with `cdp-rec gen-data --config ... --out {root}`"
        )
    from cdp_rec.data.synthetic import generate_dataset

    log.info("data root %s missing: generating the synthetic data set (seed %d)", root, cfg.data.seed)
    generate_dataset(cfg, root)


def run_name(cfg: JobConfig) -> str:
    return cfg.train.run_name or f"{cfg.model.name}-{cfg.hash()}"


def evaluate(model: nn.Module, batches: Iterable[Batch]) -> CTRMetrics:
    """Score every batch in eval mode and compute AUC / UAUC / GAUC."""
    acc = MetricAccumulator()
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            _, out = model(batch)
            acc.update(torch.sigmoid(out["logits"]), batch.labels, batch.user_ids, batch.request_ids)
    model.train(was_training)
    return acc.compute()


def train(cfg: JobConfig, data_root: str | Path | None = None) -> TrainResult:
    """Train ``cfg.model.name`` on the training days, evaluate on the test days."""
    root = Path(data_root or cfg.data.root)
    ensure_data(cfg, root)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    model.train()
    optim = build_optimizers(model, cfg.train)

    out_dir = Path(cfg.train.run_dir) / run_name(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    train_days = list(range(cfg.data.train_days))
    test_days = list(range(cfg.data.train_days, cfg.data.train_days + cfg.data.test_days))
    day_files = {d: list_day_files(root, d) for d in train_days + test_days}
    total_train = num_rows(f for d in train_days for f in day_files[d]) * cfg.train.epochs

    bs = cfg.train.batch_size
    seen, step = 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=total_train, unit="sample", disable=not cfg.train.progress, desc=f"train {cfg.model.name}")
    running = None
    for epoch in range(cfg.train.epochs):
        for day in train_days:
            for batch in ParquetBatchReader(day_files[day], cfg.features, bs):
                loss, out = model(batch)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss {loss.item()} at epoch {epoch}, day {day}, step {step} "
                        f"(bce={out['bce'].item()}); lower the learning rates or check the data"
                    )
                optim.zero_grad()
                loss.backward()
                optim.step()
                step += 1
                seen += len(batch)
                running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
                bar.update(len(batch))
                if step % cfg.train.log_every == 0 or seen == total_train:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{rate:,.0f}", day=day)
                    if not cfg.train.progress:
                        log.info("epoch %d day %d step %d loss %.4f %.0f samples/s", epoch, day, step, running, rate)
    bar.close()
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    eval_files = [f for d in test_days for f in day_files[d]]
    metrics = evaluate(model, ParquetBatchReader(eval_files, cfg.features, cfg.train.eval_batch_size))
    eval_seconds = time.perf_counter() - t1

    result: dict[str, Any] = {
        "model": cfg.model.name,
        "ablation": cfg.model.ablation,
        "config_hash": cfg.hash(),
        "data_root": str(root),
        "train_days": train_days,
        "test_days": test_days,
        **metrics.to_dict(),
        "num_train_samples": seen,
        "num_eval_samples": metrics.num_samples,
        "train_steps": step,
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_s": round(seen / max(train_seconds, 1e-9), 1),
        "eval_seconds": round(eval_seconds, 3),
        "final_train_loss": running,
    }
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    return TrainResult(out_dir, result)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    # NaN is not JSON; a metric with no valid group is reported as null, not as a fake number.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
