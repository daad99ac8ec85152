"""Training loop: stream the training days in order, evaluate on the test days.

One loop for both modes:

* single process (plain ``cdp-rec train``): the unsharded model, Adam for sparse
  (row-lazy, on sparse gradients: the rows a batch touched) and dense parameters;
* distributed (started by torchrun / torchx, ``WORLD_SIZE`` set): the model wrapped in
  DistributedModelParallel with the plan of :func:`embeddings.sharding.plan_sharding`,
  each rank reading its own disjoint slice of the Parquet files, TorchRec's
  TrainPipelineSparseDist overlapping the input all-to-all with compute, and the
  evaluation gathered from every rank before AUC / UAUC / GAUC are computed.

Flow (README "How training picks its stopping point"), :func:`_train` top to bottom,
one unit per step:

1. paths and preparation (:mod:`~cdp_rec.training.run_dirs`): data, capacity, a
   ``resume=never`` start's old checkpoints moved aside;
2. :class:`Trainer` (model, optimizers, step and evaluation mechanics);
3. the fixed step schedule and the held-out rows (:mod:`~cdp_rec.training.schedule`);
4. model selection (:mod:`~cdp_rec.training.selection`: validation, early stopping and
   the best checkpoint of :mod:`~cdp_rec.training.early_stop`, the learning-rate
   schedule of :mod:`~cdp_rec.training.lr_schedule`), resumed from the newest checkpoint;
5. the segment loop (:mod:`~cdp_rec.training.loop`): train to the next validation /
   checkpoint point, validate, checkpoint, stop early; per-step bookkeeping in
   :mod:`~cdp_rec.training.progress`;
6. the best validated weights restored, the test days scored, ``metrics.json``
   written (:mod:`~cdp_rec.training.run_record`).

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
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from cdp_rec.config import ConfigError, JobConfig, save_config
from cdp_rec.data.joined import open_reader
from cdp_rec.data.loader import DataError, ParquetBatchReader, check_dataset_spec
from cdp_rec.data.schema import Batch, is_sequence_feature
from cdp_rec.data.spec import generation_lock, generation_marker
from cdp_rec.metrics import CTRMetrics, MetricAccumulator, compute_ctr_metrics
from cdp_rec.models import build_model
from cdp_rec.training.checkpoint import Checkpointer, table_shapes
from cdp_rec.training.distributed import DistContext, all_reduce_int, gather_arrays, init_from_env, launched_distributed
from cdp_rec.training.loop import SegmentLoop
from cdp_rec.training.lr_schedule import base_learning_rates, set_learning_rates
from cdp_rec.training.optim import build_optimizers, build_sharded_optimizer, use_sparse_gradients
from cdp_rec.training.progress import LossGuard, Progress, TrainingError
from cdp_rec.training.regularize import EmbeddingL2
from cdp_rec.training.run_dirs import RunPaths, move_aside_checkpoints, run_name, run_paths
from cdp_rec.training.run_lock import RunLock, acquire_checkpoint_lock, acquire_run_lock
from cdp_rec.training.run_record import (
    RunContext,
    read_metrics,
    run_metrics,
    with_earlier_invocations,
    write_metrics,
)
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
from cdp_rec.training.selection import ModelSelection
from cdp_rec.training.threads import ThreadChoice, pick_threads, torch_threads
from embeddings.sharding import describe_plan, format_plan, shard_model, sparse_optimizer_choice
from cdp_rec.training.id_report import IdMappingReport
from embeddings.id_mapping import apply_deferred_resets, attach_optimizer
from embeddings.state import load_full_state

log = logging.getLogger(__name__)

# Importable from here as before the loop's units had their own modules.
__all__ = ["LossGuard", "Trainer", "TrainingError", "TrainResult", "ensure_data", "local_batch_size",
           "move_aside_checkpoints", "run_name", "train"]


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
    def ready() -> bool:
        """The root is there and no generation is writing it (or was interrupted writing it)."""
        return root.exists() and not generation_marker(root).exists()

    if ready():
        _check_existing_data(cfg, root)
        return
    if not root.exists() and not cfg.data.generate_if_missing:
        raise DataError(
            f"{root}: data root not found (data.generate_if_missing is false); "
            f"write it with `cdp-rec gen-data --config ... --out {root}`"
        )
    # Two runs started together on one missing root (a sweep): the second waits for the first
    # one's generation instead of reading a half-written root or writing into it.
    with generation_lock(root):
        if ready():  # generated while this run waited
            _check_existing_data(cfg, root)
            return
        if not cfg.data.generate_if_missing:
            raise DataError(f"{root}: an unfinished synthetic data set (its generation was interrupted; "
                            f"data.generate_if_missing is false): rerun `cdp-rec gen-data --config ... --out {root}`")
        from cdp_rec.data.synthetic import generate_dataset

        log.info("data root %s missing: generating the synthetic data set (seed %d)", root, cfg.data.seed)
        generate_dataset(cfg, root, force=False)


def _check_existing_data(cfg: JobConfig, root: Path) -> None:
    """The feature spec must match (DataError); a synthetic data set generated with other
    ``data.*`` settings than the config's (its seed, samples per day, ...) is trained on as it
    is, but the run's config.yaml would record settings the data was not made with - say
    which, once, at start-up."""
    spec = check_dataset_spec(root, cfg.features)
    if not spec or spec.get("generator") != "cdp_rec.data.synthetic":
        return
    from cdp_rec.data.synthetic import dataset_spec

    want = dataset_spec(cfg)
    diff = [f"data.seed {cfg.data.seed} (data set: {spec.get('seed')})"] if spec.get("seed") != want["seed"] else []
    have = spec.get("data") if isinstance(spec.get("data"), dict) else {}
    diff += [f"data.{k} {v} (data set: {have.get(k)})" for k, v in want["data"].items()
             if k not in ("train_days", "test_days") and have.get(k) != v]
    if diff:
        log.warning("%s was generated with other settings than this config's: %s; training on the data as it is",
                    root, "; ".join(diff))


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
            attach_optimizer(self.model, self.optimizer, defer_resets=True)  # admitted rows start from zero state
            self._finish_init()
            return
        full = None if sharded_init else {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        dmp, plan = shard_model(cfg, self.model, ctx.device, ctx.world_size, ctx.local_world_size, dist.group.WORLD)
        if full is not None:
            load_full_state(dmp, full)
        self.module, self.device = dmp, ctx.device
        self.plan_rows = describe_plan(plan)
        self.optimizer = build_sharded_optimizer(dmp, cfg.train)
        attach_optimizer(self.model, self.optimizer, dmp, defer_resets=True)  # admitted rows reset in the shards
        self.optimizer_note = sparse_optimizer_choice(cfg.sharding, ctx.device.type).note.format(lr=cfg.train.sparse_lr)
        if cfg.sharding.pipeline:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(self.module, self.optimizer, ctx.device, execute_all_batches=True,
                                                    custom_model_fwd=self._train_forward)
        self._finish_init()

    def _finish_init(self) -> None:
        # The configured rate of every parameter group, before a checkpoint load restores a scaled one.
        self.lr_bases = base_learning_rates(self.optimizer)
        self.regularizer = EmbeddingL2(self.model, self.cfg.train.embedding_l2) if self.cfg.train.embedding_l2 else None

    def _train_forward(self, batch: Any) -> Any:
        # Managed tables reset the rows they handed to this batch's new ids now, after the
        # previous step's update (the pipeline prepares batches two steps ahead).
        apply_deferred_resets(self.model)
        return self.module(batch)

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
            loss, out = self._train_forward(batch.to(self.device))
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
    locks: list[RunLock] = []
    try:
        if ctx is None or ctx.is_main:
            # One job per run directory; only rank 0 locks (the other ranks are the same job).
            # A torchrun restart's rank 0 waits briefly for the previous one to be gone.
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            wait = 30.0 if restarted else 0.0
            paths = run_paths(cfg)
            locks.append(acquire_run_lock(paths.out, wait_s=wait))
            if not paths.checkpoints.resolve().is_relative_to(paths.out.resolve()):  # a custom checkpoint.dir
                locks.append(acquire_checkpoint_lock(paths.checkpoints, wait_s=wait))
        with torch_threads(pick_threads(cfg.train.threads, ctx.local_world_size if ctx else 1)) as threads:
            if ctx is None or ctx.is_main:
                log.info("torch: %s", threads.describe())
            return _train(cfg, Path(data_root or cfg.data.root), ctx, threads)
    finally:
        for lock in reversed(locks):
            lock.release()
        if ctx is not None and dist.is_initialized():
            dist.destroy_process_group()


def preflight_capacity(cfg: JobConfig, world_size: int, local_world_size: int) -> None:
    """Fail before sharding when the tables (with optimizer state) cannot fit the topology.

    The same check as ``cdp-rec plan``: raises CapacityError naming the tables and the
    memory they need vs have, instead of an OOM or a bare planner error mid start-up.
    """
    from embeddings.capacity import plan_capacity

    plan_capacity(cfg, world_size, local_world_size)


def _train(cfg: JobConfig, root: Path, ctx: DistContext | None, threads: ThreadChoice) -> TrainResult:
    is_main = ctx is None or ctx.is_main
    world = ctx.world_size if ctx else 1
    paths = run_paths(cfg)
    _prepare_run(cfg, root, ctx, paths)
    bs = local_batch_size(cfg, world)
    eval_bs = local_batch_size(cfg, world, cfg.train.eval_batch_size) if cfg.train.batch_size_scope == "global" \
        else cfg.train.eval_batch_size

    trainer = Trainer(cfg, ctx)
    id_report = IdMappingReport(trainer.model, active=hasattr(trainer.model, "id_mapper") or cfg.data.id_churn > 0)
    _write_run_files(cfg, paths.out, trainer, ctx)

    split = split_days(cfg.data)
    schedule, reader, valid_reader, test_reader = _plan_data(cfg, root, split, bs, eval_bs, ctx)

    ckpt = Checkpointer(paths.checkpoints, cfg.checkpoint.keep_last)
    ckpt.attach("id_report", id_report)  # the per-day report survives a resume
    selection = ModelSelection(cfg.train, schedule, valid_reader, paths.best, is_main)

    resumed = resume(ckpt, trainer, schedule, world, bs, cfg.checkpoint.resume == "auto", log)
    start, pos = resumed.start, resumed.position
    id_report.resume_at(start)
    selection.resume(resumed.history, start, fresh=resumed.path is None)
    if resumed.path is not None and is_main:
        log.info("resumed from %s at global step %d (%d samples seen)", resumed.path, start, pos.samples)
    if ctx is not None:
        dist.barrier()  # rank 0 has (re)moved stale best checkpoints before anyone saves one

    progress = Progress(cfg, schedule, start, pos.samples, world, bs, is_main)
    loop = SegmentLoop(trainer, schedule, reader, selection, CheckpointPolicy(cfg.checkpoint, schedule), ckpt,
                       progress, id_report, meta={"local_batch_size": bs}, is_main=is_main)
    try:
        end = loop.run(start, final=pos if pos.final else None)
        id_days = id_report.finish()
    finally:
        progress.close()

    # Test with the best validated weights (the weights in memory are those after `end.weights_step`).
    restored = selection.restore_for_test(trainer, end.weights_step)
    t1 = time.perf_counter()
    metrics = trainer.evaluate(test_reader)
    eval_seconds = time.perf_counter() - t1

    record = run_metrics(cfg, RunContext(root, world, trainer.optimizer_note, start, threads.to_dict()), split,
                         schedule, selection, progress, end, restored, metrics, eval_seconds)
    if id_report.active:
        record["id_mapping_days"] = id_days
    if is_main:
        record = with_earlier_invocations(record, read_metrics(paths.out))
        write_metrics(paths.out, record)
    return TrainResult(paths.out, record)


def _prepare_run(cfg: JobConfig, root: Path, ctx: DistContext | None, paths: RunPaths) -> None:
    """Before the model is built: a ``checkpoint.resume=never`` start moves earlier
    checkpoints aside, rank 0 makes sure the data exists, every rank checks its spec and
    (sharded) that the tables fit."""
    is_main = ctx is None or ctx.is_main
    if is_main and cfg.checkpoint.resume == "never":
        moved = move_aside_checkpoints(paths.checkpoints)
        if moved is not None:
            log.warning("checkpoint.resume=never: moved the existing checkpoints of %s aside to %s "
                        "(this run starts fresh and will not resume from or delete them)", paths.checkpoints, moved)
    if is_main:
        ensure_data(cfg, root)
    if ctx is not None:
        dist.barrier()  # the others wait for rank 0 to (maybe) generate the data / move checkpoints
        check_dataset_spec(root, cfg.features)
        preflight_capacity(cfg, ctx.world_size, ctx.local_world_size)


def _write_run_files(cfg: JobConfig, out_dir: Path, trainer: Trainer, ctx: DistContext | None) -> None:
    """``pids/rank<r>.pid`` (sharded: operators and the fault-tolerance test kill by pid);
    rank 0: ``config.yaml``, ``plan.json`` (sharded) and their log lines."""
    if ctx is not None:
        (out_dir / "pids").mkdir(parents=True, exist_ok=True)
        (out_dir / "pids" / f"rank{ctx.rank}.pid").write_text(f"{os.getpid()}\n")
    if ctx is None or ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        log.info(trainer.optimizer_note)
        if trainer.plan_rows:
            log.info("sharding plan (world size %d):\n%s", ctx.world_size if ctx else 1, format_plan(trainer.plan_rows))
            (out_dir / "plan.json").write_text(json.dumps(trainer.plan_rows, indent=2) + "\n")


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
        if world > 1 and not r.files:
            # Ranks share a day's files out one by one; a day of fewer files than ranks leaves
            # a rank without rows, and the common step count (the smallest rank's) would be 0.
            raise DataError(f"{root}: training day {d} has fewer files than the {world} ranks, so rank {rank} "
                            f"reads none of its rows; write each day in at least {world} files (gen-data / import "
                            f"with --set data.rows_per_file=N, N <= a day's rows / {world}) or train on fewer ranks")
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

    test_rows = test_reader.num_rows() if ctx is None else all_reduce_int(test_reader.num_rows(), dist.ReduceOp.SUM)
    if test_rows == 0:  # data.allow_empty_days let every test day through: fail before training, not after
        raise DataError(f"{root}: the test day(s) {list(split.test)} hold 0 rows (data.allow_empty_days skipped "
                        "them): nothing to score the model on; set data.test_days / data.train_days to days with rows")
    schedule = TrainSchedule(cfg.train.epochs, split.train, day_steps, cfg.train.max_steps)
    return schedule, reader, valid_reader, test_reader

