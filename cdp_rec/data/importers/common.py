"""The import pipeline shared by every format: normalised events -> training data set.

A format module (:mod:`.taobao`, :mod:`.movielens`, :mod:`.events`) turns its files into
a stream of :class:`EventBatch` es (raw ids as int64, unix-second timestamps, the event
type or numeric value, optional query / request / context / scene columns) and
validates them; everything after that is here.

Passes (memory is bounded by one user bucket, never the whole log)
    1. *scan*: stream the input in blocks; validate; evaluate the label / history /
       impression rules; collect the exact distinct ids of every id column (the
       vocabularies: they must fit in memory anyway, as embedding tables), positive
       counts per item and each item's first-seen category; append fixed-width records
       to ``S`` temporary bucket files by ``fmix64(raw user) mod S``.
    2. *rebucket*: one temp bucket at a time, ids -> dense (rank among the sorted
       distinct raw ids), records re-appended to ``N`` files by ``fmix64(output user) mod
       N``: the joined layout's bucket of the id the data set stores.
    3. *join*: one bucket at a time, sort by (user, ts, log order), cut days, requests,
       histories and sampled negatives, and write the bucket's share of every day.

Semantics (documented in the spec the import writes)
    * Rules: ``--positive`` is ``"NAME OP NUMBER"`` on the numeric column (``rating>=4``)
      or a list of event types (``buy,cart,fav``) or ``all``; ``--history`` (which
      events enter histories) is a rule, ``positive`` (default) or ``all``;
      ``--impressions`` (which events are candidate impressions) likewise, default all.
    * Without sampled negatives every impression event is a row labelled by the rule.
      With ``--negatives K`` the rows are the *positive* impression events plus ``K``
      sampled items each (label 0, same user / request / ts / context / history); a
      negative is never an item the user has a positive event with on the same calendar
      day (in ``--tz``), draws are seeded by ``(seed, bucket)``.
    * History of a row at ``ts``: the user's last ``max_seq_len`` history events with
      event ts strictly before ``ts``, oldest first; equal timestamps keep log order
      (file order, then line order). A history may reach back before day 0.
    * Requests (GAUC groups): a user's impressions of one day whose consecutive gaps are
      at most ``--session-gap`` seconds, unless the log has a request column;
      ``request_id`` is the log position of the request's first impression.
    * Days: calendar days in ``--tz``; ``--train-days N --test-days M`` are the last
      ``N + M`` days of the log, earlier events only feed histories. ``--split
      last-fraction``: each user's last ``--test-fraction`` of impression events (by
      ``(ts, log order)``, ``floor(f * n)`` of ``n``) is day 1 (test), the rest day 0.
    * Ids: string ids hash to ``fnv1a64`` of the UTF-8 bytes, then MurmurHash3's
      ``fmix64``, top bit cleared (a non-negative int64; the same on every machine).
      ``remap`` (default) stores dense ids ``0..n-1`` in raw-id order and writes the
      mapping to ``ids/<column>.parquet``; ``--raw-ids`` stores the raw ids.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from cdp_rec.config import FeatureConfig, JobConfig
from cdp_rec.data import joined as J
from cdp_rec.data.hashing import fmix64
from cdp_rec.data.id_maps import mapping_sha256, with_id_maps
from cdp_rec.data.loader import DataError, requests_shared_by_users
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, day_dir_name, table_schema
from cdp_rec.data import spec as spec_module
from cdp_rec.data.spec import write_dataset_spec
from cdp_rec.data.writer import Behaviours

IMPORTER_VERSION = 1
ID_HASH = "fnv1a64-fmix64-63bit"
SECONDS_PER_DAY = 86_400
FRAGMENT_FILE = "train.yaml"
ARGS_FILE = "train_args"
IDS_DIR = "ids"
TMP_DIR = "_import_tmp"
SAMPLERS = ("popularity", "uniform", "category", "category-popularity")
# Flags of a record.
F_POS, F_HIST, F_IMP = 1, 2, 4
_REDRAW_ROUNDS = 32
_MASK63 = np.uint64((1 << 63) - 1)


# --------------------------------------------------------------------------- hashing


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``[n]`` int64 stable ids of strings: fnv1a64(UTF-8 bytes) -> fmix64 -> top bit cleared.

    Vectorised over byte positions (longest strings first), so the cost is the total
    number of bytes, not a Python call per string. Nulls must have been rejected.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    if n:
        order = np.argsort(-lengths, kind="stable")
        sorted_len = lengths[order]
        starts = offsets[:-1][order]
        hs = h[order]
        for j in range(int(sorted_len[0]) if n else 0):
            k = int(np.searchsorted(-sorted_len, -j, side="left"))  # strings longer than j
            hs[:k] ^= data[starts[:k] + j].astype(np.uint64)
            hs[:k] *= prime
        h[order] = hs
    return (fmix64(h) & _MASK63).astype(np.int64)


def user_bucket(ids: np.ndarray, n: int) -> np.ndarray:
    """The joined layout's bucket (``fmix64(uint64(id)) mod n``)."""
    return J.user_bucket(ids, n)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """Which events a rule selects: ``all``, event types, or ``value OP threshold``."""

    text: str
    kind: str  # "all" | "types" | "value" | "positive"
    types: tuple[str, ...] = ()
    op: str = ""
    threshold: float = 0.0

    def needs_event(self) -> bool:
        return self.kind == "types"

    def select(self, etype: pa.Array | None, value: np.ndarray | None, pos: np.ndarray | None, n: int) -> np.ndarray:
        if self.kind == "all":
            return np.ones(n, dtype=bool)
        if self.kind == "positive":
            assert pos is not None
            return pos
        if self.kind == "types":
            assert etype is not None
            return pc.is_in(etype, value_set=pa.array(list(self.types), pa.string())).to_numpy(zero_copy_only=False)
        assert value is not None
        return _OPS[self.op](value, self.threshold)


_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    ">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less, "==": np.equal, "!=": np.not_equal,
}
_RULE_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


def parse_rule(text: str, what: str, value_names: tuple[str, ...], has_event: bool, allow_positive: bool = False) -> Rule:
    """``--positive`` / ``--history`` / ``--impressions`` text -> :class:`Rule` (DataError naming the flag)."""
    t = text.strip()
    if t == "all":
        return Rule(t, "all")
    if t == "positive" and allow_positive:
        return Rule(t, "positive")
    m = _RULE_RE.match(t)
    if m:
        name, op, num = m.groups()
        if not value_names:
            raise DataError(f"--{what} {text!r}: this log has no numeric value column to compare")
        if name not in value_names:
            raise DataError(f"--{what} {text!r}: unknown column {name!r} (the value column is {value_names[0]!r})")
        return Rule(t, "value", op=op, threshold=float(num))
    types = tuple(s.strip() for s in t.split(",") if s.strip())
    if not types or any(not re.fullmatch(r"[^\s<>=!]+", s) for s in types):
        raise DataError(f"--{what} {text!r}: expected 'all', event types 'a,b' or a comparison like 'rating>=4'")
    if not has_event:
        raise DataError(f"--{what} {text!r}: names event types but this log has no event type column")
    return Rule(t, "types", types=types)


# --------------------------------------------------------------------------- events


@dataclass
class EventBatch:
    """One block of validated events, ``[n]`` each. ``locate(i)`` names file and line of row ``i``."""

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    ts: np.ndarray
    locate: Callable[[int], str]
    etype: pa.Array | None = None  # strings
    value: np.ndarray | None = None  # float64
    query: np.ndarray | None = None
    request: np.ndarray | None = None
    context: dict[str, np.ndarray] = field(default_factory=dict)
    scene: dict[str, np.ndarray] = field(default_factory=dict)
    # Roles whose ids are hashed strings -> (hashes, strings) of the block's distinct values.
    strings: dict[str, tuple[np.ndarray, pa.Array]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Source:
    """A format's events: what it has and a generator of :class:`EventBatch` es."""

    format: str
    files: list[Path]
    batches: Callable[[], Iterator[EventBatch]]
    has_event: bool = False
    has_value: bool = False
    value_names: tuple[str, ...] = ()
    has_category: bool = True
    has_query: bool = False
    has_request: bool = False
    context_columns: dict[str, str] = field(default_factory=dict)  # feature -> source column
    scene_columns: dict[str, str] = field(default_factory=dict)
    event_types: tuple[str, ...] | None = None  # declared known types (None: any)
    string_roles: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- column parsing


def first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_no_nulls(arr: pa.Array | pa.ChunkedArray, column: str, locate: Callable[[int], str]) -> None:
    if arr.null_count:
        i = first_bad(arr.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{locate(i)}: column '{column}': empty value")


def parse_int(arr: pa.Array | pa.ChunkedArray, column: str, locate: Callable[[int], str], hint: str = "") -> np.ndarray:
    """Integer column (ints or decimal strings) -> ``[n]`` int64; DataError on the first bad value."""
    check_no_nulls(arr, column, locate)
    if pa.types.is_integer(arr.type):
        values = arr.to_numpy(zero_copy_only=False)
        if values.dtype == np.uint64 and len(values) and values.max() > np.uint64(np.iinfo(np.int64).max):
            # A cast would wrap them to negative ids (an id mapping of wrong raw ids).
            i = first_bad(values > np.uint64(np.iinfo(np.int64).max))
            raise DataError(f"{locate(i)}: column '{column}': {int(values[i])} is above the signed 64-bit "
                            f"range of ids{hint}")
        return np.asarray(values, dtype=np.int64)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            return pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ok = pc.match_substring_regex(arr, r"^\s*[-+]?\d+\s*$").to_numpy(zero_copy_only=False)
            if ok.all():  # digits, but some beyond int64 (error path: find the first in Python)
                i = next(k for k, v in enumerate(arr.to_pylist()) if not -2**63 <= int(v) < 2**63)
                raise DataError(f"{locate(i)}: column '{column}': {arr[i].as_py().strip()} is beyond the signed "
                                f"64-bit range of ids{hint}") from None
            i = first_bad(~ok)
            raise DataError(f"{locate(i)}: column '{column}': {arr[i].as_py()!r} is not an integer{hint}") from None
    raise DataError(f"{locate(0)}: column '{column}' has type {arr.type}, expected integers{hint}")


def parse_id(arr: pa.Array | pa.ChunkedArray, column: str, locate: Callable[[int], str], string: bool,
             role: str, strings: dict[str, tuple[np.ndarray, pa.Array]]) -> np.ndarray:
    """An id column: ints pass through, strings (``string=True`` or a string-typed Parquet
    column read with string ids) are hashed; the distinct strings are kept for ``ids/``."""
    check_no_nulls(arr, column, locate)
    is_str = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
    if string:
        if not is_str:
            arr = pc.cast(arr, pa.string())
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        uniq = pc.unique(arr)
        h_uniq = hash_strings(uniq)
        strings[role] = (h_uniq, uniq)
        idx = pc.index_in(arr, value_set=uniq).to_numpy(zero_copy_only=False)
        return h_uniq[idx]
    return parse_int(arr, column, locate,
                     hint=f" (string ids: declare them with --string-ids {role})")


def parse_value(arr: pa.Array | pa.ChunkedArray, column: str, locate: Callable[[int], str]) -> np.ndarray:
    check_no_nulls(arr, column, locate)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        out = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
    else:
        try:
            out = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ok = pc.match_substring_regex(arr, r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
            i = first_bad(~ok.to_numpy(zero_copy_only=False))
            raise DataError(f"{locate(i)}: column '{column}': {arr[i].as_py()!r} is not a number") from None
    bad = ~np.isfinite(out)
    if bad.any():
        raise DataError(f"{locate(first_bad(bad))}: column '{column}': {out[first_bad(bad)]} is not a finite number")
    return out


_TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_TS_LIMIT = 7_258_118_400  # 2200-01-01 00:00:00 UTC, in seconds


def _naive_in_zone(naive: pa.Array | pa.ChunkedArray, tz: str | None) -> pa.Array | pa.ChunkedArray:
    """Zone-less wall-clock timestamps (``timestamp[s]`` without tz) read as local times of
    ``tz`` (a repeated hour: the earlier instant; a skipped one: the first time after it)."""
    if tz is None or tz == "UTC":
        return naive
    try:
        return pc.assume_timezone(naive, tz, ambiguous="earliest", nonexistent="latest")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"--tz {tz!r}: cannot read zone-less timestamps in this zone: {e}") from None


def parse_ts(arr: pa.Array | pa.ChunkedArray, column: str, locate: Callable[[int], str], unit: str = "s",
             tz: str | None = None) -> np.ndarray:
    """Timestamps -> ``[n]`` int64 unix seconds (floor). ``unit``: s / ms / us / ns for integer
    values, ``iso`` for ISO-8601 strings; timestamp-typed columns as is. Zone-less values (ISO
    strings without an offset, Parquet timestamps without a tz) are wall-clock times in ``tz``
    (the import's ``--tz``; None: UTC), like ``2017-05-06 08:00:00`` in a log written in Beijing."""
    check_no_nulls(arr, column, locate)
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        zone = getattr(arr.type, "tz", None)
        arr = pc.cast(arr, pa.timestamp("s", tz=zone))
        if zone is None:
            arr = _naive_in_zone(arr, tz)
        ts = pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
    elif unit == "iso":
        ts = None
        for target in (pa.timestamp("s"), pa.timestamp("s", tz="UTC")):
            try:
                parsed = pc.cast(arr, target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            if target.tz is None:
                parsed = _naive_in_zone(parsed, tz)
            ts = pc.cast(parsed, pa.int64()).to_numpy(zero_copy_only=False)
            break
        if ts is None:
            for i in range(len(arr)):  # error path only: find the first unparsable value
                try:
                    pc.cast(arr.slice(i, 1), pa.timestamp("s", tz="UTC"))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    try:
                        pc.cast(arr.slice(i, 1), pa.timestamp("s"))
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                        raise DataError(f"{locate(i)}: column '{column}': cannot parse {arr[i].as_py()!r} as an "
                                        "ISO-8601 timestamp") from None
            raise DataError(f"{locate(0)}: column '{column}': mixed ISO-8601 timestamps with and without a zone")
    else:
        if unit not in _TS_UNITS:
            raise DataError(f"--ts-unit {unit!r}: expected one of {[*_TS_UNITS, 'iso']}")
        if not pa.types.is_floating(arr.type) and not pa.types.is_integer(arr.type) \
                and bool(pc.all(pc.match_substring_regex(arr, r"^\s*\+?\d+\.\d*\s*$")).as_py()):
            arr = pc.cast(arr, pa.float64())  # decimal strings ("1494623632.0", spreadsheet exports)
        if pa.types.is_floating(arr.type):
            values = arr.to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(values)
            if bad.any():
                i = first_bad(bad)
                raise DataError(f"{locate(i)}: column '{column}': {values[i]} is not a unix timestamp ({unit})")
            ts = np.floor(values / _TS_UNITS[unit]).astype(np.int64)
        else:
            try:
                raw = parse_int(arr, column, locate)
            except DataError as e:
                raise DataError(str(e).replace("is not an integer", f"is not a unix timestamp ({unit})")) from None
            ts = np.floor_divide(raw, _TS_UNITS[unit])
    neg = ts < 0
    if neg.any():
        i = first_bad(neg)
        raise DataError(f"{locate(i)}: column '{column}': negative timestamp {ts[i]}")
    late = ts >= _TS_LIMIT
    if late.any():
        # Calendar days past the year 9999 do not exist; past 2200 is a finer unit read as seconds.
        i = first_bad(late)
        raise DataError(f"{locate(i)}: column '{column}': {arr[i].as_py()} is after 2200-01-01 as a unix "
                        f"timestamp in {unit}: milliseconds or finer? (the events format takes --ts-unit)")
    return ts


def check_types(etype: pa.Array, known: tuple[str, ...], column: str, locate: Callable[[int], str]) -> None:
    check_no_nulls(etype, column, locate)
    ok = pc.is_in(etype, value_set=pa.array(list(known), pa.string())).to_numpy(zero_copy_only=False)
    if not ok.all():
        i = first_bad(~ok)
        raise DataError(f"{locate(i)}: column '{column}': unknown behaviour type {etype[i].as_py()!r} "
                        f"(known: {', '.join(known)})")


# --------------------------------------------------------------------------- CSV streaming


def _text_lines(path: Path, encoding: str) -> Iterator[str]:
    """Lines of a (possibly .gz / .bz2 / .zst compressed) text file, as pyarrow's CSV reader sees it."""
    import io

    with pa.input_stream(str(path), compression="detect") as raw:
        yield from io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="")


def first_line(path: Path, encoding: str = "utf8") -> str:
    """The file's first line as the CSV reader sees it ("" for an empty file)."""
    return next(iter(_text_lines(path, encoding)), "")


def read_header(path: Path, delimiter: str, encoding: str = "utf8") -> list[str]:
    """The header's column names, stripped of spaces and of a UTF-8 byte-order mark (Excel)."""
    import csv

    line = first_line(path, encoding)
    if not line:
        raise DataError(f"{path}: empty file (expected a header line)")
    return [c.strip() for c in next(csv.reader([line.lstrip("\ufeff")], delimiter=delimiter))]


def record_line(path: Path, record: int, delimiter: str, encoding: str = "utf8", quoting: bool = True) -> int:
    """The physical line of CSV record ``record`` (1-based, the reader's count: blank lines are
    skipped and not counted, a quoted field may span lines). Rereads the file up to it: for
    error messages only."""
    import csv

    lines = _text_lines(path, encoding)
    if quoting and len(delimiter) == 1:
        reader = csv.reader(lines, delimiter=delimiter)
        n = 0
        for row in reader:
            n += bool(row)
            if n == record:
                return reader.line_num
        return record
    n = 0
    for k, ln in enumerate(lines, start=1):
        n += bool(ln.rstrip("\r\n"))
        if n == record:
            return k
    return record


def line_locator(path: Path, record0: int, delimiter: str, encoding: str = "utf8",
                 quoting: bool = True) -> Callable[[int], str]:
    """``locate(i)``: "<path>: line N" of the i-th row of a batch whose first row is record ``record0``."""
    return lambda i: f"{path}: line {record_line(path, record0 + i, delimiter, encoding, quoting)}"


def iter_csv(
    path: Path,
    column_names: list[str] | None,
    columns: list[str],
    delimiter: str,
    block_size: int,
    quoting: bool = True,
    encoding: str = "utf8",
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """``(first line number, batch)`` of ``columns`` (as strings) of a CSV file, streaming.

    ``column_names`` None: the file has a header line (which must hold ``columns``).
    Line numbers count records (1-based, the header is line 1); empty lines are skipped by
    the reader and not counted. A malformed line is a DataError naming it.
    """
    import pyarrow.csv as pacsv

    bad: list[Any] = []

    def on_invalid(row: Any) -> str:
        bad.append(row)
        return "error"

    # A header is read here (stripped, BOM removed) and skipped by the reader, so the names the
    # columns are checked against are the names they are read by.
    names = read_header(path, delimiter, encoding) if column_names is None else column_names
    read = pacsv.ReadOptions(column_names=names, skip_rows=int(column_names is None), block_size=block_size,
                             encoding=encoding)
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False,
                               invalid_row_handler=on_invalid)
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, include_columns=columns,
                                   strings_can_be_null=True, quoted_strings_can_be_null=True)
    line = 2 if column_names is None else 1
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield line, batch
            line += batch.num_rows
    except (pa.ArrowInvalid, pa.ArrowKeyError) as e:
        if bad:
            row = bad[0]
            where = f"line {row.number}" if row.number is not None else _find_line(path, row.text, encoding, line)
            raise DataError(f"{path}: {where}: expected {row.expected_columns} fields, got "
                            f"{row.actual_columns}: {row.text[:80]!r}") from None
        raise DataError(f"{path}: cannot read as CSV near line {line}: {e}") from None


def _find_line(path: Path, text: str, encoding: str, start: int) -> str:
    """``line N`` of the first line equal to ``text`` at or after line ``start`` (error path only)."""
    for k, ln in enumerate(_text_lines(path, encoding), start=1):
        if k >= start and ln.rstrip("\r\n") == text:
            return f"line {k}"
    return f"near line {start}"


# --------------------------------------------------------------------------- options


@dataclass
class ImportOptions:
    out: Path
    base: JobConfig = field(default_factory=JobConfig)  # features (context/scene, max_seq_len), file sizes
    layout: str = "rows"
    remap: bool = True
    positive: str | None = None
    history: str = "positive"
    impressions: str = "all"
    negatives: int = 0
    sampler: str = "popularity"
    seed: int = 0
    session_gap: int = 1800
    request_scope: str = "global"  # the log's request ids: global (kept) | user (per-user counters: renumbered)
    tz: str = "UTC"
    split: str = "days"  # days | last-fraction
    train_days: int | None = None
    test_days: int = 1
    test_fraction: float = 0.2
    since: str | None = None  # local date, inclusive
    until: str | None = None  # local date, inclusive
    allow_uneven_days: bool = False  # keep a split whose test day is tiny or whose days are mostly empty
    buckets: int | None = None  # output user buckets (default: ~1M events each, power of 2)
    scan_buckets: int | None = None  # temp buckets of the scan (default: from the input size)
    force: bool = False
    block_size: int = 16 << 20
    verbose: bool = True


@dataclass
class ImportResult:
    out: Path
    spec: dict[str, Any]
    fragment: dict[str, Any]
    overrides: list[str]


# --------------------------------------------------------------------------- distinct-value sets


class _Distinct:
    """Exact distinct int64 values, merged lazily (memory: the distinct values + one pending block)."""

    def __init__(self) -> None:
        self.values = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    def add(self, x: np.ndarray) -> None:
        u = np.unique(x)
        self._pending.append(u)
        self._pending_n += len(u)
        if self._pending_n > max(1 << 22, len(self.values)):
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            self.values = np.unique(np.concatenate([self.values, *self._pending]))
            self._pending, self._pending_n = [], 0

    def final(self) -> np.ndarray:
        self._merge()
        return self.values


class _ItemStats:
    """Per raw item: positive events, the category of its first event (log order) and the
    smallest / largest category it was logged under (they differ: an item of several)."""

    def __init__(self) -> None:
        self.items = np.zeros(0, np.int64)
        self.pos = np.zeros(0, np.int64)
        self.first = np.zeros(0, np.int64)
        self.cat = np.zeros(0, np.int64)
        self.cat_min = np.zeros(0, np.int64)
        self.cat_max = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_n = 0

    def add(self, item: np.ndarray, cat: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> None:
        u, first_idx, inv = np.unique(item, return_index=True, return_inverse=True)
        counts = np.bincount(inv, weights=pos, minlength=len(u)).astype(np.int64)
        lo = np.full(len(u), np.iinfo(np.int64).max)
        hi = np.full(len(u), np.iinfo(np.int64).min)
        np.minimum.at(lo, inv, cat)
        np.maximum.at(hi, inv, cat)
        self._pending.append((u, counts, seq[first_idx], cat[first_idx], lo, hi))
        self._pending_n += len(u)
        if self._pending_n > max(1 << 22, len(self.items)):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        parts = [(self.items, self.pos, self.first, self.cat, self.cat_min, self.cat_max), *self._pending]
        items, pos, first, cat, lo, hi = (np.concatenate(c) for c in zip(*parts))
        order = np.lexsort((first, items))
        items, pos, first, cat, lo, hi = (a[order] for a in (items, pos, first, cat, lo, hi))
        starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]])
        self.items, self.first, self.cat = items[starts], first[starts], cat[starts]
        self.pos = np.add.reduceat(pos, starts) if len(pos) else pos
        self.cat_min = np.minimum.reduceat(lo, starts) if len(lo) else lo
        self.cat_max = np.maximum.reduceat(hi, starts) if len(hi) else hi
        self._pending, self._pending_n = [], 0

    def final(self) -> "_ItemStats":
        self._merge()
        return self

    def several_categories(self) -> int:
        """Items logged under more than one category."""
        return int((self.cat_min != self.cat_max).sum())


class _Strings:
    """Distinct (hash, string) pairs of a hashed id column; a collision is a DataError."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.hashes = np.zeros(0, np.int64)
        self.strings: pa.Array = pa.array([], pa.string())
        self._pending: list[tuple[np.ndarray, pa.Array]] = []
        self._pending_n = 0

    def add(self, hashes: np.ndarray, strings: pa.Array) -> None:
        self._pending.append((hashes, strings.cast(pa.string())))
        self._pending_n += len(hashes)
        if self._pending_n > max(1 << 20, len(self.hashes)):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        h = np.concatenate([self.hashes, *(p[0] for p in self._pending)])
        s = pa.concat_arrays([self.strings, *(p[1] for p in self._pending)])
        order = np.argsort(h, kind="stable")
        h, s = h[order], s.take(pa.array(order))
        dup = np.flatnonzero(h[1:] == h[:-1])
        if len(dup):
            differ = ~pc.equal(s.take(pa.array(dup)), s.take(pa.array(dup + 1))).to_numpy(zero_copy_only=False)
            if differ.any():
                k = int(dup[first_bad(differ)])
                raise DataError(f"{self.role} ids {s[k].as_py()!r} and {s[k + 1].as_py()!r} hash to the same "
                                f"64-bit id {h[k]}; remap them before importing")
        keep = np.r_[True, h[1:] != h[:-1]]
        self.hashes, self.strings = h[keep], s.filter(pa.array(keep))
        self._pending, self._pending_n = [], 0

    def final(self) -> "_Strings":
        self._merge()
        return self


# --------------------------------------------------------------------------- records


def _record_dtype(ctx: list[str], scene: list[str]) -> np.dtype:
    fields = [("user", "<i8"), ("item", "<i8"), ("cat", "<i8"), ("ts", "<i8"), ("seq", "<i8"), ("query", "<i8"),
              ("request", "<i8"), ("flags", "u1")]
    fields += [(f"c_{c}", "<i8") for c in ctx] + [(f"s_{s}", "<i8") for s in scene]
    return np.dtype(fields)


def _count_duplicates(rec: np.ndarray) -> int:
    """Events of ``rec`` (sorted by user, ts) equal to an earlier one in every field but the
    log position: only rows sharing (user, ts) with a neighbour are compared."""
    if len(rec) < 2:
        return 0
    same = (rec["user"][1:] == rec["user"][:-1]) & (rec["ts"][1:] == rec["ts"][:-1])
    if not same.any():
        return 0
    sub = rec[np.flatnonzero(np.r_[same, False] | np.r_[False, same])]
    names = [f for f in rec.dtype.names if f != "seq"]
    sub = sub[np.lexsort([sub[f] for f in reversed(names)])]
    dup = np.ones(len(sub) - 1, bool)
    for f in names:
        dup &= sub[f][1:] == sub[f][:-1]
    return int(dup.sum())


def _append(path: Path, rec: np.ndarray) -> None:
    with open(path, "ab") as f:
        rec.tofile(f)


def _bucket_file(tmp: Path, stage: int, b: int) -> Path:
    return tmp / f"stage{stage}-{b:05d}.bin"


def _split_append(tmp: Path, stage: int, rec: np.ndarray, bucket: np.ndarray, n: int) -> None:
    order = np.argsort(bucket, kind="stable")  # stable: log order within a bucket
    bounds = np.searchsorted(bucket[order], np.arange(n + 1))
    for b in range(n):
        if bounds[b + 1] > bounds[b]:
            _append(_bucket_file(tmp, stage, b), rec[order[bounds[b] : bounds[b + 1]]])


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


# --------------------------------------------------------------------------- time


def _zone(tz: str) -> dt.tzinfo:
    if tz.upper() == "UTC":
        return dt.timezone.utc
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise DataError(f"--tz {tz!r}: unknown time zone ({e})") from None


def _local_midnight(date: dt.date, zone: dt.tzinfo) -> int:
    return int(dt.datetime.combine(date, dt.time(), tzinfo=zone).timestamp())


def day_starts(min_ts: int, max_ts: int, zone: dt.tzinfo) -> tuple[dt.date, np.ndarray]:
    """First local date and the ``[D + 1]`` unix starts of the local days covering the range."""
    d0 = dt.datetime.fromtimestamp(min_ts, zone).date()
    d1 = dt.datetime.fromtimestamp(max_ts, zone).date()
    n = (d1 - d0).days + 1
    return d0, np.array([_local_midnight(d0 + dt.timedelta(days=k), zone) for k in range(n + 1)], dtype=np.int64)


def _parse_date(text: str, flag: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise DataError(f"{flag} {text!r}: expected a date YYYY-MM-DD") from None


# --------------------------------------------------------------------------- the import


class _Staging:
    """``<out>`` is built in a sibling staging directory and renamed into place at the end."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out = out
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
            raise DataError(f"{out}: exists and is not empty (use --force to replace it)")
        self.dir = out.parent / f".{out.name}.importing-{os.getpid()}"
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def commit(self) -> None:
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
            os.replace(self.dir, self.out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.dir, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def run_import(source: Source, opts: ImportOptions) -> ImportResult:
    """Import ``source`` into ``opts.out`` (module docstring); returns the spec written."""
    out = Path(opts.out)
    _check_options(source, opts)
    staging = _Staging(out, opts.force)
    try:
        result = _Importer(source, opts, staging.dir).run()
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    result.out = out
    return result


def _check_options(source: Source, opts: ImportOptions) -> None:
    if opts.layout not in ("rows", "joined"):
        raise DataError(f"--layout must be rows or joined, got {opts.layout!r}")
    if opts.negatives < 0:
        raise DataError(f"--negatives must be >= 0, got {opts.negatives}")
    if opts.sampler not in SAMPLERS:
        raise DataError(f"--sampler must be one of {list(SAMPLERS)}, got {opts.sampler!r}")
    if opts.request_scope not in ("global", "user"):
        raise DataError(f"--request-scope must be global or user, got {opts.request_scope!r}")
    if opts.session_gap < 0:
        raise DataError(f"--session-gap must be >= 0, got {opts.session_gap}")
    if opts.split not in ("days", "last-fraction"):
        raise DataError(f"--split must be days or last-fraction, got {opts.split!r}")
    if opts.split == "last-fraction" and not 0 < opts.test_fraction < 1:
        raise DataError(f"--test-fraction must be in (0, 1), got {opts.test_fraction}")
    if opts.test_days < 1 or (opts.train_days is not None and opts.train_days < 1):
        raise DataError("--train-days and --test-days must be >= 1")
    if opts.buckets is not None and opts.buckets < 1:
        raise DataError(f"--buckets must be >= 1, got {opts.buckets}")
    for name in source.context_columns:
        if name in source.scene_columns:
            raise DataError(f"column feature {name!r} is both context and scene")


class _Importer:
    def __init__(self, source: Source, opts: ImportOptions, root: Path) -> None:
        self.src = source
        self.opts = opts
        self.root = root
        self.tmp = root / TMP_DIR
        self.tmp.mkdir()
        self.zone = _zone(opts.tz)
        f = opts.base.features
        self.L = f.max_seq_len
        # Features: the base config's context / scene columns plus the log's mapped ones.
        self.ctx_names = list(dict.fromkeys([*f.context_features, *source.context_columns]))
        self.scene_names = list(dict.fromkeys([*f.scene_features, *source.scene_columns]))
        for name in self.ctx_names:
            if name in self.scene_names:
                raise DataError(f"feature {name!r} is both a context and a scene feature")
        self.dtype = _record_dtype(self.ctx_names, self.scene_names)
        pos_text = opts.positive if opts.positive is not None else "all"
        self.rule_pos = parse_rule(pos_text, "positive", source.value_names, source.has_event)
        self.rule_hist = parse_rule(opts.history, "history", source.value_names, source.has_event, allow_positive=True)
        self.rule_imp = parse_rule(opts.impressions, "impressions", source.value_names, source.has_event)
        self.t_start = time.perf_counter()

    def log(self, msg: str) -> None:
        if self.opts.verbose:
            print(f"[import {time.perf_counter() - self.t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ pass 1

    def _scan(self) -> None:
        o = self.opts
        size = sum(p.stat().st_size for p in self.src.files)
        self.S = o.scan_buckets or min(1024, _pow2_at_least(size / (48 << 20)))
        self.distinct = {r: _Distinct() for r in ("user", "item", "cat", "query")}
        self.distinct.update({f"c_{c}": _Distinct() for c in self.src.context_columns})
        self.distinct.update({f"s_{s}": _Distinct() for s in self.src.scene_columns})
        self.item_stats = _ItemStats()
        self.strings = {r: _Strings(r) for r in self.src.string_roles if r != "request"}  # requests: no map
        self.type_counts: dict[str, int] = {}
        self.n_read = self.n_kept = 0
        self.min_ts, self.max_ts = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        # Time range of the events that become rows (impressions; with --negatives, positive
        # ones): the day split covers these days, not those where only history events fall.
        self.row_min_ts, self.row_max_ts = self.min_ts, self.max_ts
        lo = _local_midnight(_parse_date(o.since, "--since"), self.zone) if o.since else None
        hi = (_local_midnight(_parse_date(o.until, "--until") + dt.timedelta(days=1), self.zone)
              if o.until else None)
        seq0 = 0
        for batch in self.src.batches():
            n = len(batch)
            seq = np.arange(seq0, seq0 + n, dtype=np.int64)
            seq0 += n
            self.n_read += n
            if batch.etype is not None:
                vc = pc.value_counts(batch.etype)
                for v in vc.to_pylist():
                    self.type_counts[v["values"]] = self.type_counts.get(v["values"], 0) + v["counts"]
            for role, (h, s) in batch.strings.items():
                if role in self.strings:
                    self.strings[role].add(h, s)
            pos = self.rule_pos.select(batch.etype, batch.value, None, n)
            hist = self.rule_hist.select(batch.etype, batch.value, pos, n)
            imp = self.rule_imp.select(batch.etype, batch.value, pos, n)
            keep = np.ones(n, bool)
            if lo is not None:
                keep &= batch.ts >= lo
            if hi is not None:
                keep &= batch.ts < hi
            if not keep.all():
                idx = np.flatnonzero(keep)
                sel = lambda a: None if a is None else a[idx]  # noqa: E731
                batch = dataclasses.replace(
                    batch, user=batch.user[idx], item=batch.item[idx], category=batch.category[idx],
                    ts=batch.ts[idx], query=sel(batch.query), request=sel(batch.request),
                    context={k: v[idx] for k, v in batch.context.items()},
                    scene={k: v[idx] for k, v in batch.scene.items()})
                seq, pos, hist, imp = seq[idx], pos[idx], hist[idx], imp[idx]
                n = len(idx)
            if n == 0:
                continue
            self.n_kept += n
            rec = np.zeros(n, dtype=self.dtype)
            rec["user"], rec["item"], rec["cat"], rec["ts"], rec["seq"] = (
                batch.user, batch.item, batch.category, batch.ts, seq)
            rec["query"] = batch.query if batch.query is not None else 0
            rec["request"] = batch.request if batch.request is not None else -1
            rec["flags"] = pos * F_POS + hist * F_HIST + imp * F_IMP
            for c in self.ctx_names:
                if c in batch.context:
                    rec[f"c_{c}"] = batch.context[c]
                    self.distinct[f"c_{c}"].add(batch.context[c])
            for s in self.scene_names:
                if s in batch.scene:
                    rec[f"s_{s}"] = batch.scene[s]
                    self.distinct[f"s_{s}"].add(batch.scene[s])
            self.distinct["user"].add(batch.user)
            self.distinct["item"].add(batch.item)
            self.distinct["cat"].add(batch.category)
            if batch.query is not None:
                self.distinct["query"].add(batch.query)
            self.item_stats.add(batch.item, batch.category, seq, pos)
            self.min_ts = min(self.min_ts, int(batch.ts.min()))
            self.max_ts = max(self.max_ts, int(batch.ts.max()))
            row_ev = (imp & pos) if o.negatives else imp
            if row_ev.any():
                self.row_min_ts = min(self.row_min_ts, int(batch.ts[row_ev].min()))
                self.row_max_ts = max(self.row_max_ts, int(batch.ts[row_ev].max()))
            _split_append(self.tmp, 1, rec, user_bucket(batch.user, self.S), self.S)
        if self.n_kept == 0:
            raise DataError(f"{', '.join(map(str, self.src.files))}: no events"
                            + (" in the --since/--until range" if lo is not None or hi is not None else ""))
        self.unseen_types = sorted({x for t in (self.rule_pos, self.rule_hist, self.rule_imp) for x in t.types
                                    if x not in self.type_counts})
        if self.unseen_types:
            self.log(f"warning: the rules name event type(s) {self.unseen_types} that the log does not have "
                     f"(it has {sorted(self.type_counts)})")
        self.uniq = {k: d.final() for k, d in self.distinct.items()}
        if not self.src.has_query:
            self.uniq["query"] = np.zeros(1, np.int64)
        # Remapped ids mean something only with this mapping: fingerprint it (id_maps.py) for
        # _dataset.json and every file's footer, so serving can refuse another import's rows.
        self.id_map_digests = {_ROLE_NAMES.get(k, k[2:]): mapping_sha256(u) for k, u in self.uniq.items()
                               if self.opts.remap and (k != "query" or self.src.has_query)}
        self.item_stats.final()
        for s in self.strings.values():
            s.final()
        self.log(f"scanned {self.n_read:,} events ({self.n_kept:,} kept) into {self.S} temp buckets")

    # ------------------------------------------------------------------ pass 2

    def _rebucket(self) -> None:
        o = self.opts
        self.N = o.buckets or _pow2_at_least(self.n_kept / 1_000_000)
        for s in range(self.S):
            path = _bucket_file(self.tmp, 1, s)
            if not path.exists():
                continue
            rec = np.fromfile(path, dtype=self.dtype)
            path.unlink()
            for col, key in (("user", "user"), ("item", "item"), ("cat", "cat"), ("query", "query")):
                rec[col] = np.searchsorted(self.uniq[key], rec[col])
            for c in self.src.context_columns:
                rec[f"c_{c}"] = np.searchsorted(self.uniq[f"c_{c}"], rec[f"c_{c}"])
            for c in self.src.scene_columns:
                rec[f"s_{c}"] = np.searchsorted(self.uniq[f"s_{c}"], rec[f"s_{c}"])
            out_user = rec["user"] if o.remap else self.uniq["user"][rec["user"]]
            _split_append(self.tmp, 2, rec, user_bucket(out_user, self.N), self.N)
        self.log(f"rebucketed into {self.N} user buckets")

    # ------------------------------------------------------------------ setup of pass 3

    def _plan_days(self) -> None:
        o = self.opts
        self.first_date, self.starts = day_starts(self.min_ts, self.max_ts, self.zone)
        self.n_cal = len(self.starts) - 1
        if o.split == "days":
            # The output days end on the last day with an impression (row) and, by default, start
            # on the first one: a log whose history-only events (--impressions / --history rules,
            # e.g. a behaviour log beside an ad log) reach further back has no empty leading days.
            if self.row_min_ts <= self.row_max_ts:
                first_cal = int(np.searchsorted(self.starts, self.row_min_ts, side="right")) - 1
                last_cal = int(np.searchsorted(self.starts, self.row_max_ts, side="right")) - 1
            else:  # no impression at all (refused later with its own message)
                first_cal, last_cal = 0, self.n_cal - 1
            n_row_days = last_cal - first_cal + 1
            if o.train_days is None:
                if n_row_days < 1 + o.test_days:
                    what = "log spans" if n_row_days == self.n_cal else "log's impressions span"
                    raise DataError(f"the {what} {n_row_days} calendar day(s) ({o.tz}), too few for a "
                                    f"train/test split by day: use --split last-fraction")
                self.train_days = n_row_days - o.test_days
            else:
                self.train_days = o.train_days
            self.test_days = o.test_days
            self.D = self.train_days + self.test_days
            self.first_out_cal = last_cal + 1 - self.D  # may be negative: leading days without events
        else:
            self.train_days, self.test_days, self.D = 1, 1, 2
            self.first_out_cal = 0

    def _samplers(self) -> None:
        """Item tables of the negative sampler (dense item ids)."""
        st = self.item_stats
        n_items = len(self.uniq["item"])
        assert np.array_equal(st.items, self.uniq["item"])
        self.item_cat = np.searchsorted(self.uniq["cat"], st.cat)  # canonical (first-seen) category
        self.pop = st.pos.astype(np.float64) + 1.0  # positive events + 1
        self.pop_cdf = np.cumsum(self.pop)
        n_cat = len(self.uniq["cat"])
        self.items_by_cat = np.argsort(self.item_cat, kind="stable")
        self.cat_offsets = np.zeros(n_cat + 1, np.int64)
        np.cumsum(np.bincount(self.item_cat, minlength=n_cat), out=self.cat_offsets[1:])
        self.cat_cum = np.cumsum(self.pop[self.items_by_cat])
        self.n_items = n_items

    def _draw(self, rng: np.random.Generator, cats: np.ndarray, sampler: str) -> np.ndarray:
        n = len(cats)
        if sampler == "uniform":
            return rng.integers(0, self.n_items, size=n)
        if sampler == "popularity":
            x = rng.random(n) * self.pop_cdf[-1]
            return np.minimum(np.searchsorted(self.pop_cdf, x, side="right"), self.n_items - 1)
        lo_i, hi_i = self.cat_offsets[cats], self.cat_offsets[cats + 1]
        if sampler == "category":
            pos = lo_i + (rng.random(n) * (hi_i - lo_i)).astype(np.int64)
        else:
            lo = np.where(lo_i > 0, self.cat_cum[np.maximum(lo_i - 1, 0)], 0.0)
            hi = self.cat_cum[hi_i - 1]
            pos = np.searchsorted(self.cat_cum, lo + rng.random(n) * (hi - lo), side="right")
        pos = np.clip(pos, lo_i, hi_i - 1)
        return self.items_by_cat[pos]

    # ------------------------------------------------------------------ pass 3

    def run(self) -> ImportResult:
        self._scan()
        self._rebucket()
        self._plan_days()
        if self.opts.negatives:
            self._samplers()
        o = self.opts
        schema = table_schema(self._features_for_schema())
        self.stats = _Stats(self.D, self.L)
        self.day_rows = np.zeros(self.D, np.int64)  # rows per day so far (joined impression_id)
        self.file_counter = np.zeros(self.D, np.int64)
        for b in range(self.N):
            path = _bucket_file(self.tmp, 2, b)
            rec = np.fromfile(path, dtype=self.dtype) if path.exists() else np.zeros(0, self.dtype)
            path.unlink(missing_ok=True)
            self._bucket(b, rec, schema)
        if o.layout == "rows":
            for d in range(self.D):
                day_dir = self.root / day_dir_name(d)
                day_dir.mkdir(exist_ok=True)
                if not any(day_dir.glob("part-*.parquet")):
                    pq.write_table(with_id_maps(schema, self.id_map_digests).empty_table(), day_dir / "part-00000-00000.parquet")
        else:
            J.write_layout(self.root, self.N)
        shutil.rmtree(self.tmp)
        self.log(f"wrote {int(self.stats.rows.sum()):,} rows in {self.D} days ({o.layout} layout)")
        return self._finish()

    def _features_for_schema(self) -> FeatureConfig:
        return FeatureConfig(context_features={c: 1 for c in self.ctx_names},
                             scene_features={s: 1 for s in self.scene_names})

    def _out_ids(self, key: str, dense: np.ndarray) -> np.ndarray:
        return dense if self.opts.remap else self.uniq[key][dense]

    def _bucket(self, b: int, rec: np.ndarray, schema: pa.Schema) -> None:
        o = self.opts
        if len(rec):
            rec = rec[np.lexsort((rec["seq"], rec["ts"], rec["user"]))]
        self.stats.duplicates += _count_duplicates(rec)
        user, ts, flags = rec["user"], rec["ts"], rec["flags"]
        n = len(rec)
        cal = np.searchsorted(self.starts, ts, side="right") - 1
        # Output day of every event.
        if o.split == "days":
            day = cal - self.first_out_cal
        else:
            day = self._last_fraction_days(user, flags)
        imp_idx = np.flatnonzero((flags & F_IMP).astype(bool) & (day >= 0) & (day < self.D)
                                 & ((flags & F_POS).astype(bool) if o.negatives else True))
        is_beh = (flags & F_HIST).astype(bool) & (day < self.D)
        beh = np.flatnonzero(is_beh)
        # History window of every event, without a search: in (user, ts, log order) order the
        # behaviours strictly before event p are those before the first event sharing p's
        # (user, ts); the user's own start where its first event is.
        idx = np.arange(n)
        new_user = np.r_[True, user[1:] != user[:-1]] if n else np.zeros(0, bool)
        new_ts = new_user | np.r_[True, ts[1:] != ts[:-1]] if n else np.zeros(0, bool)
        before = np.r_[0, np.cumsum(is_beh)]  # behaviours at positions < p
        end_all = before[np.maximum.accumulate(np.where(new_ts, idx, 0))] if n else np.zeros(0, np.int64)
        first_all = before[np.maximum.accumulate(np.where(new_user, idx, 0))] if n else np.zeros(0, np.int64)
        local = np.cumsum(new_user) - 1
        # Requests (from the (user, ts)-sorted impressions).
        req_of = self._requests(rec, imp_idx, local, day)
        if o.negatives:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(o.seed, spawn_key=(b,))))
            src, items, cats, labels = self._with_negatives(rec, imp_idx, local, cal, rng)
        else:
            src = imp_idx
            items, cats = rec["item"][imp_idx], rec["cat"][imp_idx]
            labels = (flags[imp_idx] & F_POS).astype(bool).astype(np.int8)
        # Rows in (day, ts, log order); a stable sort keeps each positive's negatives after it.
        order = np.lexsort((rec["seq"][src], ts[src], day[src]))
        src, items, cats, labels = src[order], items[order], cats[order], labels[order]
        row_day = day[src]
        if o.layout == "joined":
            self._write_behaviours(b, rec, beh, day)
        rg = max(1, o.base.data.row_group_size)
        bounds = np.searchsorted(row_day, np.arange(self.D + 1))
        for d in range(self.D):
            lo, hi = int(bounds[d]), int(bounds[d + 1])
            writer = _DayWriter(self, d, b, schema)
            for s in range(lo, hi, rg):
                e = min(hi, s + rg)
                r = src[s:e]
                end = end_all[r]
                start = np.maximum(first_all[r], end - self.L)
                lengths = end - start
                flat = offsets = None
                if o.layout == "rows":
                    offsets = np.zeros(len(r) + 1, np.int64)
                    np.cumsum(lengths, out=offsets[1:])
                    flat = beh[np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])]
                writer.write(self._columns(rec, r, items[s:e], cats[s:e], labels[s:e], req_of[r], flat, offsets))
                self.stats.add(d, labels[s:e], lengths)
            self.stats.requests[d] += len(np.unique(req_of[src[lo:hi]]))
            writer.close()

    def _last_fraction_days(self, user: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """Day 0/1 per event: an event is day 1 from the user's first test impression on."""
        n = len(user)
        if n == 0:
            return np.zeros(0, np.int64)
        imp = (flags & F_IMP).astype(bool)
        if self.opts.negatives:
            imp &= (flags & F_POS).astype(bool)
        new_user = np.r_[True, user[1:] != user[:-1]]
        uid = np.cumsum(new_user) - 1
        n_imp = np.bincount(uid, weights=imp).astype(np.int64)
        n_test = np.floor(self.opts.test_fraction * n_imp + 1e-9).astype(np.int64)
        rank = np.cumsum(imp) - 1  # global imp rank
        first_rank = np.zeros(len(n_imp), np.int64)
        first_rank[1:] = np.cumsum(n_imp)[:-1]
        local_rank = rank - first_rank[uid]  # rank of each impression within its user
        is_test_imp = imp & (local_rank >= (n_imp - n_test)[uid])
        # Everything at or after the first test impression (in sort order) is day 1.
        seen = np.cumsum(is_test_imp) - np.r_[0, np.cumsum(is_test_imp)][np.flatnonzero(new_user)][uid]
        return (seen > 0).astype(np.int64)

    def _requests(self, rec: np.ndarray, imp_idx: np.ndarray, local: np.ndarray, day: np.ndarray) -> np.ndarray:
        """``[events]`` request id of each impression event (others -1)."""
        m = np.full(len(rec), -1, np.int64)
        if self.src.has_request:
            raw = rec["request"][imp_idx]
            u = local[imp_idx]
            if self.opts.request_scope == "user":
                # Per-user counters: a (user, request) pair is one request, numbered by the log
                # position of its first impression (unique across buckets: users do not span them).
                pairs = np.stack([u, raw], axis=1)
                _, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
                m[imp_idx] = rec["seq"][imp_idx][first][inverse.reshape(-1)]
            else:
                # GAUC groups by request_id alone: an id under two users would merge their requests.
                shared = requests_shared_by_users(raw, u)
                if shared.size:
                    raise DataError(
                        f"request column: id {int(shared[0])} (and {shared.size - 1:,} more) is "
                        "logged for several users, but a request is one user's (GAUC groups impressions by it); "
                        "if the log counts requests per user, pass --request-scope user")
                m[imp_idx] = raw
        elif len(imp_idx):
            u, t, d = local[imp_idx], rec["ts"][imp_idx], day[imp_idx]
            new = np.r_[True, (u[1:] != u[:-1]) | (d[1:] != d[:-1]) | (t[1:] - t[:-1] > self.opts.session_gap)]
            first = np.flatnonzero(new)
            rid = rec["seq"][imp_idx][first]
            m[imp_idx] = np.repeat(rid, np.diff(np.r_[first, len(imp_idx)]))
        return m

    def _with_negatives(self, rec, imp_idx, local, cal, rng):
        """Rows with sampled negatives: ``(src event, item, category, label)`` per row."""
        K = self.opts.negatives
        pos_items = rec["item"][imp_idx]
        n = len(imp_idx)
        # Positive (user, calendar day, item) of the bucket: never a negative.
        pmask = (rec["flags"] & F_POS).astype(bool)
        n_cal, n_items = self.n_cal + 1, self.n_items
        top = (int(local.max()) + 1 if len(local) else 1) * n_cal * n_items
        if top >= 1 << 63:
            raise DataError("too many users x days x items in one bucket for the exclusion keys; use more --buckets")
        pkeys = np.unique((local[pmask] * n_cal + cal[pmask]) * n_items + rec["item"][pmask])
        base = np.repeat((local[imp_idx] * n_cal + cal[imp_idx]) * n_items, K)
        cats = np.repeat(self.item_cat[pos_items], K)
        sampler = self.opts.sampler
        draws = self._draw(rng, cats, sampler)
        ok = ~_member(pkeys, base + draws)
        rounds = 0
        while not ok.all() and rounds < 2 * _REDRAW_ROUNDS:
            bad = np.flatnonzero(~ok)
            use = sampler if rounds < _REDRAW_ROUNDS else "popularity"  # category exhausted: fall back
            if use != sampler and rounds == _REDRAW_ROUNDS:
                self.stats.fallback += len(bad)
            draws[bad] = self._draw(rng, cats[bad], use)
            ok[bad] = ~_member(pkeys, base[bad] + draws[bad])
            rounds += 1
        self.stats.dropped += int((~ok).sum())
        neg_ok = ok.reshape(n, K)
        # Row order: each positive followed by its negatives.
        per = 1 + neg_ok.sum(axis=1)
        src = np.repeat(imp_idx, per)
        items = np.empty(len(src), np.int64)
        labels = np.zeros(len(src), np.int8)
        starts = np.r_[0, np.cumsum(per)[:-1]]
        items[starts] = pos_items
        labels[starts] = 1
        neg_rows = np.ones(len(src), bool)
        neg_rows[starts] = False
        items[neg_rows] = draws.reshape(n, K)[neg_ok]
        cats_out = self.item_cat[items]
        cats_out[starts] = rec["cat"][imp_idx]
        return src, items, cats_out, labels

    def _columns(self, rec, r, items, cats, labels, req, flat, offsets) -> dict[str, Any]:
        """One chunk of rows; ``flat`` / ``offsets`` None: no history lists (the joined layout)."""
        cols: dict[str, Any] = {
            "request_id": req,
            "user_id": self._out_ids("user", rec["user"][r]),
            "query_id": self._out_ids("query", rec["query"][r]),
            "item_id": self._out_ids("item", items),
            "category_id": self._out_ids("cat", cats),
            "ts": rec["ts"][r],
        }
        for c in self.ctx_names:
            if c in self.src.context_columns:
                cols[c] = self._out_ids(f"c_{c}", rec[f"c_{c}"][r])
            elif c == "hour":
                cols[c] = self._hour(rec["ts"][r])
            else:
                cols[c] = np.zeros(len(r), np.int64)
        for s in self.scene_names:
            cols[s] = self._out_ids(f"s_{s}", rec[f"s_{s}"][r]) if s in self.src.scene_columns else np.zeros(len(r), np.int64)
        cols["label"] = labels
        if flat is None:
            return cols
        off = pa.array(offsets.astype(np.int32))
        cols[HIST_ITEMS] = pa.ListArray.from_arrays(off, pa.array(self._out_ids("item", rec["item"][flat]), pa.int64()))
        cols[HIST_CATEGORIES] = pa.ListArray.from_arrays(off, pa.array(self._out_ids("cat", rec["cat"][flat]), pa.int64()))
        return cols

    def _hour(self, ts: np.ndarray) -> np.ndarray:
        """Local hour of day (0..23, a 25-hour DST day clamps at 23), bucketed to the hour vocabulary."""
        cal = np.searchsorted(self.starts, ts, side="right") - 1
        hour = np.minimum((ts - self.starts[cal]) // 3600, 23)
        vocab = self.opts.base.features.context_features.get("hour", 24)
        return (hour * vocab // 24).astype(np.int64)

    def _write_behaviours(self, b: int, rec: np.ndarray, beh: np.ndarray, day: np.ndarray) -> None:
        period = np.maximum(day[beh], -1) + 1  # 0: before day 0; d + 1: day d
        for p in np.unique(period):
            idx = beh[period == p]
            part = Behaviours(self._out_ids("user", rec["user"][idx]), rec["ts"][idx],
                              self._out_ids("item", rec["item"][idx]), self._out_ids("cat", rec["cat"][idx]))
            J.write_behaviour_part(self.root, b, int(p), part)
        self.stats.behaviours += len(beh)

    # ------------------------------------------------------------------ spec

    def _finish(self) -> ImportResult:
        o = self.opts
        st = self.stats
        features, fragment, overrides, trainable = self._fragment()
        if o.remap:
            self._write_id_maps()
        hist = st.hist_summary()
        rows = st.rows.tolist()
        pos = st.pos.tolist()
        days_info = []
        for d in range(self.D):
            info: dict[str, Any] = {"day": d, "rows": rows[d], "positives": pos[d],
                                    "ctr": pos[d] / rows[d] if rows[d] else None, "requests": int(st.requests[d]),
                                    "split": "train" if d < self.train_days else "test"}
            if o.split == "days":
                info["date"] = (self.first_date + dt.timedelta(days=self.first_out_cal + d)).isoformat()
            days_info.append(info)
        if o.split == "days" and not o.allow_uneven_days:
            self._check_day_coverage(days_info)
        total_rows, total_pos = int(st.rows.sum()), int(st.pos.sum())
        if total_rows and total_pos in (0, total_rows):
            raise DataError(f"every one of the {total_rows:,} rows is labelled {1 if total_pos else 0}: give a "
                            "--positive rule that separates events, or --negatives K for an implicit log")
        card = {k: {"distinct": int(len(v)), "method": "exact"} for k, v in self.uniq.items()
                if k != "query" or self.src.has_query}
        card = {_ROLE_NAMES.get(k, k[2:]): v for k, v in card.items()}  # c_page -> page
        neg: dict[str, Any] | None = None
        if o.negatives:
            n_pos = total_pos
            n_neg = total_rows - total_pos
            neg = {"per_positive": o.negatives, "sampler": o.sampler, "seed": o.seed,
                   "popularity": "positive events of the item + 1, whole log",
                   "item_category": "the category of the item's first event (log order)",
                   "exclusion": "never an item with a positive event of the same user on the same calendar day",
                   "draws_seeded_by": "(seed, output bucket)",
                   "observed_per_positive": n_neg / n_pos if n_pos else None,
                   "fell_back_to_popularity": int(st.fallback), "dropped": int(st.dropped)}
        spec: dict[str, Any] = {
            "generator": "cdp_rec.data.importers",
            "importer_version": IMPORTER_VERSION,
            "source": {"format": self.src.format, "files": [str(p) for p in self.src.files],
                       "events_read": self.n_read, "events_kept": self.n_kept, **self.src.notes},
            "features": _data_features(features),
            "data": {"layout": o.layout, "train_days": self.train_days, "test_days": self.test_days,
                     **({"num_user_buckets": self.N} if o.layout == "joined" else {})},
            "days": list(range(self.D)),
            "day_stats": days_info,
            "rows": total_rows,
            "ctr": total_pos / total_rows if total_rows else None,
            "behaviours_in_histories": int(st.behaviours) if o.layout == "joined" else None,
            "event_types": dict(sorted(self.type_counts.items())) or None,
            "rule_types_not_in_log": self.unseen_types or None,
            "cardinality": card,
            # Rows and histories keep each event's own category; a sampled negative takes its item's
            # first event's (rules.negatives.item_category).
            "items_with_several_categories": self.item_stats.several_categories(),
            # Events equal to an earlier one but for their log position (each still its own row).
            "duplicate_events": st.duplicates,
            "time_range": {"min_ts": self.min_ts, "max_ts": self.max_ts, "tz": o.tz,
                           "first_date": self.first_date.isoformat(),
                           "last_date": (self.first_date + dt.timedelta(days=self.n_cal - 1)).isoformat(),
                           "calendar_days": self.n_cal},
            "history_length": hist,
            "rules": {"positive": self.rule_pos.text, "history": self.rule_hist.text,
                      "impressions": self.rule_imp.text,
                      "history_order": "events strictly before the row's ts, oldest first, equal ts in log order",
                      "negatives": neg},
            "requests": ({"from": "the log's request column", "scope": o.request_scope,
                          **({"rule": "request_id = log position of the first impression of each (user, "
                                      "request) pair"} if o.request_scope == "user" else {})}
                         if self.src.has_request else
                         {"from": "sessions", "session_gap_s": o.session_gap,
                          "rule": "a user's impressions of one day with consecutive gaps <= session_gap_s; "
                                  "request_id = log position of the first"}),
            "split": ({"kind": "days", "rule": f"the last {self.D} calendar days ({o.tz}) up to the last day with "
                                              "an impression; earlier events only feed histories", "since": o.since, "until": o.until}
                      if o.split == "days" else
                      {"kind": "last-fraction", "test_fraction": o.test_fraction,
                       "rule": "each user's last floor(f * n) impression events (by ts, log order) are day 1"}),
            "ids": {"remapped": o.remap, "string_hash": ID_HASH, "string_columns": list(self.src.string_roles),
                    "mapping_dir": IDS_DIR if o.remap else None, "trainable": trainable,
                    **({"mapping_sha256": self.id_map_digests} if o.remap else {}),
                    **({} if o.remap else {
                        "note": "raw ids: a table whose ids are not already row numbers (non-negative, at least "
                                "half of 0..max used) is a managed-collision table (features.id_mapping) of "
                                "distinct ids + 25% rows; the rest are dense",
                        "managed_tables": sorted(t for t, k in fragment["features"].get("id_mapping", {}).items()
                                                 if k == "managed")})},
            "context_features": {c: ("column " + self.src.context_columns[c] if c in self.src.context_columns
                                     else "local hour of ts" if c == "hour" else "constant 0")
                                 for c in self.ctx_names},
            "scene_features": {s: ("column " + self.src.scene_columns[s] if s in self.src.scene_columns
                                   else "constant 0") for s in self.scene_names},
            "train_config": fragment,
            "train_overrides": overrides,
        }
        (self.root / FRAGMENT_FILE).write_text(
            "# Written by `cdp-rec import`: pass it as --config, or copy these keys into your config\n"
            "# (or use the --set overrides in _dataset.json's train_overrides).\n"
            + yaml.safe_dump(fragment, sort_keys=False))
        # The --set flags as one line, for `cdp-rec train --config BASE $(cat <out>/train_args)`: the
        # shell splits that at whitespace and removes no quotes, so the flags are written bare (no
        # value holds a space but a data path with one, which the summary warns about).
        (self.root / ARGS_FILE).write_text(" ".join(f"--set {x}" for x in overrides) + "\n")
        write_dataset_spec(self.root, spec)
        return ImportResult(out=self.root, spec=spec, fragment=fragment, overrides=overrides)

    def _check_day_coverage(self, days: list[dict[str, Any]]) -> None:
        """Refuse a calendar split that a few stray timestamps or a cut-off last day made useless:
        a test day far below a typical day (its AUC would rest on a handful of rows) or mostly
        empty days (a stray event months away stretches the range)."""
        rows = np.array([d["rows"] for d in days])
        typical = float(np.median(rows[rows > 0])) if (rows > 0).any() else 0.0
        span = f"the log's events run from {days[0].get('date')} to {days[-1].get('date')} ({self.opts.tz})"
        fix = "bound the days with --since / --until, or pass --allow-uneven-days to keep this split"
        empty = int((rows == 0).sum())
        if empty > len(rows) // 2:
            raise DataError(f"{empty} of the {len(rows)} days hold no rows ({span}): stray timestamps far from "
                            f"the bulk of the log? {fix}")
        for d in days[self.train_days:]:
            if d["rows"] < 0.05 * typical:
                raise DataError(f"test day {d['day']} ({d.get('date')}) holds {d['rows']:,} rows against a median "
                                f"of {typical:,.0f} per day that has rows ({span}): a cut-off last day or stray "
                                f"timestamps after the log? {fix}")

    def _fragment(self) -> tuple[FeatureConfig, dict[str, Any], list[str], bool]:
        o = self.opts
        base = o.base.features

        mapping: dict[str, str] = {}

        def vocab(key: str, table: str, base_size: int = 1) -> int:
            """Rows of ``table`` for the ids in ``self.uniq[key]`` (``mapping`` notes raw-id tables)."""
            u = self.uniq[key]
            if o.remap or not len(u):
                return max(base_size, len(u), 1)
            lo, hi, n = int(u.min()), int(u.max()), len(u)
            if lo >= 0 and hi + 1 <= max(base_size, 2 * n):  # already row numbers, at least half of them used
                return max(base_size, hi + 1)
            # Raw ids (hashes, sparse 64-bit): a managed-collision table, every id of the log its own
            # row plus a quarter for ids that arrive later (and the row ids without one share).
            mapping[table] = "managed"
            return max(2, n + n // 4 + 1)

        ctx, scene = {}, {}
        for c in self.ctx_names:
            size = base.context_features.get(c, 24 if c == "hour" else 1)
            if c in self.src.context_columns:
                size = vocab(f"c_{c}", f"ctx_{c}", size)
            ctx[c] = size
        for s in self.scene_names:
            size = base.scene_features.get(s, 1)
            if s in self.src.scene_columns:
                size = vocab(f"s_{s}", f"scene_{s}", size)
            scene[s] = size
        sizes = {"num_users": vocab("user", "user"), "num_items": vocab("item", "item"),
                 "num_queries": vocab("query", "query"), "num_categories": vocab("cat", "category")}
        trainable = all(0 < v < 1 << 31 for v in sizes.values())
        features = FeatureConfig(**sizes, context_features=ctx, scene_features=scene, max_seq_len=self.L)
        data = {"root": str(o.out), "train_days": self.train_days, "test_days": self.test_days, "layout": o.layout,
                "generate_if_missing": False}
        if o.layout == "joined":
            data["num_user_buckets"] = self.N
        if not self.stats.rows.all() and "allow_empty_days" in {f.name for f in dataclasses.fields(o.base.data)}:
            data["allow_empty_days"] = True  # calendar days without events stay in the day numbering
        fragment: dict[str, Any] = {"features": _data_features(features), "data": data}
        id_mapping = {**mapping, **base.id_mapping}  # a mapping the base config names wins
        if id_mapping:
            fragment["features"]["id_mapping"] = id_mapping
        overrides = [f"data.root={o.out}"]
        base_data = o.base.data
        for k, v in data.items():
            if k != "root" and getattr(base_data, k) != v:
                overrides.append(f"data.{k}={str(v).lower() if isinstance(v, bool) else v}")
        for k, v in {**_data_features(features), "id_mapping": id_mapping}.items():
            if getattr(base, k) != v:
                # Compact JSON (YAML reads it): no space, so the flag survives `$(cat train_args)`.
                val = json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else v
                overrides.append(f"features.{k}={val}")
        return features, fragment, overrides, trainable

    def _write_id_maps(self) -> None:
        d = self.root / IDS_DIR
        d.mkdir()
        for key, u in self.uniq.items():
            if key == "query" and not self.src.has_query:
                continue
            name = _ROLE_NAMES.get(key, key[2:])
            cols: dict[str, pa.Array] = {"id": pa.array(np.arange(len(u), dtype=np.int64)), "raw": pa.array(u)}
            role = _KEY_ROLES.get(key, key[2:])
            if role in self.strings:
                s = self.strings[role]
                pos = np.searchsorted(s.hashes, u)
                cols["key"] = s.strings.take(pa.array(pos))
            pq.write_table(pa.table(cols), d / f"{name}.parquet", compression="zstd")


_ROLE_NAMES = {"user": "user_id", "item": "item_id", "cat": "category_id", "query": "query_id"}
_KEY_ROLES = {"user": "user", "item": "item", "cat": "category", "query": "query"}


def _data_features(features: FeatureConfig) -> dict[str, Any]:
    """The features a data set determines (not the model-side id-mapping keys, if the config has any)."""
    skip = getattr(spec_module, "MODEL_SIDE_FEATURE_KEYS", ())
    return {k: v for k, v in dataclasses.asdict(features).items() if k not in skip}


def _member(sorted_keys: np.ndarray, x: np.ndarray) -> np.ndarray:
    if not len(sorted_keys):
        return np.zeros(len(x), bool)
    pos = np.minimum(np.searchsorted(sorted_keys, x), len(sorted_keys) - 1)
    return sorted_keys[pos] == x


class _Stats:
    def __init__(self, D: int, L: int) -> None:
        self.rows = np.zeros(D, np.int64)
        self.pos = np.zeros(D, np.int64)
        self.requests = np.zeros(D, np.int64)
        self.hist = np.zeros(L + 1, np.int64)
        self.hist_sum = np.zeros(D, np.int64)
        self.fallback = 0
        self.dropped = 0
        self.behaviours = 0
        self.duplicates = 0
        self.L = L

    def add(self, d: int, labels: np.ndarray, lengths: np.ndarray) -> None:
        self.rows[d] += len(labels)
        self.pos[d] += int(labels.sum())
        self.hist += np.bincount(lengths, minlength=self.L + 1)
        self.hist_sum[d] += int(lengths.sum())

    def hist_summary(self) -> dict[str, Any]:
        n = int(self.hist.sum())
        if not n:
            return {"rows": 0}
        cdf = np.cumsum(self.hist) / n
        q = lambda p: int(np.searchsorted(cdf, p))  # noqa: E731
        lengths = np.arange(self.L + 1)
        return {"mean": float(self.hist @ lengths / n), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
                "max": int(lengths[self.hist > 0].max()), "empty_fraction": float(self.hist[0] / n),
                "full_fraction": float(self.hist[self.L] / n), "max_seq_len": self.L,
                "mean_per_day": [float(s / r) if r else None for s, r in zip(self.hist_sum, self.rows)]}


class _DayWriter:
    """One bucket's rows of one day: rows files (rolled at rows_per_file) or one joined impression file."""

    def __init__(self, imp: _Importer, day: int, bucket: int, schema: pa.Schema) -> None:
        schema = with_id_maps(schema, imp.id_map_digests)
        self.imp, self.day, self.bucket, self.schema = imp, day, bucket, schema
        self.joined = imp.opts.layout == "joined"
        self.writer: pq.ParquetWriter | None = None
        self.in_file = 0
        self.k = 0
        self.rg = imp.opts.base.data.row_group_size
        if self.joined:
            self.out_schema = pa.schema([pa.field(J.IMPRESSION_ID, pa.int64(), nullable=False),
                                         *[f for f in schema if f.name not in (HIST_ITEMS, HIST_CATEGORIES)]],
                                        metadata=schema.metadata)

    def _open(self) -> None:
        day_dir = self.imp.root / day_dir_name(self.day)
        day_dir.mkdir(exist_ok=True)
        if self.joined:
            path = J.impression_file(self.imp.root, self.day, self.bucket)
            self.writer = pq.ParquetWriter(path, self.out_schema, compression="zstd")
        else:
            path = day_dir / f"part-{self.bucket:05d}-{self.k:05d}.parquet"
            self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.k += 1
        self.in_file = 0

    def write(self, cols: dict[str, Any]) -> None:
        n = len(cols["label"])
        if self.joined:
            start = int(self.imp.day_rows[self.day])
            cols = {J.IMPRESSION_ID: np.arange(start, start + n, dtype=np.int64), **cols}
            schema = self.out_schema
        else:
            schema = self.schema
        self.imp.day_rows[self.day] += n
        table = pa.Table.from_arrays([pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                                      else cols[f.name] for f in schema], schema=schema)
        rpf = self.imp.opts.base.data.rows_per_file
        s = 0
        while s < n:
            if self.writer is None or (not self.joined and self.in_file >= rpf):
                if self.writer is not None:
                    self.writer.close()
                self._open()
            take = n - s if self.joined else min(n - s, rpf - self.in_file)
            assert self.writer is not None
            self.writer.write_table(table.slice(s, take), row_group_size=self.rg)
            self.in_file += take
            s += take

    def close(self) -> None:
        if self.writer is None and self.joined:
            self._open()  # every bucket of every day has a file, possibly empty
        if self.writer is not None:
            self.writer.close()
