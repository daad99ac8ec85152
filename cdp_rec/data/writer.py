"""Parquet writing helpers shared by every data set writer (generator, joined, convert, import).

Nothing here reads data or draws synthetic logs, so writers import it without pulling in
the generator, and readers never need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdp_rec.data.schema import day_dir_name


@dataclass
class Behaviours:
    """Behaviours of one log period, sorted by (user_id, ts), ties in log order.

    All arrays are ``[m]`` int64; ``category_id`` is the item's category.
    """

    user_id: np.ndarray
    ts: np.ndarray
    item_id: np.ndarray
    category_id: np.ndarray


def write_parquet(table: pa.Table, path: Path, row_group_size: int, **options: Any) -> Path:
    """Write ``table`` with the data sets' settings (zstd, ``row_group_size`` rows per row
    group, ``options`` for :func:`pyarrow.parquet.write_table`) to a temporary name and
    rename it, so a crash never leaves a half file."""
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd", **options)
    os.replace(tmp, path)
    return path


def write_rows_day(out: Path, day: int, table: pa.Table, rows_per_file: int, row_group_size: int) -> list[Path]:
    """The per-row layout of one day: ``<out>/day=NN/part-KKKKK.parquet`` of ``rows_per_file``
    rows each, replacing whatever the day directory held (either layout)."""
    day_dir = out / day_dir_name(day)
    day_dir.mkdir(parents=True, exist_ok=True)
    for old_file in [*day_dir.glob("part-*.parquet"), *day_dir.glob("bucket=*.parquet")]:
        old_file.unlink()
    written = []
    for k, start in enumerate(range(0, table.num_rows, rows_per_file)):
        written.append(write_parquet(table.slice(start, rows_per_file), day_dir / f"part-{k:05d}.parquet", row_group_size))
    return written
