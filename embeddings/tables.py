"""Embedding table specs and the TorchRec module that holds them.

Every id feature lives in one TorchRec :class:`EmbeddingBagCollection`, so sharding
with DistributedModelParallel is a wrap of this one module, not a rewrite. The
behaviour sequence shares the ``item`` table with the target item (paper §3.3: the
pooled intent lives in the same space as the candidate). (The sequence baselines keep
``item`` / ``category`` in an unpooled EmbeddingCollection instead,
:mod:`cdp_rec.models.sequence`; :mod:`embeddings.sharding` shards both kinds.)

Table names are stable (``query``, ``user``, ``item``, ``category``, ``ctx_<col>``,
``scene_<col>``): sharding constraints, checkpoints and the capacity planner refer
to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from cdp_rec.config import FeatureConfig
from cdp_rec.data.schema import ID_FEATURES


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: its rows, and the KJT features that look it up."""

    name: str
    num_embeddings: int
    feature_names: tuple[str, ...]


def table_specs(features: FeatureConfig, history_features: tuple[str, ...] = ()) -> list[TableSpec]:
    """Tables of the model, in a fixed order.

    Args:
        features: the feature spec (vocabulary sizes, context and scene columns).
        history_features: extra KJT features pooled from the item table, e.g.
            ``("hist_item_ids",)`` for plain mean pooling of the whole sequence or
            ``("hist_match_item_ids",)`` for the category-filtered sequence.
    """
    specs = [
        TableSpec("query", features.num_queries, ("query_id",)),
        TableSpec("user", features.num_users, ("user_id",)),
        TableSpec("item", features.num_items, ("item_id", *history_features)),
        TableSpec("category", features.num_categories, ("category_id",)),
    ]
    specs += [TableSpec(f"ctx_{c}", n, (c,)) for c, n in features.context_features.items()]
    specs += [TableSpec(f"scene_{c}", n, (c,)) for c, n in features.scene_features.items()]
    return specs


def single_value_features(features: FeatureConfig) -> list[str]:
    """Features with exactly one id per sample, in KJT order."""
    return [*ID_FEATURES, *features.context_features, *features.scene_features]


def build_embedding_bag_collection(
    specs: list[TableSpec], embedding_dim: int, device: torch.device | str = "cpu"
) -> EmbeddingBagCollection:
    """One EBC over ``specs``; every table MEAN-pools.

    MEAN is exact for single-valued features and gives the mean of a behaviour
    sequence; an empty bag pools to the zero vector (fbgemm), which is the paper's
    "no matching behaviour" case without any NaN from 0/0. ``device="meta"`` builds
    the tables without memory, for planning.
    """
    tables = [
        EmbeddingBagConfig(
            name=s.name,
            embedding_dim=embedding_dim,
            num_embeddings=s.num_embeddings,
            feature_names=list(s.feature_names),
            pooling=PoolingType.MEAN,
        )
        for s in specs
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))
