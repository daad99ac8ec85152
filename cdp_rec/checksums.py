"""Sizes and SHA-256 digests of checkpoint, export and serving-package files, and their verification.

Standard library only, below every other module of the package: checkpoints
(:mod:`cdp_rec.training.checkpoint`) and serving packages (:mod:`cdp_rec.serving.package`,
which must load without the training code) share these records and checks.

SHA-256 because ``sha256sum`` checks a file by hand and the digest doubles as a content id
of a serving artifact; with the SHA extensions of current x86 and ARM CPUs hashlib streams
it at about 1.5 GB/s per core (CRC32 would be about twice as fast), and the save and the
resume split the files across ranks. Files are read in 1 MiB chunks, never whole.

The digests detect truncation, bit rot and files swapped between checkpoints. They are
not a signature: whoever can rewrite the files can rewrite the digests in ``meta.json``
too, so they say nothing about who wrote a checkpoint.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

ALGORITHM = "sha256"
CHUNK = 1 << 20
_HEX = re.compile(r"[0-9a-f]{64}")


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file, streamed."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, ALGORITHM: h.hexdigest()}


def digest_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Digests of ``root / name`` for each name (names may contain ``/``)."""
    return {name: file_digest(root / name) for name in names}


def check_record(record: Any) -> str | None:
    """Why a recorded ``{"size", "sha256"}`` entry is malformed, or None."""
    if not isinstance(record, dict):
        return "is not an object"
    if not isinstance(record.get("size"), int) or record["size"] < 0:
        return "has no valid size"
    if not isinstance(record.get(ALGORITHM), str) or not _HEX.fullmatch(record[ALGORITHM]):
        return f"has no valid {ALGORITHM}"
    return None


def size_difference(path: Path, record: dict[str, Any], written: str = "saved", event: str = "the save"
                    ) -> str | None:
    """Why ``path`` does not have the recorded size (missing, truncated, grown), or None.

    A stat only: checking every size first finds a cut file before any hashing.
    ``written`` / ``event`` word the message for the writer ("saved" / "the save",
    "exported" / "the export").
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size != record["size"]:
        return f"is {size} bytes but {record['size']} were {written} (truncated or changed after {event})"
    return None


def digest_difference(path: Path, record: dict[str, Any], written: str = "saved", event: str = "the save",
                      reference: str = "the saved one") -> str | None:
    """Why ``path``'s content differs from the recorded digest (``reference`` names where it is), or None."""
    try:
        got = file_digest(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if got["size"] != record["size"]:
        return f"is {got['size']} bytes but {record['size']} were {written} (truncated or changed after {event})"
    if got[ALGORITHM] != record[ALGORITHM]:
        return f"{ALGORITHM} differs from {reference} (corrupted or changed after {event})"
    return None
