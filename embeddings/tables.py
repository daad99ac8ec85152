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
    """One EBC over ``specs``; every table SUM-pools.

    A bag that holds several ids (the behaviour history) is turned into its mean by the
    model, :func:`bag_mean`, not by fbgemm's MEAN mode: TorchRec runs MEAN tables through
    two different roads depending on the sharding type (fbgemm's MEAN kernels for
    table-wise, column-wise and data-parallel shards; SUM plus its own division for row-wise
    ones), and on an H200 the MEAN road gave different training than the CPU while the SUM
    road matched (docs/performance.md, "On a GPU"). With SUM everywhere every sharding type
    runs the same kernels. Single-valued features are unaffected (a bag of one id).
    ``device="meta"`` builds the tables without memory, for planning.
    """
    tables = [
        EmbeddingBagConfig(
            name=s.name,
            embedding_dim=embedding_dim,
            num_embeddings=s.num_embeddings,
            feature_names=list(s.feature_names),
            pooling=PoolingType.SUM,
        )
        for s in specs
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def bag_mean(pooled: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` mean of each SUM-pooled bag ``pooled [B, D]`` holding ``lengths [B]`` ids.

    An empty bag stays the zero vector (the paper's "no matching behaviour"), never 0/0.
    """
    return pooled / lengths.clamp(min=1).to(pooled.dtype).unsqueeze(-1)
