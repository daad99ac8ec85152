"""Stable integer hashing shared by the data writers and importers.

One finalizer so that the joined layout's user buckets and the importers' string-id hash
cannot drift apart: both are documented as MurmurHash3's 64-bit finalizer, the same on
every run, machine and numpy version (unlike Python's ``hash``).
"""

from __future__ import annotations

import numpy as np


def fmix64(x: np.ndarray) -> np.ndarray:
    """``[n]`` uint64: MurmurHash3's 64-bit finalizer of ``x`` as uint64 (wrapping arithmetic)."""
    x = np.asarray(x).astype(np.uint64)  # a copy: shifted in place below
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x
