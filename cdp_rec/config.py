"""Typed job configuration: dataclasses, YAML loading and ``--set`` overrides.

One dataclass per component (torchtitan style), composed into :class:`JobConfig`.
The dataclass defaults *are* the tiny CI configuration, so ``JobConfig()`` is the
embedded default that ``cdp-rec train`` runs with no ``--config``; ``configs/tiny.yaml``
spells the same values out and a test keeps the two equal.

Errors are :class:`ConfigError`, one line naming the offending key and where its value
came from (``<file>:<line>`` or ``--set key=value``), because a typo in a 60-day job config
should fail at start-up, not silently fall back to a default. Every numeric field is
range-checked at load (NaN / inf anywhere is an error), a key given twice in a YAML
mapping is an error, and ``sharding.constraints`` may only name tables the config has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Union

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


class Origins:
    """Where each config key's value came from, so an error names the right source.

    ``keys`` maps a dotted key (``train.lr``) to ``"<file>:<line>"`` for a YAML key or to
    ``"--set train.lr=..."`` for an override; a key that was not given anywhere (its
    default is used) or a sub-key of a given mapping falls back to its nearest given
    parent, then to ``default`` (the config file, or ``<embedded default>``).
    """

    def __init__(self, default: str) -> None:
        self.default = default
        self.keys: dict[str, str] = {}

    def set(self, key: str, origin: str) -> None:
        """Record ``key``'s origin; what was recorded under ``key`` (a replaced mapping) goes."""
        for k in [k for k in self.keys if k.startswith((f"{key}.", f"{key}["))]:
            del self.keys[k]
        self.keys[key] = origin

    def given(self, key: str) -> str | None:
        """The origin of ``key`` or of its nearest given parent; None if all are defaults."""
        key = key.removesuffix(" (key)")
        while key:
            if key in self.keys:
                return self.keys[key]
            if key.endswith("]") and "[" in key:
                key = key[: key.rindex("[")]
            elif "." in key:
                key = key.rsplit(".", 1)[0]
            else:
                return None
        return None

    def of(self, key: str) -> str:
        found = self.given(key)
        return self.default if found is None else found

    def __str__(self) -> str:
        return self.default


# Where a validation error points: a plain label ("convert", a file) or per-key Origins.
Where = Union[str, Origins]


def _at(where: Where, *keys: str) -> str:
    """The origin to report for a problem involving ``keys``: the first one that was
    given explicitly (a later ``--set`` beats the file), else the default."""
    if not isinstance(where, Origins):
        return where
    for found in ([where.keys.get(k) for k in keys], [where.given(k) for k in keys]):  # own key, then parents
        for origin in [g for g in found if g is not None and g.startswith("--set ")] + [g for g in found if g]:
            return origin
    return where.default


def _fail(where: Where, key: str | tuple[str, ...], message: str) -> NoReturn:
    """Raise ConfigError ``"<origin>: <key> <message>"`` (``key``: one key, or the keys of a
    cross-field rule, the first of which is named)."""
    keys = (key,) if isinstance(key, str) else key
    raise ConfigError(f"{_at(where, *keys)}: {keys[0]} {message}")


def _positive(where: Where, section: str, obj: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    """Every ``obj.<name>`` is ``>= minimum`` (ints) — ``> 0`` when ``minimum`` is 1."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            _fail(where, f"{section}.{name}", f"must be {'> 0' if minimum == 1 else f'>= {minimum}'}, got {value}")


def _positive_float(where: Where, key: str, value: float, allow_zero: bool = False) -> None:
    """A finite float ``> 0`` (``>= 0`` with ``allow_zero``)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        _fail(where, key, f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


ID_MAPPINGS = ("dense", "hash", "managed")
# Most torch intra-op threads a setting may ask for (train.threads, OMP_NUM_THREADS, predict
# --threads): far above any host's cores, below the counts where OpenMP start-up segfaults.
MAX_THREADS = 1024
EVICTION_POLICIES = ("distance_lfu", "lru", "lfu")


@dataclass
class ZchConfig:
    """Settings of every ``managed`` table (``features.id_mapping``): TorchRec's
    ``MCHManagedCollisionModule`` (zero-collision hashing) in front of the table.

    A managed table of ``N`` rows holds up to ``N - 1`` raw ids, one row each; its last row
    is shared by the ids it holds no row for (not admitted yet, or unseen in evaluation).
    Ids are admitted, and rows reclaimed, in *rounds*: every ``eviction_interval`` training
    steps the ids seen since the last round are counted; new ids take free rows, and when
    the table is full the lowest-scored ids (``eviction_policy``) give theirs up.
    ``ttl_steps`` > 0 also frees, each round, the rows of ids unseen for more than that
    many steps (``lru`` / ``distance_lfu`` only). See :mod:`embeddings.id_mapping`.
    """

    # distance_lfu: count / (steps since last seen + 1)**decay_exponent; lru: last seen;
    # lfu: count (TorchRec's DistanceLFU_ / LRU_ / LFU_EvictionPolicy).
    eviction_policy: str = "distance_lfu"
    # Steps between admission / eviction rounds. 1: an id gets its row in the step it first
    # appears (exact resume at any step); larger amortises the round (a sort of the table's
    # N ids) over more steps, new ids share the last row until the next round, and a resume
    # is exact only from a checkpoint whose step is a multiple of it.
    eviction_interval: int = 1
    # > 0: free the rows of ids unseen for more than this many training steps (0: never;
    # rows are then reclaimed only when the table is full and new ids arrive).
    ttl_steps: int = 0
    decay_exponent: float = 1.0

    def validate(self, where: Where) -> None:
        _choice(where, "features.zch.eviction_policy", self.eviction_policy, EVICTION_POLICIES)
        _positive(where, "features.zch", self, ("eviction_interval",))
        _positive(where, "features.zch", self, ("ttl_steps",), minimum=0)
        _positive_float(where, "features.zch.decay_exponent", self.decay_exponent)
        if self.ttl_steps and self.eviction_policy == "lfu":
            _fail(where, ("features.zch.ttl_steps", "features.zch.eviction_policy"),
                  "needs an eviction_policy that records when an id was last seen (lru or distance_lfu), got lfu")


@dataclass
class FeatureConfig:
    """Feature spec: vocabulary sizes and which columns are context / scene.

    With the default ``dense`` id mapping, ids must lie in ``[0, size)``; the loader rejects
    anything else. ``id_mapping`` makes a table take raw 64-bit ids instead (``hash`` /
    ``managed``, see :mod:`embeddings.id_mapping`); ``size`` is then its number of rows.
    Context and scene columns are declared here (column name -> vocabulary size), never
    hard-coded, so a new context column is a config change.
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
    # Table name (as ``sharding.constraints`` names them) -> how its ids become rows:
    # "dense" (ids are row numbers 0..size-1, range-checked; unlisted tables), "hash" (any
    # int64 id -> splitmix64(id) mod size: stateless, collisions possible) or "managed"
    # (any int64 id -> its own row while the table has room: ``zch``). The behaviour
    # sequence always maps like the target (a history item and the same target item share
    # one row). Not part of the data set: ``_dataset.json`` does not compare it.
    id_mapping: dict[str, str] = field(default_factory=dict)
    zch: ZchConfig = field(default_factory=ZchConfig)
    # hash tables: keep the smallest raw id seen per row (8 bytes + 1 per row) to count the
    # rows shared by two or more ids (the per-day "id mapping" report); false: no state.
    hash_collision_stats: bool = True

    def validate(self, where: Where) -> None:
        _positive(where, "features", self, ("num_users", "num_items", "num_queries", "num_categories", "max_seq_len"))
        for group in ("context_features", "scene_features"):
            if not getattr(self, group):
                _fail(where, f"features.{group}", "must be non-empty")
        clash = set(self.context_features) & set(self.scene_features)
        if clash:
            _fail(where, (f"features.scene_features.{sorted(clash)[0]}", "features.context_features"),
                  f"is also a context feature: columns {sorted(clash)} are both context and scene features")
        for group in ("context_features", "scene_features"):
            for col, size in getattr(self, group).items():
                if col in RESERVED_COLUMNS:
                    _fail(where, f"features.{group}.{col}", "clashes with a built-in column")
                if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                    _fail(where, f"features.{group}.{col}", f"must be a positive int, got {size!r}")
        known = embedding_table_names(self)
        for table, kind in self.id_mapping.items():
            if table not in known:
                _fail(where, f"features.id_mapping.{table}", f"names an unknown table {table!r} (known tables: {known})")
            _choice(where, f"features.id_mapping.{table}", kind, ID_MAPPINGS)
        sizes = {table: n for table, (_, n) in table_size_fields(self).items()}
        for table, kind in self.id_mapping.items():
            if kind == "managed" and sizes[table] < 2:
                _fail(where, f"features.id_mapping.{table}",
                      f"managed needs a table of >= 2 rows (one is the shared row of ids without one), "
                      f"got {sizes[table]}")
        self.zch.validate(where)


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
    # A day whose files hold 0 rows is an error naming the day directory (a silently
    # shrinking data set is worse than a crash); true turns it into a warning and the
    # day is skipped (e.g. an outage day in real logs).
    allow_empty_days: bool = False
    # Synthetic generator only: strength of a click term that depends on *which*
    # in-category behaviours match the impression's context and scene (README "Model zoo
    # and comparisons", cdp_rec/data/synthetic.py "Context signal"). 0 = no such term:
    # exactly the data of earlier versions, bit for bit.
    context_signal: float = 0.0
    # Synthetic generator only (cdp_rec/data/raw_ids.py): write user / query / item /
    # category ids as raw 62-bit ids (a fixed bijection of the dense ids), for tables with
    # features.id_mapping hash or managed; and relaunch this share of the item and query
    # slots under new ids every day (needs raw_ids). Both off: the data of earlier versions.
    raw_ids: bool = False
    id_churn: float = 0.0
    # Validation (README "How training picks its stopping point"): held out of training,
    # scored every epoch (and every train.eval_every steps) for early stopping, the
    # plateau schedule and the restored best weights. Either the last ``valid_days`` of
    # the ``train_days`` (whole days), or, with valid_days 0, ``valid_fraction`` of the
    # last training day, chosen by ``valid_split``: "tail" = the day's last batches in
    # reading order (the latest impressions of time-ordered logs such as the generator's);
    # "per_user" = each user's last rows that day, valid_fraction of its n in expectation
    # (floor(valid_fraction * n + u), u a fixed hash of the user in [0, 1); for
    # logs stored user by user, e.g. `cdp-rec import` output, whose tail would be whole
    # users). Each rank splits its own share of the day. Both 0: no validation, the run
    # trains every epoch and tests its last weights.
    valid_days: int = 0
    valid_fraction: float = 0.05
    valid_split: str = "tail"
    # Request-level deduplication (README "Request-level deduplication"): the reader keeps
    # one copy of the history that consecutive impressions of one request share (same
    # request_id and user, identical history, checked) plus an index from impressions to
    # it; CDP and base then look up and pool it once per request (CDP: once per request
    # and target category), other models get it expanded back. Same scores.
    dedup_requests: bool = False

    def validate(self, where: Where) -> None:
        _positive(where, "data", self, ("valid_days",), minimum=0)
        if self.valid_days and self.valid_days >= self.train_days:
            _fail(where, ("data.valid_days", "data.train_days"),
                  f"must be < data.train_days={self.train_days} (at least one day must train), got {self.valid_days}")
        if not (math.isfinite(self.valid_fraction) and 0 <= self.valid_fraction < 1):
            _fail(where, "data.valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")
        if self.valid_days and self.valid_fraction:
            _fail(where, ("data.valid_fraction", "data.valid_days"),
                  "and data.valid_days are two ways to hold out validation data; set one of them to 0")
        _choice(where, "data.valid_split", self.valid_split, ("tail", "per_user"))
        if not 0 <= self.id_churn < 1:
            _fail(where, "data.id_churn", f"must be in [0, 1), got {self.id_churn}")
        if self.id_churn and not self.raw_ids:
            _fail(where, ("data.id_churn", "data.raw_ids"),
                  "needs data.raw_ids=true (relaunched ids grow past the dense vocabulary)")
        _choice(where, "data.layout", self.layout, LAYOUTS)
        _positive_float(where, "data.context_signal", self.context_signal, allow_zero=True)
        if not self.root:
            _fail(where, "data.root", "must be a non-empty path")
        _positive(where, "data", self, ("train_days", "test_days", "samples_per_day", "rows_per_file",
                                        "row_group_size", "num_user_buckets"))
        _positive(where, "data", self, ("seed",), minimum=0)


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
    # Skip-step sampling: the denoiser runs at this many of the sampler's
    # ``inference_steps`` steps (evenly strided, first and last always kept); the posterior
    # sampler then steps with the respaced posterior between the kept steps. 0, or any
    # value >= ``inference_steps``: every step (the plain sampler, bit for bit). 4: AUC
    # within 1e-5, UAUC / GAUC within 1e-4 of all 20 on tiny and small, 5x fewer denoiser
    # calls (README "Skip-step sampler").
    sample_steps: int = 4
    # Inference starts from the noised observation at step ``inference_steps``. With
    # false it starts from its mean sqrt(ᾱ_K)·x0 (deterministic scores in eval);
    # with true it draws q(x_K | x0) noise.
    inference_start_noise: bool = False
    # What the ranking loss sees while training: "one_step" = x̂0 from one noise
    # prediction at a random t (cheap, DDRM-style); "full" = the inference sampler.
    train_x0: str = "one_step"
    loss_weight: float = 0.01
    time_embedding: str = "sinusoidal"  # sinusoidal | learned

    def validate(self, where: Where) -> None:
        d = "model.diffusion"
        _positive(where, d, self, ("num_steps",))
        if not 0 < self.inference_steps <= self.num_steps:
            _fail(where, (f"{d}.inference_steps", f"{d}.num_steps"),
                  f"must be in [1, num_steps={self.num_steps}], got {self.inference_steps}")
        for name in ("beta_start", "beta_end", "noise_scale"):
            _positive_float(where, f"{d}.{name}", getattr(self, name))
        if self.beta_start > self.beta_end:
            _fail(where, (f"{d}.beta_start", f"{d}.beta_end"),
                  f"must be <= beta_end, got {self.beta_start} > {self.beta_end}")
        if self.noise_scale * self.beta_end >= 1:
            _fail(where, (f"{d}.noise_scale", f"{d}.beta_end"),
                  f"* beta_end must be < 1 (betas are probabilities), got {self.noise_scale} * {self.beta_end}")
        _choice(where, f"{d}.sampler", self.sampler, ("posterior", "ddim"))
        # Not capped by inference_steps: a config that lowers inference_steps below the
        # default 4 just runs every step.
        _positive(where, d, self, ("sample_steps",), minimum=0)
        _choice(where, f"{d}.train_x0", self.train_x0, ("one_step", "full"))
        _choice(where, f"{d}.time_embedding", self.time_embedding, ("sinusoidal", "learned"))
        _positive_float(where, f"{d}.loss_weight", self.loss_weight, allow_zero=True)


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
    # Logistic regression on streaming, leak-free click-rate counts: the floor of compare.
    "lr_counts",
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
    # CDP: what the ranker sees of the behaviours. "both" = the category-filtered mean x0
    # and the purified interest (this code's default since the first version); "purified"
    # = the purified interest alone, the paper's eq. (1) / (10) wiring.
    cdp_ranker_input: str = "both"
    # lr_counts: smoothing strength a of the click rates (clicks + a * prior) / (impressions + a).
    counts_smoothing: float = 20.0

    def validate(self, where: Where) -> None:
        _choice(where, "model.name", self.name, MODEL_NAMES)
        _choice(where, "model.ablation", self.ablation, ABLATIONS)
        _choice(where, "model.cdp_ranker_input", self.cdp_ranker_input, ("both", "purified"))
        _positive_float(where, "model.counts_smoothing", self.counts_smoothing)
        _positive(where, "model", self, ("embedding_dim", "condition_dim", "condition_hidden", "time_embedding_dim",
                                         "attention_len", "top_k", "num_heads", "num_layers", "num_interests"))
        _positive_float(where, "model.contrastive_temperature", self.contrastive_temperature)
        _positive_float(where, "model.contrastive_weight", self.contrastive_weight, allow_zero=True)
        for name in ("denoiser_hidden", "ranker_hidden"):
            if not getattr(self, name) or any(h <= 0 for h in getattr(self, name)):
                _fail(where, f"model.{name}", f"must be a non-empty list of positive ints, got {getattr(self, name)}")
        self.diffusion.validate(where)


MONITORS = ("auc", "logloss", "uauc", "gauc")


@dataclass
class EarlyStopConfig:
    """Early stopping on the validation data (``data.valid_days`` / ``data.valid_fraction``).

    After every validation the monitored metric is compared with the best so far; a value
    better by more than ``min_delta`` is a new best (saved as ``<checkpoints>/best/``).
    ``patience`` validations in a row without one stop the run (``train.epochs`` is then an
    upper bound). With ``restore_best`` the test days are scored with the best weights.
    Without validation data nothing here applies.
    """

    enabled: bool = True
    monitor: str = "auc"  # auc | logloss | uauc | gauc
    mode: str = "auto"  # max | min | auto (min for logloss, max for the AUCs)
    patience: int = 1  # validations in a row without a new best (one per epoch by default)
    min_delta: float = 0.0
    restore_best: bool = True

    def validate(self, where: Where) -> None:
        e = "train.early_stop"
        _choice(where, f"{e}.monitor", self.monitor, MONITORS)
        _choice(where, f"{e}.mode", self.mode, ("auto", "max", "min"))
        _positive(where, e, self, ("patience",))
        _positive_float(where, f"{e}.min_delta", self.min_delta, allow_zero=True)

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.monitor == "logloss" else "max"


LR_SCHEDULES = ("constant", "cosine", "plateau")


@dataclass
class LRScheduleConfig:
    """Learning-rate multiplier applied to both ``dense_lr`` and ``sparse_lr`` every step.

    ``warmup_steps``: linear ramp ``(step + 1) / warmup_steps`` over the first steps; then
    ``constant`` (1), ``cosine`` (from 1 down to ``min_lr_ratio`` at the last scheduled step
    of ``train.epochs``) or ``plateau`` (times ``plateau_factor`` after ``plateau_patience``
    validations in a row without a new best of ``train.early_stop.monitor``, never below
    ``min_lr_ratio``; needs validation data). See :mod:`cdp_rec.training.lr_schedule`.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 1

    def validate(self, where: Where) -> None:
        s = "train.lr_schedule"
        _choice(where, f"{s}.kind", self.kind, LR_SCHEDULES)
        _positive(where, s, self, ("warmup_steps",), minimum=0)
        _positive(where, s, self, ("plateau_patience",))
        if not (math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            _fail(where, f"{s}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not (math.isfinite(self.plateau_factor) and 0 < self.plateau_factor < 1):
            _fail(where, f"{s}.plateau_factor", f"must be in (0, 1), got {self.plateau_factor}")


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
    # Passes over the training days: an upper bound when early stopping is on and there
    # is validation data (the default), so every model stops at its own best validation
    # point (tiny, measured: CDP, base, SIM, DIN, HSTU peak at epoch 2, QIN and DiffuMIN
    # at 3, TWIN, DDRM and DiffRec at 4; lr_counts still gains <1e-4 AUC an epoch at 10).
    # The paper trains once over its 60 days: streaming configs set 1 (industrial.yaml).
    epochs: int = 10
    seed: int = 0
    run_dir: str = "runs"
    run_name: str = ""  # empty: "<model>-<config hash>"
    progress: bool = True
    log_every: int = 50
    # Stop after this many steps (0: run every epoch and day). For smoke runs, and to
    # interrupt a run on purpose; a stopped run is resumable from its checkpoints.
    max_steps: int = 0
    # Validate every this many steps as well as at every epoch end (0: epoch ends only).
    eval_every: int = 0
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    # L2 on the embedding rows a step looks up: + embedding_l2 / 2 * sum of their squared
    # norms (each distinct row once per step) added to the loss; sharded tables (fused
    # optimizers) get it on their pooled lookups instead. 0: off.
    embedding_l2: float = 0.0
    # Decoupled (AdamW-style) weight decay of the dense weight matrices (not biases or
    # norms); 0: plain Adam.
    weight_decay: float = 0.0
    # Intra-op threads of each training process (torch.set_num_threads); 0: OMP_NUM_THREADS
    # if set, else this process's share of the cores other processes leave idle
    # (cdp_rec/training/threads.py). Logged at start-up and in metrics.json.
    threads: int = 0

    def validate(self, where: Where) -> None:
        _choice(where, "train.batch_size_scope", self.batch_size_scope, ("global", "per_rank"))
        _positive(where, "train", self, ("batch_size", "eval_batch_size", "epochs", "log_every"))
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) >= 1 << 31:  # rows are indexed by int32 in places (fbgemm offsets)
                _fail(where, f"train.{name}", f"must be < 2**31, got {getattr(self, name)}")
        if not self.run_dir:
            _fail(where, "train.run_dir", "must be a non-empty path (runs go to <run_dir>/<run_name>)")
        # Inside run_dir: "/home/me/proj" or "../x" put the run elsewhere, where it rewrites
        # whatever config.yaml / metrics.json that directory holds.
        parts = self.run_name.split("/")
        if self.run_name and (self.run_name.startswith("/") or "\0" in self.run_name
                              or any(part in (".", "..") for part in parts)):
            _fail(where, "train.run_name", f"must be a relative name inside train.run_dir (no leading '/', no '.' "
                  f"or '..' parts), got {self.run_name!r}; set train.run_dir to choose where runs go")
        _positive(where, "train", self, ("max_steps", "seed", "eval_every"), minimum=0)  # max_steps 0: no limit
        _positive(where, "train", self, ("threads",), minimum=0)  # 0: picked at start-up
        if self.threads > MAX_THREADS:  # 100000 OpenMP threads: a segfault at start-up, no message
            _fail(where, "train.threads", f"must be <= {MAX_THREADS}, got {self.threads}")
        self.early_stop.validate(where)
        self.lr_schedule.validate(where)
        _positive_float(where, "train.embedding_l2", self.embedding_l2, allow_zero=True)
        _positive_float(where, "train.weight_decay", self.weight_decay, allow_zero=True)
        # Finite and > 0; no upper bound here: a rate that makes training diverge is caught
        # by the trainer's divergence check, which sees what actually happens.
        for name in ("dense_lr", "sparse_lr"):
            _positive_float(where, f"train.{name}", getattr(self, name))


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

    def validate(self, where: Where) -> None:
        _choice(where, "sharding.compute_device", self.compute_device, ("cpu", "cuda"))
        _choice(where, "sharding.init", self.init, ("replicated", "sharded"))
        _choice(where, "sharding.sparse_optimizer", self.sparse_optimizer, SPARSE_OPTIMIZERS)
        _choice(where, "sharding.cpu_adam_fallback", self.cpu_adam_fallback, ("rowwise_adagrad", "adagrad", "sgd"))
        for table, kind in self.constraints.items():
            _choice(where, f"sharding.constraints.{table}", kind, SHARDING_TYPES)
        _positive_float(where, "sharding.hbm_gb", self.hbm_gb)
        _positive_float(where, "sharding.ddr_gb", self.ddr_gb, allow_zero=True)

    def check_tables(self, where: Where, features: FeatureConfig) -> None:
        """Every constrained table exists (names as :func:`embedding_table_names`)."""
        known = embedding_table_names(features)
        for table in self.constraints:
            if table not in known:
                _fail(where, f"sharding.constraints.{table}",
                      f"names an unknown table {table!r} (known tables: {known})")


def embedding_table_names(features: FeatureConfig) -> list[str]:
    """Names of the embedding tables a config has, as :func:`embeddings.tables.table_specs`
    names them (kept in sync by a test); a model may use a subset (``lr_counts`` embeds
    only the context / scene columns)."""
    return list(table_size_fields(features))


def table_size_fields(features: FeatureConfig) -> dict[str, tuple[str, int]]:
    """Table name (:func:`embedding_table_names` order) -> the config field that sizes it and
    its value: ``{"query": ("features.num_queries", 500), ..., "ctx_hour": ("features.context_features.hour", 24)}``."""
    f = features
    out = {"query": ("features.num_queries", f.num_queries), "user": ("features.num_users", f.num_users),
           "item": ("features.num_items", f.num_items), "category": ("features.num_categories", f.num_categories)}
    out.update({f"ctx_{c}": (f"features.context_features.{c}", n) for c, n in f.context_features.items()})
    out.update({f"scene_{c}": (f"features.scene_features.{c}", n) for c, n in f.scene_features.items()})
    return out


@dataclass
class CheckpointConfig:
    """Sharded DCP checkpoints (see cdp_rec/training/checkpoint.py)."""

    every_steps: int = 0  # 0: only at day ends / the end
    at_day_end: bool = True
    keep_last: int = 2
    dir: str = ""  # empty: <run_dir>/<run_name>/checkpoints
    # "auto": continue from the newest committed checkpoint in ``dir`` (what a restarted
    # torchx job needs); "never": start fresh; existing checkpoints are
    # moved aside to checkpoints.replaced-<UTC time>, never deleted or mixed in.
    resume: str = "auto"

    def validate(self, where: Where) -> None:
        _positive(where, "checkpoint", self, ("every_steps",), minimum=0)
        _positive(where, "checkpoint", self, ("keep_last",), minimum=1)
        _choice(where, "checkpoint.resume", self.resume, ("auto", "never"))


@dataclass
class JobConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self, where: Where = "<config>") -> "JobConfig":
        self.features.validate(where)
        self.data.validate(where)
        self.model.validate(where)
        self.train.validate(where)
        self.sharding.validate(where)
        self.sharding.check_tables(where, self.features)
        self.checkpoint.validate(where)
        if not self.has_validation():
            for key, on in (("train.eval_every", self.train.eval_every > 0),
                            ("train.lr_schedule.kind", self.train.lr_schedule.kind == "plateau")):
                if on:
                    _fail(where, (key, "data.valid_fraction", "data.valid_days"),
                          "needs validation data: set data.valid_days or data.valid_fraction > 0")
        return self

    def has_validation(self) -> bool:
        """Whether part of the training data is held out for validation."""
        return self.data.valid_days > 0 or self.data.valid_fraction > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable short hash of every field; names runs and tags metrics.json."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def _choice(where: Where, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(where, key, f"must be one of {list(allowed)}, got {value!r}")


# --------------------------------------------------------------------------- loading


def _check_type(value: Any, tp: Any, key: str, where: Where) -> Any:
    """Return ``value`` coerced to ``tp`` or raise naming ``key`` and ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(where, key)}: {key} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{_at(where, key)}: {key} must be a list, got {type(value).__name__}")
        return [_check_type(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(where, key)}: {key} must be a mapping, got {type(value).__name__}")
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
        raise ConfigError(f"{_at(where, key)}: {key} has the wrong type {type(value).__name__} (expected {tp})")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{_at(where, key)}: {key} must be null")
        return None
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_at(where, key)}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # .nan / .inf / 1e999: never a meaningful setting
            raise ConfigError(f"{_at(where, key)}: {key} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_at(where, key)}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_at(where, key)}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_at(where, key)}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{_at(where, key)}: {key}: unsupported field type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str, where: Where) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        full = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise ConfigError(f"{_at(where, *full)}: unknown key {', '.join(full)} (known: {sorted(names)})")
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
_REPLACED_MAPPINGS = ("context_features", "scene_features", "constraints", "id_mapping")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (same tags, same safety) that refuses duplicate mapping keys.

    Plain PyYAML keeps the last of two equal keys, so a config that sets ``train.lr``
    twice silently trains with the second value. Merge keys (``<<: *base``) may still be
    overridden by an explicit key, as YAML intends.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(
                            f"{key_node.start_mark.name}:{line}: duplicate key {key!r} (first given on line "
                            f"{seen[key]}); remove one"
                        )
                    seen[key] = line
                except TypeError:  # unhashable key: SafeLoader reports it below
                    continue
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from a (multi-line) PyYAML error: line:column and the problem."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    text = " ".join(str(problem).split())
    return f"line {mark.line + 1} column {mark.column + 1}: {text}" if mark is not None else text


# More keys than any config has (~150, plus user-listed context / scene columns): a file
# whose aliases expand beyond this is an alias bomb ("billion laughs"), not a config.
_MAX_YAML_KEYS = 100_000


def _key_lines(node: yaml.Node | None, prefix: str = "", _walk: dict[str, Any] | None = None) -> dict[str, int]:
    """Dotted key -> 1-based line of every scalar mapping key in a composed YAML tree.

    A key given twice in one mapping is a ConfigError naming the file, line and dotted key
    (:class:`_StrictLoader` refuses it too, but does not know the key's section). So is a
    mapping that contains itself through an alias (``a: &a {b: *a}``) and a tree whose
    aliases expand to more than ``_MAX_YAML_KEYS`` keys: an alias is walked once per use,
    so either would otherwise recurse without end or exhaust memory."""
    walk = _walk if _walk is not None else {"open": set(), "keys": 0}
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        if id(node) in walk["open"]:
            raise ConfigError(f"{node.start_mark.name}:{node.start_mark.line + 1}: {prefix or 'the document'} "
                              "is an alias of a mapping that contains it; a config must be a finite tree")
        walk["open"].add(id(node))
        seen: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                line = key_node.start_mark.line + 1
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise ConfigError(f"{key_node.start_mark.name}:{line}: duplicate key {key} "
                                      f"(first given on line {seen[ident]}); remove one")
                seen[ident] = line
                walk["keys"] += 1
                if walk["keys"] > _MAX_YAML_KEYS:
                    raise ConfigError(f"{key_node.start_mark.name}:{line}: more than {_MAX_YAML_KEYS} keys once "
                                      "YAML aliases are expanded (an alias bomb?); a config has a few hundred")
                out[key] = line
                out.update(_key_lines(value_node, key, walk))
        walk["open"].discard(id(node))
    return out


def read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """A YAML file's data (safe, duplicate keys refused) and the line of each dotted key.

    Every error is a one-line ConfigError naming the file (and line where known).
    """
    try:
        with open(path, encoding="utf-8") as f:
            loader = _StrictLoader(f)
            try:
                node = loader.get_single_node()
                lines = _key_lines(node)
                data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    return data, lines


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a job config from YAML (or the embedded default) and apply ``key=value`` overrides.

    Example::

        cfg = load_config("configs/tiny.yaml", ["model.name=base", "train.batch_size=512"])

    Errors are ConfigErrors naming the key and its origin: ``<file>:<line>`` for a key of
    the YAML file, ``--set key=value`` for an override (the last one given wins).
    """
    data: dict[str, Any] = JobConfig().to_dict()
    origins = Origins("<embedded default>")
    if path is not None:
        where = str(path)
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{where}: config path is a directory, not a YAML file")
        if not p.is_file():
            raise ConfigError(f"{where}: config file not found")
        loaded, lines = read_yaml(p)
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level must be a mapping of sections")
        origins = Origins(where)
        for key, line in lines.items():
            origins.keys[key] = f"{where}:{line}"
        _build(JobConfig, loaded, "", origins)  # keys and types checked against the file's lines
        data = _merge(data, loaded)
    for ov in overrides:
        data = _apply_override(data, ov, origins)
    cfg = _build(JobConfig, data, "", origins)
    return cfg.validate(origins)


def _apply_override(data: dict[str, Any], override: str, origins: Origins | None = None) -> dict[str, Any]:
    """Apply one ``key=value`` to ``data`` (in place) and record in ``origins`` that
    ``key`` now comes from ``--set key=value``."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    where = f"--set {key}={raw}"
    parts = key.split(".")
    if not all(parts):  # "=x", "train.=x", "train..seed=1": "unknown key " would name nothing
        raise ConfigError(f"{where}: the key {key!r} has an empty part; expected section.key=value, "
                          "e.g. train.seed=1")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse value {raw!r}: {_yaml_problem(e)}") from e
    cursor: Any = data
    cls: Any = JobConfig
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            if part not in hints:
                raise ConfigError(f"{where}: unknown key {'.'.join(parts[: i + 1])}")
            tp = hints[part]
            if is_last:
                # Strings from the command line stay strings for str fields ("--set a=1e-3" on a
                # float is parsed by YAML, "--set train.run_name=007" keeps the leading zero).
                cursor[part] = raw if tp is str else _check_type(value, tp, key, where)
            else:
                cursor = cursor[part]
                cls = tp
        elif typing.get_origin(cls) is dict:
            if not is_last:
                raise ConfigError(f"{where}: cannot descend into {'.'.join(parts[: i + 1])}")
            cursor[part] = _check_type(value, typing.get_args(cls)[1], key, where)
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is not a section")
    if origins is not None:
        origins.set(key, where)
    return data


def config_from_dict(data: dict[str, Any], where: str = "<dict>") -> JobConfig:
    """Rebuild a JobConfig from ``JobConfig.to_dict()`` output (e.g. sent to spawned ranks)."""
    return _build(JobConfig, data, "", where).validate(where)


def save_config(cfg: JobConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
