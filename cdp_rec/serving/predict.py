"""``cdp-rec predict``: stream Parquet logs through a serving package -> ``request_id, item_id, score``.

Input: Parquet in the training schema (:func:`cdp_rec.data.schema.table_schema` of the
package's feature spec, histories included; ``label`` may be absent), read by the
training loader's own reader (one row group at a time, every column validated: types,
nulls, id ranges of dense tables, history lengths), so a bad file is the same one-line
:class:`~cdp_rec.data.loader.DataError` naming the file, row group, column and row that
training would give. ``--data`` is a Parquet file, a directory of ``*.parquet`` files, a
data root with ``day=NN`` directories (all days, or those given), or a joined-layout root.

Output: one row per input row, in input order: ``request_id`` int64, ``item_id`` int64
(the raw id as logged), ``score`` float32 (the click probability). Written to
``<out>.tmp-<pid>`` and renamed at the end, so ``out`` is complete or absent; an existing
``out`` is replaced only with ``force``, and never when it is an input file or lies inside
the data root being scored (refused, with or without ``force``). A score that is not finite
(NaN / inf logits: damaged weights) stops the run with a PackageError; none is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdp_rec.config import FeatureConfig
from cdp_rec.data.loader import (
    DataError,
    ParquetBatchReader,
    check_data_root,
    check_dataset_spec,
    check_schema,
    is_ignored_name,
    list_day_files,
)
from cdp_rec.data.schema import Batch, table_schema

OUTPUT_SCHEMA = pa.schema([
    pa.field("request_id", pa.int64(), nullable=False),
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
])


class ServingReader(ParquetBatchReader):
    """The training loader's reader without the ``label`` column (neither read nor required);
    batches carry zero labels."""

    def __init__(self, files: Sequence[Path], features: FeatureConfig, batch_size: int) -> None:
        super().__init__(files, features, batch_size)
        self._schema = pa.schema([f for f in table_schema(features) if f.name != "label"])
        self._single_cols = [f.name for f in self._schema if not pa.types.is_list(f.type)]

    def _convert_single(self, where: str, table: pa.Table) -> dict[str, np.ndarray]:
        single = super()._convert_single(where, table)
        single["label"] = np.zeros(table.num_rows, dtype=np.int8)
        return single

    def convert_table(self, where: str, table: pa.Table) -> Batch:
        """One Arrow table (any number of rows) -> one validated Batch."""
        check_schema(Path(where), table.schema, self._schema)
        return self._to_batch(self._convert(where, table.select(self._schema.names)))


def arrow_to_batch(data: Any, features: FeatureConfig) -> Batch:
    """A ``pyarrow.Table`` / ``RecordBatch`` in the training schema -> a validated Batch (the Python API's input)."""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, pa.Table):
        raise TypeError(f"predict() takes a cdp_rec.data.schema.Batch or a pyarrow Table / RecordBatch, "
                        f"got {type(data).__name__}")
    if data.num_rows == 0:
        raise DataError("batch: no rows")
    return ServingReader([], features, max(1, data.num_rows)).convert_table("batch", data)


def input_files(data: Path, days: Sequence[int] = ()) -> list[Path]:
    """The Parquet files of ``data`` in reading order (see the module docstring)."""
    if data.is_file():
        return [data]
    check_data_root(data)
    day_dirs = sorted(p for p in data.iterdir() if p.is_dir() and p.name.startswith("day="))
    if days or day_dirs:
        wanted = list(days) or [int(p.name.split("=", 1)[1]) for p in day_dirs if p.name[4:].isdigit()]
        return [f for d in wanted for f in list_day_files(data, d)]
    entries = sorted(p for p in data.iterdir() if not is_ignored_name(p.name))
    # Like a day directory: a file that is not read is an error, never silently unscored rows.
    stray = [p for p in entries if not (p.name.endswith(".parquet") and p.is_file())]
    if stray:
        raise DataError(f"{stray[0]}: not a *.parquet file, in the directory being scored (--data {data}); "
                        "move it out, or rename it if it is Parquet (names starting with '.' or '_' are ignored)")
    if not entries:
        raise DataError(f"{data}: no *.parquet files and no day=NN directories")
    return entries


def open_input(data: Path, features: FeatureConfig, batch_size: int, days: Sequence[int] = ()) -> ParquetBatchReader:
    data = Path(data)
    if data.is_dir():
        check_dataset_spec(data, features)  # a data set written for another feature spec: name the key
        from cdp_rec.data.joined import LAYOUT_FILE, JoinedBatchReader, layout_days

        if (data / LAYOUT_FILE).is_file():
            # Scoring an empty day yields no rows (a warning), as the per-row input does.
            return JoinedBatchReader(data, list(days) or layout_days(data, "joined"), features, batch_size,
                                     allow_empty_days=True)
    return ServingReader(input_files(data, days), features, batch_size)


def check_id_maps(model: Any, sources: Sequence[tuple[Any, pa.Schema | dict[str, str] | None]]) -> None:
    """Refuse rows numbered by another import's dense-id mapping than the model's training data
    (:mod:`cdp_rec.data.id_maps`): ``sources`` are ``(where, Arrow schema or a
    column -> sha256 record)``. Nothing to check without a record on either side."""
    from cdp_rec.data.id_maps import mismatch, mismatch_message, schema_id_maps

    want = getattr(model, "data_id_maps", None) or {}
    if not want:
        return
    for where, src in sources:
        have = schema_id_maps(src, where) if isinstance(src, pa.Schema) or src is None else src
        col = mismatch(want, have)
        if col is not None:
            raise DataError(mismatch_message(where, col, want, have, getattr(model, "root", "?"),
                                             getattr(model, "trained_on", None)))


def _check_input_id_maps(model: Any, data: Path, reader: Any) -> None:
    from cdp_rec.data.id_maps import dataset_id_maps
    from cdp_rec.data.spec import DATASET_SPEC_FILE

    if not getattr(model, "data_id_maps", None):
        return
    sources: list[tuple[Any, Any]] = []
    spec_path = Path(data) / DATASET_SPEC_FILE
    if Path(data).is_dir() and spec_path.is_file():
        import json

        try:
            sources.append((spec_path, dataset_id_maps(json.loads(spec_path.read_text()))))
        except (OSError, ValueError, RecursionError):
            pass  # check_dataset_spec has read it already; the files' own records still apply
    sources += [(f, pq.read_schema(f)) for f in getattr(reader, "files", ())]
    check_id_maps(model, sources)


def check_out_is_not_input(out: Path, data: Path, files: Sequence[Path] = ()) -> None:
    """Refuse an ``out`` that is ``data`` itself, lies inside the data root ``data`` being scored
    (followed through links or not), is one of the input ``files`` or sits in a directory of them
    (a symlinked ``day=NN``): predictions are never written over, or among, the data they score."""
    def inside(path: Path, root: Path) -> bool:
        return path == root or path.is_relative_to(root)

    out_abs, data_abs = Path(os.path.abspath(out)), Path(os.path.abspath(data))
    out_real, data_real = out.resolve(), data.resolve()
    if data.is_file():
        if out_abs == data_abs or out_real == data_real or (out.exists() and os.path.samefile(out, data)):
            raise DataError(f"{out}: is the input file being scored (--data {data}); write the predictions "
                            "to another file (--force never replaces an input)")
        return
    if inside(out_abs, data_abs) or inside(out_real, data_real):
        raise DataError(f"{out}: is inside the data root being scored (--data {data}); write the predictions "
                        "outside it (--force never replaces or adds files there)")
    for f in map(Path, files):
        f_real = f.resolve()
        if out_real == f_real or (out.exists() and f.exists() and os.path.samefile(out, f)):
            raise DataError(f"{out}: is the input file {f} of --data {data}; write the predictions outside the "
                            "data being scored (--force never replaces an input)")
        if out_real.parent == f_real.parent:
            raise DataError(f"{out}: is in the directory of the input file {f} of --data {data}; write the "
                            "predictions outside the data being scored")


@dataclass
class PredictStats:
    rows: int
    batches: int
    files: int
    seconds: float


def predict_to_parquet(model: Any, data: Path, out: Path, batch_size: int = 4096, days: Sequence[int] = (),
                       force: bool = False) -> PredictStats:
    """Score every row of ``data`` with ``model`` (a :class:`~cdp_rec.serving.runtime.ServingModel`)."""
    import time

    import torch

    out = Path(out)
    if out.is_dir() or out.is_symlink():
        raise DataError(f"{out}: is a directory or a link; --out names the Parquet file to write")
    check_out_is_not_input(out, Path(data))  # before "exists": --force must never replace the data itself
    if out.exists() and not force:
        raise DataError(f"{out}: exists; use --force to replace it")
    reader = open_input(Path(data), model.features, batch_size, days)
    check_out_is_not_input(out, Path(data), getattr(reader, "files", ()))
    _check_input_id_maps(model, Path(data), reader)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = batches = 0
    try:
        with pq.ParquetWriter(staging, OUTPUT_SCHEMA) as writer:
            for batch in reader:
                scores = model.predict(batch)
                items = batch.sparse["item_id"].values()
                writer.write_table(pa.table({
                    "request_id": pa.array(batch.request_ids.numpy(), pa.int64()),
                    "item_id": pa.array(items.numpy(), pa.int64()),
                    "score": pa.array(scores.to(torch.float32).numpy(), pa.float32()),
                }, schema=OUTPUT_SCHEMA))
                rows += len(batch)
                batches += 1
        os.replace(staging, out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return PredictStats(rows, batches, len(getattr(reader, "files", [])), time.perf_counter() - t0)


def iter_scores(model: Any, data: Path, batch_size: int = 4096,
                days: Sequence[int] = ()) -> Iterator[tuple[Batch, Any]]:
    """``(batch, scores)`` of every batch of ``data`` (the streaming core of :func:`predict_to_parquet`)."""
    reader = open_input(Path(data), model.features, batch_size, days)
    _check_input_id_maps(model, Path(data), reader)
    for batch in reader:
        yield batch, model.predict(batch)
