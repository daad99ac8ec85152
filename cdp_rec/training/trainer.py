"""Training loop: stream the training days in order, evaluate on the test days.

One loop for both modes:

* single process (plain ``cdp-rec train``): the unsharded model, Adam for sparse
  (row-lazy, on sparse gradients: the rows a batch touched) and dense parameters;
* distributed (started by torchrun / torchx, ``WORLD_SIZE`` set): the model wrapped in
  DistributedModelParallel with the plan of :func:`embeddings.sharding.plan_sharding`,
  each rank reading its own disjoint slice of the Parquet files, TorchRec's
  TrainPipelineSparseDist overlapping the input all-to-all with compute, and the
  evaluation gathered from every rank before AUC / UAUC / GAUC are computed.

Writes ``<run_dir>/<run_name>/config.yaml``, ``metrics.json`` and, when sharded,
``plan.json`` (rank 0 only).

Safety: rank 0 holds an exclusive lock on the run directory for the whole run (see
:mod:`cdp_rec.training.run_lock`); ``checkpoint.resume=never`` moves an earlier run's
checkpoints aside instead of mixing with or pruning against them; a diverging loss stops
the run (see :class:`LossGuard`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from cdp_rec.config import ConfigError, JobConfig, save_config
from cdp_rec.data.joined import open_reader
from cdp_rec.data.loader import DataError, ParquetBatchReader, check_dataset_spec
from cdp_rec.data.schema import Batch, is_sequence_feature
from cdp_rec.metrics import CTRMetrics, MetricAccumulator, compute_ctr_metrics
from cdp_rec.models import build_model
from cdp_rec.training.checkpoint import Checkpointer, Position, list_checkpoints, table_shapes
from cdp_rec.training.distributed import DistContext, all_reduce_int, gather_arrays, init_from_env, launched_distributed
from cdp_rec.training.optim import build_optimizers, build_sharded_optimizer, use_sparse_gradients
from cdp_rec.training.run_lock import RunLock, acquire_run_lock
from embeddings.sharding import describe_plan, format_plan, shard_model, sparse_optimizer_choice
from embeddings.state import load_full_state

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
    an error naming the differing key — never silently overwritten or misread. Only a
    missing root is ever written (and :func:`~cdp_rec.data.synthetic.generate_dataset`
    itself refuses a non-empty directory it did not write), so this never touches a
    directory of real logs.
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
    generate_dataset(cfg, root, force=False)


def run_name(cfg: JobConfig) -> str:
    return cfg.train.run_name or f"{cfg.model.name}-{cfg.hash()}"


def local_batch_size(cfg: JobConfig, world_size: int, batch_size: int | None = None) -> int:
    bs = cfg.train.batch_size if batch_size is None else batch_size
    if cfg.train.batch_size_scope == "per_rank":
        return bs
    if bs % world_size:
        raise ConfigError(
            f"train.batch_size={bs} is a global batch (train.batch_size_scope=global) and must be "
            f"divisible by the world size {world_size}"
        )
    return bs // world_size


class Trainer:
    """Owns the model (sharded or not), its optimizers and the step / eval mechanics.

    Args:
        cfg: the job config.
        ctx: the process group context, or None for a single unsharded process.
        model: an already built (e.g. checkpoint-loaded) unsharded model to use.
    """

    def __init__(self, cfg: JobConfig, ctx: DistContext | None = None, model: torch.nn.Module | None = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.train.seed)
        sharded_init = ctx is not None and cfg.sharding.init == "sharded"
        self.model = model if model is not None else build_model(cfg, device="meta" if sharded_init else "cpu")
        self.table_shapes = table_shapes(self.model)  # before DMP swaps the EBC for its sharded twin
        self.plan_rows: list[dict[str, Any]] = []
        self.pipeline = None
        if ctx is None:
            self.module: torch.nn.Module = self.model
            seq_len, bs = cfg.features.max_seq_len, cfg.train.batch_size
            use_sparse_gradients(self.model, lambda f: bs * (seq_len if is_sequence_feature(f) else 1))
            self.optimizer: Any = build_optimizers(self.model, cfg.train)
            self.device = torch.device("cpu")
            self.optimizer_note = "sparse optimizer: row-lazy Adam over the unsharded tables (touched rows only)"
            return
        full = None if sharded_init else {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        dmp, plan = shard_model(cfg, self.model, ctx.device, ctx.world_size, ctx.local_world_size, dist.group.WORLD)
        if full is not None:
            load_full_state(dmp, full)
        self.module, self.device = dmp, ctx.device
        self.plan_rows = describe_plan(plan)
        self.optimizer = build_sharded_optimizer(dmp, cfg.train)
        self.optimizer_note = sparse_optimizer_choice(cfg.sharding, ctx.device.type).note.format(lr=cfg.train.sparse_lr)
        if cfg.sharding.pipeline:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(self.module, self.optimizer, ctx.device, execute_all_batches=True)

    # ------------------------------------------------------------------ training

    def train_steps(
        self, batches: Iterable[Batch], on_step: Callable[[dict[str, torch.Tensor]], None], first_step: int = 0
    ) -> int:
        """Run one optimizer step per batch; ``on_step`` sees each step's output dict.

        ``first_step``: the global step before these batches (errors name global steps).
        """
        self.module.train()
        prepared: Iterator[Batch] = (self.model.prepare_batch(b) for b in batches)
        steps = 0
        if self.pipeline is not None:
            if not getattr(self.pipeline, "_model_attached", True):
                self.pipeline.attach(self.module)
            while True:
                try:
                    out = self.pipeline.progress(prepared)
                except StopIteration:
                    break
                self._check_finite(out, first_step + steps + 1)
                on_step(out)
                steps += 1
            return steps
        for batch in prepared:
            loss, out = self.module(batch.to(self.device))
            self._check_finite(out, first_step + steps + 1)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            on_step(out)
            steps += 1
        return steps

    @staticmethod
    def _check_finite(out: dict[str, torch.Tensor], step: int) -> None:
        if not (torch.isfinite(out["loss"]).all() and torch.isfinite(out["bce"]).all()):
            raise TrainingError(
                f"training diverged: non-finite loss {out['loss'].item()} at step {step} "
                f"(bce={out['bce'].item()}); lower train.dense_lr / train.sparse_lr or check the data"
            )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, reader: ParquetBatchReader) -> CTRMetrics:
        """Score every row of ``reader`` (this rank's files) and compute the metrics over all ranks.

        Sharded forwards are collectives, so every rank runs the same number of batches:
        a rank that runs out repeats its last batch and throws those scores away.
        """
        if self.pipeline is not None:
            self.pipeline.detach()  # restore the sharded modules' own forward for eval
        acc = MetricAccumulator()
        self.module.eval()
        n_local = reader.num_batches()
        n = all_reduce_int(n_local, dist.ReduceOp.MAX) if self.ctx is not None else n_local
        with torch.no_grad():
            it = iter(reader)
            last: Batch | None = None
            for i in range(n):
                real = i < n_local
                batch = next(it) if real else last
                if batch is None:  # nothing to repeat: this rank has no evaluation rows at all
                    raise DataError(f"rank {self.ctx.rank if self.ctx else 0} has no evaluation rows; "
                                    "use fewer ranks or more files per day")
                last = batch
                _, out = self.module(self.model.prepare_batch(batch).to(self.device))
                if real:
                    acc.update(torch.sigmoid(out["logits"]), batch.labels, batch.user_ids, batch.request_ids)
        self.module.train()
        if self.ctx is None:
            return acc.compute()
        return compute_ctr_metrics(**gather_arrays(acc.state()))


def _equal_step_count(reader: ParquetBatchReader, ctx: DistContext | None, what: str) -> int:
    """Steps every rank can take on ``what`` (sharded forwards are collectives: equal counts)."""
    n_local = reader.num_batches()
    if ctx is None:
        return n_local
    n = all_reduce_int(n_local, dist.ReduceOp.MIN)
    if n < n_local:
        log.warning(
            "rank %d: %s has %d batches but the smallest rank has %d; skipping this rank's last %d "
            "batches so every rank steps together (balance the files per day to avoid this)",
            ctx.rank, what, n_local, n, n_local - n,
        )
    return n


def train(cfg: JobConfig, data_root: str | Path | None = None) -> TrainResult:
    """Train ``cfg.model.name`` on the training days, evaluate on the test days.

    Distributed when launched by torchrun / torchx (``WORLD_SIZE`` in the environment).
    """
    ctx = init_from_env(cfg.sharding.compute_device) if launched_distributed() else None
    lock: RunLock | None = None
    try:
        if ctx is None or ctx.is_main:
            # One job per run directory; only rank 0 locks (the other ranks are the same job).
            # A torchrun restart's rank 0 waits briefly for the previous one to be gone.
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            lock = acquire_run_lock(Path(cfg.train.run_dir) / run_name(cfg), wait_s=30.0 if restarted else 0.0)
        return _train(cfg, Path(data_root or cfg.data.root), ctx)
    finally:
        if lock is not None:
            lock.release()
        if ctx is not None and dist.is_initialized():
            dist.destroy_process_group()


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


def preflight_capacity(cfg: JobConfig, world_size: int, local_world_size: int) -> None:
    """Fail before sharding when the tables (with optimizer state) cannot fit the topology.

    The same check as ``cdp-rec plan``: raises CapacityError naming the tables and the
    memory they need vs have, instead of an OOM or a bare planner error mid start-up.
    """
    from embeddings.capacity import plan_capacity

    plan_capacity(cfg, world_size, local_world_size)


def _train(cfg: JobConfig, root: Path, ctx: DistContext | None) -> TrainResult:
    is_main = ctx is None or ctx.is_main
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    out_dir = Path(cfg.train.run_dir) / run_name(cfg)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out_dir / "checkpoints"
    if is_main and cfg.checkpoint.resume == "never":
        moved = move_aside_checkpoints(ckpt_dir)
        if moved is not None:
            log.warning("checkpoint.resume=never: moved the existing checkpoints of %s aside to %s "
                        "(this run starts fresh and will not resume from or delete them)", ckpt_dir, moved)
    if is_main:
        ensure_data(cfg, root)
    if ctx is not None:
        dist.barrier()  # the others wait for rank 0 to (maybe) generate the data / move checkpoints
        check_dataset_spec(root, cfg.features)
    if ctx is not None:
        preflight_capacity(cfg, world, ctx.local_world_size)
    bs = local_batch_size(cfg, world)
    eval_bs = local_batch_size(cfg, world, cfg.train.eval_batch_size) if cfg.train.batch_size_scope == "global" \
        else cfg.train.eval_batch_size

    trainer = Trainer(cfg, ctx)
    if ctx is not None:
        # Which process is which rank: operators (and the fault-tolerance test) kill by pid.
        (out_dir / "pids").mkdir(parents=True, exist_ok=True)
        (out_dir / "pids" / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        log.info(trainer.optimizer_note)
        if trainer.plan_rows:
            log.info("sharding plan (world size %d):\n%s", world, format_plan(trainer.plan_rows))
            (out_dir / "plan.json").write_text(json.dumps(trainer.plan_rows, indent=2) + "\n")

    train_days = list(range(cfg.data.train_days))
    test_days = list(range(cfg.data.train_days, cfg.data.train_days + cfg.data.test_days))
    eval_reader = open_reader(cfg, root, test_days, eval_bs, rank, world)  # a missing test day fails now

    def reader(day: int) -> ParquetBatchReader:
        return open_reader(cfg, root, day, bs, rank, world)

    # The schedule (epoch, day, steps) is fixed up front from Parquet footers, so a
    # checkpoint's global step maps back to an exact (day, batch) on resume.
    day_steps = {d: _equal_step_count(reader(d), ctx, f"day {d}") for d in train_days}
    schedule = [(e, d, day_steps[d]) for e in range(cfg.train.epochs) for d in train_days]
    day_ends = set(itertools.accumulate(n for _, _, n in schedule))
    total_steps = sum(n for _, _, n in schedule)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last)
    checkpointing = cfg.checkpoint.at_day_end or cfg.checkpoint.every_steps > 0
    pos = Position()
    latest = ckpt.latest() if cfg.checkpoint.resume == "auto" else None
    start = 0
    if latest is not None:
        pos, meta = ckpt.load(trainer, latest)
        start = pos.global_step
        if (meta.get("world_size"), meta.get("local_batch_size")) != (world, bs):
            # Another world size cuts the days into other batches: restart the day the
            # checkpoint was in (day-end checkpoints therefore resume exactly).
            done = 0
            for _, _, n in schedule:
                if done + n > start:
                    break
                done += n
            log.warning("resuming a checkpoint of world size %s on %d ranks: restarting its day at step %d "
                        "(exact continuation needs the same world size and batch size)",
                        meta.get("world_size"), world, done)
            start = done
        if is_main:
            log.info("resumed from %s at global step %d (%d samples seen)", latest, start, pos.samples)

    def train_batches() -> Iterator[Batch]:
        done = 0
        for epoch, day, n in schedule:
            if done + n <= start:
                done += n
                continue
            state["day"] = day
            first = max(0, start - done)
            stop = n if not cfg.train.max_steps else min(n, cfg.train.max_steps - done)
            if stop > first:
                yield from itertools.islice(iter(reader(day)), first, stop)
            done += n
            if cfg.train.max_steps and done >= cfg.train.max_steps:
                return

    state: dict[str, Any] = {"day": train_days[0], "seen": pos.samples, "steps": start, "loss": None}
    per_step_rows = cfg.train.batch_size if cfg.train.batch_size_scope == "global" else bs * world
    bar = tqdm(total=total_steps * per_step_rows, initial=min(start, total_steps) * per_step_rows, unit="sample",
               disable=not (cfg.train.progress and is_main), desc=f"train {cfg.model.name}")
    t0 = time.perf_counter()
    seen_at_start = state["seen"]
    guard = LossGuard()

    def on_step(out: dict[str, torch.Tensor]) -> None:
        n = out["logits"].numel() * world  # global samples this step (ranks step together)
        state["seen"] += n
        state["steps"] += 1
        loss = out["loss"].item()
        state["loss"] = loss if state["loss"] is None else 0.98 * state["loss"] + 0.02 * loss
        bar.update(n)
        step = state["steps"]
        guard.update(loss, out["bce"].item(), step)
        if step % cfg.train.log_every == 0:
            rate = (state["seen"] - seen_at_start) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{state['loss']:.4f}", samples_s=f"{rate:,.0f}", day=state["day"])
            if is_main and not cfg.train.progress:
                log.info("day %d step %d loss %.4f %.0f samples/s", state["day"], step, state["loss"], rate)
        every = cfg.checkpoint.every_steps
        if (every and step % every == 0) or (cfg.checkpoint.at_day_end and step in day_ends) or (
            checkpointing and step == total_steps
        ):
            final = step == sum(n for _, _, n in schedule)
            ckpt.save(trainer, Position(step, state["seen"], final), {"local_batch_size": bs})

    try:
        if not pos.final:
            trainer.train_steps(train_batches(), on_step, first_step=start)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    metrics = trainer.evaluate(eval_reader)
    eval_seconds = time.perf_counter() - t1

    result: dict[str, Any] = {
        "model": cfg.model.name,
        "ablation": cfg.model.ablation,
        "config_hash": cfg.hash(),
        "data_root": str(root),
        "world_size": world,
        "sparse_optimizer": trainer.optimizer_note,
        "train_days": train_days,
        "test_days": test_days,
        **metrics.to_dict(),
        "num_train_samples": state["seen"],
        "resumed_from_step": start,
        "num_eval_samples": metrics.num_samples,
        "train_steps": state["steps"],
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_s": round((state["seen"] - seen_at_start) / max(train_seconds, 1e-9), 1),
        "eval_seconds": round(eval_seconds, 3),
        "final_train_loss": state["loss"],
    }
    if is_main:
        (out_dir / "metrics.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    return TrainResult(out_dir, _jsonable(result))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    # NaN is not JSON; a metric with no valid group is reported as null, not as a fake number.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
