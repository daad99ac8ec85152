"""The sharding plan: topology, constraints, sharder and optimizer choice for the tables.

One function, :func:`plan_sharding`, turns a config plus a world size into a TorchRec
``ShardingPlan``. Training and the capacity planner both call it, so the plan printed
by ``cdp-rec plan`` is the plan a run gets for the same topology.

Facts this module encodes (checked on torch 2.13 / fbgemm-gpu-cpu 1.8 / torchrec 1.8):

* The planner offers no ``row_wise`` / ``table_row_wise`` for ``compute_device="cpu"``
  even when constrained; a hand-built ParameterSharding with the fused kernel works.
  Such tables are planned table-wise first and their sharding replaced by hand.
* fbgemm's fused Adam is GPU-only, and TorchRec 1.8 refuses the dense kernel for
  model-parallel tables, so sharded tables on CPU cannot use Adam at all: they use the
  fused optimizer named by ``sharding.cpu_adam_fallback`` (rowwise Adagrad by default).
  :class:`SparseOptimizerChoice` carries the choice and the start-up log says it.
  (Unsharded single-process training keeps the paper's Adam.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import row_wise, table_row_wise
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ShardingPlan, ShardingType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from cdp_rec.config import ConfigError, JobConfig, ShardingConfig

log = logging.getLogger(__name__)

GB = 1024**3

# Sharding types the planner refuses on CPU; planned by hand instead.
_CPU_HAND_PLANNED = ("row_wise", "table_row_wise")


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


def build_sharder(cfg: JobConfig, device_type: str) -> EmbeddingBagCollectionSharder:
    choice = sparse_optimizer_choice(cfg.sharding, device_type)
    return EmbeddingBagCollectionSharder(fused_params=choice.fused_params(cfg.train.sparse_lr))


def build_topology(
    world_size: int, local_world_size: int, compute_device: str, hbm_gb: float, ddr_gb: float
) -> Topology:
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


def find_ebc(model: nn.Module) -> tuple[str, EmbeddingBagCollection]:
    """The (single) EmbeddingBagCollection of a model and its module path."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one EmbeddingBagCollection in the model, found {len(found)}")
    return found[0]


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
    """Plan the model's EBC over ``world_size`` devices.

    Args:
        model: the unsharded model (tables may live on the meta device).
        pg: when given, rank 0 plans and broadcasts (every rank gets the same plan).
        hbm_gb, ddr_gb: per-device capacities; default from ``cfg.sharding``.
    """
    s = cfg.sharding
    path, ebc = find_ebc(model)
    tables = {t.name: t for t in ebc.embedding_bag_configs()}
    unknown = sorted(set(s.constraints) - set(tables))
    if unknown:
        # Config load already refuses names that are no table of the config; this catches a
        # table this model keeps out of its sharded collection (the sequence models' item /
        # category). A ConfigError, so the CLI reports it in one line.
        raise ConfigError(f"sharding.constraints.{unknown[0]}: model {cfg.model.name!r} has no sharded table "
                          f"{unknown[0]!r} (its sharded tables: {sorted(tables)})")
    choice = sparse_optimizer_choice(s, device_type)
    hand = {t: k for t, k in s.constraints.items() if device_type == "cpu" and k in _CPU_HAND_PLANNED}
    constraints = {}
    for name in tables:
        kind = s.constraints.get(name)
        if name in hand:
            kind = ShardingType.TABLE_WISE.value  # placeholder, replaced below
        kernels = [choice.compute_kernel]
        if kind == ShardingType.DATA_PARALLEL.value:
            kernels = [EmbeddingComputeKernel.DENSE.value]
        constraints[name] = ParameterConstraints(
            sharding_types=[kind] if kind else None,
            compute_kernels=kernels,
        )
    topology = build_topology(
        world_size, local_world_size, device_type,
        s.hbm_gb if hbm_gb is None else hbm_gb, s.ddr_gb if ddr_gb is None else ddr_gb,
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharder = build_sharder(cfg, device_type)
    sharders = [sharder]  # type: ignore[list-item]
    plan = planner.collective_plan(model, sharders, pg) if pg is not None else planner.plan(model, sharders)
    if hand:
        kernel = EmbeddingComputeKernel.FUSED.value
        if choice.compute_kernel != kernel:
            raise ValueError(
                f"tables {sorted(hand)} are constrained to {sorted(set(hand.values()))}, which TorchRec runs on CPU "
                f"only with the fused kernel; set sharding.cpu_adam_fallback=rowwise_adagrad or "
                f"sharding.sparse_optimizer to a fused optimizer (rowwise_adagrad, adagrad, sgd)"
            )
        params = sharder.shardable_parameters(ebc)
        module_plan = plan.plan[path]
        assert isinstance(module_plan, EmbeddingModuleShardingPlan)
        for t, kind in hand.items():
            module_plan[t] = _hand_generator(kind, kernel)(params[t], local_world_size, world_size, device_type, sharder)
    return plan


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

    Dense modules become data-parallel (DDP) inside DMP; the EBC's tables are sharded by
    the plan with the fused sparse optimizer of :func:`sparse_optimizer_choice`.
    """
    device_type = device.type
    plan = plan_sharding(cfg, model, world_size, local_world_size, device_type, pg=pg)
    dmp = DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=[build_sharder(cfg, device_type)]  # type: ignore[list-item]
    )
    return dmp, plan
