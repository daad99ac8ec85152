"""The data set spec file ``<root>/_dataset.json``: its name and how it is read and written.

Written by every data set writer (the synthetic generator, ``convert``, ``import``) and
read by the readers (:func:`cdp_rec.data.loader.check_dataset_spec`), so it lives beside
the schema and imports nothing from either side.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATASET_SPEC_FILE = "_dataset.json"

# FeatureConfig keys that say how ids become embedding rows (features.id_mapping): a model
# choice, not a property of the data, so a data set's spec neither records nor compares them.
MODEL_SIDE_FEATURE_KEYS = ("id_mapping", "zch", "hash_collision_stats")


def dataset_features(features: Any) -> dict[str, Any]:
    """``asdict(features)`` without :data:`MODEL_SIDE_FEATURE_KEYS` (what ``_dataset.json`` records)."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(features).items() if k not in MODEL_SIDE_FEATURE_KEYS}


def spec_path(root: str | Path) -> Path:
    return Path(root) / DATASET_SPEC_FILE


def generation_marker(root: str | Path) -> Path:
    """The generator's in-progress spec: present while (or after an interrupted) generation
    writes ``root``, replaced by the final spec at the end."""
    return spec_path(root).with_suffix(".json.tmp")


@contextlib.contextmanager
def generation_lock(root: str | Path) -> Iterator[None]:
    """An exclusive flock on ``.<root name>.gen.lock`` beside ``root``, blocking until free:
    one training run generating a missing synthetic root at a time (see ensure_data)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.gen.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_dataset_spec(root: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``spec`` (sorted keys, indented) to a temporary name and rename it into place."""
    path = spec_path(root)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
