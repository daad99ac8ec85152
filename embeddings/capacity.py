"""Embedding capacity planning: does the model's tables fit, on how many GPUs, and how?

``cdp-rec plan`` answers this from the same config training uses, without allocating
any table: the model is built on the meta device and handed to TorchRec's planner with
the constraints, sharder and fused-optimizer parameters of
:func:`embeddings.sharding.plan_sharding`. :func:`plan_embeddings` runs that planning
and keeps what ``plan_sharding`` throws away (the planner's per-shard storage estimates
and the capacity left after its reservation); a test checks the two plans are equal.

What the report adds to the planner's numbers, and why:

* **Optimizer state.** TorchRec's planner counts optimizer memory only for parameters
  tagged by ``apply_optimizer_in_backward``; state configured through the sharder's
  ``fused_params`` (our path) counts as 0 bytes. fbgemm keeps it in fp32: Adam 2 values
  per element, exact Adagrad 1, rowwise Adagrad 1 per row, SGD none. It lives with the
  weights (HBM for the fused kernel), except that UVM-cached tables keep non-rowwise
  state in UVM (host DDR) and rowwise state on the device (fbgemm ``construct_split_state``).
  Data-parallel tables (dense kernel) are updated by a torch Adam: 2 values per element
  in the weights' dtype, on every replica.
* **Fit.** A rank fits when planner estimate + optimizer state <= the capacity left
  after the planner's reservation (15 % of HBM, 6x dense parameters, batch inputs).

Units: bytes everywhere in the data; "GiB" (2**30 bytes) in text. ``--hbm-gb`` /
``--ddr-gb`` are in the same 2**30-byte units as :func:`embeddings.sharding.build_topology`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.constants import BATCH_SIZE, UVM_CACHING_RATIO
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Storage, Topology
from torchrec.distributed.types import CacheParams, EmbeddingModuleShardingPlan, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DataType
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from cdp_rec.config import JobConfig
from cdp_rec.models import build_model
from embeddings.sharding import (
    GB,
    _CPU_HAND_PLANNED,
    _hand_generator,
    build_sharder,
    build_topology,
    describe_plan,
    find_ebc,
    sparse_optimizer_choice,
)

# TorchRec's default reservation (EmbeddingPlannerBase): 15 % of HBM kept back as margin.
PLANNER_HBM_RESERVE = 0.15

DTYPES: dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}

# fbgemm stores an int8 row as dim bytes + fp32 scale and bias (INT8_EMB_ROW_DIM_OFFSET).
INT8_ROW_OVERHEAD_BYTES = 8

# fbgemm optimizer state, fp32: (values per element, values per row).
_FUSED_STATE: dict[str, tuple[int, int]] = {
    "adam": (2, 0),
    "adagrad": (1, 0),
    "rowwise_adagrad": (0, 1),
    "sgd": (0, 0),
}
_OPTIMIZER_NAMES: dict[EmbOptimType, str] = {
    EmbOptimType.ADAM: "adam",
    EmbOptimType.EXACT_ADAGRAD: "adagrad",
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad",
    EmbOptimType.EXACT_SGD: "sgd",
}
_FP32_BYTES = 4

_FUSED = EmbeddingComputeKernel.FUSED.value
_CACHING = EmbeddingComputeKernel.FUSED_UVM_CACHING.value
_DENSE = EmbeddingComputeKernel.DENSE.value


class CapacityError(ValueError):
    """The plan does not fit, or a what-if names an unknown table / unsupported value."""


# --------------------------------------------------------------------------- what-ifs


@dataclass(frozen=True)
class WhatIf:
    """Changes to the tables and kernels, applied on top of the config.

    Attributes:
        scale_rows: table -> factor on its row count (``item=2.0`` doubles the vocabulary).
        dims: table -> embedding dimension.
        dtype: weight dtype of every table ("fp32", "fp16", "int8"); None keeps fp32.
        caching: plan model-parallel tables on fbgemm's UVM caching kernel: a cache of
            ``cache_load_factor`` of the rows in HBM, the full table in host DDR.
        cache_load_factor: fraction of rows cached in HBM (TorchRec's default 0.2).
    """

    scale_rows: Mapping[str, float] = field(default_factory=dict)
    dims: Mapping[str, int] = field(default_factory=dict)
    dtype: str | None = None
    caching: bool = False
    cache_load_factor: float = UVM_CACHING_RATIO

    def describe(self) -> list[str]:
        """One phrase per change, for the report header ([] when nothing changes)."""
        out = [f"{t} rows x{f:g}" for t, f in self.scale_rows.items()]
        out += [f"{t} dim {d}" for t, d in self.dims.items()]
        if self.dtype:
            out.append(f"dtype {self.dtype}")
        if self.caching:
            out.append(f"UVM caching (load factor {self.cache_load_factor:g})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale_rows": dict(self.scale_rows),
            "dims": dict(self.dims),
            "dtype": self.dtype,
            "caching": self.caching,
            "cache_load_factor": self.cache_load_factor if self.caching else None,
        }


def parse_table_values(items: list[str], flag: str, cast: type) -> dict[str, Any]:
    """``["item=2.0", "user=1.5"]`` -> ``{"item": 2.0, "user": 1.5}``; bad items name ``flag``."""
    out: dict[str, Any] = {}
    for item in items:
        table, sep, raw = item.partition("=")
        try:
            if not sep or not table:
                raise ValueError
            out[table.strip()] = cast(raw)
        except ValueError:
            raise CapacityError(f"{flag} {item!r}: expected TABLE={cast.__name__.upper()}") from None
    return out


def _validate_what_if(what_if: WhatIf, cfg: JobConfig, tables: list[str]) -> None:
    for flag, names in (("--scale-table", what_if.scale_rows), ("--dim", what_if.dims)):
        unknown = sorted(set(names) - set(tables))
        if unknown:
            raise CapacityError(f"{flag} names unknown tables {unknown}; tables are {tables}")
    for t, f in what_if.scale_rows.items():
        if not (f > 0 and math.isfinite(f)):
            raise CapacityError(f"--scale-table {t}={f}: the factor must be > 0")
    for t, d in what_if.dims.items():
        # fbgemm's TBE asserts embedding_dim % 4 == 0 (construct_split_state).
        if d <= 0 or d % 4:
            raise CapacityError(f"--dim {t}={d}: the dimension must be a positive multiple of 4 (fbgemm TBE)")
    if what_if.dtype is not None and what_if.dtype not in DTYPES:
        raise CapacityError(f"--dtype {what_if.dtype!r}: supported are {sorted(DTYPES)}")
    if what_if.dtype == "int8":
        # int8 weights exist only in fbgemm's fused kernels; TorchRec builds a dense
        # (data-parallel) table as fp16 and a torch optimizer cannot update int8.
        dp = sorted(t for t, k in cfg.sharding.constraints.items() if k == ShardingType.DATA_PARALLEL.value)
        if dp:
            raise CapacityError(f"--dtype int8 needs a fused kernel; tables {dp} are data_parallel (dense kernel)")
    if what_if.caching:
        if cfg.sharding.compute_device != "cuda":
            raise CapacityError(
                "--caching is fbgemm's UVM cache (GPU HBM in front of host memory); it needs "
                "sharding.compute_device=cuda (try --set sharding.compute_device=cuda)"
            )
        if not 0 < what_if.cache_load_factor <= 1:
            raise CapacityError(f"--cache-load-factor {what_if.cache_load_factor}: must be in (0, 1]")


# --------------------------------------------------------------------------- model


def planning_model(cfg: JobConfig, what_if: WhatIf = WhatIf()) -> nn.Module:
    """The training model with its tables on the meta device, what-ifs applied.

    Rows, dims and dtypes of the EBC's tables are rewritten by replacing the EBC with one
    built from edited configs (the dense layers stay; the planner's reservation sizes them).
    """
    model = build_model(cfg, "meta")
    path, ebc = find_ebc(model)
    configs = ebc.embedding_bag_configs()
    _validate_what_if(what_if, cfg, [c.name for c in configs])
    if not (what_if.scale_rows or what_if.dims or what_if.dtype):
        return model
    edited = [_edit_table(c, what_if) for c in configs]
    new = EmbeddingBagCollection(tables=edited, is_weighted=ebc.is_weighted(), device=torch.device("meta"))
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)
    return model


def _edit_table(c: EmbeddingBagConfig, what_if: WhatIf) -> EmbeddingBagConfig:
    rows = max(1, round(c.num_embeddings * what_if.scale_rows.get(c.name, 1.0)))
    return dataclasses.replace(
        c,
        num_embeddings=rows,
        embedding_dim=what_if.dims.get(c.name, c.embedding_dim),
        data_type=DTYPES[what_if.dtype] if what_if.dtype else c.data_type,
    )


# --------------------------------------------------------------------------- planning


@dataclass
class PlanningResult:
    """What :func:`plan_embeddings` knows beyond the ShardingPlan.

    Attributes:
        plan: the ShardingPlan (equal to ``plan_sharding``'s for the same inputs).
        options: the planner's chosen sharding options, per table, with per-shard
            ``storage`` estimates in bytes (for hand-planned tables: the placeholder).
        hand_planned: table -> sharding type replaced by hand after planning (CPU row-wise).
        capacity: per-device bytes of the topology (HBM is 0 on CPU).
        available: per-device bytes left to the tables after the reservation.
    """

    plan: ShardingPlan
    options: dict[str, ShardingOption]
    hand_planned: dict[str, str]
    capacity: Storage
    available: Storage


@contextlib.contextmanager
def quiet_planner() -> Iterator[None]:
    """Silence TorchRec's planner chatter for a report on stdout.

    The planner logs a stats table at INFO, warns per table that data_parallel has no
    fused kernel (our constraint, by design), and that dry-run dense sizes are estimates.
    """
    logger = logging.getLogger("torchrec")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def plan_embeddings(
    cfg: JobConfig,
    model: nn.Module,
    world_size: int,
    local_world_size: int,
    device_type: str,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
    caching: bool = False,
    cache_load_factor: float = UVM_CACHING_RATIO,
) -> PlanningResult:
    """``plan_sharding`` plus the planner's storage view; ``caching`` swaps the kernel.

    Mirrors :func:`embeddings.sharding.plan_sharding` line for line (same constraints,
    topology, sharder and hand-built CPU row-wise); with ``caching`` the model-parallel
    tables are constrained to ``fused_uvm_caching`` instead of ``fused``.

    Raises:
        PlannerError: from TorchRec when no placement fits.
    """
    s = cfg.sharding
    path, ebc = find_ebc(model)
    tables = {t.name: t for t in ebc.embedding_bag_configs()}
    unknown = sorted(set(s.constraints) - set(tables))
    if unknown:
        raise ValueError(f"sharding.constraints names unknown tables {unknown}; tables are {sorted(tables)}")
    choice = sparse_optimizer_choice(s, device_type)
    hand = {t: k for t, k in s.constraints.items() if device_type == "cpu" and k in _CPU_HAND_PLANNED}
    model_parallel_kernel = _CACHING if caching else choice.compute_kernel
    constraints = {}
    for name in tables:
        kind = s.constraints.get(name)
        if name in hand:
            kind = ShardingType.TABLE_WISE.value  # placeholder, replaced below
        kernels = [model_parallel_kernel]
        if kind == ShardingType.DATA_PARALLEL.value:
            kernels = [_DENSE]
        constraints[name] = ParameterConstraints(
            sharding_types=[kind] if kind else None,
            compute_kernels=kernels,
            cache_params=CacheParams(load_factor=cache_load_factor) if caching else None,
        )
    with quiet_planner():
        topology = build_topology(
            world_size, local_world_size, device_type,
            s.hbm_gb if hbm_gb is None else hbm_gb, s.ddr_gb if ddr_gb is None else ddr_gb,
        )
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        sharder = build_sharder(cfg, device_type)
        sharders = [sharder]  # type: ignore[list-item]
        available = _capacity_after_reservation(topology, model, sharders, constraints)
        plan = planner.plan(model, sharders)
    if hand:
        # Same replacement as plan_sharding (its error for a non-fused kernel is unreachable
        # here: hand-planned tables only exist on CPU, where the kernel is always fused).
        params = sharder.shardable_parameters(ebc)
        module_plan = plan.plan[path]
        assert isinstance(module_plan, EmbeddingModuleShardingPlan)
        for t, kind in hand.items():
            module_plan[t] = _hand_generator(kind, _FUSED)(params[t], local_world_size, world_size, device_type, sharder)
    options = {so.name: so for so in (planner._best_plan or [])}  # noqa: SLF001 - the estimates live only here
    return PlanningResult(plan, options, hand, topology.devices[0].storage, available)


def _capacity_after_reservation(
    topology: Topology, model: nn.Module, sharders: list[Any], constraints: dict[str, ParameterConstraints]
) -> Storage:
    """Per-device bytes left to the tables by the planner's default reservation policy
    (same class, percentage and batch size as the planner builds when given none)."""
    reservation = HeuristicalStorageReservation(percentage=PLANNER_HBM_RESERVE)
    try:
        return reservation.reserve(topology, BATCH_SIZE, model, sharders, constraints).devices[0].storage
    except PlannerError:
        # The reservation alone exceeds HBM; the planner raises the same error right after.
        return Storage(hbm=0, ddr=topology.devices[0].storage.ddr, ssd=0)


# --------------------------------------------------------------------------- bytes


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one embedding row as fbgemm stores it."""
    if dtype == "int8":
        return dim + INT8_ROW_OVERHEAD_BYTES
    return dim * (2 if dtype == "fp16" else 4)


def optimizer_bytes(rows: int, dim: int, optimizer: str, kernel: str, dtype: str) -> int:
    """Optimizer state of a ``rows x dim`` shard.

    Args:
        optimizer: the fused optimizer name (``adam``, ``rowwise_adagrad``, ...).
        kernel: dense-kernel tables get torch Adam (2 values per element, weights' dtype).
    """
    if kernel == _DENSE:
        return 2 * rows * dim * (4 if dtype == "fp32" else 2)
    per_elem, per_row = _FUSED_STATE[optimizer]
    return (per_elem * rows * dim + per_row * rows) * _FP32_BYTES


def optimizer_in_hbm(kernel: str, optimizer: str, device_type: str) -> bool:
    """Where fbgemm puts optimizer state: with the weights, but UVM-cached tables keep
    non-rowwise state in UVM (host) and rowwise state on the device."""
    if device_type != "cuda":
        return False
    if kernel == _CACHING:
        return optimizer == "rowwise_adagrad"
    return True


def describe_optimizer(optimizer: str) -> str:
    return {
        "adam": "adam: 2 fp32 values per element",
        "adagrad": "adagrad: 1 fp32 value per element",
        "rowwise_adagrad": "rowwise_adagrad: 1 fp32 value per row",
        "sgd": "sgd: no state",
    }[optimizer]


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class TableUsage:
    """One table: its size and where the plan puts it. Bytes are for the whole table
    (one copy; data-parallel tables have one per rank)."""

    name: str
    rows: int
    dim: int
    dtype: str
    param_bytes: int
    optimizer_bytes: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    # features.id_mapping: "dense", "hash" or "managed"; the mapping's bytes on *every* rank
    # (embeddings.id_mapping: persistent state + a managed table's per-step history bound).
    id_mapping: str = "dense"
    mapping_bytes: int = 0
    mapping_state_bytes: int = 0


@dataclass(frozen=True)
class RankUsage:
    """One device. ``planner_*``: TorchRec's estimate (weights, UVM cache, input/output
    buffers); ``optimizer_*``: optimizer state it does not count; ``mapping_*``: the raw-id
    mapping state of hash / managed tables, replicated on every rank. Bytes."""

    rank: int
    planner_hbm: int
    planner_ddr: int
    optimizer_hbm: int
    optimizer_ddr: int
    tables: list[str]
    mapping_hbm: int = 0
    mapping_ddr: int = 0

    @property
    def hbm(self) -> int:
        return self.planner_hbm + self.optimizer_hbm + self.mapping_hbm

    @property
    def ddr(self) -> int:
        return self.planner_ddr + self.optimizer_ddr + self.mapping_ddr


@dataclass(frozen=True)
class CapacityReport:
    """The plan with its memory, per table and per rank. Capacities are per device, bytes."""

    config: str
    model: str
    world_size: int
    local_world_size: int
    compute_device: str
    hbm_capacity: int
    ddr_capacity: int
    hbm_available: int
    ddr_available: int
    sparse_optimizer: str
    what_if: WhatIf
    tables: list[TableUsage]
    ranks: list[RankUsage]
    seconds: float

    def over_capacity(self) -> list[RankUsage]:
        """Ranks whose planner estimate + optimizer state exceeds the available bytes."""
        return [r for r in self.ranks if r.hbm > self.hbm_available or r.ddr > self.ddr_available]

    def fits(self) -> bool:
        return not self.over_capacity()

    def totals(self) -> dict[str, int]:
        return {
            "rows": sum(t.rows for t in self.tables),
            "param_bytes": sum(t.param_bytes for t in self.tables),
            "optimizer_bytes": sum(t.optimizer_bytes for t in self.tables),
            "mapping_bytes_per_rank": sum(t.mapping_bytes for t in self.tables),
            "hbm_bytes": sum(r.hbm for r in self.ranks),
            "ddr_bytes": sum(r.ddr for r in self.ranks),
            "max_rank_hbm_bytes": max((r.hbm for r in self.ranks), default=0),
            "max_rank_ddr_bytes": max((r.ddr for r in self.ranks), default=0),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "model": self.model,
            "topology": {
                "world_size": self.world_size,
                "local_world_size": self.local_world_size,
                "compute_device": self.compute_device,
                "hbm_capacity_bytes": self.hbm_capacity,
                "ddr_capacity_bytes": self.ddr_capacity,
                "hbm_available_bytes": self.hbm_available,
                "ddr_available_bytes": self.ddr_available,
            },
            "sparse_optimizer": self.sparse_optimizer,
            "optimizer_counted_by_planner": False,
            "what_if": self.what_if.to_dict(),
            "tables": [dataclasses.asdict(t) for t in self.tables],
            "ranks": [
                {**dataclasses.asdict(r), "hbm_bytes": r.hbm, "ddr_bytes": r.ddr} for r in self.ranks
            ],
            "totals": self.totals(),
            "fits": self.fits(),
            "planning_seconds": round(self.seconds, 3),
        }


def build_report(
    cfg: JobConfig,
    model: nn.Module,
    result: PlanningResult,
    world_size: int,
    local_world_size: int,
    what_if: WhatIf,
    seconds: float,
    config_name: str,
) -> CapacityReport:
    """Combine the plan, the planner's estimates and the explicit optimizer state."""
    device_type = cfg.sharding.compute_device
    optimizer = _OPTIMIZER_NAMES[sparse_optimizer_choice(cfg.sharding, device_type).fused_optimizer]
    dtype = what_if.dtype or "fp32"
    _, ebc = find_ebc(model)
    configs = {c.name: c for c in ebc.embedding_bag_configs()}
    tables: list[TableUsage] = []
    ranks: dict[int, dict[str, Any]] = {
        r: {"planner_hbm": 0, "planner_ddr": 0, "optimizer_hbm": 0, "optimizer_ddr": 0, "tables": [],
            "mapping_hbm": 0, "mapping_ddr": 0}
        for r in range(world_size)
    }
    for row in describe_plan(result.plan):
        c = configs[row["table"]]
        kernel = row["compute_kernel"]
        tables.append(
            TableUsage(
                name=c.name, rows=c.num_embeddings, dim=c.embedding_dim, dtype=dtype,
                param_bytes=c.num_embeddings * row_bytes(c.embedding_dim, dtype),
                optimizer_bytes=optimizer_bytes(c.num_embeddings, c.embedding_dim, optimizer, kernel, dtype),
                sharding_type=row["sharding_type"], compute_kernel=kernel, ranks=sorted(row["ranks"]),
            )
        )
        mapping = _mapping_usage(cfg, model, c, world_size)
        if mapping is not None:
            kind, total, persistent = mapping
            tables[-1] = dataclasses.replace(tables[-1], id_mapping=kind, mapping_bytes=total,
                                             mapping_state_bytes=persistent)
            for r in ranks.values():  # a full replica of the mapping on every rank, beside the dense layers
                r["mapping_hbm" if device_type == "cuda" else "mapping_ddr"] += total
        in_hbm = optimizer_in_hbm(kernel, optimizer, device_type)
        for rank, (rows, cols), storage in _shards(row, c, result):
            r = ranks[rank]
            r["planner_hbm"] += storage.hbm
            r["planner_ddr"] += storage.ddr
            r["optimizer_hbm" if in_hbm else "optimizer_ddr"] += optimizer_bytes(rows, cols, optimizer, kernel, dtype)
            if c.name not in r["tables"]:
                r["tables"].append(c.name)
    return CapacityReport(
        config=config_name, model=cfg.model.name, world_size=world_size, local_world_size=local_world_size,
        compute_device=device_type, hbm_capacity=result.capacity.hbm, ddr_capacity=result.capacity.ddr,
        hbm_available=result.available.hbm, ddr_available=result.available.ddr,
        sparse_optimizer=optimizer, what_if=what_if, tables=tables,
        ranks=[RankUsage(rank=k, **v) for k, v in sorted(ranks.items())], seconds=seconds,
    )


def _mapping_usage(
    cfg: JobConfig, model: nn.Module, c: EmbeddingBagConfig, world_size: int
) -> tuple[str, int, int] | None:
    """(mapping, bytes per rank, of which persistent) of a hash / managed table; None if dense.

    The history bound assumes every sequence feature of the table full (``max_seq_len``)
    for the global batch, as :func:`cdp_rec.training.optim.use_sparse_gradients` does.
    """
    from cdp_rec.data.schema import is_sequence_feature
    from embeddings.id_mapping import history_bytes, state_bytes

    kind = cfg.features.id_mapping.get(c.name, "dense")
    mapper = getattr(model, "id_mapper", None)
    if kind == "dense" or mapper is None or c.name not in mapper.specs:
        return None
    t = cfg.train
    global_batch = t.batch_size * (world_size if t.batch_size_scope == "per_rank" else 1)
    ids = global_batch * sum(cfg.features.max_seq_len if is_sequence_feature(f) else 1
                             for f in mapper.specs[c.name].features)
    persistent = state_bytes(kind, c.num_embeddings, cfg.features.zch, cfg.features.hash_collision_stats)
    return kind, persistent + history_bytes(kind, ids, cfg.features.zch), persistent


def _shards(
    row: dict[str, Any], c: EmbeddingBagConfig, result: PlanningResult
) -> Iterator[tuple[int, tuple[int, int], Storage]]:
    """(rank, (rows, cols), planner storage) for every shard of one table.

    Hand-planned (CPU row-wise) tables were planned as a table-wise placeholder: their
    estimate is spread over the real shards in proportion to shard size.
    """
    option = result.options[c.name]
    if row["table"] not in result.hand_planned:
        for shard in option.shards:
            assert shard.rank is not None
            yield shard.rank, (shard.size[0], shard.size[1]), shard.storage or Storage(0, 0, 0)
        return
    whole = sum((sh.storage for sh in option.shards if sh.storage), Storage(0, 0, 0))
    numel = c.num_embeddings * c.embedding_dim
    for sh in row["shards"]:
        rows, cols = sh["sizes"]
        frac = rows * cols / numel
        yield sh["rank"], (rows, cols), Storage(hbm=round(whole.hbm * frac), ddr=round(whole.ddr * frac), ssd=0)


# --------------------------------------------------------------------------- entry points


def plan_capacity(
    cfg: JobConfig,
    world_size: int,
    local_world_size: int,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
    what_if: WhatIf = WhatIf(),
    config_name: str = "<embedded default>",
    model: nn.Module | None = None,
) -> CapacityReport:
    """Plan the config's tables on ``world_size`` devices and report memory.

    Raises:
        CapacityError: the plan does not fit (the message names the tables and the
            bytes they need vs the bytes available), or a what-if is invalid.
    """
    _check_topology(world_size, local_world_size)
    hbm_gb = cfg.sharding.hbm_gb if hbm_gb is None else hbm_gb
    ddr_gb = cfg.sharding.ddr_gb if ddr_gb is None else ddr_gb
    model = planning_model(cfg, what_if) if model is None else model
    device_type = cfg.sharding.compute_device
    start = time.perf_counter()
    try:
        result = plan_embeddings(
            cfg, model, world_size, local_world_size, device_type, hbm_gb, ddr_gb,
            what_if.caching, what_if.cache_load_factor,
        )
    except PlannerError as e:
        raise CapacityError(
            _diagnose_no_plan(cfg, model, world_size, local_world_size, hbm_gb, ddr_gb, what_if, e)
        ) from None
    report = build_report(
        cfg, model, result, world_size, local_world_size, what_if, time.perf_counter() - start, config_name
    )
    if not report.fits():
        raise CapacityError(_diagnose_over_capacity(report))
    return report


def _check_topology(world_size: int, local_world_size: int, flag: str = "--world-size") -> None:
    if local_world_size <= 0 or world_size <= 0 or world_size % local_world_size:
        raise CapacityError(
            f"{flag} {world_size} must be a positive multiple of --local-world-size {local_world_size}"
        )


@dataclass(frozen=True)
class SearchStep:
    """One probe of :func:`find_min_world_size`: a world size and why it did (not) fit."""

    world_size: int
    fits: bool
    reason: str = ""


def find_min_world_size(
    cfg: JobConfig,
    local_world_size: int,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
    what_if: WhatIf = WhatIf(),
    max_world_size: int = 1024,
    config_name: str = "<embedded default>",
) -> tuple[CapacityReport, list[SearchStep]]:
    """Smallest multiple of ``local_world_size`` whose plan fits, by search over the planner.

    Doubles the number of hosts until a plan fits, then bisects between the last host
    count that failed and the first that fit: about 2 log2(hosts) planner runs, where a
    scan would need one per host. Bisection assumes that if a world size fits, larger
    ones do too; the planner's search is heuristic, so this is an assumption, but the
    answer is always a checked fit and one host fewer a checked failure.

    Raises:
        CapacityError: nothing up to ``max_world_size`` fits (the message is that size's).
    """
    _check_topology(max_world_size, local_world_size, "--max-world-size")
    model = planning_model(cfg, what_if)
    steps: list[SearchStep] = []
    reports: dict[int, CapacityReport] = {}

    def probe(hosts: int) -> bool:
        ws = hosts * local_world_size
        try:
            reports[ws] = plan_capacity(cfg, ws, local_world_size, hbm_gb, ddr_gb, what_if, config_name, model)
            steps.append(SearchStep(ws, True))
            return True
        except CapacityError as e:
            steps.append(SearchStep(ws, False, str(e)))
            return False

    max_hosts = max_world_size // local_world_size
    lo, hi = 0, 1  # lo: most hosts known not to fit (0: none tried)
    while not probe(hi):
        if hi >= max_hosts:
            raise CapacityError(f"no plan fits on up to {max_world_size} devices: {steps[-1].reason}")
        lo, hi = hi, min(2 * hi, max_hosts)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    return reports[hi * local_world_size], steps


# --------------------------------------------------------------------------- diagnosis


def _table_need(
    c: EmbeddingBagConfig, optimizer: str, kernel: str, device_type: str, what_if: WhatIf
) -> Storage:
    """Bytes a whole table needs in each tier (weights, UVM cache and optimizer state)."""
    dtype = what_if.dtype or "fp32"
    params = c.num_embeddings * row_bytes(c.embedding_dim, dtype)
    state = optimizer_bytes(c.num_embeddings, c.embedding_dim, optimizer, kernel, dtype)
    if device_type != "cuda":
        return Storage(hbm=0, ddr=params + state, ssd=0)
    state_hbm = state if optimizer_in_hbm(kernel, optimizer, device_type) else 0
    if kernel == _CACHING:
        return Storage(hbm=round(params * what_if.cache_load_factor) + state_hbm, ddr=params + state - state_hbm, ssd=0)
    return Storage(hbm=params + state, ddr=0, ssd=0)


def _spread(kind: str | None, world_size: int, local_world_size: int) -> int:
    """Over how many devices a table of this sharding type can be split at most."""
    if kind in (ShardingType.TABLE_WISE.value, ShardingType.DATA_PARALLEL.value):
        return 1
    if kind in (ShardingType.TABLE_ROW_WISE.value, ShardingType.TABLE_COLUMN_WISE.value):
        return local_world_size
    return world_size


def _diagnose_no_plan(
    cfg: JobConfig,
    model: nn.Module,
    world_size: int,
    local_world_size: int,
    hbm_gb: float,
    ddr_gb: float,
    what_if: WhatIf,
    error: PlannerError,
) -> str:
    """Name the tables that do not fit: first any that cannot fit its devices even alone,
    else the largest tables against the cluster's total, else the planner's own reason."""
    device_type = cfg.sharding.compute_device
    choice = sparse_optimizer_choice(cfg.sharding, device_type)
    optimizer = _OPTIMIZER_NAMES[choice.fused_optimizer]
    kernel = _CACHING if what_if.caching else choice.compute_kernel
    _, ebc = find_ebc(model)
    with quiet_planner():
        topology = build_topology(world_size, local_world_size, device_type, hbm_gb, ddr_gb)
        sharders = [build_sharder(cfg, device_type)]
        available = _capacity_after_reservation(topology, model, sharders, {})  # type: ignore[arg-type]
    left = [f"{_gib(available.ddr)} DDR (of {ddr_gb:g} GiB)"]
    if topology.devices[0].storage.hbm:  # CPU topologies have no HBM
        left.insert(0, f"{_gib(available.hbm)} HBM (of {hbm_gb:g} GiB)")
    where = (
        f"{world_size} x {device_type} ({local_world_size} per host), per device "
        + " and ".join(left) + " left after the planner's reservation"
    )
    needs: dict[str, Storage] = {}
    alone: list[str] = []
    for c in ebc.embedding_bag_configs():
        kind = cfg.sharding.constraints.get(c.name)
        k = _DENSE if kind == ShardingType.DATA_PARALLEL.value else kernel
        need = needs[c.name] = _table_need(c, optimizer, k, device_type, what_if)
        n = _spread(kind, world_size, local_world_size)
        for tier in ("hbm", "ddr"):
            per_device = math.ceil(getattr(need, tier) / n)
            if per_device > getattr(available, tier):
                how = f"split over at most {n} devices ({kind or 'any sharding'})" if n > 1 else f"on one device ({kind})"
                alone.append(
                    f"{c.name} needs {_gib(per_device)} {tier.upper()} {how}, has {_gib(getattr(available, tier))}"
                )
    if alone:
        return f"does not fit on {where}: " + "; ".join(alone)
    for tier in ("hbm", "ddr"):
        total = sum(getattr(n, tier) for n in needs.values())
        have = getattr(available, tier) * world_size
        if total > have:
            big = sorted(needs.items(), key=lambda kv: -getattr(kv[1], tier))
            listed = [f"{t} {_gib(getattr(n, tier))}" for t, n in big if getattr(n, tier) >= 0.01 * total]
            return (
                f"does not fit on {where}: the tables need {_gib(total)} {tier.upper()} in total "
                f"(weights + {optimizer} state), the {world_size} devices have {_gib(have)}: " + ", ".join(listed)
            )
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    biggest = sorted(needs.items(), key=lambda kv: -(kv[1].hbm + kv[1].ddr))[:3]
    return (
        f"does not fit on {where}: TorchRec's planner found no placement under the constraints "
        f"({first}); largest tables: " + ", ".join(f"{t} {_gib(n.hbm + n.ddr)}" for t, n in biggest)
    )


def _diagnose_over_capacity(report: CapacityReport) -> str:
    """The planner placed the tables, but with optimizer state some ranks overflow."""
    over = report.over_capacity()
    worst = max(over, key=lambda r: max(r.hbm / max(report.hbm_available, 1), r.ddr / max(report.ddr_available, 1)))
    tier = "HBM" if worst.hbm > report.hbm_available else "DDR"
    planner, state, have = (
        (worst.planner_hbm, worst.optimizer_hbm, report.hbm_available)
        if tier == "HBM"
        else (worst.planner_ddr, worst.optimizer_ddr, report.ddr_available)
    )
    sizes = {t.name: t.param_bytes + t.optimizer_bytes for t in report.tables}
    mine = sorted(worst.tables, key=lambda t: -sizes[t])
    # Name the tables that matter: a 24-row context table is not why a rank overflows.
    names = ", ".join(f"{t} ({_gib(sizes[t])} with state)" for t in mine if sizes[t] >= 0.01 * sizes[mine[0]])
    ids = worst.mapping_hbm if tier == "HBM" else worst.mapping_ddr
    mapped = ""
    if ids:
        per = ", ".join(f"{t.name} {t.id_mapping} {_gib(t.mapping_bytes)}" for t in report.tables if t.mapping_bytes)
        mapped = (f" + raw-id mapping {_gib(ids)} on every rank ({per}; lower features.zch.eviction_interval or the "
                  f"table rows, or make tables hash)")
    return (
        f"does not fit on {report.world_size} x {report.compute_device}: {len(over)} of {report.world_size} ranks "
        f"over capacity; rank {worst.rank} needs {_gib(planner + state + ids)} {tier} (planner {_gib(planner)} + "
        f"{report.sparse_optimizer} state {_gib(state)}, which TorchRec's planner does not count{mapped}), "
        f"has {_gib(have)} available; its tables: {names}"
    )


# --------------------------------------------------------------------------- text


def _gib(n: float) -> str:
    return f"{n / GB:.2f} GiB"


@dataclass(frozen=True)
class Unit:
    """Display unit of a text report: GiB for real tables, MiB/KiB for toy configs."""

    name: str
    bytes: int

    def __call__(self, n: float) -> str:
        return f"{n / self.bytes:.2f}"


def report_unit(report: CapacityReport) -> Unit:
    biggest = max([t.param_bytes for t in report.tables] + [r.hbm + r.ddr for r in report.ranks])
    for name, size in (("GiB", 2**30), ("MiB", 2**20)):
        if biggest >= size:
            return Unit(name, size)
    return Unit("KiB", 2**10)


def format_ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 3, 8, 9]`` -> ``"0-3,8-9"``."""
    if not ranks:
        return "-"
    parts, start, prev = [], ranks[0], ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def format_report(report: CapacityReport, steps: list[SearchStep] | None = None) -> str:
    """The report as text: header, one line per table, ranks with equal use grouped."""
    r = report
    u = report_unit(r)
    hbm = r.hbm_capacity > 0  # CPU topologies have no HBM
    hosts = r.world_size // r.local_world_size
    mem = [f"DDR {r.ddr_capacity / GB:g} GiB ({_gib(r.ddr_available)} left)"]
    if hbm:
        mem.insert(0, f"HBM {r.hbm_capacity / GB:g} GiB ({_gib(r.hbm_available)} left)")
    out = [
        f"capacity plan: {r.config} (model {r.model}), {r.world_size} x {r.compute_device}, "
        f"{hosts} host{'s' * (hosts != 1)} x {r.local_world_size}",
        "per device: " + ", ".join(mem) + "; 'left' = after the planner's reservation "
        "(15% of HBM, dense layers, batch inputs)",
        f"sparse optimizer state: {describe_optimizer(r.sparse_optimizer)}; TorchRec's planner does not count it, "
        f"the 'optim' columns add it",
    ]
    if r.what_if.describe():
        out.append("what-if: " + ", ".join(r.what_if.describe()))
    if r.what_if.dtype == "int8":
        out.append(
            f"int8: rows take dim + {INT8_ROW_OVERHEAD_BYTES} bytes (scale, bias); TorchRec's planner sizes them "
            f"as fp16, so the per-rank figures are an upper bound"
        )
    if steps:
        out.append(
            "search: "
            + ", ".join(f"{s.world_size} {'fits' if s.fits else 'no'}" for s in sorted(steps, key=lambda s: s.world_size))
            + f" -> smallest world size {r.world_size}"
        )
    out += ["", _table_lines(r, u), *_mapping_lines(r, u), "", _rank_lines(r, u, hbm), "", _summary(r, u, hbm)]
    return "\n".join(out)


def _mapping_lines(r: CapacityReport, u: Unit) -> list[str]:
    """The raw-id mapping of hash / managed tables (features.id_mapping), if any."""
    mapped = [t for t in r.tables if t.id_mapping != "dense"]
    if not mapped:
        return []
    where = "HBM" if r.compute_device == "cuda" else "DDR"
    lines = ["", f"raw-id mapping (features.id_mapping), a full replica on every rank, in {where}; "
             f"the rank table's 'ids' column:"]
    for t in mapped:
        what = (f"{t.rows - 1:,} ids max, state {u(t.mapping_state_bytes)} + history buffer <= "
                f"{u(t.mapping_bytes - t.mapping_state_bytes)} {u.name}" if t.id_mapping == "managed"
                else f"collision statistics {u(t.mapping_state_bytes)} {u.name}" if t.mapping_state_bytes
                else "stateless")
        lines.append(f"ids {t.name:<16} {t.id_mapping:<8} {what}")
    return lines


def _summary(r: CapacityReport, u: Unit, hbm: bool) -> str:
    t = r.totals()
    parts = []
    for tier, avail, total in (("HBM", r.hbm_available, t["hbm_bytes"]), ("DDR", r.ddr_available, t["ddr_bytes"])):
        if tier == "HBM" and not hbm:
            continue
        busiest = max(r.ranks, key=lambda x: x.hbm if tier == "HBM" else x.ddr)
        used = busiest.hbm if tier == "HBM" else busiest.ddr
        parts.append(f"{tier} busiest rank {busiest.rank} {_pct(used, avail)}, all ranks {u(total)} {u.name}")
    return f"fits: {'yes' if r.fits() else 'NO'}; " + "; ".join(parts) + f"; planned in {r.seconds:.2f} s"


def _pct(used: int, available: int) -> str:
    return f"{100 * used / available:.0f}%" if available else ("0%" if not used else "inf")


def _table_lines(r: CapacityReport, u: Unit) -> str:
    params, optim = f"params {u.name}", f"optim {u.name}"
    lines = [
        f"{'table':<20} {'rows':>13} {'dim':>4} {'dtype':<5} {params:>10} {optim:>10} "
        f"{'sharding':<17} {'kernel':<17} ranks"
    ]
    for t in r.tables:
        lines.append(
            f"{t.name:<20} {t.rows:>13,} {t.dim:>4} {t.dtype:<5} {u(t.param_bytes):>10} {u(t.optimizer_bytes):>10} "
            f"{t.sharding_type:<17} {t.compute_kernel:<17} {format_ranks(t.ranks)}"
        )
    tot = r.totals()
    lines.append(f"{'total':<20} {tot['rows']:>13,} {'':>4} {'':<5} {u(tot['param_bytes']):>10} {u(tot['optimizer_bytes']):>10}")
    return "\n".join(lines)


def _rank_lines(r: CapacityReport, u: Unit, hbm: bool) -> str:
    """Per rank: planner estimate + optimizer state = used, and used as % of what is left."""
    tiers = [("HBM", r.hbm_available)] if hbm else []
    tiers.append(("DDR", r.ddr_available))
    width = 40
    head = "".join(f"{f'   {name} {u.name} (of {_gib(left)} left)':<{width}}" for name, left in tiers)
    cell = "{:>9} + {:>8} = {:>8} {:>5}"
    ids = any(t.id_mapping != "dense" for t in r.tables)
    if ids:  # hash / managed tables: their mapping is a third term
        cell, width = "{:>9} + {:>8} + {:>8} = {:>8} {:>5}", 51
        head = "".join(f"{f'   {name} {u.name} (of {_gib(left)} left)':<{width}}" for name, left in tiers)
    sub = "".join(f"{cell.format('planner', 'optim', *(['ids'] if ids else []), 'used', 'use'):<{width}}"
                  for _ in tiers)
    lines = [f"{'':<12}{head}", f"{'ranks':<12}{sub}tables"]
    groups: list[tuple[list[int], str]] = []
    for x in r.ranks:
        cells = [(x.planner_ddr, x.optimizer_ddr, x.mapping_ddr, x.ddr, r.ddr_available)]
        if hbm:
            cells.insert(0, (x.planner_hbm, x.optimizer_hbm, x.mapping_hbm, x.hbm, r.hbm_available))
        text = "".join(f"{cell.format(u(p), u(o), *([u(m)] if ids else []), u(n), _pct(n, a)):<{width}}"
                       for p, o, m, n, a in cells)
        text += ",".join(x.tables) or "-"
        if groups and groups[-1][1] == text:
            groups[-1][0].append(x.rank)
        else:
            groups.append(([x.rank], text))
    lines += [f"{format_ranks(ranks):<12}{text}" for ranks, text in groups]
    return "\n".join(line.rstrip() for line in lines)


def report_json(report: CapacityReport, steps: list[SearchStep] | None = None) -> str:
    data = report.to_dict()
    if steps is not None:
        data["search"] = [dataclasses.asdict(s) for s in steps]
        data["min_world_size"] = report.world_size
    return json.dumps(data, indent=2)
