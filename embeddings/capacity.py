"""Embedding capacity planning: does the model's tables fit, on how many GPUs, and how?

``cdp-rec plan`` answers this from the same config training uses, without allocating
any table: the model is built on the meta device and planned by
:func:`embeddings.sharding.plan_with_estimates`, the function training's
:func:`~embeddings.sharding.plan_sharding` is. The planner counts the sparse optimizer's
state per shard (:mod:`embeddings.optimizer_state`), so its placement already leaves
room for it: a plan that fits is a plan that runs.

What this module adds to the planner, and why:

* **What-ifs** (:class:`WhatIf`): table rows, dims, dtype and the UVM caching kernel
  changed on the meta model before planning.
* **The report**: per table (weights, optimizer state, sharding, ranks) and per rank
  the planner's estimate split into weights + buffers and optimizer state, plus the
  raw-id mapping of hash / managed tables (``features.id_mapping``): a full replica on
  every rank beside the dense layers, which the planner does not see.
* **Fit**: the planner placed every shard within the capacity left after its reservation
  (15 % of HBM, 6x dense parameters, batch inputs); a rank still fails when the id
  mapping pushes it over.
* **Diagnosis** of a plan that does not fit (which tables, how many bytes) and the
  **smallest world size** that fits (:func:`find_min_world_size`).

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
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.planner.constants import UVM_CACHING_RATIO
from torchrec.distributed.planner.types import Storage
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import DataType

from cdp_rec.config import JobConfig, table_size_fields
from cdp_rec.models import build_model
from embeddings.optimizer_state import (
    CACHING as _CACHING,
    DENSE as _DENSE,
    describe_optimizer,
    optimizer_bytes,
    optimizer_in_hbm,
    optimizer_name,
    optimizer_storage,
)
from embeddings.sharding import (
    GB,
    PLANNER_HBM_RESERVE,
    NoPlacementError,
    PlannedSharding,
    TableLocation,
    build_topology,
    describe_plan,
    find_embedding_modules,
    model_tables,
    module_table_configs,
    plan_with_estimates,
    sparse_optimizer_choice,
)

DTYPES: dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}

# fbgemm stores an int8 row as dim bytes + fp32 scale and bias (INT8_EMB_ROW_DIM_OFFSET).
INT8_ROW_OVERHEAD_BYTES = 8


class CapacityError(ValueError):
    """The plan does not fit, or a what-if names an unknown table / unsupported value."""


# Bounds on what `cdp-rec plan` is asked, so an absurd what-if gets a one-line refusal
# naming the flag instead of an int64 overflow in torch or a planner that runs for hours.
# TorchRec's planner time grows with world size x proposals (industrial: 12 s at 1024
# devices; the tiny CPU config's 6,561 proposals: ~100 s at 1024 on 2 cores).
MAX_WORLD_SIZE = 4096
# Column-wise sharding cuts a table into dim / 128 shards, each a planner option: a dim of
# 4e9 enumerates 31 M of them. 65,536 (512 shards) is far beyond production dims (64-512).
MAX_DIM = 65536
# Per device, GiB: 1 PiB. With MAX_WORLD_SIZE devices the cluster's bytes stay < 2**63.
MAX_MEMORY_GB = 2**20
# Elements (rows x dim) of one table: byte counts of weights + optimizer state (at most
# 4 + 8 bytes per element, fp32 + Adam) must fit int64, which torch's meta tensors use.
MAX_TABLE_ELEMENTS = 2**59


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

    Rows, dims and dtypes of the tables are rewritten by replacing each embedding module
    (EBC, and the sequence models' EC) with one built from edited configs (the dense
    layers stay; the planner's reservation sizes them).
    """
    _check_table_sizes(cfg, what_if)  # before build_model: torch overflows on meta tensors past int64
    model = build_model(cfg, "meta")
    _validate_what_if(what_if, cfg, sorted(model_tables(model)))
    if not (what_if.scale_rows or what_if.dims or what_if.dtype):
        return model
    for path, module in find_embedding_modules(model):
        edited = [_edit_table(c, what_if) for c in module_table_configs(module)]
        if isinstance(module, EmbeddingBagCollection):
            new: nn.Module = EmbeddingBagCollection(tables=edited, is_weighted=module.is_weighted(),
                                                    device=torch.device("meta"))
        else:
            dims = {c.name: c.embedding_dim for c in edited}
            if len(set(dims.values())) > 1:
                raise CapacityError(
                    f"--dim: tables {sorted(dims)} of model {cfg.model.name!r} share one EmbeddingCollection, "
                    f"whose tables have one dim (TorchRec); give them the same --dim (got {dims})"
                )
            new = EmbeddingCollection(tables=edited, device=torch.device("meta"))
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, new)
    return model


def _scaled_rows(rows: int, factor: float) -> int:
    return max(1, round(rows * factor))


def _check_table_sizes(cfg: JobConfig, what_if: WhatIf) -> None:
    """Dims and rows x dim within bounds, from the config's table sizes (as
    :func:`embeddings.tables.table_specs` makes them) and the what-ifs, naming where each
    value came from."""
    fields = table_size_fields(cfg.features)
    if cfg.model.embedding_dim > MAX_DIM:
        raise CapacityError(f"model.embedding_dim {cfg.model.embedding_dim}: at most {MAX_DIM:,} (planning time grows "
                            f"with dim / 128 column-wise shards)")
    for t, d in what_if.dims.items():
        if d > MAX_DIM:
            raise CapacityError(f"--dim {t}={d}: at most {MAX_DIM:,} (planning time grows with dim / 128 "
                                f"column-wise shards)")
    for t, (key, n) in fields.items():
        factor = what_if.scale_rows.get(t)
        if factor is not None and not (factor > 0 and math.isfinite(factor)):
            continue  # _validate_what_if names it
        rows = n if factor is None else _scaled_rows(n, factor)
        dim = what_if.dims.get(t, cfg.model.embedding_dim)
        if rows * dim > MAX_TABLE_ELEMENTS:
            source = f"{key}={n}" + ("" if factor is None else f" x --scale-table {t}={factor:g}")
            raise CapacityError(
                f"table {t}: {rows:.3g} rows x dim {dim} ({source}) exceeds {MAX_TABLE_ELEMENTS:.3g} (2**59) "
                f"elements, past which its byte counts (weights + optimizer state) overflow int64"
            )


def _edit_table(c: Any, what_if: WhatIf) -> Any:
    rows = _scaled_rows(c.num_embeddings, what_if.scale_rows.get(c.name, 1.0))
    return dataclasses.replace(
        c,
        num_embeddings=rows,
        embedding_dim=what_if.dims.get(c.name, c.embedding_dim),
        data_type=DTYPES[what_if.dtype] if what_if.dtype else c.data_type,
    )


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


# --------------------------------------------------------------------------- bytes


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one embedding row as fbgemm stores it."""
    if dtype == "int8":
        return dim + INT8_ROW_OVERHEAD_BYTES
    return dim * (2 if dtype == "fp16" else 4)


def _weight_width(dtype: str) -> int:
    """Bytes per value of the weights' dtype, for a data-parallel table's torch Adam."""
    return 4 if dtype == "fp32" else 2


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
    """One device, bytes. TorchRec's estimate split in two: ``planner_*`` its weights, UVM
    cache and input/output buffers, ``optimizer_*`` the optimizer state it counts with them
    (:mod:`embeddings.optimizer_state`); ``mapping_*``: the raw-id mapping state of hash /
    managed tables, replicated on every rank, which the planner does not see."""

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
        """Ranks whose planner estimate + id mapping exceeds the available bytes."""
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
            "optimizer_counted_by_planner": True,
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
    planned: PlannedSharding,
    world_size: int,
    local_world_size: int,
    what_if: WhatIf,
    seconds: float,
    config_name: str,
) -> CapacityReport:
    """Tables and ranks of the plan, from the planner's per-shard estimates."""
    device_type = cfg.sharding.compute_device
    optimizer = optimizer_name(sparse_optimizer_choice(cfg.sharding, device_type).fused_optimizer)
    dtype = what_if.dtype or "fp32"
    locations = model_tables(model)
    tables: list[TableUsage] = []
    ranks: dict[int, dict[str, Any]] = {
        r: {"planner_hbm": 0, "planner_ddr": 0, "optimizer_hbm": 0, "optimizer_ddr": 0, "tables": [],
            "mapping_hbm": 0, "mapping_ddr": 0}
        for r in range(world_size)
    }
    for row in describe_plan(planned.plan):
        c = locations[row["table"]].config
        kernel = row["compute_kernel"]
        tables.append(
            TableUsage(
                name=c.name, rows=c.num_embeddings, dim=c.embedding_dim, dtype=dtype,
                param_bytes=c.num_embeddings * row_bytes(c.embedding_dim, dtype),
                optimizer_bytes=optimizer_bytes(c.num_embeddings, c.embedding_dim, optimizer, kernel,
                                                _weight_width(dtype)),
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
        for rank, (rows, cols), storage in _shards(row, locations[row["table"]], planned):
            # The same per-shard state the planner's estimator added (embeddings.optimizer_state).
            state = optimizer_storage(rows, cols, optimizer, kernel, device_type, _weight_width(dtype))
            r = ranks[rank]
            r["planner_hbm"] += storage.hbm - state.hbm
            r["planner_ddr"] += storage.ddr - state.ddr
            r["optimizer_hbm"] += state.hbm
            r["optimizer_ddr"] += state.ddr
            if c.name not in r["tables"]:
                r["tables"].append(c.name)
    return CapacityReport(
        config=config_name, model=cfg.model.name, world_size=world_size, local_world_size=local_world_size,
        compute_device=device_type, hbm_capacity=planned.capacity.hbm, ddr_capacity=planned.capacity.ddr,
        hbm_available=planned.available.hbm, ddr_available=planned.available.ddr,
        sparse_optimizer=optimizer, what_if=what_if, tables=tables,
        ranks=[RankUsage(rank=k, **v) for k, v in sorted(ranks.items())], seconds=seconds,
    )


def _mapping_usage(cfg: JobConfig, model: nn.Module, c: Any, world_size: int) -> tuple[str, int, int] | None:
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


def shard_estimates(planned: PlannedSharding, model: nn.Module) -> Iterator[tuple[str, int, tuple[int, int], Storage]]:
    """(table, rank, (rows, cols), the planner's storage estimate) for every shard of the plan."""
    locations = model_tables(model)
    for row in describe_plan(planned.plan):
        for rank, size, storage in _shards(row, locations[row["table"]], planned):
            yield row["table"], rank, size, storage


def _shards(
    row: dict[str, Any], loc: TableLocation, planned: PlannedSharding
) -> Iterator[tuple[int, tuple[int, int], Storage]]:
    """(rank, (rows, cols), planner storage) for every shard of one table.

    Hand-planned (CPU row-wise) tables were planned as a table-wise placeholder: their
    estimate is spread over the real shards in proportion to shard size (weights and
    optimizer state are proportional to it; the input/output buffers are not, a few KiB).
    """
    option = planned.options[row["table"]]
    if row["table"] not in planned.hand_planned:
        for shard in option.shards:
            assert shard.rank is not None
            yield shard.rank, (shard.size[0], shard.size[1]), shard.storage or Storage(0, 0, 0)
        return
    whole = sum((sh.storage for sh in option.shards if sh.storage), Storage(0, 0, 0))
    numel = loc.config.num_embeddings * loc.config.embedding_dim
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
    hbm_gb, ddr_gb = _memory(cfg, hbm_gb, ddr_gb)
    model = planning_model(cfg, what_if) if model is None else model
    device_type = cfg.sharding.compute_device
    start = time.perf_counter()
    try:
        with quiet_planner():
            planned = plan_with_estimates(
                cfg, model, world_size, local_world_size, device_type, hbm_gb=hbm_gb, ddr_gb=ddr_gb,
                caching=what_if.caching, cache_load_factor=what_if.cache_load_factor,
            )
    except NoPlacementError as e:
        raise CapacityError(
            _diagnose_no_plan(cfg, model, world_size, local_world_size, hbm_gb, ddr_gb, what_if, e)
        ) from None
    report = build_report(
        cfg, model, planned, world_size, local_world_size, what_if, time.perf_counter() - start, config_name
    )
    if not report.fits():
        raise CapacityError(_diagnose_over_capacity(report))
    return report


def _check_topology(world_size: int, local_world_size: int, flag: str = "--world-size") -> None:
    if local_world_size <= 0 or world_size <= 0 or world_size % local_world_size:
        raise CapacityError(
            f"{flag} {world_size} must be a positive multiple of --local-world-size {local_world_size}"
        )
    if world_size > MAX_WORLD_SIZE:
        raise CapacityError(f"{flag} {world_size}: at most {MAX_WORLD_SIZE} devices (TorchRec's planner "
                            f"time grows with the world size)")


def _memory(cfg: JobConfig, hbm_gb: float | None, ddr_gb: float | None) -> tuple[float, float]:
    """Per-device (HBM, DDR) GiB: the flags, else ``sharding.hbm_gb`` / ``ddr_gb``; finite and
    within bounds, HBM > 0 and DDR >= 0 as :class:`cdp_rec.config.ShardingConfig` requires
    (no host memory is a valid what-if on CUDA)."""
    out = []
    for flag, key, given, default, minimum in (("--hbm-gb", "sharding.hbm_gb", hbm_gb, cfg.sharding.hbm_gb, "> 0"),
                                               ("--ddr-gb", "sharding.ddr_gb", ddr_gb, cfg.sharding.ddr_gb, ">= 0")):
        gb = default if given is None else given
        ok = math.isfinite(gb) and (gb > 0 if minimum == "> 0" else gb >= 0) and gb <= MAX_MEMORY_GB
        if not ok:
            raise CapacityError(f"{flag if given is not None else key} {gb}: must be a finite number of GiB "
                                f"{minimum} and <= {MAX_MEMORY_GB:,} (1 PiB per device)")
        out.append(gb)
    return out[0], out[1]


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
    hbm_gb, ddr_gb = _memory(cfg, hbm_gb, ddr_gb)  # before the search, which reads refusals as "does not fit"
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


def _table_need(c: Any, optimizer: str, kernel: str, device_type: str, what_if: WhatIf) -> Storage:
    """Bytes a whole table needs in each tier (weights, UVM cache and optimizer state)."""
    dtype = what_if.dtype or "fp32"
    params = c.num_embeddings * row_bytes(c.embedding_dim, dtype)
    state = optimizer_bytes(c.num_embeddings, c.embedding_dim, optimizer, kernel, _weight_width(dtype))
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
    error: NoPlacementError,
) -> str:
    """Name the tables that do not fit: first any that cannot fit its devices even alone,
    else the largest tables against the cluster's total, else the planner's own reason."""
    device_type = cfg.sharding.compute_device
    choice = sparse_optimizer_choice(cfg.sharding, device_type)
    optimizer = optimizer_name(choice.fused_optimizer)
    kernel = _CACHING if what_if.caching else choice.compute_kernel
    topology = build_topology(world_size, local_world_size, device_type, hbm_gb, ddr_gb)
    available = error.available
    left = [f"{_gib(available.ddr)} DDR (of {ddr_gb:g} GiB)"]
    if topology.devices[0].storage.hbm:  # CPU topologies have no HBM
        left.insert(0, f"{_gib(available.hbm)} HBM (of {hbm_gb:g} GiB)")
    where = (
        f"{world_size} x {device_type} ({local_world_size} per host), per device "
        + " and ".join(left) + " left after the planner's reservation"
    )
    needs: dict[str, Storage] = {}
    alone: list[str] = []
    for loc in model_tables(model).values():
        c = loc.config
        kind = cfg.sharding.constraints.get(c.name)
        k = _DENSE if kind == ShardingType.DATA_PARALLEL.value else kernel
        need = needs[c.name] = _table_need(c, optimizer, k, device_type, what_if)
        n = _spread(kind, world_size, local_world_size)
        for tier in ("hbm", "ddr"):
            per_device = math.ceil(getattr(need, tier) / n)
            if per_device > getattr(available, tier):
                how = f"split over at most {n} devices" if n > 1 else "on one device"
                how += f" ({kind or 'any sharding'})"
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
    """The planner placed the tables (with their optimizer state), but the raw-id mapping it
    does not see pushes some ranks over."""
    over = report.over_capacity()
    worst = max(over, key=lambda r: max(r.hbm / max(report.hbm_available, 1), r.ddr / max(report.ddr_available, 1)))
    tier = "HBM" if worst.hbm > report.hbm_available else "DDR"
    planner, state, ids, have = (
        (worst.planner_hbm, worst.optimizer_hbm, worst.mapping_hbm, report.hbm_available)
        if tier == "HBM"
        else (worst.planner_ddr, worst.optimizer_ddr, worst.mapping_ddr, report.ddr_available)
    )
    sizes = {t.name: t.param_bytes + t.optimizer_bytes for t in report.tables}
    mine = sorted(worst.tables, key=lambda t: -sizes[t])
    # Name the tables that matter: a 24-row context table is not why a rank overflows.
    names = ", ".join(f"{t} ({_gib(sizes[t])} with state)" for t in mine if sizes[t] >= 0.01 * sizes[mine[0]])
    per = ", ".join(f"{t.name} {t.id_mapping} {_gib(t.mapping_bytes)}" for t in report.tables if t.mapping_bytes)
    return (
        f"does not fit on {report.world_size} x {report.compute_device}: {len(over)} of {report.world_size} ranks "
        f"over capacity; rank {worst.rank} needs {_gib(planner + state + ids)} {tier} (planner {_gib(planner + state)}"
        f", of which {report.sparse_optimizer} state {_gib(state)}, + raw-id mapping {_gib(ids)} on every rank, "
        f"which the planner does not see: {per}; lower features.zch.eviction_interval or the table rows, or make "
        f"tables hash), has {_gib(have)} available; its tables: {names}"
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


def _replicated_reserve(r: CapacityReport) -> int:
    """Bytes per device the planner's storage reservation set aside beyond its HBM margin
    (TorchRec's heuristic: dense parameters x 6, buffers, input KJTs) on the tier the
    tables live in."""
    if r.hbm_capacity > 0:
        return max(0, round(r.hbm_capacity * (1 - PLANNER_HBM_RESERVE)) - r.hbm_available)
    return max(0, r.ddr_capacity - r.ddr_available)


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
        f"({'15% of HBM + ' if hbm else ''}{_gib(_replicated_reserve(r))} for what every rank holds whole: dense layers with "
        "their gradients and optimizer state, buffers such as lr_counts' count tables, batch inputs)",
        f"sparse optimizer state: {describe_optimizer(r.sparse_optimizer)}; the planner counts it per shard "
        f"and places around it: 'weights' (weights, cache, I/O buffers) + 'optim' is its estimate",
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
    """Per rank: the planner's estimate (weights + optimizer state) [+ id mapping] = used, and used
    as % of what is left."""
    tiers = [("HBM", r.hbm_available)] if hbm else []
    tiers.append(("DDR", r.ddr_available))
    width = 40
    head = "".join(f"{f'   {name} {u.name} (of {_gib(left)} left)':<{width}}" for name, left in tiers)
    cell = "{:>9} + {:>8} = {:>8} {:>5}"
    ids = any(t.id_mapping != "dense" for t in r.tables)
    if ids:  # hash / managed tables: their mapping is a third term
        cell, width = "{:>9} + {:>8} + {:>8} = {:>8} {:>5}", 51
        head = "".join(f"{f'   {name} {u.name} (of {_gib(left)} left)':<{width}}" for name, left in tiers)
    sub = "".join(f"{cell.format('weights', 'optim', *(['ids'] if ids else []), 'used', 'use'):<{width}}"
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
