"""Serving: ``cdp-rec export --serving`` packages, their runtime and ``cdp-rec predict``.

* :mod:`cdp_rec.serving.export` - checkpoint -> package (needs the training code);
* :mod:`cdp_rec.serving.package` - the package layout, manifest, digests, safe readers;
* :mod:`cdp_rec.serving.program` - the dense graph's JSON form and its allow-list;
* :mod:`cdp_rec.serving.runtime` - :func:`load_package` -> ``ServingModel.predict(batch)``;
* :mod:`cdp_rec.serving.predict` - Parquet in, ``request_id, item_id, score`` Parquet out.

Only ``export`` imports the training code or the model classes. Importing this package
imports nothing heavy: :func:`load_package` is resolved on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_package"]


def __getattr__(name: str) -> Any:
    if name == "load_package":
        from cdp_rec.serving.runtime import load_package

        return load_package
    raise AttributeError(f"module 'cdp_rec.serving' has no attribute {name!r}")
