"""Training loop: stream the training days in order, evaluate on the test days.

One loop for both modes:

* single process (plain ``cdp-rec train``): the unsharded model, Adam for sparse
  (row-lazy, on sparse gradients: the rows a batch touched) and dense parameters;
* distributed (started by torchrun / torchx, ``WORLD_SIZE`` set): the model wrapped in
  DistributedModelParallel with the plan of :func:`embeddings.sharding.plan_sharding`,
  each rank reading its own disjoint slice of the Parquet files, TorchRec's
  TrainPipelineSparseDist overlapping the input all-to-all with compute, and the
  evaluation gathered from every rank before AUC / UAUC / GAUC are computed.

Flow (README "How training picks its stopping point"): the fixed step schedule
(:mod:`~cdp_rec.training.schedule`) runs in segments; after a segment the held-out
validation rows may be scored (every epoch, every ``train.eval_every`` steps), which
feeds early stopping and the best checkpoint (:mod:`~cdp_rec.training.early_stop`) and
the plateau learning-rate schedule (:mod:`~cdp_rec.training.lr_schedule`), and a
checkpoint may be written (:class:`~cdp_rec.training.schedule.CheckpointPolicy`). At the
end the best validated weights are restored and the test days scored.
``train.embedding_l2`` adds :mod:`~cdp_rec.training.regularize`'s term to the loss.

Writes ``<run_dir>/<run_name>/config.yaml``, ``metrics.json`` and, when sharded,
``plan.json`` (rank 0 only).

Safety: rank 0 holds an exclusive lock on the run directory for the whole run (see
:mod:`cdp_rec.training.run_lock`); ``checkpoint.resume=never`` moves an earlier run's
checkpoints aside instead of mixing with or pruning against them; a diverging loss stops
the run (see :class:`LossGuard`).
"""

from __future__ import annotations

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
from cdp_rec.training.early_stop import BestCheckpoint, EarlyStopping, Validation
from cdp_rec.training.distributed import DistContext, all_reduce_int, gather_arrays, init_from_env, launched_distributed
from cdp_rec.training.lr_schedule import LRSchedule, base_learning_rates, set_learning_rates
from cdp_rec.training.optim import build_optimizers, build_sharded_optimizer, use_sparse_gradients
from cdp_rec.training.regularize import EmbeddingL2
from cdp_rec.training.run_lock import RunLock, acquire_run_lock
from cdp_rec.training.schedule import (
    BatchSource,
    CheckpointPolicy,
    DaySplit,
    HeldOutTail,
    MaskedRows,
    TrainSchedule,
    held_out_batches,
    resume,
    split_days,
    user_tail_mask,
)
from embeddings.sharding import describe_plan, format_plan, shard_model, sparse_optimizer_choice
from cdp_rec.training.id_report import IdMappingReport
from embeddings.id_mapping import attach_optimizer
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
            attach_optimizer(self.model, self.optimizer)  # managed tables: admitted rows start from zero state
            self._finish_init()
            return
        full = None if sharded_init else {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        dmp, plan = shard_model(cfg, self.model, ctx.device, ctx.world_size, ctx.local_world_size, dist.group.WORLD)
        if full is not None:
            load_full_state(dmp, full)
        self.module, self.device = dmp, ctx.device
        self.plan_rows = describe_plan(plan)
        self.optimizer = build_sharded_optimizer(dmp, cfg.train)
        attach_optimizer(self.model, self.optimizer, dmp)  # managed tables reset admitted rows in the shards
        self.optimizer_note = sparse_optimizer_choice(cfg.sharding, ctx.device.type).note.format(lr=cfg.train.sparse_lr)
        if cfg.sharding.pipeline:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(self.module, self.optimizer, ctx.device, execute_all_batches=True)
        self._finish_init()

    def _finish_init(self) -> None:
        # The configured rate of every parameter group, before a checkpoint load restores a scaled one.
        self.lr_bases = base_learning_rates(self.optimizer)
        self.regularizer = EmbeddingL2(self.model, self.cfg.train.embedding_l2) if self.cfg.train.embedding_l2 else None

    def set_lr_factor(self, factor: float) -> None:
        """Every group's rate = its configured rate x ``factor`` (dense and sparse, fused or not)."""
        set_learning_rates(self.optimizer, self.lr_bases, factor)

    # ------------------------------------------------------------------ training

    def train_steps(
        self, batches: Iterable[Batch], on_step: Callable[[dict[str, torch.Tensor]], None], first_step: int = 0,
        before_step: Callable[[int], None] | None = None,
    ) -> int:
        """Run one optimizer step per batch; ``on_step`` sees each step's output dict.

        ``first_step``: the global step before these batches (errors name global steps).
        ``before_step(s)``: called before the update that follows ``s`` global steps (e.g. to
        set its learning rate; the pipeline's and the loop's ``zero_grad()`` then hand the
        rate to the fused sparse kernels before their in-backward update).
        """
        self.module.train()
        prepared: Iterator[Batch] = (self.model.prepare_batch(b) for b in batches)
        steps = 0
        if self.pipeline is not None:
            if not getattr(self.pipeline, "_model_attached", True):
                self.pipeline.attach(self.module)
            while True:
                if before_step is not None:
                    before_step(first_step + steps)
                try:
                    out = self.pipeline.progress(prepared)
                except StopIteration:
                    break
                self._check_finite(out, first_step + steps + 1)
                on_step(out)
                steps += 1
            return steps
        for batch in prepared:
            if before_step is not None:
                before_step(first_step + steps)
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


def _equal_step_count(n_local: int, ctx: DistContext | None, what: str) -> int:
    """Steps every rank can take on ``what``, of which this rank has ``n_local`` batches
    (sharded forwards are collectives: equal counts)."""
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
    id_report = IdMappingReport(trainer.model, active=hasattr(trainer.model, "id_mapper") or cfg.data.id_churn > 0)
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

    split = split_days(cfg.data)
    schedule, reader, valid_reader, test_reader = _plan_data(cfg, root, split, bs, eval_bs, ctx)

    ckpt = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last)
    policy = CheckpointPolicy(cfg.checkpoint, schedule)
    stopper = EarlyStopping(cfg.train.early_stop)
    lr = LRSchedule(cfg.train.lr_schedule, schedule.length, stopper.improvement)
    best = BestCheckpoint(ckpt_dir / "best")
    validation = None if valid_reader is None else Validation(
        valid_reader, stopper, lr, best, epoch_ends=schedule.epoch_ends, every=cfg.train.eval_every,
        last_step=schedule.length, restore_best=cfg.train.early_stop.restore_best, is_main=is_main)

    resumed = resume(ckpt, trainer, schedule, world, bs, cfg.checkpoint.resume == "auto", log)
    start, pos = resumed.start, resumed.position
    for point in stopper.replay(resumed.history, start):  # early-stop and plateau state as they were at `start`
        lr.on_validation(point.get(stopper.monitor))
    if resumed.path is None:
        if is_main and list_checkpoints(best.root):  # an earlier run's best point is not this run's
            moved = move_aside_checkpoints(best.root)
            log.warning("fresh start: moved the best checkpoint of an earlier run in %s aside to %s", best.root, moved)
    else:
        best.drop_after(start, is_main)
        if is_main:
            log.info("resumed from %s at global step %d (%d samples seen)", resumed.path, start, pos.samples)
    if ctx is not None:
        dist.barrier()  # rank 0 has (re)moved stale best checkpoints before anyone saves one

    progress = _Progress(cfg, schedule, start, pos.samples, world, bs, is_main)
    t0 = time.perf_counter()
    step = start
    on_step = id_report.wrap(progress.on_step)
    try:
        if not pos.final:
            validating = validation is not None
            ends = schedule.segment_ends(
                start, [cfg.checkpoint.every_steps if policy.enabled else 0, cfg.train.eval_every if validating else 0],
                policy.points() | (validation.points() if validating else set()))
            for end in ends:
                # One segment: the steps up to the next validation / checkpoint / end. The sharded
                # pipeline drains at its end, so every rank has applied the same updates.
                batches = schedule.batches(step, end, reader, progress.set_day)
                trainer.train_steps(id_report.watch(batches, lambda: progress.day), on_step, first_step=step,
                                    before_step=lambda s: trainer.set_lr_factor(lr.factor(s)))
                step = end
                if validating and validation.due(step):
                    validation.run(trainer, step, schedule.epoch_of(step), progress.seen,
                                   {"local_batch_size": bs})
                if policy.due(step, stopping=stopper.stopped):
                    final = step == schedule.length or stopper.stopped
                    ckpt.save(trainer, Position(step, progress.seen, final),
                              {"local_batch_size": bs, "training_state": {"history": stopper.history}})
                if stopper.stopped:
                    if is_main:
                        log.info("early stop at step %d (epoch %d): no better validation %s in %d validations",
                                 step, schedule.epoch_of(step), stopper.monitor, stopper.cfg.patience)
                    break
        id_days = id_report.finish()
    finally:
        progress.close()
    train_seconds = time.perf_counter() - t0 - (validation.seconds if validation else 0.0)

    # Test with the best validated weights (the weights in memory are those after `weights_step`).
    weights_step = pos.global_step if pos.final else step
    restored = None
    summary = stopper.summary()
    if summary is not None and cfg.train.early_stop.restore_best:
        restored = summary["step"]
        if restored != weights_step:
            path = best.restore(trainer, restored)
            if is_main:
                log.info("restored the best validation point (epoch %d, step %d, %s %.4f) from %s for the test days",
                         summary["epoch"], restored, stopper.monitor, summary["value"], path)

    t1 = time.perf_counter()
    metrics = trainer.evaluate(test_reader)
    eval_seconds = time.perf_counter() - t1

    result: dict[str, Any] = {
        "model": cfg.model.name,
        "ablation": cfg.model.ablation,
        "config_hash": cfg.hash(),
        "data_root": str(root),
        "world_size": world,
        "sparse_optimizer": trainer.optimizer_note,
        "train_days": split.train,
        "valid_days": split.valid,
        "valid_tail": None if split.tail_day is None else {"day": split.tail_day, "fraction": split.tail_fraction,
                                                           "split": split.tail_split},
        "test_days": split.test,
        **metrics.to_dict(),
        "num_train_samples": progress.seen,
        "resumed_from_step": start,
        "num_eval_samples": metrics.num_samples,
        "train_steps": progress.steps,
        "scheduled_steps": schedule.length,
        "epochs_run": schedule.epoch_of(weights_step) if weights_step else 0,
        "stopped_early": stopper.stopped,
        # The weights the test days were scored with: the best validation point's ("restored":
        # its epoch, step and validation metrics), or the last step's when nothing was validated.
        "restored": None if restored is None else {**summary, "from_checkpoint": restored != weights_step},
        "best_validation": summary,
        "validation": stopper.history,
        "lr_schedule": cfg.train.lr_schedule.kind,
        "final_lr_factor": lr.factor(max(weights_step - 1, 0)),
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_s": round((progress.seen - progress.seen_at_start) / max(train_seconds, 1e-9), 1),
        "valid_seconds": round(validation.seconds, 3) if validation else 0.0,
        "eval_seconds": round(eval_seconds, 3),
        "final_train_loss": progress.loss,
    }
    if id_report.active:
        result["id_mapping_days"] = id_days
    if is_main:
        (out_dir / "metrics.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    return TrainResult(out_dir, _jsonable(result))


def _plan_data(cfg: JobConfig, root: Path, split: DaySplit, bs: int, eval_bs: int, ctx: DistContext | None
               ) -> tuple[TrainSchedule, Callable[[int], BatchSource], BatchSource | None, ParquetBatchReader]:
    """The training schedule, this rank's training batches of a day, validation and test readers.

    The schedule is fixed up front (every rank the same step count per day): from Parquet
    footers, or for a ``per_user`` validation split from one pass over the day's user ids.
    The validation rows of the last training day (``data.valid_fraction``) are split off
    this rank's own rows of that day, so no rank ever trains on a row it validates on.
    """
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    test_reader = open_reader(cfg, root, split.test, eval_bs, rank, world)  # a missing test day fails now
    valid_reader: BatchSource | None = None
    if split.valid:
        valid_reader = open_reader(cfg, root, split.valid, eval_bs, rank, world)
    day_steps = {}
    train_mask: Any = None
    for d in split.train:
        r = open_reader(cfg, root, d, bs, rank, world)
        if d == split.tail_day and split.tail_split == "per_user":
            held = user_tail_mask(r, split.tail_fraction)
            if not held.any() or held.all():
                raise DataError(f"day {d}: data.valid_split=per_user with data.valid_fraction="
                                f"{split.tail_fraction:g} holds out {int(held.sum())} of this rank's {held.size} rows; "
                                "use a larger fraction, data.valid_split=tail or data.valid_days")
            train_mask = ~held
            valid_reader = MaskedRows(r, held, eval_bs)
            day_steps[d] = _equal_step_count(MaskedRows(r, train_mask, bs).num_batches(), ctx,
                                             f"day {d} (without its validation rows)")
        elif d == split.tail_day:
            n = r.num_batches()
            cut = n - held_out_batches(n, split.tail_fraction, f"day {d}")
            valid_reader = HeldOutTail(r, cut)
            day_steps[d] = _equal_step_count(cut, ctx, f"day {d} (without its validation tail)")
        else:
            day_steps[d] = _equal_step_count(r.num_batches(), ctx, f"day {d}")

    def reader(day: int) -> BatchSource:
        r = open_reader(cfg, root, day, bs, rank, world)
        return MaskedRows(r, train_mask, bs) if day == split.tail_day and train_mask is not None else r

    schedule = TrainSchedule(cfg.train.epochs, split.train, day_steps, cfg.train.max_steps)
    return schedule, reader, valid_reader, test_reader


class _Progress:
    """Per-step bookkeeping: samples seen, smoothed loss, progress bar / log lines, divergence guard."""

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


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    # NaN is not JSON; a metric with no valid group is reported as null, not as a fake number.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
