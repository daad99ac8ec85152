"""The sharding plan: topology, constraints, sharders and optimizer choice for the tables.

One function, :func:`plan_with_estimates`, turns a config plus a world size into a TorchRec
``ShardingPlan`` and the planner's per-shard storage estimates; :func:`plan_sharding` is
its plan. Training and the capacity planner (``cdp-rec plan``) both call it, so the plan
printed by ``cdp-rec plan`` is the plan a run gets for the same topology.

Every embedding module of a model is planned and sharded: the pooled
``EmbeddingBagCollection`` of every model, and the unpooled ``EmbeddingCollection`` of
the sequence models (their ``item`` / ``category`` tables), each with TorchRec's sharder
for its type and the same fused optimizer. Table names are unique across a model's
modules, so ``sharding.constraints`` addresses tables by name whichever module holds them.

The planner counts the sparse optimizer's state (:mod:`embeddings.optimizer_state`): a
plan it accepts has room for the weights *and* the fused optimizer's state per shard.

Facts this module encodes (checked on torch 2.13 / fbgemm-gpu-cpu 1.8 / torchrec 1.8):

* The planner offers no ``row_wise`` / ``table_row_wise`` to an EmbeddingBagCollection
  for ``compute_device="cpu"`` even when constrained; a hand-built ParameterSharding with
  the fused kernel works. Such tables are planned table-wise first and their sharding
  replaced by hand. (TorchRec's EmbeddingCollection sharder offers ``row_wise`` on CPU.)
* TorchRec's EmbeddingCollection sharder offers data_parallel, table_wise, column_wise
  and row_wise only, and its data_parallel fails at the first lookup on CPU: a
  ``table_row_wise`` / ``data_parallel`` constraint on an EC table is a ConfigError
  naming the constraint.
* fbgemm's fused Adam is GPU-only, and TorchRec 1.8 refuses the dense kernel for
  model-parallel tables, so sharded tables on CPU cannot use Adam at all: they use the
  fused optimizer named by ``sharding.cpu_adam_fallback`` (rowwise Adagrad by default).
  :class:`SparseOptimizerChoice` carries the choice and the start-up log says it.
  (Unsharded single-process training keeps the paper's Adam.)
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE, DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Storage
from torchrec.distributed.sharding_plan import row_wise, table_row_wise
from torchrec.distributed.types import CacheParams, EmbeddingModuleShardingPlan, ShardingPlan, ShardingType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from cdp_rec.config import ConfigError, JobConfig, ShardingConfig
from embeddings.optimizer_state import OptimizerAwareStorageEstimator

log = logging.getLogger(__name__)

GB = 1024**3

# TorchRec's default reservation (EmbeddingPlannerBase): 15 % of HBM kept back as margin.
PLANNER_HBM_RESERVE = 0.15

# Sharding types the planner refuses an EBC on CPU; planned by hand instead.
_CPU_HAND_PLANNED = ("row_wise", "table_row_wise")

EmbeddingModule = EmbeddingBagCollection | EmbeddingCollection


@dataclass(frozen=True)
class SparseOptimizerChoice:
    """What actually updates the sharded embedding tables (printed at start-up).

    Attributes:
        compute_kernel: TorchRec compute kernel for model-parallel tables.
        fused_optimizer: the fbgemm optimizer fused into the backward pass.
        note: one line for the start-up log (``{lr}`` is filled in).
    """

    compute_kernel: str
    fused_optimizer: EmbOptimType
    note: str

    def fused_params(self, lr: float) -> dict[str, Any]:
        return {"optimizer": self.fused_optimizer, "learning_rate": lr}


_FUSED = {
    "adam": EmbOptimType.ADAM,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
}


def sparse_optimizer_choice(cfg: ShardingConfig, device_type: str) -> SparseOptimizerChoice:
    """Resolve ``sharding.sparse_optimizer`` for the device, never silently."""
    name = cfg.sparse_optimizer
    if name == "adam" and device_type == "cpu":
        return SparseOptimizerChoice(
            EmbeddingComputeKernel.FUSED.value,
            _FUSED[cfg.cpu_adam_fallback],
            f"sparse optimizer: fbgemm's fused Adam is GPU-only, so on CPU the sharded tables use fused "
            f"{cfg.cpu_adam_fallback} (sharding.cpu_adam_fallback) at lr {{lr}}",
        )
    return SparseOptimizerChoice(
        EmbeddingComputeKernel.FUSED.value, _FUSED[name], f"sparse optimizer: fused {name} (fbgemm) at lr {{lr}}"
    )


def build_sharders(cfg: JobConfig, device_type: str) -> list[Any]:
    """One TorchRec sharder per embedding module type, with the same fused optimizer."""
    fused = sparse_optimizer_choice(cfg.sharding, device_type).fused_params(cfg.train.sparse_lr)
    return [EmbeddingBagCollectionSharder(fused_params=dict(fused)),
            EmbeddingCollectionSharder(fused_params=dict(fused))]


def build_sharder(cfg: JobConfig, device_type: str) -> EmbeddingBagCollectionSharder:
    """The EmbeddingBagCollection sharder of :func:`build_sharders`."""
    return build_sharders(cfg, device_type)[0]


def build_topology(
    world_size: int, local_world_size: int, compute_device: str, hbm_gb: float, ddr_gb: float
) -> Topology:
    # int(nan * GB) raises and a negative capacity plans nonsense: callers validate with
    # the flag / field named (embeddings.capacity, ShardingConfig); this is the backstop.
    for name, gb in (("hbm_gb", hbm_gb), ("ddr_gb", ddr_gb)):
        if not (math.isfinite(gb) and gb >= 0):
            raise ValueError(f"{name} must be a finite number of GiB >= 0, got {gb}")
    return Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        hbm_cap=int(hbm_gb * GB),
        ddr_cap=int(ddr_gb * GB),
    )


def _hand_generator(sharding_type: str, kernel: str):
    if sharding_type == "row_wise":
        return row_wise(compute_kernel=kernel)
    gen = table_row_wise(host_index=0)

    def fused_table_row_wise(*args: Any) -> Any:
        # table_row_wise() takes no kernel argument and defaults to dense, which CPU rejects.
        ps = gen(*args)
        ps.compute_kernel = kernel
        return ps

    return fused_table_row_wise


# --------------------------------------------------------------------------- the model's tables


def find_embedding_modules(model: nn.Module) -> list[tuple[str, EmbeddingModule]]:
    """Every EmbeddingBagCollection / EmbeddingCollection of a model with its module path."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]
    if not found:
        raise ValueError("the model has no EmbeddingBagCollection or EmbeddingCollection to shard")
    return found


def module_table_configs(module: EmbeddingModule) -> list[Any]:
    """The table configs of an EBC (``EmbeddingBagConfig``) or EC (``EmbeddingConfig``)."""
    if isinstance(module, EmbeddingBagCollection):
        return list(module.embedding_bag_configs())
    return list(module.embedding_configs())


@dataclass(frozen=True)
class TableLocation:
    """Where a table lives: its module's path, the module, and its config."""

    path: str
    module: EmbeddingModule
    config: Any

    @property
    def pooled(self) -> bool:
        return isinstance(self.module, EmbeddingBagCollection)


def model_tables(model: nn.Module) -> dict[str, TableLocation]:
    """Table name -> location, over every embedding module (names are unique in a model)."""
    out: dict[str, TableLocation] = {}
    for path, module in find_embedding_modules(model):
        for c in module_table_configs(module):
            if c.name in out:
                raise ValueError(f"table {c.name!r} is in two embedding modules ({out[c.name].path!r}, {path!r})")
            out[c.name] = TableLocation(path, module, c)
    return out


def find_ebc(model: nn.Module) -> tuple[str, EmbeddingBagCollection]:
    """The (single) EmbeddingBagCollection of a model and its module path."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one EmbeddingBagCollection in the model, found {len(found)}")
    return found[0]


# EmbeddingCollectionSharder.sharding_types (TorchRec 1.8) but data_parallel (refused below).
_EC_SHARDING = ("table_wise", "column_wise", "row_wise")


def _dense_only(loc: TableLocation) -> bool:
    """TorchRec 1.8's fused EBC kernels assert 4k columns per shard: an EBC table of another
    dim (lr_counts' dim-1 weights) can only be data-parallel (dense kernel)."""
    return loc.pooled and loc.config.embedding_dim % 4 != 0


def _check_constraints(cfg: JobConfig, tables: dict[str, TableLocation]) -> None:
    """Constraints name tables this model has, with a sharding type their module supports."""
    s = cfg.sharding
    unknown = sorted(set(s.constraints) - set(tables))
    if unknown:
        # Config load already refuses names that are no table of the config; this catches a
        # table this model does not have (lr_counts keeps only context / scene tables).
        # A ConfigError, so the CLI reports it in one line.
        raise ConfigError(f"sharding.constraints.{unknown[0]}: model {cfg.model.name!r} has no table "
                          f"{unknown[0]!r} (its tables: {sorted(tables)})")
    for name, kind in s.constraints.items():
        if _dense_only(tables[name]) and kind != ShardingType.DATA_PARALLEL.value:
            raise ConfigError(
                f"sharding.constraints.{name}: {kind} needs a dim divisible by 4 (fbgemm's fused kernels); model "
                f"{cfg.model.name!r}'s table {name!r} has dim {tables[name].config.embedding_dim}: use data_parallel"
            )
        if tables[name].pooled:
            continue
        if kind not in _EC_SHARDING and kind != ShardingType.DATA_PARALLEL.value:
            raise ConfigError(
                f"sharding.constraints.{name}: {kind} is not available for model {cfg.model.name!r}'s table "
                f"{name!r}, an unpooled EmbeddingCollection table (TorchRec's EmbeddingCollectionSharder "
                f"shards it {', '.join(_EC_SHARDING)} here)"
            )
        if kind == ShardingType.DATA_PARALLEL.value:
            # Fails at the first lookup on CPU (gloo); on CUDA unchecked, and the trainer's
            # optimizer split only knows data-parallel EBC tables.
            raise ConfigError(
                f"sharding.constraints.{name}: data_parallel of model {cfg.model.name!r}'s unpooled "
                f"EmbeddingCollection table {name!r} is not supported (TorchRec 1.8's dense kernel fails "
                f"on CPU; unchecked on CUDA); use table_wise, column_wise or row_wise"
            )


# --------------------------------------------------------------------------- planning


class NoPlacementError(PlannerError):
    """TorchRec's planner found no placement; ``available`` is the per-device room it had
    (after its reservation; HBM 0 when the reservation alone exceeds it)."""

    def __init__(self, message: str, available: Storage) -> None:
        super().__init__(message)
        self.available = available


@dataclass
class PlannedSharding:
    """The plan and what the planner knows beyond it.

    Attributes:
        plan: the ShardingPlan (what DistributedModelParallel takes).
        options: table -> the planner's chosen sharding option, with per-shard ``storage``
            estimates in bytes: weights, cache, input/output buffers *and* optimizer state
            (for hand-planned tables: the table-wise placeholder's).
        hand_planned: table -> sharding type replaced by hand after planning (CPU row-wise).
        capacity: per-device bytes of the topology (HBM is 0 on CPU).
        available: per-device bytes left to the tables after the planner's reservation.
    """

    plan: ShardingPlan
    options: dict[str, ShardingOption] = field(default_factory=dict)
    hand_planned: dict[str, str] = field(default_factory=dict)
    capacity: Storage = field(default_factory=lambda: Storage(0, 0, 0))
    available: Storage = field(default_factory=lambda: Storage(0, 0, 0))


def plan_with_estimates(
    cfg: JobConfig,
    model: nn.Module,
    world_size: int,
    local_world_size: int,
    device_type: str,
    pg: torch.distributed.ProcessGroup | None = None,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
    caching: bool = False,
    cache_load_factor: float | None = None,
) -> PlannedSharding:
    """Plan every embedding module of ``model`` over ``world_size`` devices.

    Args:
        model: the unsharded model (tables may live on the meta device).
        pg: when given, rank 0 plans and broadcasts (every rank gets the same plan; the
            estimates are rank 0's).
        hbm_gb, ddr_gb: per-device capacities; default from ``cfg.sharding``.
        caching: plan model-parallel tables on fbgemm's UVM caching kernel (a what-if of
            ``cdp-rec plan``), ``cache_load_factor`` of the rows in HBM.

    Raises:
        ConfigError: a constraint names a table the model lacks or a sharding its module lacks.
        NoPlacementError: no placement fits (weights, buffers and optimizer state).
    """
    s = cfg.sharding
    tables = model_tables(model)
    _check_constraints(cfg, tables)
    choice = sparse_optimizer_choice(s, device_type)
    hand = {t: k for t, k in s.constraints.items()
            if device_type == "cpu" and k in _CPU_HAND_PLANNED and tables[t].pooled}
    model_parallel_kernel = EmbeddingComputeKernel.FUSED_UVM_CACHING.value if caching else choice.compute_kernel
    constraints = {}
    for name in tables:
        kind = s.constraints.get(name)
        if kind is None and _dense_only(tables[name]):
            kind = ShardingType.DATA_PARALLEL.value
        if name in hand:
            kind = ShardingType.TABLE_WISE.value  # placeholder, replaced below
        kernels = [model_parallel_kernel]
        if kind == ShardingType.DATA_PARALLEL.value:
            kernels = [EmbeddingComputeKernel.DENSE.value]
        constraints[name] = ParameterConstraints(
            sharding_types=[kind] if kind else None,
            compute_kernels=kernels,
            cache_params=CacheParams(load_factor=cache_load_factor) if caching else None,
        )
    topology = build_topology(
        world_size, local_world_size, device_type,
        s.hbm_gb if hbm_gb is None else hbm_gb, s.ddr_gb if ddr_gb is None else ddr_gb,
    )
    enumerator = EmbeddingEnumerator(
        topology=topology, batch_size=BATCH_SIZE, constraints=constraints,
        estimator=[
            EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topology, constraints=constraints),
            OptimizerAwareStorageEstimator(topology=topology, constraints=constraints),
        ],
    )
    with warnings.catch_warnings():
        # TorchRec's own default, built here only to read its reserved topology afterwards;
        # it warns on construction that dry-run dense sizes are estimates.
        warnings.simplefilter("ignore", FutureWarning)
        reservation = HeuristicalStorageReservation(percentage=PLANNER_HBM_RESERVE)
    chosen: dict[str, ShardingOption] = {}

    def keep(best: list[ShardingOption]) -> list[ShardingOption]:
        chosen.update((so.name, so) for so in best)
        return best

    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=constraints, enumerator=enumerator,
        storage_reservation=reservation, callbacks=[keep],
    )
    sharders = build_sharders(cfg, device_type)
    try:
        plan = planner.collective_plan(model, sharders, pg) if pg is not None else planner.plan(model, sharders)
    except PlannerError as e:
        reserved = reservation.last_reserved_topology
        left = reserved.devices[0].storage if reserved is not None else \
            Storage(hbm=0, ddr=topology.devices[0].storage.ddr, ssd=0)
        raise NoPlacementError(str(e), left) from e
    if hand:
        kernel = EmbeddingComputeKernel.FUSED.value
        if choice.compute_kernel != kernel:
            raise ValueError(
                f"tables {sorted(hand)} are constrained to {sorted(set(hand.values()))}, which TorchRec runs on CPU "
                f"only with the fused kernel; set sharding.cpu_adam_fallback=rowwise_adagrad or "
                f"sharding.sparse_optimizer to a fused optimizer (rowwise_adagrad, adagrad, sgd)"
            )
        for t, kind in hand.items():
            loc = tables[t]
            sharder = sharders[0]
            param = sharder.shardable_parameters(loc.module)[t]
            module_plan = plan.plan[loc.path]
            assert isinstance(module_plan, EmbeddingModuleShardingPlan)
            module_plan[t] = _hand_generator(kind, kernel)(param, local_world_size, world_size, device_type, sharder)
    reserved = reservation.last_reserved_topology
    available = reserved.devices[0].storage if reserved is not None else topology.devices[0].storage
    return PlannedSharding(plan, chosen, hand, topology.devices[0].storage, available)


def plan_sharding(
    cfg: JobConfig,
    model: nn.Module,
    world_size: int,
    local_world_size: int,
    device_type: str,
    pg: torch.distributed.ProcessGroup | None = None,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
) -> ShardingPlan:
    """The ShardingPlan of :func:`plan_with_estimates` (what training shards with)."""
    return plan_with_estimates(cfg, model, world_size, local_world_size, device_type, pg, hbm_gb, ddr_gb).plan


def describe_plan(plan: ShardingPlan) -> list[dict[str, Any]]:
    """Rows of (module, table, sharding type, kernel, ranks, shard sizes) for printing/saving."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if ps.sharding_spec is not None:
                shards = [
                    {"rank": sh.placement.rank(), "offsets": list(sh.shard_offsets), "sizes": list(sh.shard_sizes)}
                    for sh in ps.sharding_spec.shards
                ]
            rows.append(
                {
                    "module": module_path,
                    "table": table,
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "ranks": list(ps.ranks) if ps.ranks is not None else [],
                    "shards": shards,
                }
            )
    return rows


def format_plan(rows: list[dict[str, Any]], embedding_bytes: dict[str, int] | None = None) -> str:
    """Human-readable plan: one line per table, then bytes per rank (parameters only)."""
    lines = [f"{'table':<22} {'sharding':<18} {'kernel':<8} ranks"]
    per_rank: dict[int, int] = {}
    for r in rows:
        lines.append(f"{r['table']:<22} {r['sharding_type']:<18} {r['compute_kernel']:<8} {r['ranks']}")
        for sh in r["shards"]:
            n = 1
            for d in sh["sizes"]:
                n *= d
            per_rank[sh["rank"]] = per_rank.get(sh["rank"], 0) + n * 4
    if per_rank:
        lines.append(
            "parameter bytes per rank (fp32, excluding optimizer state): "
            + ", ".join(f"rank {k}: {v / 2**20:.2f} MiB" for k, v in sorted(per_rank.items()))
        )
    return "\n".join(lines)


def shard_model(
    cfg: JobConfig,
    model: nn.Module,
    device: torch.device,
    world_size: int,
    local_world_size: int,
    pg: torch.distributed.ProcessGroup,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan (rank 0 plans, all ranks receive) and wrap ``model`` in DistributedModelParallel.

    Dense modules become data-parallel (DDP) inside DMP; the tables of every EBC / EC are
    sharded by the plan with the fused sparse optimizer of :func:`sparse_optimizer_choice`.
    """
    device_type = device.type
    plan = plan_sharding(cfg, model, world_size, local_world_size, device_type, pg=pg)
    dmp = DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=build_sharders(cfg, device_type)  # type: ignore[arg-type]
    )
    return dmp, plan
