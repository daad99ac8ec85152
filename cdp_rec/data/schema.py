"""The Parquet search-log schema and the in-memory training batch.

One row per impression. Context and scene columns come from the feature spec
(:class:`cdp_rec.config.FeatureConfig`), so the schema is built, not hard-coded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from cdp_rec.config import FeatureConfig

# Single-valued id features, in KJT key order. Each has exactly one value per sample.
ID_FEATURES = ("query_id", "user_id", "item_id", "category_id")
# Jagged behaviour features, most recent behaviour last, equal lengths per row.
HIST_ITEMS = "hist_item_ids"
HIST_CATEGORIES = "hist_category_ids"


def day_dir_name(day: int) -> str:
    return f"day={day:02d}"


def table_schema(features: FeatureConfig) -> pa.Schema:
    """Arrow schema every Parquet file of a data set must have (column order free)."""
    fields = [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("query_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("category_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
    ]
    for col in (*features.context_features, *features.scene_features):
        fields.append(pa.field(col, pa.int64(), nullable=False))
    fields += [
        pa.field("label", pa.int8(), nullable=False),
        pa.field(HIST_ITEMS, pa.list_(pa.int64()), nullable=False),
        pa.field(HIST_CATEGORIES, pa.list_(pa.int64()), nullable=False),
    ]
    return pa.schema(fields)


# The one int64 a raw-id column may not hold: TorchRec's managed-collision modules mark an
# empty slot with it (kept out of hash tables too, so a table can switch mapping freely).
RAW_ID_RESERVED = 2**63 - 1


def column_tables(features: FeatureConfig) -> dict[str, str]:
    """Id column -> the embedding table its ids look up (names as ``features.id_mapping``)."""
    tables = {"user_id": "user", "query_id": "query", "item_id": "item", "category_id": "category",
              HIST_ITEMS: "item", HIST_CATEGORIES: "category"}
    tables.update({c: f"ctx_{c}" for c in features.context_features})
    tables.update({c: f"scene_{c}" for c in features.scene_features})
    return tables


def id_ranges(features: FeatureConfig) -> dict[str, int | None]:
    """Column -> exclusive upper bound of its ids (lower bound is 0), or None for a column of
    raw ids: its table is ``hash`` / ``managed`` in ``features.id_mapping``, and any int64
    but :data:`RAW_ID_RESERVED` is accepted (negative ids included)."""
    ranges: dict[str, int | None] = {
        "user_id": features.num_users,
        "query_id": features.num_queries,
        "item_id": features.num_items,
        "category_id": features.num_categories,
        HIST_ITEMS: features.num_items,
        HIST_CATEGORIES: features.num_categories,
    }
    ranges.update(features.context_features)
    ranges.update(features.scene_features)
    mapping = getattr(features, "id_mapping", {})
    for column, table in column_tables(features).items():
        if mapping.get(table, "dense") != "dense":
            ranges[column] = None
    return ranges


def sparse_keys(features: FeatureConfig) -> list[str]:
    """KJT keys in the order the loader emits them."""
    return [
        *ID_FEATURES,
        *features.context_features,
        *features.scene_features,
        HIST_ITEMS,
        HIST_CATEGORIES,
    ]


@dataclass
class Batch(Pipelineable):
    """One training/eval batch of ``B`` impressions.

    Attributes:
        sparse: KJT with keys :func:`sparse_keys`; single-valued features have length
            1 per sample, ``hist_item_ids`` / ``hist_category_ids`` are jagged with
            equal lengths (``0 <= len <= max_seq_len``).
        labels: ``[B]`` float32 in {0, 1}.
        user_ids: ``[B]`` int64, the UAUC group.
        request_ids: ``[B]`` int64, the GAUC group.
        history_row: ``[B]`` int64 or None. Set by request-level deduplication
            (``data.dedup_requests``): sample ``b``'s jagged history features (``hist_*``
            and what a model derives from them) are those of row ``history_row[b] <= b``,
            and rows that are not their own ``history_row`` hold empty bags there. None:
            every row holds its own (:func:`cdp_rec.data.loader.expand_histories` turns
            one form into the other).
    """

    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    user_ids: torch.Tensor
    request_ids: torch.Tensor
    history_row: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    @staticmethod
    def concat(batches: "list[Batch]") -> "Batch":
        """Stack batches along the sample dimension (same KJT keys, in order)."""
        keys = batches[0].sparse.keys()
        dicts = [b.sparse.to_dict() for b in batches]
        values = torch.cat([d[k].values() for k in keys for d in dicts])
        lengths = torch.cat([d[k].lengths().to(torch.int64) for k in keys for d in dicts])
        history_row = None
        if any(b.history_row is not None for b in batches):  # row indices shift by the rows before
            starts = [0, *itertools.accumulate(len(b) for b in batches)]
            history_row = torch.cat([
                (b.history_row if b.history_row is not None else torch.arange(len(b))) + start
                for b, start in zip(batches, starts)
            ])
        return Batch(
            sparse=KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths),
            labels=torch.cat([b.labels for b in batches]),
            user_ids=torch.cat([b.user_ids for b in batches]),
            request_ids=torch.cat([b.request_ids for b in batches]),
            history_row=history_row,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            request_ids=self.request_ids.to(device=device, non_blocking=non_blocking),
            history_row=None if self.history_row is None else self.history_row.to(device=device,
                                                                                  non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        self.user_ids.record_stream(stream)
        self.request_ids.record_stream(stream)
        if self.history_row is not None:
            self.history_row.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            user_ids=self.user_ids.pin_memory(),
            request_ids=self.request_ids.pin_memory(),
            history_row=None if self.history_row is None else self.history_row.pin_memory(),
        )


def is_sequence_feature(name: str) -> bool:
    """Whether a KJT key holds a behaviour sequence (up to ``max_seq_len`` ids per sample).

    ``hist_*``: the logged history and what models derive from it (e.g. CDP's
    ``hist_match_item_ids``); ``seq_*``: the sequence models' selected behaviours.
    """
    return name.startswith(("hist_", "seq_"))
