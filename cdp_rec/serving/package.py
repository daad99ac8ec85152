"""The serving package on disk: layout, manifest, digests and the safe readers of its files.

Layout of a package directory (written by :mod:`cdp_rec.serving.export`)::

    manifest.json              written last: format, versions, model, dtype, the tables, the
                               dense program's inputs and ``files`` (size + SHA-256 of every
                               other file)
    spec.json                  the feature spec: FeatureConfig (vocabularies, context / scene
                               columns, max_seq_len, id_mapping) and the Parquet input schema
    config.json                the checkpoint's resolved training config (for people; unread)
    tables/<t>.weight.npy      uint8 [rows, bytes per row]: the table in TorchRec's quantized
                               layout (``torchrec.quant.embedding_modules.quantize_state_dict``):
                               fp32 / fp16 values as bytes, or int8 codes
    tables/<t>.scale_shift.npy uint8 [rows, 4] (int8 only): fp16 scale and bias of each row
    tables/<t>.ids.npy         int64 [n, 2] (managed tables only): (raw id, row), ascending
    dense/program.json         the dense graph: ``torch.export`` program, serialized as JSON
    dense/weights.pt           its parameters and buffers (a dict of tensors, ``torch.save``)
    dense/constants.pt         its lifted constants (same)
    dense/aoti.pt2             optional: the same graph compiled by AOTInductor (native code)

Trust. A package is data until it is loaded with ``native=True``. Loading always checks
``manifest.json`` first, then every file's size, then every file's SHA-256, and reads only
files the manifest lists: ``.npy`` with ``allow_pickle=False``, ``.pt`` with torch's
weights-only unpickler, the program JSON through the allow-list of
:mod:`cdp_rec.serving.program` (no pickle, no Python code from the file). ``aoti.pt2``
holds a shared library: loading it runs native code, so it is loaded only when asked for.
The digests catch damage, not tampering (whoever rewrites a file can rewrite the manifest):
pin the package with ``expected_sha256`` (the SHA-256 of ``manifest.json``, which lists
the digest of every other file; ``cdp-rec export`` prints it) to also refuse a package
that is not the one exported.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cdp_rec.checksums import check_record, digest_difference, file_digest, size_difference

FORMAT = "cdp-rec-serving"
# 2: the EBC lookup SUM-pools and the dense program divides the history bag by its length
# (embeddings.tables.bag_mean); version-1 packages MEAN-pooled in the lookup, so reading one
# with this runtime would divide twice - they are refused and re-exported instead.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SPEC = "spec.json"
_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", dict: "object", list: "array",
               type(None): "null"}

# Manifest keys the runtime reads, and their JSON types (a missing or mistyped one is refused
# up front rather than failing with a KeyError deep in the loader).
_MANIFEST_KEYS: dict[str, type] = {
    "format": str, "format_version": int, "model": str, "family": str, "dtype": str, "tables": dict,
    "lookups": dict, "dense": dict, "prep": dict, "files": dict,
}


class PackageError(ValueError):
    """A serving package is missing, damaged, not the expected one or unusable; names the file."""


# ----------------------------------------------------------------------------- digests
# The size + SHA-256 records of cdp_rec.checksums (standard library only), as checkpoints use.


def package_sha256(root: str | Path) -> str:
    """The package's identity: SHA-256 of its ``manifest.json`` (which digests every other file)."""
    return file_digest(Path(root) / MANIFEST)["sha256"]


# ----------------------------------------------------------------------------- manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """``manifest.json`` of a package, checked to be an object of this format with the keys the runtime reads."""
    path = root / MANIFEST
    if not root.is_dir():
        raise PackageError(f"{root}: not a serving package ({'not a directory' if root.exists() else 'not found'})")
    if not path.is_file():
        raise PackageError(f"{root}: not a serving package (no {MANIFEST}; export writes it last, so an "
                           "interrupted export leaves none)")
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise PackageError(f"{path}: unreadable ({e.strerror or e})") from e
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser's stack
        raise PackageError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise PackageError(f"{path}: holds a JSON {_JSON_TYPES.get(type(data), '?')}, not an object")
    if data.get("format") != FORMAT:
        hint = " (a plain `cdp-rec export` without --serving: tables and dense.pt only)" if "format" not in data \
            and "tables" in data else ""
        raise PackageError(f"{path}: not a cdp-rec serving package (format {data.get('format')!r}){hint}")
    if data.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{path}: package format version {data.get('format_version')!r}; this cdp-rec reads "
                           f"version {FORMAT_VERSION} (re-export it with this version)")
    for key, kind in _MANIFEST_KEYS.items():
        if key not in data:
            raise PackageError(f"{path}: no {key!r} (every export writes it; the file was edited or cut)")
        if type(data[key]) is not kind:
            raise PackageError(f"{path}: {key!r} is a JSON {_JSON_TYPES.get(type(data[key]), '?')}, "
                               f"not a JSON {_JSON_TYPES[kind]}")
    _check_file_records(path, data["files"])
    return data


def _check_file_records(where: Path, files: dict[str, Any]) -> None:
    for name, record in files.items():
        p = PurePosixPath(name)
        # Relative paths inside the package only: a record must not make us open any other file.
        if not name or p.is_absolute() or ".." in p.parts or "\\" in name or name == MANIFEST:
            raise PackageError(f"{where}: 'files' lists {name!r}, which is not a file of the package")
        if check_record(record) is not None:
            raise PackageError(f"{where}: 'files' entry {name!r} is not {{size, sha256}}")


def verify_package(root: Path, manifest: dict[str, Any], expected_sha256: str | None = None) -> None:
    """Check the package against its manifest before anything else is read.

    ``expected_sha256``: the package identity to insist on (:func:`package_sha256`). Then
    every listed file's size (a stat each: a cut file is found without hashing), then every
    digest. Symbolic links are refused: the package must hold the bytes it was exported with.
    """
    if expected_sha256 is not None:
        got = package_sha256(root)
        if got != expected_sha256.lower().removeprefix("sha256:"):
            raise PackageError(f"{root / MANIFEST}: sha256 is {got}, not the expected {expected_sha256} "
                               "(another package, or this one was changed)")
    files: dict[str, dict[str, Any]] = manifest["files"]
    for name in sorted(files):
        path = root / name
        parts = PurePosixPath(name).parts
        if any(root.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts) + 1)):
            raise PackageError(f"{path}: is (under) a symbolic link; a package holds its own files")
        if path.exists() and not path.is_file():  # a FIFO or device: hashing it would block or never end
            raise PackageError(f"{path}: is not a regular file ({'a directory' if path.is_dir() else 'a FIFO, device or socket'})")
        bad = size_difference(path, files[name], "exported", "the export")
        if bad == "missing":
            bad = f"missing (listed in {MANIFEST})"
        if bad is not None:
            raise PackageError(f"{path}: {bad}")
    for name in sorted(files):
        bad = digest_difference(root / name, files[name], "exported", "the export", MANIFEST)
        if bad is not None:
            raise PackageError(f"{root / name}: {bad}")


# ----------------------------------------------------------------------------- safe readers


def listed(root: Path, manifest: dict[str, Any], name: Any, what: str) -> Path:
    """``root / name`` if the manifest lists (and so verified) it; a PackageError otherwise."""
    if not isinstance(name, str) or name not in manifest["files"]:
        raise PackageError(f"{root / MANIFEST}: {what} refers to {name!r}, which is not among its files")
    return root / name


def load_npy(path: Path, dtype: np.dtype | type, ndim: int, mmap: bool = True) -> np.ndarray:
    """An ``.npy`` array without pickle (``allow_pickle=False``), checked for dtype and rank."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as e:
        raise PackageError(f"{path}: not a readable .npy array ({e})") from e
    if arr.dtype != np.dtype(dtype) or arr.ndim != ndim:
        raise PackageError(f"{path}: holds {arr.dtype} with {arr.ndim} dimension(s); expected {np.dtype(dtype)} "
                           f"with {ndim}")
    return arr


def load_tensors(path: Path) -> dict[str, Any]:
    """A ``torch.save`` d dict of tensors, read with torch's weights-only unpickler."""
    import torch

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a refused global, a cut zip, an unreadable file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PackageError(f"{path}: not a readable tensor file ({type(e).__name__}: {first})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise PackageError(f"{path}: does not hold a dict of named tensors")
    return obj


def read_json(root: Path, manifest: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    path = listed(root, manifest, name, what)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise PackageError(f"{path}: unreadable {what} ({e})") from e
    if not isinstance(data, dict):
        raise PackageError(f"{path}: {what} is not a JSON object")
    return data
