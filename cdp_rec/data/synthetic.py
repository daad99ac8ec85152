"""Deterministic synthetic search logs with the structure CDP is meant to exploit.

The generator writes ``<out>/day=NN/part-NNNNN.parquet`` files with exactly
:func:`cdp_rec.data.schema.table_schema` and a ``<out>/_dataset.json`` describing the
feature spec, data config and seed (see :func:`dataset_spec`). With ``data.layout:
joined`` it writes the same impressions and the behaviour log they were drawn from in
the layout of :mod:`cdp_rec.data.joined` instead (:func:`generate_periods` yields both).
Everything is vectorised numpy; the only Python loops run over days, files, columns and
fixed-size chunks.

Generative story
================
All randomness comes from ``numpy.random.Generator(PCG64(SeedSequence(seed, spawn_key=...)))``
with one independent stream per purpose: the *world* (items, queries, users), the
*behaviour log* of each period (pre-history, day 0, day 1, ...) and the *impressions*
of each day. Day ``d`` therefore only depends on the world and the log streams up to
``d``, so generating ``days=[2]`` alone yields byte-identical day-2 files.

Items
    Each item has a category (category sizes are Zipf-skewed; every category gets at
    least one item when there are enough items), a Zipf popularity (exponent ~1.05 over a
    random rank) and a latent vector ``z_i ~ N(0, I/d)`` with ``d = 8``.

Queries
    Each query is *about* one category (drawn by category size) and has a latent ``q``
    and a Zipf popularity among the queries of its category.

Users
    * activity ``a_u`` (log-normal, mean 1): how often the user searches and behaves;
      5% are *new* users (no pre-history, behaving at 0.3x the rate during the days) and
      2.5% are *silent* (they search but leave no behaviours), so a few % of impressions
      (~4% on day 0, ~2.5% later) have empty histories;
    * a sparse interest distribution over categories: 1-3 main categories with
      Dirichlet weights, plus a small floor mass ``EPS_FLOOR`` spread by category size;
    * per main category ``k`` and *mode* ``m in {0, 1}`` a taste vector
      ``p[u, k, m] = 0.45 * b[u, k] + mask_m * e[u, k, m]``: a shared part plus a part that
      lives only in the first (``m = 0``) or second (``m = 1``) half of the latent
      dimensions, so the same user likes different items of a category in different
      modes; outside the main categories a weaker general taste ``g[u, m]`` applies;
    * a preferred value of every scene column (used 80% of the time).

Context / scene and the mode
    Requests are timestamped with a diurnal hour profile. A context column named
    ``hour`` is the hour of day (bucketed to its vocabulary if that is not 24); every
    other context column is treated as *depth-like* (page, slot, ...): value ``v`` is
    drawn with probability ``∝ 0.55**v`` and lowers the click logit by ``0.2 * min(v, 5)``.
    Scene columns are Zipf-skewed, 80% the user's preferred value.
    The taste mode is ``mode = is_night(hour of ts) XOR (first scene column is odd)``
    (night = 19:00-06:59): a function of context and scene, derived from ``ts`` even when
    no ``hour`` column is configured.

Requests and exposure
    A request picks a user ``∝ a_u``, a query (85%: about a category drawn from the user's
    interests, else any query by popularity), a timestamp, context and scene, and returns
    ``K ~ U{4..12}`` impressions (``request_id = day * samples_per_day + r``, unique
    across days). Each impression's item is from the query's category with
    probability 0.7, else from a category drawn by size (exposure), by popularity within
    the category.

Clicks
    ``logit = -3.1 + 1.6 <p_{u,c(i),mode}, z_i> + 0.6 <q, z_i> + 0.8 [c(i) = c(q)]
    + 0.5 [c(i) in main(u)] + 0.15 popz_i + depth bias + N(0, 0.5²)`` and
    ``label ~ Bernoulli(sigmoid(logit))``; ``popz`` is the standardised log popularity.
    Measured on the tiny default config: CTR ~19%; AUC of the noise-free logit ~0.80,
    of the taste term alone ~0.76 in the right mode but ~0.58 in the wrong one, of
    popularity alone ~0.57; a logistic regression on popularity + query/category match +
    page reaches ~0.65, adding category-gated mean-pooled history latents ~0.70, and
    projecting that pool on the context's mode ~0.71 (what purification can add).

Behaviour sequences (contaminated observations)
    Every user has a behaviour log: pre-history uniform over the ``PRE_HISTORY_DAYS``
    days before day 0 (``Poisson(0.5 * max_seq_len * a_u)`` behaviours) and
    ``Poisson(0.1 * max_seq_len * a_u)`` behaviours per day with the diurnal profile.
    Each behaviour is

    * genuine with probability 0.5: category from the user's interest distribution, item
      ``∝ exp(4 <p_{u,c,mode}, z_i>)`` in the behaviour's own mode (Gumbel-max over 16
      candidates drawn uniformly from the category, an approximation that keeps it cheap);
    * exposure bias (0.2): an item by global popularity;
    * category drift (0.15): a uniformly random category, item by popularity;
    * misclick (0.15): a uniformly random item.

    The history of an impression at ``ts`` is the user's last ``max_seq_len`` behaviours
    with behaviour ts strictly before ``ts``, oldest first (most recent last); behaviours
    sharing a (user, ts) keep their log order (the order they were drawn in after the
    sort by (user, ts)). It is built with ``searchsorted`` over a (user, ts)-sorted log,
    which is truncated to the last ``max_seq_len`` behaviours per user after each day so
    memory stays bounded: every behaviour dropped is older than ``max_seq_len`` kept ones
    that precede any later impression, so no history changes (the joined layout stores
    the untruncated log and its reader gives the same histories).

Context signal (``data.context_signal``, default 0: no such term, the data above bit for bit)
    A click term that makes *which* in-category behaviours matter depend on the
    impression's context and scene, so that a context-conditioned purifier *could* do
    better than any context-blind summary of the history. The schema logs no
    per-behaviour context, so a behaviour's logged context is derived deterministically
    from its item id: ``slot(i) = fibonacci_hash(i) mod 4`` (:func:`behaviour_context_slot`;
    read it as "the context an item is typically consumed in"; no random draw, so every
    other draw is unchanged). An impression's slot is
    ``2 * is_night(hour of ts) + (first scene value mod 2)`` (:func:`impression_context_slot`,
    a function of context and scene, as the taste mode). With strength ``s`` the click
    logit gains ``s * sqrt(d) * <z_i, mean of z_b over the history behaviours b with
    c(b) = c(i) and slot(b) = slot of the impression>`` (:func:`context_term`; 0 when
    none match). It takes no random draws, so every draw, and with ``s = 0`` every row,
    is unchanged. ``sqrt(d) <z, z'>`` is ~N(0, 1) for one behaviour. A model can only
    use it by learning each item's slot (its embedding) and selecting or weighting the
    in-category behaviours by the impression's context and scene; the plain
    category-filtered mean carries a diluted share (about a quarter of the in-category
    behaviours are in the impression's slot). Measured on the tiny config (day 2, 50k
    impressions) with ``s = 1``: CTR ~21.6% (19.5% at 0); with the true latents, a
    logistic regression on the right-mode taste term plus the context-blind
    ``<z_i, mean of all in-category z_b>`` reaches AUC ~0.776, adding the slot-matched
    term ~0.801 (+0.025: what context-aware selection of behaviours can add at best);
    at ``s = 0`` the slot-matched term adds nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, table_schema
from cdp_rec.data import raw_ids
from cdp_rec.data.spec import DATASET_SPEC_FILE, dataset_features, generation_marker
from cdp_rec.data.writer import Behaviours, write_parquet, write_rows_day  # noqa: F401 (re-exported)

# Bump when the generative story changes, so stale data sets are detected by _dataset.json.
GENERATOR_VERSION = 1

SECONDS_PER_DAY = 86_400
LATENT_DIM = 8
PRE_HISTORY_DAYS = 14
# Keys pack (user, ts) into one int64: user << 32 | (ts + _TS_OFFSET).
_TS_OFFSET = PRE_HISTORY_DAYS * SECONDS_PER_DAY
_TS_BITS = 32

NUM_SLOTS = 3  # maximum number of main categories per user
EPS_FLOOR = 0.05  # interest mass outside the main categories
NEW_USER_FRAC = 0.05
SILENT_USER_FRAC = 0.025  # users who search but never leave behaviours
PRE_RATE = 0.5  # pre-history behaviours per user, in units of max_seq_len * activity
DAY_RATE = 0.1  # behaviours per user per day, same units
SCENE_STICKINESS = 0.8
QUERY_FROM_INTEREST = 0.85
ITEM_FROM_QUERY_CATEGORY = 0.7
# Behaviour type probabilities: genuine, exposure, drift, misclick.
BEHAVIOUR_MIX = (0.5, 0.2, 0.15, 0.15)
SIR_CANDIDATES = 16
SIR_TEMPERATURE = 4.0

# Click model coefficients (see module docstring).
CLICK_BIAS = -3.1
CLICK_TASTE = 1.6
CLICK_QUERY = 0.6
CLICK_MATCH = 0.8
CLICK_INTEREST = 0.5
CLICK_POP = 0.15
CLICK_DEPTH = 0.2
CLICK_NOISE = 0.5

# Context signal: number of context slots (see the module docstring).
NUM_CONTEXT_SLOTS = 4
_FIB_HASH = np.uint64(0x9E3779B97F4A7C15)

# Relative search/behaviour traffic per hour of day: quiet at night, peak in the evening.
HOUR_PROFILE = np.array(
    [0.6, 0.4, 0.25, 0.2, 0.2, 0.3, 0.5, 0.8, 1.0, 1.1, 1.2, 1.2,
     1.3, 1.2, 1.1, 1.1, 1.2, 1.3, 1.4, 1.6, 1.7, 1.6, 1.3, 0.9]
)
_CHUNK = 1 << 18  # rows per chunk for the [n, candidates, d] affinity computation

# Stream tags for SeedSequence spawn keys.
_WORLD, _LOG, _IMPRESSIONS = 0, 1, 2
_PRE_PERIOD = 0  # log period 0 is the pre-history; day d is period d + 1


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


# --------------------------------------------------------------------------- world


@dataclass
class World:
    """Latent ground truth shared by all days. Arrays are indexed by id.

    Shapes: ``U`` users, ``I`` items, ``Q`` queries, ``C`` categories, ``d`` latent dim,
    ``S = NUM_SLOTS``.
    """

    item_category: np.ndarray  # [I] int64
    item_latent: np.ndarray  # [I, d] float32
    item_popz: np.ndarray  # [I] float64 standardised log popularity
    item_pop_cdf: np.ndarray  # [I] float64 cumulative popularity (global sampling)
    items_by_cat: np.ndarray  # [I] int64 item ids sorted by category
    item_cat_offsets: np.ndarray  # [C + 1] int64 ranges into items_by_cat
    item_cat_cum: np.ndarray  # [I] float64 cumulative popularity in items_by_cat order
    category_weight: np.ndarray  # [C] float64, 0 for categories without items
    category_cdf: np.ndarray  # [C] float64
    query_category: np.ndarray  # [Q] int64
    query_latent: np.ndarray  # [Q, d] float32
    query_pop_cdf: np.ndarray  # [Q] float64
    queries_by_cat: np.ndarray  # [Q] int64
    query_cat_offsets: np.ndarray  # [C + 1] int64
    query_cat_cum: np.ndarray  # [Q] float64
    user_activity: np.ndarray  # [U] float64, mean 1
    user_activity_cdf: np.ndarray  # [U] float64
    user_new: np.ndarray  # [U] bool, no pre-history
    user_silent: np.ndarray  # [U] bool, no behaviours at all
    user_main: np.ndarray  # [U, S] int64 main categories
    user_slot_cdf: np.ndarray  # [U, S] float64 cumulative interest over slots (ends at 1 - EPS_FLOOR)
    user_taste: np.ndarray  # [U, S, 2, d] float32 per (slot, mode)
    user_general_taste: np.ndarray  # [U, 2, d] float32 outside main categories
    user_scene_pref: np.ndarray  # [U, n_scene] int64
    scene_cdfs: list[np.ndarray]  # per scene column [vocab]
    depth_cdfs: dict[str, np.ndarray]  # per non-hour context column [vocab]

    def taste(self, users: np.ndarray, categories: np.ndarray, modes: np.ndarray) -> np.ndarray:
        """``p_{u,c,mode}`` for aligned ``[n]`` arrays -> ``[n, d]`` float32."""
        match = self.user_main[users] == categories[:, None]  # [n, S]
        has = match.any(axis=1)
        slot = match.argmax(axis=1)
        main = self.user_taste[users, slot, modes]
        general = self.user_general_taste[users, modes]
        return np.where(has[:, None], main, general)

    def in_main(self, users: np.ndarray, categories: np.ndarray) -> np.ndarray:
        """``[n]`` bool: is ``categories[k]`` one of ``users[k]``'s main categories."""
        return (self.user_main[users] == categories[:, None]).any(axis=1)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """``[n]`` weights ``∝ rank^-exponent`` over a random rank permutation, sum 1."""
    w = (np.arange(1, n + 1, dtype=np.float64)) ** -exponent
    w = w[rng.permutation(n)]
    return w / w.sum()


def _assign_groups(n: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a group for ``n`` members by ``weights``, covering every group if ``n`` allows."""
    k = len(weights)
    groups = rng.choice(k, size=n, p=weights)
    cover = min(n, int((weights > 0).sum()))
    # The first ``cover`` members of a random order each get one distinct non-empty group.
    members = rng.permutation(n)[:cover]
    groups[members] = rng.permutation(np.flatnonzero(weights > 0))[:cover]
    return groups.astype(np.int64)


def _grouped_cdf(
    group: np.ndarray, weight: np.ndarray, num_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Members sorted by group, ``[G + 1]`` offsets and cumulative weight in that order."""
    order = np.argsort(group, kind="stable")
    offsets = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(group, minlength=num_groups), out=offsets[1:])
    return order.astype(np.int64), offsets, np.cumsum(weight[order])


def _sample_in_groups(
    groups: np.ndarray,
    members: np.ndarray,
    offsets: np.ndarray,
    cum: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw one member ``∝`` weight for each ``[n]`` group id; all groups must be non-empty."""
    lo_idx, hi_idx = offsets[groups], offsets[groups + 1]
    lo = np.where(lo_idx > 0, cum[np.maximum(lo_idx - 1, 0)], 0.0)
    hi = cum[hi_idx - 1]
    x = lo + rng.random(len(groups)) * (hi - lo)
    pos = np.searchsorted(cum, x, side="right")
    # Float round-off at range edges must not leak into a neighbouring group.
    pos = np.clip(pos, lo_idx, hi_idx - 1)
    return members[pos]


def _sample_cdf(cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n]`` int64 draws from a cumulative (unnormalised) weight vector."""
    x = rng.random(n) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, x, side="right"), len(cdf) - 1).astype(np.int64)


def build_world(cfg: JobConfig) -> World:
    """Draw the latent world (items, queries, users) from ``cfg.data.seed``."""
    f = cfg.features
    rng = _rng(cfg.data.seed, _WORLD)
    U, I, Q, C, d = f.num_users, f.num_items, f.num_queries, f.num_categories, LATENT_DIM

    # Items.
    cat_size = _zipf_weights(C, 0.8, rng)
    item_category = _assign_groups(I, cat_size, rng)
    item_pop = _zipf_weights(I, 1.05, rng)
    logp = np.log(item_pop)
    item_popz = (logp - logp.mean()) / (logp.std() + 1e-12)
    item_latent = (rng.standard_normal((I, d)) / math.sqrt(d)).astype(np.float32)
    items_by_cat, item_cat_offsets, item_cat_cum = _grouped_cdf(item_category, item_pop, C)
    # Categories without items can never be drawn (only possible when I < C).
    category_weight = np.bincount(item_category, minlength=C).astype(np.float64)
    category_weight = np.where(category_weight > 0, cat_size, 0.0)
    category_weight /= category_weight.sum()

    # Queries.
    query_category = _assign_groups(Q, category_weight, rng)
    query_latent = (0.7 * rng.standard_normal((Q, d))).astype(np.float32)
    query_pop = _zipf_weights(Q, 0.9, rng)
    queries_by_cat, query_cat_offsets, query_cat_cum = _grouped_cdf(query_category, query_pop, C)

    # Users.
    activity = rng.lognormal(0.0, 0.8, size=U)
    activity /= activity.mean()
    user_new = rng.random(U) < NEW_USER_FRAC
    user_silent = rng.random(U) < SILENT_USER_FRAC
    n_main = rng.choice(np.arange(1, NUM_SLOTS + 1), size=U, p=[0.3, 0.4, 0.3])
    user_main = rng.choice(C, size=(U, NUM_SLOTS), p=category_weight).astype(np.int64)
    slot_w = rng.gamma(1.0, size=(U, NUM_SLOTS))
    slot_w[np.arange(NUM_SLOTS)[None, :] >= n_main[:, None]] = 0.0
    slot_w /= slot_w.sum(axis=1, keepdims=True)
    user_slot_cdf = np.cumsum(slot_w * (1.0 - EPS_FLOOR), axis=1)
    half = np.zeros((2, d), dtype=np.float32)
    half[0, : d // 2] = 1.0
    half[1, d // 2 :] = 1.0
    shared = rng.standard_normal((U, NUM_SLOTS, 1, d))
    specific = rng.standard_normal((U, NUM_SLOTS, 2, d)) * half
    user_taste = (0.45 * shared + specific).astype(np.float32)
    general_shared = rng.standard_normal((U, 1, d))
    general_specific = rng.standard_normal((U, 2, d)) * half
    user_general_taste = (0.5 * (0.45 * general_shared + general_specific)).astype(np.float32)

    scene_cdfs = [np.cumsum(_rank_weights(v, 1.2)) for v in f.scene_features.values()]
    user_scene_pref = np.stack([_sample_cdf(cdf, U, rng) for cdf in scene_cdfs], axis=1)
    depth_cdfs = {
        col: np.cumsum(0.55 ** np.arange(v, dtype=np.float64))
        for col, v in f.context_features.items()
        if col != "hour"
    }
    return World(
        item_category=item_category,
        item_latent=item_latent,
        item_popz=item_popz,
        item_pop_cdf=np.cumsum(item_pop),
        items_by_cat=items_by_cat,
        item_cat_offsets=item_cat_offsets,
        item_cat_cum=item_cat_cum,
        category_weight=category_weight,
        category_cdf=np.cumsum(category_weight),
        query_category=query_category,
        query_latent=query_latent,
        query_pop_cdf=np.cumsum(query_pop),
        queries_by_cat=queries_by_cat,
        query_cat_offsets=query_cat_offsets,
        query_cat_cum=query_cat_cum,
        user_activity=activity,
        user_activity_cdf=np.cumsum(activity),
        user_new=user_new,
        user_silent=user_silent,
        user_main=user_main,
        user_slot_cdf=user_slot_cdf,
        user_taste=user_taste,
        user_general_taste=user_general_taste,
        user_scene_pref=user_scene_pref,
        scene_cdfs=scene_cdfs,
        depth_cdfs=depth_cdfs,
    )


def _rank_weights(n: int, exponent: float) -> np.ndarray:
    """``[n]`` weights ``∝ (v + 1)^-exponent``: value 0 most frequent."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


# --------------------------------------------------------------------------- shared draws


def context_mode(ts: np.ndarray, scene0: np.ndarray) -> np.ndarray:
    """Taste mode ``[n]`` int64 in {0, 1}: night (19:00-06:59) XOR odd first scene value."""
    hour = (ts % SECONDS_PER_DAY) // 3600
    night = (hour >= 19) | (hour < 7)
    return (night ^ (scene0 % 2 == 1)).astype(np.int64)


def impression_context_slot(ts: np.ndarray, scene0: np.ndarray) -> np.ndarray:
    """Context slot ``[n]`` int64 in ``[0, 4)`` of impressions: 2 * night (19:00-06:59) + odd first scene value."""
    hour = (ts % SECONDS_PER_DAY) // 3600
    night = (hour >= 19) | (hour < 7)
    return 2 * night.astype(np.int64) + (scene0 % 2)


def behaviour_context_slot(items: np.ndarray) -> np.ndarray:
    """The logged context slot ``[n]`` int64 in ``[0, 4)`` of behaviours on ``items``: a
    Fibonacci hash of the item id (top two bits of ``id * 0x9E3779B97F4A7C15 mod 2**64``)."""
    h = np.asarray(items).astype(np.uint64) * _FIB_HASH  # wraps mod 2**64
    return (h >> np.uint64(62)).astype(np.int64)


def context_term(
    world: World,
    item: np.ndarray,
    cat: np.ndarray,
    slot: np.ndarray,
    offsets: np.ndarray,
    hist_items: np.ndarray,
    match_slot: bool = True,
) -> np.ndarray:
    """``[n]`` ``sqrt(d) <z_item, mean z_b>`` over the history behaviours b of the item's
    category (and, with ``match_slot``, of the impression's context slot); 0 if none.

    ``match_slot=False`` is the context-blind version (every in-category behaviour),
    used to measure how much the slot selection is worth."""
    n = len(item)
    seg = np.repeat(np.arange(n), np.diff(offsets))
    keep = world.item_category[hist_items] == cat[seg]
    if match_slot:
        keep &= behaviour_context_slot(hist_items) == slot[seg]
    seg, hist = seg[keep], hist_items[keep]
    dots = np.einsum("nd,nd->n", world.item_latent[item][seg], world.item_latent[hist]).astype(np.float64)
    total = np.bincount(seg, weights=dots, minlength=n)
    count = np.bincount(seg, minlength=n)
    return math.sqrt(LATENT_DIM) * total / np.maximum(count, 1)


def _day_times(day: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n]`` int64 timestamps within ``day`` following the diurnal profile."""
    hour = rng.choice(24, size=n, p=HOUR_PROFILE / HOUR_PROFILE.sum())
    return day * SECONDS_PER_DAY + hour * 3600 + rng.integers(0, 3600, size=n)


def _scene_draws(world: World, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[n, n_scene]`` int64 scene values: the user's preferred value or a skewed draw."""
    n, k = len(users), world.user_scene_pref.shape[1]
    out = world.user_scene_pref[users].copy()
    for j in range(k):
        other = rng.random(n) >= SCENE_STICKINESS
        out[other, j] = _sample_cdf(world.scene_cdfs[j], int(other.sum()), rng)
    return out


def _interest_categories(
    world: World, users: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``[n]`` int64 categories from each user's interest distribution."""
    u = rng.random(len(users))
    cdf = world.user_slot_cdf[users]  # [n, S]
    slot = (u[:, None] >= cdf).sum(axis=1)  # S means "floor mass"
    floor = slot >= NUM_SLOTS
    cats = world.user_main[users, np.minimum(slot, NUM_SLOTS - 1)]
    cats[floor] = _sample_cdf(world.category_cdf, int(floor.sum()), rng)
    return cats


def _items_in(world: World, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[n]`` items, each by popularity within its category ``cats[k]``."""
    return _sample_in_groups(cats, world.items_by_cat, world.item_cat_offsets, world.item_cat_cum, rng)


# --------------------------------------------------------------------------- behaviour log


@dataclass
class _Log:
    """A (user, ts)-sorted behaviour log: ``keys`` [n] int64 = user << 32 | ts + offset."""

    keys: np.ndarray
    items: np.ndarray

    @staticmethod
    def key(users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return (users.astype(np.int64) << _TS_BITS) | (ts + _TS_OFFSET)


def _behaviour_rate(cfg: JobConfig, world: World, period: int) -> np.ndarray:
    """``[U]`` expected behaviours of each user in a period (0 = pre-history, ``d + 1`` = day ``d``)."""
    f = cfg.features
    if period == _PRE_PERIOD:
        rate = PRE_RATE * f.max_seq_len * world.user_activity * ~world.user_new
    else:
        # New users are only starting to behave, so some still have empty histories.
        rate = DAY_RATE * f.max_seq_len * world.user_activity * np.where(world.user_new, 0.3, 1.0)
    return rate * ~world.user_silent


def mean_history_lengths(cfg: JobConfig, days: Iterable[int]) -> np.ndarray:
    """``[len(days)]`` expected mean history length of an impression on each day.

    From the behaviour rates alone (no items drawn, so cheap at any number of days):
    requests pick users ``∝`` activity, and an impression half-way through day ``d``
    sees ``min(L, pre-history + d + 0.5 days of behaviours)``, drawn as Poisson counts.
    """
    world = build_world(cfg)
    rng = _rng(cfg.data.seed, _LOG, 1 << 20)  # a stream of its own: the data's draws are untouched
    pre, daily = _behaviour_rate(cfg, world, _PRE_PERIOD), _behaviour_rate(cfg, world, 1)
    weight = world.user_activity / world.user_activity.sum()
    L = cfg.features.max_seq_len
    return np.array([float(weight @ np.minimum(rng.poisson(pre + daily * (d + 0.5)), L)) for d in days])


def _period_log(cfg: JobConfig, world: World, period: int) -> _Log:
    """Behaviours of one period (0 = pre-history, ``d + 1`` = day ``d``), sorted by key."""
    f = cfg.features
    rng = _rng(cfg.data.seed, _LOG, period)
    counts = rng.poisson(_behaviour_rate(cfg, world, period))
    users = np.repeat(np.arange(f.num_users, dtype=np.int64), counts)
    n = len(users)
    if period == _PRE_PERIOD:
        ts = rng.integers(-PRE_HISTORY_DAYS * SECONDS_PER_DAY, 0, size=n)
    else:
        ts = _day_times(period - 1, n, rng)
    keys = np.sort(_Log.key(users, ts))
    users = keys >> _TS_BITS
    ts = (keys & ((1 << _TS_BITS) - 1)) - _TS_OFFSET

    scene0 = _scene_draws(world, users, rng)[:, 0]
    modes = context_mode(ts, scene0)
    kind = np.searchsorted(np.cumsum(BEHAVIOUR_MIX), rng.random(n), side="right")
    items = np.empty(n, dtype=np.int64)

    genuine = np.flatnonzero(kind == 0)
    cats = _interest_categories(world, users[genuine], rng)
    # Latents in category order: candidates of one category are then close in memory.
    latent_by_cat = world.item_latent[world.items_by_cat]
    for s in range(0, len(genuine), _CHUNK):
        # Chunks bound the [c, M, d] temporaries; the draws depend only on the fixed
        # chunk size, so results stay deterministic.
        idx, cat = genuine[s : s + _CHUNK], cats[s : s + _CHUNK]
        c = len(idx)
        # Candidates uniform within the category, then a Gumbel-max pick: item ∝ exp(τ·aff)
        # among them. Uniform draws are O(1), unlike popularity draws (a binary search each).
        lo = world.item_cat_offsets[cat]
        size = world.item_cat_offsets[cat + 1] - lo
        pos = lo[:, None] + (rng.random((c, SIR_CANDIDATES)) * size[:, None]).astype(np.int64)
        taste = world.taste(users[idx], cat, modes[idx])  # [c, d]
        z = np.take(latent_by_cat, pos, axis=0)  # [c, M, d]; take is much faster than []
        aff = np.einsum("nd,nmd->nm", taste, z)  # [c, M]
        u = np.maximum(rng.random(aff.shape, dtype=np.float32), np.finfo(np.float32).tiny)
        pick = np.argmax(SIR_TEMPERATURE * aff - np.log(-np.log(u)), axis=1)
        items[idx] = world.items_by_cat[pos[np.arange(c), pick]]

    exposure = np.flatnonzero(kind == 1)
    items[exposure] = _sample_cdf(world.item_pop_cdf, len(exposure), rng)
    drift = np.flatnonzero(kind == 2)
    nonempty = np.flatnonzero(world.category_weight > 0)
    items[drift] = _items_in(world, rng.choice(nonempty, size=len(drift)), rng)
    misclick = np.flatnonzero(kind == 3)
    items[misclick] = rng.integers(0, f.num_items, size=len(misclick))
    return _Log(keys=keys, items=items)


def _merge(a: _Log, b: _Log) -> _Log:
    keys = np.concatenate([a.keys, b.keys])
    # Two sorted runs: the stable sort (timsort) merges them in linear time.
    order = np.argsort(keys, kind="stable")
    return _Log(keys=keys[order], items=np.concatenate([a.items, b.items])[order])


def _truncate(log: _Log, num_users: int, keep: int) -> _Log:
    """Keep each user's last ``keep`` behaviours: all a later history can still see."""
    users = log.keys >> _TS_BITS
    ends = np.cumsum(np.bincount(users, minlength=num_users))
    from_end = ends[users] - np.arange(len(users)) - 1
    mask = from_end < keep
    return _Log(keys=log.keys[mask], items=log.items[mask])


def _histories(
    log: _Log, users: np.ndarray, ts: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Last ``max_len`` behaviours strictly before ``ts``: ``[n + 1]`` offsets, flat items."""
    end = np.searchsorted(log.keys, _Log.key(users, ts), side="left")
    first = np.searchsorted(log.keys, _Log.key(users, np.full_like(ts, -_TS_OFFSET)), side="left")
    start = np.maximum(first, end - max_len)
    lengths = end - start
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    return offsets, log.items[flat]


# --------------------------------------------------------------------------- impressions


def _day_impressions(cfg: JobConfig, world: World, day: int, log: _Log) -> pa.Table:
    """All ``samples_per_day`` impressions of ``day`` as a table with :func:`table_schema`."""
    f = cfg.features
    n = cfg.data.samples_per_day
    rng = _rng(cfg.data.seed, _IMPRESSIONS, day)

    # Requests of K ~ U{4..12} impressions; the last one is cut to hit exactly n rows.
    sizes = rng.integers(4, 13, size=n // 4 + 1)
    ends = np.cumsum(sizes)
    R = int(np.searchsorted(ends, n)) + 1
    sizes = sizes[:R].copy()
    sizes[-1] -= ends[R - 1] - n

    r_user = _sample_cdf(world.user_activity_cdf, R, rng)
    r_qcat = _interest_categories(world, r_user, rng)
    has_q = world.query_cat_offsets[r_qcat + 1] > world.query_cat_offsets[r_qcat]
    r_query = np.empty(R, dtype=np.int64)
    personal = has_q & (rng.random(R) < QUERY_FROM_INTEREST)
    r_query[personal] = _sample_in_groups(
        r_qcat[personal], world.queries_by_cat, world.query_cat_offsets, world.query_cat_cum, rng
    )
    r_query[~personal] = _sample_cdf(world.query_pop_cdf, int((~personal).sum()), rng)
    r_ts = _day_times(day, R, rng)
    r_scene = _scene_draws(world, r_user, rng)  # [R, n_scene]
    r_ctx: dict[str, np.ndarray] = {}
    depth_bias = np.zeros(R)
    for col, vocab in f.context_features.items():
        if col == "hour":
            r_ctx[col] = ((r_ts % SECONDS_PER_DAY) // 3600) * vocab // 24
        else:
            r_ctx[col] = _sample_cdf(world.depth_cdfs[col], R, rng)
            depth_bias -= CLICK_DEPTH * np.minimum(r_ctx[col], 5)
    r_mode = context_mode(r_ts, r_scene[:, 0])

    # Impressions.
    rep = lambda a: np.repeat(a, sizes, axis=0)  # noqa: E731
    user, query, ts, mode = rep(r_user), rep(r_query), rep(r_ts), rep(r_mode)
    qcat = world.query_category[query]
    from_query = rng.random(n) < ITEM_FROM_QUERY_CATEGORY
    cat = np.where(from_query, qcat, _sample_cdf(world.category_cdf, n, rng))
    item = _items_in(world, cat, rng)

    z = world.item_latent[item]
    logit = (
        CLICK_BIAS
        + CLICK_TASTE * np.einsum("nd,nd->n", world.taste(user, cat, mode), z)
        + CLICK_QUERY * np.einsum("nd,nd->n", world.query_latent[query], z)
        + CLICK_MATCH * (cat == qcat)
        + CLICK_INTEREST * world.in_main(user, cat)
        + CLICK_POP * world.item_popz[item]
        + rep(depth_bias)
        + CLICK_NOISE * rng.standard_normal(n)
    )
    offsets, hist_items = _histories(log, user, ts, f.max_seq_len)  # no random draws
    if cfg.data.context_signal:
        slot = impression_context_slot(ts, rep(r_scene[:, 0]))
        logit = logit + cfg.data.context_signal * context_term(world, item, cat, slot, offsets, hist_items)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)

    hist_cats = world.item_category[hist_items]
    request_id = rep(day * n + np.arange(R, dtype=np.int64))

    columns: dict[str, pa.Array] = {
        "request_id": pa.array(request_id),
        "user_id": pa.array(user),
        "query_id": pa.array(query),
        "item_id": pa.array(item),
        "category_id": pa.array(cat),
        "ts": pa.array(ts),
    }
    for col in f.context_features:
        columns[col] = pa.array(rep(r_ctx[col]).astype(np.int64))
    for j, col in enumerate(f.scene_features):
        columns[col] = pa.array(rep(r_scene[:, j]))
    columns["label"] = pa.array(label)
    off = pa.array(offsets.astype(np.int32))
    columns[HIST_ITEMS] = pa.ListArray.from_arrays(off, pa.array(hist_items))
    columns[HIST_CATEGORIES] = pa.ListArray.from_arrays(off, pa.array(hist_cats))
    schema = table_schema(f)
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def _behaviours_of(log: _Log, world: World) -> Behaviours:
    """A period's log as :class:`cdp_rec.data.writer.Behaviours` (categories from the world)."""
    return Behaviours(
        user_id=log.keys >> _TS_BITS,
        ts=(log.keys & ((1 << _TS_BITS) - 1)) - _TS_OFFSET,
        item_id=log.items,
        category_id=world.item_category[log.items],
    )


@dataclass
class Period:
    """One log period: ``index`` 0 is everything before day 0, ``d + 1`` is day ``d``.

    ``behaviours`` is the period's whole log (when asked for); ``impressions`` is day
    ``index - 1``'s table (:func:`table_schema`) when that day was requested, else None.
    """

    index: int
    behaviours: Behaviours | None
    impressions: pa.Table | None

    @property
    def day(self) -> int:
        return self.index - 1


def generate_periods(cfg: JobConfig, days: Iterable[int], with_behaviours: bool = False) -> Iterator[Period]:
    """Yield every log period up to the last requested day, in order.

    The joined layout needs each period's behaviours (``with_behaviours=True``); the
    per-row layout only the impression tables. Both come from the same draws, so the
    histories inline in a table are exactly what the joined reader assembles from the
    behaviours: the last ``max_seq_len`` with ts strictly before the impression's, oldest
    first, ties in ts in log order.
    """
    wanted = sorted(set(int(d) for d in days))
    if not wanted:
        return
    if wanted[0] < 0:
        raise ValueError(f"days must be >= 0, got {wanted[0]}")
    world = build_world(cfg)
    keep = cfg.features.max_seq_len
    pre = _period_log(cfg, world, _PRE_PERIOD)
    if with_behaviours:
        yield Period(_PRE_PERIOD, raw_ids.apply_to_behaviours(cfg, _behaviours_of(pre, world)), None)
    log = _truncate(pre, cfg.features.num_users, keep)
    for day in range(wanted[-1] + 1):
        # Every day's behaviours enter the log, requested or not, so histories of a
        # later day are the same whichever days are generated.
        new = _period_log(cfg, world, day + 1)
        log = _merge(log, new)
        table = _day_impressions(cfg, world, day, log) if day in wanted else None
        if table is not None:
            table = raw_ids.apply_to_impressions(cfg, day, table, log)  # data.raw_ids / id_churn; else as is
        if with_behaviours or table is not None:
            beh = raw_ids.apply_to_behaviours(cfg, _behaviours_of(new, world)) if with_behaviours else None
            yield Period(day + 1, beh, table)
        log = _truncate(log, cfg.features.num_users, keep)


def generate_days(cfg: JobConfig, days: Iterable[int]) -> Iterable[tuple[int, pa.Table]]:
    """Yield ``(day, table)`` in increasing day order; the building block of the writer."""
    for period in generate_periods(cfg, days):
        if period.impressions is not None:
            yield period.day, period.impressions


# --------------------------------------------------------------------------- writing


def dataset_spec(cfg: JobConfig) -> dict[str, Any]:
    """What ``_dataset.json`` records: everything that determines the generated rows."""
    d = cfg.data
    return {
        "generator": "cdp_rec.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": d.seed,
        "features": dataset_features(cfg.features),
        "data": {
            "samples_per_day": d.samples_per_day,
            "rows_per_file": d.rows_per_file,
            "row_group_size": d.row_group_size,
            "train_days": d.train_days,
            "test_days": d.test_days,
            "layout": d.layout,
            # Recorded only when set, so data sets of the default (no term) keep their spec.
            **({"context_signal": d.context_signal} if d.context_signal else {}),
            **({"raw_ids": True} if d.raw_ids else {}),
            **({"id_churn": d.id_churn} if d.id_churn else {}),
            # The bucket count shapes only the joined layout's files.
            **({"num_user_buckets": d.num_user_buckets} if d.layout == "joined" else {}),
        },
    }


def dataset_is_complete(cfg: JobConfig, out: str | Path, days: Iterable[int] | None = None) -> bool:
    """True if ``<out>/_dataset.json`` matches ``cfg`` (and this generator version) and lists
    every day in ``days`` (default: all train + test days): nothing needs generating."""
    path = Path(out) / DATASET_SPEC_FILE
    if not path.is_file():
        return False
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if days is None:
        days = range(cfg.data.train_days + cfg.data.test_days)
    listed = set(spec.pop("days", []))
    return spec == json.loads(json.dumps(dataset_spec(cfg))) and set(days) <= listed


GENERATOR = "cdp_rec.data.synthetic"  # the "generator" of the specs this module writes


def written_by_generator(out: str | Path) -> bool:
    """True if ``out`` holds a spec written by this generator: ``_dataset.json``, or the
    in-progress ``_dataset.json.tmp`` of a generation that was interrupted."""
    for path in (Path(out) / DATASET_SPEC_FILE, (Path(out) / DATASET_SPEC_FILE).with_suffix(".json.tmp")):
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(spec, dict) and spec.get("generator") == GENERATOR:
            return True
    return False


def _check_may_write(out: Path, force: bool) -> None:
    """Refuse (DataError) to write into a directory holding anything gen-data did not write."""
    from cdp_rec.data.loader import DataError  # loader imports torchrec: keep this module light

    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; give a directory to write the data set in")
    if force or not out.exists() or written_by_generator(out):
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise DataError(
            f"{out}: not empty ({shown}) and not written by gen-data (no {DATASET_SPEC_FILE} of the synthetic "
            f"generator); refusing to overwrite it: give an empty or new directory, or --force to replace its data"
        )


# Peak bytes per impression of a day being generated, per history slot and besides: the day's
# columns, its histories and the draws behind them are in memory at once (measured 1.3 KB a
# row at max_seq_len 50, 100k-400k rows a day).
_DAY_BYTES_PER_ROW = 8 * 16
_DAY_BYTES_PER_HISTORY_SLOT = 8 * 3


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound
        return None


def _check_day_fits_memory(cfg: JobConfig) -> None:
    """DataError naming ``data.samples_per_day`` when one day cannot be generated in this
    machine's memory (the generator builds a whole day at once): a one-line refusal up
    front, not numpy's MemoryError / "Maximum allowed dimension exceeded" traceback or an
    OOM kill after minutes."""
    from cdp_rec.data.loader import DataError  # loader imports torchrec: keep this module light

    n, L = cfg.data.samples_per_day, cfg.features.max_seq_len
    need = n * (_DAY_BYTES_PER_ROW + _DAY_BYTES_PER_HISTORY_SLOT * L)
    have = _physical_memory()
    if have is not None and need > have:
        raise DataError(
            f"data.samples_per_day={n:,}: the generator builds a day in memory, about {need / 2**30:,.1f} GiB "
            f"at features.max_seq_len={L}, more than this machine's {have / 2**30:,.1f} GiB; "
            f"lower data.samples_per_day (days are streamed one at a time, so data.train_days is free)"
        )


def generate_dataset(
    cfg: JobConfig, out: str | Path, days: Iterable[int] | None = None, force: bool = False
) -> list[Path]:
    """Write ``days`` (default: all train + test days) under ``out``; return the files.

    ``out`` must be new, empty, or written by this generator (its ``_dataset.json`` says
    so); anything else, e.g. a directory of real logs, is refused with a DataError unless
    ``force`` (which replaces the day files it writes and ``behaviors/``).

    ``data.layout`` picks the layout. ``rows``: each day is ``<out>/day=NN/part-00000.parquet,
    ...`` with ``rows_per_file`` rows per file and ``row_group_size`` rows per row group
    (zstd). ``joined``: see :mod:`cdp_rec.data.joined` (the behaviour log of every period
    up to the last requested day, and each requested day's impressions, by user bucket).
    ``_dataset.json`` is written last, so its presence means the listed days are complete.
    """
    cfg.features.validate("generate_dataset")
    cfg.data.validate("generate_dataset")
    _check_day_fits_memory(cfg)
    out = Path(out)
    if days is None:
        days = range(cfg.data.train_days + cfg.data.test_days)
    days = sorted(set(int(d) for d in days))
    _check_may_write(out, force)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / DATASET_SPEC_FILE
    tmp_spec = generation_marker(out)
    spec = dataset_spec(cfg)
    done: set[int] = set()
    # The in-progress marker (this generator's spec listing no days): a crash leaves a
    # root that a rerun still recognises as its own. Replaced by the final spec below.
    tmp_spec.write_text(json.dumps({**spec, "days": []}, indent=2, sort_keys=True) + "\n")
    if spec_path.is_file():
        try:
            old = json.loads(spec_path.read_text())
        except ValueError:
            old = {}
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != "days"} == json.loads(json.dumps(spec)):
            done = set(old.get("days", []))
        # Invalidate before touching files, so a crash cannot leave a stale spec behind.
        spec_path.unlink()

    written: list[Path] = []
    try:
        if cfg.data.layout == "joined":
            from cdp_rec.data import joined  # joined imports this module in write_generated: import late

            written = joined.write_generated(cfg, out, days, fresh=not done)
        else:
            from cdp_rec.data.joined import remove_joined_artifacts

            remove_joined_artifacts(out)  # a root that held the joined layout is rows now
            for day, table in generate_days(cfg, days):
                written += write_rows_day(out, day, table, cfg.data.rows_per_file, cfg.data.row_group_size)
    except OSError as e:
        if e.filename is not None or not e.errno:
            raise
        # pyarrow's write errors carry no file name (e.g. a full disk): name the data root.
        raise OSError(e.errno, os.strerror(e.errno), str(out)) from e
    spec["days"] = sorted(done | set(days))
    tmp_spec.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_spec, spec_path)
    return written
