"""Streaming Parquet search logs -> :class:`cdp_rec.data.schema.Batch`.

The reader holds at most one row group plus one partial batch in memory: it opens one
file at a time, reads one row group at a time, validates it, converts it to numpy with
columnar (never per-row) operations and cuts fixed-size batches, carrying leftover rows
into the next row group or file. Nothing is cached, so memory does not grow with the
number of files or days.

Every problem with the data is a :class:`DataError` that names the file and, where it
applies, the row group, the column, how many values are bad and the first bad row and
value. Bad rows are never dropped or repaired: a silently shrinking data set is worse
than a crash at step 0.

This reads the per-row layout; :mod:`cdp_rec.data.joined` reads the joined one with the
same validation helpers and batching (its reader subclasses :class:`ParquetBatchReader`),
and :func:`cdp_rec.data.joined.open_reader` picks by ``data.layout``.

Request-level deduplication (``dedup_requests``, ``data.dedup_requests``): the 4-12
impressions of a request are consecutive rows that carry the same history. A row whose
``request_id`` equals the previous row's and whose history is identical to it (checked,
never assumed: an imported request spans several timestamps, so its histories may
differ) keeps no copy of it; ``Batch.history_row`` points every row at the row that holds
its history. The KJT keeps its keys and its stride ``B`` (so every EmbeddingBagCollection,
DistributedModelParallel and the training pipeline take it unchanged); the history
features just have empty bags at the rows that share. See :func:`share_histories` and
:func:`expand_histories`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cdp_rec.config import FeatureConfig, table_size_fields
from cdp_rec.data.schema import (
    HIST_CATEGORIES,
    HIST_ITEMS,
    ID_FEATURES,
    RAW_ID_RESERVED,
    Batch,
    day_dir_name,
    id_ranges,
    is_sequence_feature,
    table_schema,
)
from cdp_rec.data.spec import DATASET_SPEC_FILE, MODEL_SIDE_FEATURE_KEYS


class DataError(ValueError):
    """The data on disk is missing, malformed or inconsistent with the feature spec."""


# --------------------------------------------------------------------------- files


log = logging.getLogger(__name__)

DAY_FILE_PATTERN = "part-*.parquet"


def is_ignored_name(name: str) -> bool:
    """Entries of a day directory that are never data: hidden or bookkeeping names
    (``.``/``_`` prefix, e.g. Spark's ``_SUCCESS`` and ``.part-0.parquet.crc``) and
    unfinished writes (``.tmp`` suffix, e.g. the generator's ``part-0.parquet.tmp``)."""
    return name.startswith((".", "_")) or name.endswith(".tmp")


def check_data_root(root: str | Path) -> None:
    """DataError unless ``root`` is a directory (distinguishing a file from a missing path)."""
    root = Path(root)
    if root.is_dir():
        return
    if root.exists():
        raise DataError(f"{root}: data root is a file, not a directory")
    raise DataError(f"{root}: data root not found")


def list_day_files(root: str | Path, day: int, allow_empty: bool = False) -> list[Path]:
    """Sorted ``part-*.parquet`` files of ``<root>/day=NN``.

    DataError if the directory is missing, holds no ``part-*.parquet`` file, holds any
    other entry (a Parquet file under another name would be silently left out; names
    :func:`is_ignored_name` accepts are skipped), or — unless ``allow_empty``
    (``data.allow_empty_days``), then a warning — its files hold 0 rows in all. Only the
    footers are read, and only until a file with rows is found.
    """
    day_dir = Path(root) / day_dir_name(day)
    if not day_dir.is_dir():
        if day_dir.exists():
            raise DataError(f"{day_dir}: is a file, not a day directory")
        raise DataError(f"{day_dir}: day directory not found")
    files = sorted(day_dir.glob(DAY_FILE_PATTERN))
    refuse_stray_entries(day_dir, {f.name for f in files}, lambda n: f"not named {DAY_FILE_PATTERN}")
    if not files:
        raise DataError(f"{day_dir}: no {DAY_FILE_PATTERN} files")
    check_day_has_rows(day_dir, files, allow_empty, "file")
    check_day_rows_match_spec(Path(root), day, day_dir, files)
    return files


def expected_day_rows(spec: dict[str, Any], day: int) -> int | None:
    """The rows day ``day`` holds by the data set's spec (rows layout), or None when it does not say:
    the generator writes ``data.samples_per_day`` a day, the importer records each day's rows."""
    if spec.get("generator") == "cdp_rec.data.synthetic" and isinstance(spec.get("data"), dict) \
            and spec["data"].get("layout", "rows") == "rows" and isinstance(spec["data"].get("samples_per_day"), int):
        return spec["data"]["samples_per_day"]
    stats = spec.get("day_stats")
    if isinstance(stats, list):
        for entry in stats:
            if isinstance(entry, dict) and entry.get("day") == day and isinstance(entry.get("rows"), int):
                return entry["rows"]
    return None


def check_day_rows_match_spec(root: Path, day: int, day_dir: Path, files: Sequence[Path]) -> None:
    """The day's files hold the rows ``_dataset.json`` says they do (footers only): a part file
    copied in twice, left over from an earlier write or missing is refused, not trained on."""
    spec = read_json_file(root / DATASET_SPEC_FILE, "data set spec")
    want = None if spec is None else expected_day_rows(spec, day)
    if want is None:
        return
    have = sum(_num_rows(f) for f in files)
    if have and have != want:  # an empty day is data.allow_empty_days' business (check_day_has_rows)
        raise DataError(f"{day_dir}: its {len(files)} file(s) hold {have:,} rows, {root / DATASET_SPEC_FILE} says "
                        f"{want:,}: a part file copied in, left over or missing? (rewrite the day: gen-data / import)")


def refuse_stray_entries(day_dir: Path, data_names: set[str], not_data: Callable[[int], str]) -> None:
    """DataError naming every entry of ``day_dir`` that is not one of ``data_names`` (and
    not a name :func:`is_ignored_name` skips): a reader would silently leave it out.
    ``not_data(n)`` words what the ``n`` entries are not, for the message."""
    stray = sorted(p.name for p in day_dir.iterdir() if p.name not in data_names and not is_ignored_name(p.name))
    if stray:
        shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise DataError(
            f"{day_dir}: {len(stray)} entr{'y' if len(stray) == 1 else 'ies'} {not_data(len(stray))} would be "
            f"ignored: {shown}; rename or move them (names starting with '.' or '_' or ending in .tmp are skipped)"
        )


def check_day_has_rows(day_dir: Path, files: Sequence[Path], allow_empty: bool, noun: str) -> None:
    """A day whose ``files`` hold 0 rows in all: DataError, or with ``allow_empty``
    (``data.allow_empty_days``) a warning. Only footers are read, until a file has rows."""
    if not any(_num_rows(f) for f in files):
        message = f"{day_dir}: {day_dir.name} has 0 rows in its {len(files)} {noun}(s)"
        if not allow_empty:
            raise DataError(f"{message}; set data.allow_empty_days=true to skip empty days")
        log.warning("%s; skipped (data.allow_empty_days)", message)


def dataset_files(root: str | Path, days: Sequence[int], allow_empty: bool = False) -> list[Path]:
    """:func:`list_day_files` of every day in ``days``, concatenated in that order."""
    return [f for day in days for f in list_day_files(root, day, allow_empty)]


def _num_rows(path: Path) -> int:
    with _open(path) as pf:
        return pf.metadata.num_rows


def read_json_file(path: Path, what: str) -> dict[str, Any] | None:
    """A data set's JSON side file (a JSON object), or None when it does not exist;
    a one-line DataError naming the file when it is unreadable or not an object."""
    if not path.exists():
        return None
    if not path.is_file():
        raise DataError(f"{path}: cannot read {what}: not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: cannot read {what}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what}: {' '.join(str(e).split())}") from e
    except RecursionError as e:  # nested deeper than the parser's stack: not a spec, and not a traceback
        raise DataError(f"{path}: cannot read {what}: JSON nested too deeply") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: cannot read {what}: expected a JSON object, got {type(data).__name__}")
    return data


def check_dataset_spec(
    root: str | Path, features: FeatureConfig, seed: int | None = None
) -> dict[str, Any] | None:
    """Compare ``<root>/_dataset.json`` (written by the synthetic generator) with the config.

    Returns the parsed spec, or None when the file does not exist (real logs carry no
    spec; the per-row-group validation still applies). Raises DataError naming the first
    mismatching key, e.g. a data set generated for another vocabulary or seed.
    """
    if Path(root).exists():
        check_data_root(root)  # a file: say so, rather than "not found" further down
    path = Path(root) / DATASET_SPEC_FILE
    spec = read_json_file(path, "data set spec")
    if spec is None:
        return None
    want = json.loads(json.dumps(asdict(features)))  # tuples/ints as JSON would store them
    have = spec.get("features", {})
    if not isinstance(have, dict):
        raise DataError(f"{path}: 'features' must be a JSON object, got {type(have).__name__}")
    # How ids become rows is the model's business, not the data's (the loader checks the ids).
    want = {k: v for k, v in want.items() if k not in MODEL_SIDE_FEATURE_KEYS}
    have = {k: v for k, v in have.items() if k not in MODEL_SIDE_FEATURE_KEYS}
    # A hash / managed table's size is its row count, free to differ from the data's vocabulary.
    sizes = table_size_fields(features)
    for table, kind in getattr(features, "id_mapping", {}).items():
        if kind == "dense" or table not in sizes:
            continue
        key, *col = sizes[table][0].split(".")[1:]  # "features.num_items" / "features.context_features.hour"
        for d in (want, have):
            if not col:
                d.pop(key, None)
            elif isinstance(d.get(key), dict) and col[0] in d[key]:
                d[key] = {**d[key], col[0]: "(row count of a raw-id table)"}
    for key in sorted(set(want) | set(have)):
        if have.get(key) != want.get(key):
            raise DataError(
                f"{path}: features.{key} is {have.get(key)!r} in the data set but "
                f"{want.get(key)!r} in the config; regenerate the data or fix the config"
            )
    if seed is not None and spec.get("seed") != seed:
        raise DataError(f"{path}: seed is {spec.get('seed')!r} in the data set but {seed} in the config")
    return spec


# --------------------------------------------------------------------------- columns


@dataclass
class _Columns:
    """A block of rows in numpy form, cheap to slice.

    ``single`` maps each single-valued column to ``[n]`` int64 (label: int8); both
    history columns share ``offsets`` ``[n + 1]`` starting at 0 (their lengths were
    checked equal), ``hist_items`` / ``hist_cats`` are the ``[offsets[-1]]`` flat values.
    Slices are numpy views; only a batch that spans two blocks is copied.
    """

    single: dict[str, np.ndarray]
    offsets: np.ndarray
    hist_items: np.ndarray
    hist_cats: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def slice(self, start: int, stop: int) -> "_Columns":
        offsets = self.offsets[start : stop + 1]
        lo, hi = int(offsets[0]), int(offsets[-1])
        return _Columns(
            single={k: v[start:stop] for k, v in self.single.items()},
            offsets=offsets - lo,
            hist_items=self.hist_items[lo:hi],
            hist_cats=self.hist_cats[lo:hi],
        )

    @staticmethod
    def concat(a: "_Columns", b: "_Columns") -> "_Columns":
        return _Columns(
            single={k: np.concatenate([a.single[k], b.single[k]]) for k in a.single},
            offsets=np.concatenate([a.offsets, b.offsets[1:] + a.offsets[-1]]),
            hist_items=np.concatenate([a.hist_items, b.hist_items]),
            hist_cats=np.concatenate([a.hist_cats, b.hist_cats]),
        )


# --------------------------------------------------------------------------- reader


class ParquetBatchReader:
    """Iterate fixed-size :class:`Batch` es over Parquet files, one row group at a time.

    Args:
        files: Parquet files in reading order (e.g. :func:`dataset_files`).
        features: the feature spec the files must satisfy.
        batch_size: rows per batch ``B``; batches span row group and file boundaries.
        rank, world_size: this reader takes ``files[rank::world_size]``, so ranks read
            disjoint files. Ranks may then get different numbers of batches; a
            distributed loop must agree on a common step count.
        drop_last: drop the final batch if it has fewer than ``B`` rows.
        dedup_requests: emit each shared history once per batch (module docstring).

    Each iteration re-reads the files from the start (one pass per ``iter()``).
    """

    def __init__(
        self,
        files: Sequence[Path],
        features: FeatureConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        dedup_requests: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.files: list[Path] = [Path(f) for f in files][rank::world_size]
        self.features = features
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.dedup_requests = dedup_requests
        self._schema = table_schema(features)
        self._ranges = id_ranges(features)
        self._single_cols = [f.name for f in self._schema if not pa.types.is_list(f.type)]
        self._keys = [*ID_FEATURES, *features.context_features, *features.scene_features]

    def num_rows(self) -> int:
        """Rows in this rank's files, from the Parquet footers (no data is read)."""
        total = 0
        for path in self.files:
            with _open(path) as pf:
                total += pf.metadata.num_rows
        return total

    def num_batches(self) -> int:
        """Batches one pass yields (honours ``drop_last``)."""
        rows = self.num_rows()
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        B = self.batch_size
        carry: _Columns | None = None
        for block in self._blocks():
            start = 0
            if carry is not None:
                need = B - len(carry)
                if len(block) < need:
                    carry = _Columns.concat(carry, block)
                    continue
                yield self._to_batch(_Columns.concat(carry, block.slice(0, need)))
                carry, start = None, need
            while len(block) - start >= B:
                yield self._to_batch(block.slice(start, start + B))
                start += B
            if start < len(block):
                carry = block.slice(start, len(block))
        if carry is not None and len(carry) > 0 and not self.drop_last:
            yield self._to_batch(carry)
        release_unused_memory()

    # ------------------------------------------------------------------ reading

    def _blocks(self) -> Iterator[_Columns]:
        """Validated row groups of all files, in order."""
        names = self._schema.names
        for path in self.files:
            with _open(path) as pf:
                self._check_schema(path, pf.schema_arrow)
                for where, table in row_groups(pf, path, names):
                    if table.num_rows:
                        yield self._convert(where, table)

    def _check_schema(self, path: Path, schema: pa.Schema) -> None:
        check_schema(path, schema, self._schema)

    def _convert_single(self, where: str, table: pa.Table) -> dict[str, np.ndarray]:
        """Validate the single-valued columns of one row group: name -> ``[n]`` numpy."""
        single: dict[str, np.ndarray] = {}
        for name in self._single_cols:
            col = table.column(name)
            _check_no_nulls(where, name, col)
            values = col.to_numpy()
            if name == "label":
                _check_bad(where, name, (values != 0) & (values != 1), values, "value(s) not in {0, 1}")
            elif name in self._ranges:
                _check_range(where, name, values, self._ranges[name])
            single[name] = values
        if "label" in single:  # labelled rows feed GAUC; scoring input (no label column) just passes ids through
            _check_requests_of_one_user(where, single["request_id"], single["user_id"])
        return single

    def _convert(self, where: str, table: pa.Table) -> _Columns:
        """Validate one row group and turn it into numpy arrays (no per-row Python)."""
        n = table.num_rows
        max_len = self.features.max_seq_len
        single = self._convert_single(where, table)

        lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in (HIST_ITEMS, HIST_CATEGORIES):
            col = table.column(name)
            _check_no_nulls(where, name, col)
            arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
            lengths = pc.list_value_length(arr).to_numpy()
            flat = pc.list_flatten(arr)
            if flat.null_count:
                first = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
                row = _row_of(lengths, first)
                raise DataError(
                    f"{where}: column '{name}': {flat.null_count} null element(s) inside lists, "
                    f"first at row {row} of the row group"
                )
            values = flat.to_numpy()
            _check_bad(where, name, lengths > max_len, lengths,
                       f"list(s) longer than max_seq_len={max_len}", what="length")
            upper = self._ranges[name]
            bad = (values == RAW_ID_RESERVED) if upper is None else (values < 0) | (values >= upper)
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{where}: column '{name}': {int(bad.sum())} {_range_problem(name, upper)}, first at row "
                    f"{_row_of(lengths, first)} of the row group: {values[first]}"
                )
            lists[name] = (lengths, values)

        item_len, cat_len = lists[HIST_ITEMS][0], lists[HIST_CATEGORIES][0]
        diff = item_len != cat_len
        if diff.any():
            r = int(np.flatnonzero(diff)[0])
            raise DataError(
                f"{where}: column '{HIST_CATEGORIES}': {int(diff.sum())} row(s) whose length differs "
                f"from '{HIST_ITEMS}', first at row {r} of the row group: {cat_len[r]} vs {item_len[r]}"
            )
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(item_len, out=offsets[1:])
        return _Columns(single, offsets, lists[HIST_ITEMS][1], lists[HIST_CATEGORIES][1])

    def _to_batch(self, cols: _Columns) -> Batch:
        """``_Columns`` of ``B`` rows -> Batch (KJT values key-major, as torchrec expects)."""
        B = len(cols)
        hist_len = np.diff(cols.offsets)
        history_row = None
        items, cats = [cols.hist_items], [cols.hist_cats]
        if self.dedup_requests:
            rows = shared_history_rows(cols.single["request_id"], cols.offsets, cols.hist_items, cols.hist_cats)
            if (rows != np.arange(B)).any():
                history_row = torch.from_numpy(rows)
                ranges = _own_history_ranges(rows, cols.offsets)
                items = [cols.hist_items[lo:hi] for lo, hi in ranges]
                cats = [cols.hist_cats[lo:hi] for lo, hi in ranges]
                hist_len = np.where(rows == np.arange(B), hist_len, 0)
        values = np.concatenate(
            [cols.single[k] for k in self._keys] + items + cats
        ).astype(np.int64, copy=False)
        lengths = np.concatenate(
            [np.ones(B * len(self._keys), dtype=np.int64), hist_len, hist_len]
        )
        sparse = KeyedJaggedTensor(
            keys=[*self._keys, HIST_ITEMS, HIST_CATEGORIES],
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths),
        )
        return Batch(
            sparse=sparse,
            labels=torch.from_numpy(cols.single["label"].astype(np.float32)),
            # Copies: Arrow-backed arrays are read-only, and torch wants writable memory.
            user_ids=torch.from_numpy(np.array(cols.single["user_id"], dtype=np.int64)),
            request_ids=torch.from_numpy(np.array(cols.single["request_id"], dtype=np.int64)),
            history_row=history_row,
        )


# --------------------------------------------------------------------------- request-level deduplication


def shared_history_rows(
    request_ids: np.ndarray, offsets: np.ndarray, hist_items: np.ndarray, hist_cats: np.ndarray
) -> np.ndarray:
    """``[B]`` int64: the row whose history each row can share (itself when none).

    Row ``b`` shares row ``b - 1``'s history (and so that row's own) when both have the
    same ``request_id`` and identical ``hist_item_ids`` and ``hist_category_ids``; anything
    else keeps its own. Args: ``[B]`` request ids, ``[B + 1]`` history offsets from 0, the
    ``[N]`` flat history values.

    A run of consecutive rows of one request with equal lengths ``L`` is one block of the
    flat values; the block without its first row equals the block without its last exactly
    when every row equals the one before, so one comparison of two slices per run and
    column checks it (row by row only when that fails). No ``[N]`` temporary is built.
    """
    n = len(request_ids)
    lengths = np.diff(offsets)
    same = np.zeros(n, dtype=bool)
    if n > 1:
        same[1:] = (request_ids[1:] == request_ids[:-1]) & (lengths[1:] == lengths[:-1])
    cand = np.flatnonzero(same)
    if cand.size:
        cut = np.flatnonzero(np.diff(cand) != 1) + 1
        for run in np.split(cand, cut):  # rows run[0] - 1 .. run[-1], one request, equal lengths
            a, e = int(run[0]), int(run[-1]) + 1
            width = int(lengths[a])
            lo, hi = int(offsets[a - 1]), int(offsets[e])
            if width == 0:
                continue
            for flat in (hist_items, hist_cats):
                if not np.array_equal(flat[lo + width:hi], flat[lo:hi - width]):
                    block = flat[lo:hi].reshape(e - a + 1, width)
                    same[a:e] &= (block[1:] == block[:-1]).all(axis=1)
    own = np.where(same, 0, np.arange(n, dtype=np.int64))
    return np.maximum.accumulate(own) if n else own


def _own_history_ranges(rows: np.ndarray, offsets: np.ndarray) -> list[tuple[int, int]]:
    """Flat ``[lo, hi)`` ranges of the histories the rows keep (``rows[b] == b``), merged where adjacent."""
    keep = np.flatnonzero(rows == np.arange(len(rows)))
    if not keep.size:
        return []
    cut = np.flatnonzero(np.diff(keep) != 1) + 1
    return [(int(offsets[r[0]]), int(offsets[r[-1] + 1])) for r in np.split(keep, cut)]


def share_histories(batch: Batch) -> Batch:
    """``batch`` (every row with its own history) in the deduplicated form the reader emits
    with ``dedup_requests``: rows sharing a request's identical history keep one copy and
    ``history_row`` points to it. For batches built outside the reader (benchmarks, tests)."""
    if batch.history_row is not None:
        return batch
    kjt = batch.sparse
    jt = kjt.to_dict()
    hist_lengths = jt[HIST_ITEMS].lengths().to(torch.int64)
    offsets = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(hist_lengths.numpy(), out=offsets[1:])
    rows = shared_history_rows(batch.request_ids.numpy(), offsets, jt[HIST_ITEMS].values().numpy(),
                               jt[HIST_CATEGORIES].values().numpy())
    if (rows == np.arange(len(batch))).all():
        return batch
    own = torch.from_numpy(rows == np.arange(len(batch)))
    ranges = _own_history_ranges(rows, offsets)
    values, lengths = [], []
    for key in kjt.keys():
        v, n = jt[key].values(), jt[key].lengths().to(torch.int64)
        if key in (HIST_ITEMS, HIST_CATEGORIES):
            v = torch.cat([v[lo:hi] for lo, hi in ranges]) if ranges else v[:0]
            n = torch.where(own, n, torch.zeros_like(n))
        values.append(v)
        lengths.append(n)
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths))
    return dataclasses.replace(batch, sparse=sparse, history_row=torch.from_numpy(rows))


def expand_histories(batch: Batch) -> Batch:
    """``batch`` with every row holding its own history again (``history_row`` None).

    The jagged sequence features (``hist_*``, ``seq_*``) of row ``b`` become those of row
    ``history_row[b]``; the rest is unchanged. For models that read per-row histories.
    """
    if batch.history_row is None:
        return batch
    kjt = batch.sparse
    src = batch.history_row.to(torch.int64)
    values, lengths = [], []
    for key, jt in kjt.to_dict().items():
        v, n = jt.values(), jt.lengths().to(torch.int64)
        if is_sequence_feature(key):
            n, v = gather_bags(n, src, v)
        values.append(v)
        lengths.append(n)
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths))
    return dataclasses.replace(batch, sparse=sparse, history_row=None)


def gather_bags(lengths: torch.Tensor, rows: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Jagged bags ``rows`` (``[K]`` int64, repeats allowed) of jagged ``values`` (``[N]`` each,
    one ``lengths`` ``[B]``): ``(new_lengths [K], *new_values)``, bag ``i`` = input bag ``rows[i]``."""
    lengths = lengths.to(torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    new_lengths = lengths[rows]
    total = int(new_lengths.sum())
    new_starts = torch.cumsum(new_lengths, 0) - new_lengths
    # position j of new bag i reads old position starts[rows[i]] + j
    index = torch.repeat_interleave(starts[rows] - new_starts, new_lengths, output_size=total)
    index += torch.arange(total, dtype=torch.int64, device=index.device)
    return (new_lengths, *(v.index_select(0, index) for v in values))


# --------------------------------------------------------------------------- validation


def check_schema(path: Path, schema: pa.Schema, expected: pa.Schema) -> None:
    """DataError naming ``path`` and the column unless ``schema`` has every column of
    ``expected`` exactly once with its type (list columns: any list of the value type;
    nullability and extra columns are not checked here)."""
    for field in expected:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            if field.name in schema.names:  # duplicated name: ambiguous
                raise DataError(f"{path}: column '{field.name}' appears more than once")
            raise DataError(
                f"{path}: column '{field.name}' is missing (file has columns {schema.names})"
            )
        got = schema.field(idx).type
        ok = (
            pa.types.is_list(got) and got.value_type == field.type.value_type
            if pa.types.is_list(field.type)
            else got == field.type
        )
        if not ok:
            raise DataError(f"{path}: column '{field.name}' has type {got}, expected {field.type}")


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def release_unused_memory() -> None:
    """Hand freed reader buffers back to the OS (called at the end of every pass).

    Nothing stays live between passes, but pyarrow's pool (mimalloc) and glibc's heap
    keep freed row-group buffers for reuse: without this, RSS crept up ~6% from day 1 to
    day 8 of streaming (bench/loader.py), and a 60-day run would look like a leak.
    """
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def row_groups(pf: pq.ParquetFile, path: Path, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
    """``(where, table)`` for each row group of ``pf``, ``where`` naming file and row group."""
    for rg in range(pf.num_row_groups):
        where = f"{path}: row group {rg}"
        try:
            table = pf.read_row_group(rg, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{where}: cannot read: {e}") from e
        yield where, table


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e


def _row_of(lengths: np.ndarray, flat_index: int) -> int:
    """Row that holds element ``flat_index`` of the flattened lists."""
    ends = np.cumsum(lengths)
    return int(np.searchsorted(ends, flat_index, side="right"))


def _check_no_nulls(where: str, name: str, col: pa.ChunkedArray) -> None:
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{where}: column '{name}': {col.null_count} null value(s), first at row {first} of the row group"
        )


def _check_bad(
    where: str, name: str, bad: np.ndarray, values: np.ndarray, message: str, what: str = ""
) -> None:
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        label = f"{what} " if what else ""
        raise DataError(
            f"{where}: column '{name}': {int(bad.sum())} {message}, first at row {first} of the "
            f"row group: {label}{values[first]}"
        )


def requests_shared_by_users(request_ids: np.ndarray, user_ids: np.ndarray) -> np.ndarray:
    """The request ids (ascending, unique) that ``[n]`` rows give to more than one user."""
    order = np.lexsort((user_ids, request_ids))
    req, users = request_ids[order], user_ids[order]
    return np.unique(req[1:][(req[1:] == req[:-1]) & (users[1:] != users[:-1])])


def _check_requests_of_one_user(where: str, request_ids: np.ndarray, user_ids: np.ndarray) -> None:
    """DataError if a ``request_id`` of the row group is shared by several users.

    A request is one user's search: GAUC groups impressions by ``request_id`` alone, so
    ids reused across users (a log's per-user request or session counter) would silently
    merge different users' requests into one group (checked within each row group).
    """
    shared_ids = requests_shared_by_users(request_ids, user_ids)
    if shared_ids.size:
        rid = shared_ids[0]
        rows = np.flatnonzero(request_ids == rid)
        shared = shared_ids.size
        first_users = list(dict.fromkeys(int(u) for u in user_ids[rows]))[:3]
        raise DataError(
            f"{where}: column 'request_id': {shared} request id(s) shared by several users, first {rid} "
            f"(rows {int(rows[0])} and {int(rows[np.flatnonzero(user_ids[rows] != user_ids[rows[0]])[0]])} of the "
            f"row group, users {', '.join(map(str, first_users))}): a request is one user's, and GAUC groups by "
            f"request_id; make the ids unique across users (e.g. number the (user, request) pairs)"
        )


def _range_problem(name: str, upper: int | None) -> str:
    if upper is None:
        return (f"value(s) equal to {RAW_ID_RESERVED} (2**63 - 1), the one int64 a raw-id column may not hold "
                f"(TorchRec's empty-slot marker)")
    return f"value(s) out of range [0, {upper})"


def _check_range(where: str, name: str, values: np.ndarray, upper: int | None) -> None:
    """Dense column: ids in ``[0, upper)``; raw-id column (``upper`` None): any int64 but
    :data:`~cdp_rec.data.schema.RAW_ID_RESERVED`."""
    bad = (values == RAW_ID_RESERVED) if upper is None else (values < 0) | (values >= upper)
    _check_bad(where, name, bad, values, _range_problem(name, upper))
