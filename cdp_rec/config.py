"""Typed job configuration: dataclasses, YAML loading and ``--set`` overrides.

One dataclass per component (torchtitan style), composed into :class:`JobConfig`.
The dataclass defaults *are* the tiny CI configuration, so ``JobConfig()`` is the
embedded default that ``cdp-rec train`` runs with no ``--config``; ``configs/tiny.yaml``
spells the same values out and a test keeps the two equal.

Errors are :class:`ConfigError` and always name the offending key and the file (or
``--set``) it came from, because a typo in a 60-day job config should fail at start-up,
not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


@dataclass
class FeatureConfig:
    """Feature spec: vocabulary sizes and which columns are context / scene.

    Ids must lie in ``[0, size)``; the loader rejects anything else. Context and scene
    columns are declared here (column name -> vocabulary size), never hard-coded, so a
    new context column is a config change.
    """

    num_users: int = 2_000
    num_items: int = 5_000
    num_queries: int = 500
    num_categories: int = 20
    context_features: dict[str, int] = field(default_factory=lambda: {"hour": 24, "page": 8})
    scene_features: dict[str, int] = field(
        default_factory=lambda: {"client": 3, "search_source": 4}
    )
    max_seq_len: int = 50

    def validate(self, where: str) -> None:
        for name in ("num_users", "num_items", "num_queries", "num_categories", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: features.{name} must be > 0, got {getattr(self, name)}")
        if not self.context_features or not self.scene_features:
            raise ConfigError(f"{where}: features.context_features and features.scene_features must be non-empty")
        clash = set(self.context_features) & set(self.scene_features)
        if clash:
            raise ConfigError(f"{where}: columns {sorted(clash)} are both context and scene features")
        for group in ("context_features", "scene_features"):
            for col, size in getattr(self, group).items():
                if col in RESERVED_COLUMNS:
                    raise ConfigError(f"{where}: features.{group}.{col} clashes with a built-in column")
                if not isinstance(size, int) or size <= 0:
                    raise ConfigError(f"{where}: features.{group}.{col} must be a positive int, got {size!r}")


# Columns every data set has; context/scene columns come from FeatureConfig.
RESERVED_COLUMNS = (
    "request_id",
    "user_id",
    "query_id",
    "item_id",
    "category_id",
    "ts",
    "label",
    "hist_item_ids",
    "hist_category_ids",
)


LAYOUTS = ("rows", "joined")


@dataclass
class DataConfig:
    """Where the Parquet search logs live and how the synthetic generator shapes them.

    Days ``0 .. train_days-1`` train, the following ``test_days`` evaluate. ``layout``
    picks how they are stored (README "Storage layouts"):

    * ``rows``: ``<root>/day=NN/part-NNNNN.parquet``, every impression row carries its
      behaviour history as list columns (:mod:`cdp_rec.data.loader`);
    * ``joined``: each user's behaviour log stored once under ``<root>/behaviors/``, the
      impressions without histories, both split into ``num_user_buckets`` buckets by a
      hash of user_id; histories are assembled at read time (:mod:`cdp_rec.data.joined`).
    """

    root: str = "data/tiny"
    train_days: int = 2
    test_days: int = 1
    samples_per_day: int = 200_000
    rows_per_file: int = 100_000
    row_group_size: int = 20_000
    seed: int = 0
    # Create the synthetic data set when ``root`` is missing (tiny/small configs only;
    # the industrial config sets false so a wrong path is an error, not a surprise 100 GB).
    generate_if_missing: bool = True
    # Storage layout: "rows" (histories inline) or "joined" (behaviour log stored once).
    layout: str = "rows"
    # Joined layout only: user buckets (rank r reads buckets b with b % world_size == r,
    # so use a multiple of the world size; a reader holds one bucket's log in memory).
    num_user_buckets: int = 16

    def validate(self, where: str) -> None:
        _choice(where, "data.layout", self.layout, LAYOUTS)
        for name in ("train_days", "samples_per_day", "rows_per_file", "row_group_size", "num_user_buckets"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: data.{name} must be > 0, got {getattr(self, name)}")
        if self.test_days < 1:
            raise ConfigError(f"{where}: data.test_days must be >= 1, got {self.test_days}")


@dataclass
class DiffusionConfig:
    """Forward schedule and reverse sampler of the purifier (paper §3.3, §3.5, §4.1.3).

    ``betas = noise_scale * linspace(beta_start, beta_end, num_steps)``: the paper's
    "100 steps, linear, noise 0.005 -> 0.01". Raw betas keep ᾱ_100 ≈ 0.47, so the
    observation is purified rather than regenerated from pure noise.
    """

    num_steps: int = 100
    beta_start: float = 0.005
    beta_end: float = 0.01
    noise_scale: float = 1.0
    inference_steps: int = 20
    # Reverse process at inference: "posterior" = deterministic posterior-mean steps
    # K, K-1, .., 1; "ddim" = deterministic DDIM strided over the full num_steps.
    sampler: str = "posterior"
    # Inference starts from the noised observation at step ``inference_steps``. With
    # false it starts from its mean sqrt(ᾱ_K)·x0 (deterministic scores in eval);
    # with true it draws q(x_K | x0) noise.
    inference_start_noise: bool = False
    # What the ranking loss sees while training: "one_step" = x̂0 from one noise
    # prediction at a random t (cheap, DDRM-style); "full" = the inference sampler.
    train_x0: str = "one_step"
    loss_weight: float = 0.01
    time_embedding: str = "sinusoidal"  # sinusoidal | learned

    def validate(self, where: str) -> None:
        if self.num_steps <= 0:
            raise ConfigError(f"{where}: model.diffusion.num_steps must be > 0")
        if not 0 < self.inference_steps <= self.num_steps:
            raise ConfigError(
                f"{where}: model.diffusion.inference_steps must be in [1, num_steps={self.num_steps}], "
                f"got {self.inference_steps}"
            )
        if not 0 < self.beta_start <= self.beta_end or self.noise_scale * self.beta_end >= 1:
            raise ConfigError(
                f"{where}: model.diffusion needs 0 < beta_start <= beta_end and noise_scale*beta_end < 1"
            )
        _choice(where, "model.diffusion.sampler", self.sampler, ("posterior", "ddim"))
        _choice(where, "model.diffusion.train_x0", self.train_x0, ("one_step", "full"))
        _choice(where, "model.diffusion.time_embedding", self.time_embedding, ("sinusoidal", "learned"))
        if self.loss_weight < 0:
            raise ConfigError(f"{where}: model.diffusion.loss_weight must be >= 0")


MODEL_NAMES = (
    "cdp",
    "base",
    # Baselines of the paper's Table 1 (and DIN, DiffuMIN), cdp_rec/models/<name>.py.
    "din",
    "sim",
    "twin",
    "qin",
    "ddrm",
    "diffrec",
    "hstu",
    "diffumin",
    # CDP with ``model.ablation`` preset (Table 2); see cdp_rec.models.ABLATION_PRESETS.
    "cdp_no_condition",
    "cdp_no_collab",
    "cdp_no_context",
    "cdp_no_moe",
    "cdp_no_diffusion",
)
ABLATIONS = ("none", "no_condition", "no_collaborative", "no_context_scene", "no_moe", "no_diffusion")


@dataclass
class ModelConfig:
    """Model choice and sizes. ``ablation`` switches CDP's paper ablations (Table 2)."""

    name: str = "cdp"
    embedding_dim: int = 16
    condition_dim: int = 32
    condition_hidden: int = 64
    denoiser_hidden: list[int] = field(default_factory=lambda: [64, 64])
    time_embedding_dim: int = 16
    ranker_hidden: list[int] = field(default_factory=lambda: [128, 64])
    ablation: str = "none"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # Sequence baselines (din, sim, twin, qin, hstu, diffumin): how many behaviours are
    # looked up unpooled. DIN / HSTU / DiffuMIN attend over the last ``attention_len``;
    # SIM / TWIN / QIN retrieve ``top_k`` from the whole sequence (FuxiCTR's default 50).
    attention_len: int = 50
    top_k: int = 50
    num_heads: int = 2
    num_layers: int = 2  # HSTU blocks
    # DiffuMIN: interest channels and the InfoNCE term aligning generated with genuine interests.
    num_interests: int = 4
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1

    def validate(self, where: str) -> None:
        _choice(where, "model.name", self.name, MODEL_NAMES)
        _choice(where, "model.ablation", self.ablation, ABLATIONS)
        for name in ("embedding_dim", "condition_dim", "condition_hidden", "time_embedding_dim", "attention_len",
                     "top_k", "num_heads", "num_layers", "num_interests", "contrastive_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: model.{name} must be > 0")
        for name in ("denoiser_hidden", "ranker_hidden"):
            if not getattr(self, name) or any(h <= 0 for h in getattr(self, name)):
                raise ConfigError(f"{where}: model.{name} must be a non-empty list of positive ints")
        self.diffusion.validate(where)


@dataclass
class TrainConfig:
    """Optimisation and run bookkeeping (paper §4.1.3: Adam, dense 2.5e-4, sparse 5e-4)."""

    batch_size: int = 256
    # "global": batch_size is the global batch, split evenly across ranks (a 1-process
    # and an N-process run see the same batches). "per_rank": each rank reads
    # batch_size samples (the paper's "4096 per GPU").
    batch_size_scope: str = "global"
    eval_batch_size: int = 1024
    # Defaults are the tiny config's: 4x the paper's rates, because 400k training samples
    # must show learning that 18B samples show at 2.5e-4 / 5e-4 (configs/industrial.yaml).
    dense_lr: float = 1e-3
    sparse_lr: float = 5e-3
    # Passes over the training days; the paper trains once over its 60 days.
    epochs: int = 1
    seed: int = 0
    run_dir: str = "runs"
    run_name: str = ""  # empty: "<model>-<config hash>"
    progress: bool = True
    log_every: int = 50
    # Stop after this many steps (0: run every epoch and day). For smoke runs, and to
    # interrupt a run on purpose; a stopped run is resumable from its checkpoints.
    max_steps: int = 0

    def validate(self, where: str) -> None:
        _choice(where, "train.batch_size_scope", self.batch_size_scope, ("global", "per_rank"))
        for name in ("batch_size", "eval_batch_size", "epochs", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("dense_lr", "sparse_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}: train.{name} must be > 0, got {getattr(self, name)}")


SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel")
SPARSE_OPTIMIZERS = ("adam", "rowwise_adagrad", "adagrad", "sgd")


@dataclass
class ShardingConfig:
    """How DistributedModelParallel shards the tables and what updates them.

    World size comes from the launcher (torchrun / torchx), not from here; the planner's
    Topology is built from it plus the per-device memory below.
    """

    # "cpu" (gloo) or "cuda" (nccl). CPU is for development, tests and small runs.
    compute_device: str = "cpu"
    hbm_gb: float = 80.0  # per device
    ddr_gb: float = 128.0  # per device (host memory share)
    # table name -> sharding type; unlisted tables are the planner's choice.
    constraints: dict[str, str] = field(default_factory=dict)
    # Sparse optimizer (paper: Adam). fbgemm's fused Adam runs on GPU only.
    sparse_optimizer: str = "adam"
    # What replaces fused Adam for sharded tables on CPU — never silently: fbgemm's fused
    # Adam is GPU-only and TorchRec refuses the dense kernel for sharded tables.
    cpu_adam_fallback: str = "rowwise_adagrad"
    # TorchRec TrainPipelineSparseDist: input dist of batch i+1 overlaps compute of batch i.
    pipeline: bool = True
    # "replicated": every rank builds the full seeded tables and keeps its shards, so any
    # world size starts from identical weights (exact 1-vs-N comparisons; small tables).
    # "sharded": tables are built on the meta device and each shard is initialised in
    # place — the only option when a table does not fit one host (industrial).
    init: str = "replicated"

    def validate(self, where: str) -> None:
        _choice(where, "sharding.compute_device", self.compute_device, ("cpu", "cuda"))
        _choice(where, "sharding.init", self.init, ("replicated", "sharded"))
        _choice(where, "sharding.sparse_optimizer", self.sparse_optimizer, SPARSE_OPTIMIZERS)
        _choice(where, "sharding.cpu_adam_fallback", self.cpu_adam_fallback, ("rowwise_adagrad", "adagrad", "sgd"))
        for table, kind in self.constraints.items():
            _choice(where, f"sharding.constraints.{table}", kind, SHARDING_TYPES)
        if self.hbm_gb <= 0 or self.ddr_gb < 0:
            raise ConfigError(f"{where}: sharding.hbm_gb must be > 0 and sharding.ddr_gb >= 0")


@dataclass
class CheckpointConfig:
    """Sharded DCP checkpoints (see cdp_rec/training/checkpoint.py)."""

    every_steps: int = 0  # 0: only at day ends / the end
    at_day_end: bool = True
    keep_last: int = 2
    dir: str = ""  # empty: <run_dir>/<run_name>/checkpoints
    # "auto": continue from the newest committed checkpoint in ``dir`` (what a restarted
    # torchx job needs); "never": start fresh (existing checkpoints get overwritten).
    resume: str = "auto"

    def validate(self, where: str) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ConfigError(f"{where}: checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")
        _choice(where, "checkpoint.resume", self.resume, ("auto", "never"))


@dataclass
class JobConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self, where: str = "<config>") -> "JobConfig":
        self.features.validate(where)
        self.data.validate(where)
        self.model.validate(where)
        self.train.validate(where)
        self.sharding.validate(where)
        self.checkpoint.validate(where)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable short hash of every field; names runs and tags metrics.json."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def _choice(where: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {key} must be one of {list(allowed)}, got {value!r}")


# --------------------------------------------------------------------------- loading


def _check_type(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` or raise naming ``key`` and ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {type(value).__name__}")
        return [_check_type(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
        return {
            _check_type(k, k_tp, f"{key} (key)", where): _check_type(v, v_tp, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key} has the wrong type {type(value).__name__} (expected {tp})")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: {key} must be null")
        return None
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported field type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        full = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"{where}: unknown key {full} (known: {sorted(names)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(value, hints[name], key, where)
    # Nested dataclasses not given in ``data`` keep their defaults; given ones were
    # built from defaults + their keys, so a partial YAML section is fine.
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _REPLACED_MAPPINGS:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# Mappings that a YAML file replaces whole rather than merges into the defaults:
# a config that lists its context columns means exactly those columns.
_REPLACED_MAPPINGS = ("context_features", "scene_features", "constraints")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a job config from YAML (or the embedded default) and apply ``key=value`` overrides.

    Example::

        cfg = load_config("configs/tiny.yaml", ["model.name=base", "train.batch_size=512"])
    """
    data: dict[str, Any] = JobConfig().to_dict()
    where = "<embedded default>"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{where}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level must be a mapping of sections")
        _build(JobConfig, loaded, "", where)  # keys and types checked against the file's name
        data = _merge(data, loaded)
    for ov in overrides:
        data = _apply_override(data, ov)
    cfg = _build(JobConfig, data, "", where if not overrides else f"{where} (+ --set {' '.join(overrides)})")
    return cfg.validate(where)


def _apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    cursor: Any = data
    cls: Any = JobConfig
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            if part not in hints:
                raise ConfigError(f"--set {key}: unknown key {'.'.join(parts[: i + 1])}")
            tp = hints[part]
            if is_last:
                # Strings from the command line stay strings for str fields ("--set a=1e-3" on a
                # float is parsed by YAML, "--set train.run_name=007" keeps the leading zero).
                cursor[part] = raw if tp is str else _check_type(value, tp, key, "--set")
            else:
                cursor = cursor[part]
                cls = tp
        elif typing.get_origin(cls) is dict:
            if not is_last:
                raise ConfigError(f"--set {key}: cannot descend into {'.'.join(parts[: i + 1])}")
            cursor[part] = _check_type(value, typing.get_args(cls)[1], key, "--set")
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a section")
    return data


def config_from_dict(data: dict[str, Any], where: str = "<dict>") -> JobConfig:
    """Rebuild a JobConfig from ``JobConfig.to_dict()`` output (e.g. sent to spawned ranks)."""
    return _build(JobConfig, data, "", where).validate(where)


def save_config(cfg: JobConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
