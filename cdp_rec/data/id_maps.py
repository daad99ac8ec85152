"""Fingerprints of an import's dense id mapping (``--remap``, the default).

A remapped import numbers each column's distinct raw ids ``0..n-1`` in sorted order
(``ids/<column>.parquet``), so a dense id means something only together with that mapping:
another import (a later log, a subset, the same log plus a new day) gives the same item
another number. A model trained on one import and fed rows of another would look every
id up in some other id's row - in range, no error, wrong scores.

The import therefore records, per remapped column, the SHA-256 of its sorted distinct raw
ids (little-endian int64): in ``_dataset.json`` (``ids.mapping_sha256``) and in the
key-value metadata of every Parquet file it writes (``cdp_rec.id_maps``, JSON). ``export
--serving`` copies the training data's record into the package's ``spec.json``
(``data_id_maps``) for its dense tables, and ``predict`` / ``load_package().predict`` refuse
rows whose file or table carries another mapping of the same column. Files without the
record (written by hand, by the synthetic generator, by an import before this) are not
checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"cdp_rec.id_maps"
# Columns whose ids follow another column's mapping (histories share the target's).
SAME_MAPPING = {"hist_item_ids": "item_id", "hist_category_ids": "category_id"}


def mapping_sha256(sorted_raw_ids: np.ndarray) -> str:
    """SHA-256 of a column's mapping, given its sorted distinct raw ids (dense id = position)."""
    return hashlib.sha256(np.ascontiguousarray(sorted_raw_ids, dtype="<i8").tobytes()).hexdigest()


def with_id_maps(schema: pa.Schema, digests: Mapping[str, str]) -> pa.Schema:
    """``schema`` carrying ``digests`` (column -> mapping SHA-256) in its metadata."""
    if not digests:
        return schema
    meta = dict(schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(dict(sorted(digests.items())), separators=(",", ":")).encode()
    return schema.with_metadata(meta)


def schema_id_maps(schema: pa.Schema | None, where: Any) -> dict[str, str]:
    """The mapping record of a Parquet / Arrow schema ({} when there is none)."""
    raw = (schema.metadata or {}).get(METADATA_KEY) if schema is not None else None
    if raw is None:
        return {}
    try:
        maps = json.loads(raw)
    except ValueError:
        maps = None
    if not isinstance(maps, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in maps.items()):
        from cdp_rec.data.loader import DataError

        raise DataError(f"{where}: metadata {METADATA_KEY.decode()} is not a JSON object of column -> sha256")
    return maps


def file_id_maps(path: Path) -> dict[str, str]:
    """The mapping record in a Parquet file's footer ({} when there is none)."""
    return schema_id_maps(pq.read_schema(path), path)


def dataset_id_maps(spec: Mapping[str, Any] | None) -> dict[str, str]:
    """The mapping record of a parsed ``_dataset.json`` ({} when there is none)."""
    ids = (spec or {}).get("ids")
    maps = ids.get("mapping_sha256") if isinstance(ids, dict) else None
    return dict(maps) if isinstance(maps, dict) else {}


def mismatch(package: Mapping[str, str], data: Mapping[str, str]) -> str | None:
    """The first column both record with different mappings, or None."""
    for col in sorted(set(package) & set(data)):
        if package[col] != data[col]:
            return col
    return None


def mismatch_message(where: Any, col: str, package: Mapping[str, str], data: Mapping[str, str],
                     package_root: Any, trained_on: Any) -> str:
    return (f"{where}: column '{col}' holds dense ids of another import's mapping (ids/{col}.parquet sha256 "
            f"{data[col][:12]}..) than the one the package's model was trained on ({package[col][:12]}.., "
            f"data set {trained_on}); its ids would look up other ids' rows. Score rows imported with that "
            f"mapping, or train on an import with --raw-ids (managed tables map raw ids; unseen ones share "
            f"a row) - package {package_root}")
