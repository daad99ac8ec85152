"""The joined storage layout: each user's behaviour log stored once, histories joined at read time.

In the per-row layout (:mod:`cdp_rec.data.loader`) every impression carries its last
``L = features.max_seq_len`` behaviours as list columns: at ``L = 2000`` that is 32 KB of
raw ids per row, repeated for every impression of a user. Here the behaviour log is
stored once and :class:`JoinedBatchReader` assembles the same histories while reading.

On-disk layout (``N = data.num_user_buckets``, ``bucket(u) = fmix64(u) mod N`` with
``fmix64`` MurmurHash3's 64-bit finalizer on the id as uint64, see :func:`user_bucket`)::

    <root>/_layout.json                      {"layout": "joined", "num_user_buckets": N,
                                              "bucket_hash": "murmur3-fmix64", "version": 1,
                                              "behaviour_parts": [[P, ...] per bucket]}  (written
                                             last; readers refuse a listed part that is missing or
                                             an unlisted one; absent in older data sets: unchecked)
    <root>/_dataset.json                     synthetic data only, as for the per-row layout
    <root>/day=DD/bucket=BBBB.parquet        impressions of day DD whose user is in bucket BBBB
    <root>/behaviors/bucket=BBBB/part-PPPPP.parquet
                                             behaviours of bucket BBBB's users logged in period
                                             P: P = 0 before day 0, P = d + 1 on day d

* Impression files: exactly :func:`cdp_rec.data.schema.table_schema` without the two
  history lists, plus ``impression_id`` (int64): the impression's 0-based position in
  its day in the per-row layout (files in name order, then row order). Rows are in
  increasing ``impression_id`` order. All ``N`` files of a day exist (possibly empty).
* Behaviour files: ``user_id``, ``ts``, ``item_id``, ``category_id`` (int64), sorted by
  (user_id, ts); behaviours with equal (user_id, ts) keep their log order. Across the
  parts of a bucket, each user's behaviours are in time order: a user's rows in part P
  are no later than its rows in part P + 1. Periods without rows may lack a file.

Join semantics (exactly what the synthetic generator writes inline, see
:func:`cdp_rec.data.synthetic.generate_periods`): the history of an impression of user
``u`` at ``ts`` is ``u``'s last ``L`` behaviours with behaviour ts strictly before
``ts`` (a behaviour at the impression's second or later never leaks in), oldest first,
ties in ts in log order. It is computed with ``searchsorted`` over the bucket's sorted
(user, ts) keys; nothing loops over rows in Python.

Reading and memory. Rank ``r`` of ``w`` reads buckets ``b`` with ``b % w == r`` (the
per-row reader takes files ``i % w == r``; here buckets play the files' role), day by
day, bucket by bucket. For one (day, bucket) the reader first reads the impressions'
``user_id`` / ``ts`` columns, then the bucket's behaviour parts newest first, keeping
only rows of users with impressions that day and earlier than their last impression,
and stops as soon as every such user has ``L`` behaviours before its first impression
(or the parts run out). Parts whose smallest ts (from the Parquet statistics) is not
before the day's last impression are skipped, so future days are never read. Memory is
therefore one bucket's visible log (at most ``L`` plus one day per active user) plus one
behaviour part plus one impression row group; never the whole log. The price is read
amplification: each (day, bucket) reads about ``L / (behaviours per user per day)`` days
of its log (~10 at the generator's rates and ``L = 2000``), because nothing is carried
between days; a compacted per-user "last L" snapshot per bucket would bound that and is
not implemented.

What "identical batches" means. For the same data, both layouts give every impression
the same values in every column, the same history list (same ids, same order) and the
same label. Within a bucket, impressions come out in ``impression_id`` order, i.e. the
per-row layout's order, and buckets in increasing order; so with ``N = 1`` and one rank
the two readers yield identical batches, batch for batch. With ``N > 1`` the row order
is bucket-major: the multiset of sample rows per day is identical, and concatenating
every bucket's rows and stable-sorting by ``impression_id`` gives the per-row layout's
sequence exactly, but batch boundaries (and which rank reads what) differ.

Validation is as strict as the per-row reader's and reuses its helpers: every problem
is a :class:`DataError` naming the file (and row group / column where it applies):
missing files or directories, wrong columns or types, nulls, ids out of range, users in
the wrong bucket, unsorted behaviour parts, decreasing ``impression_id``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdp_rec.config import ConfigError, FeatureConfig, JobConfig
from cdp_rec.data.hashing import fmix64
from cdp_rec.data.loader import (
    DataError,
    ParquetBatchReader,
    _check_bad,
    _check_no_nulls,
    _check_range,
    _Columns,
    _open,
    check_data_root,
    check_dataset_spec,
    check_day_has_rows,
    check_schema,
    dataset_files,
    is_ignored_name,
    read_json_file,
    refuse_stray_entries,
    row_groups,
)
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, day_dir_name, table_schema
from cdp_rec.data.writer import Behaviours, write_parquet

LAYOUT_FILE = "_layout.json"
LAYOUT_VERSION = 1
BUCKET_HASH = "murmur3-fmix64"
BEHAVIORS_DIR = "behaviors"
BEHAVIOUR_PARTS = "behaviour_parts"  # _layout.json: each bucket's behaviour part numbers
IMPRESSION_ID = "impression_id"
BEHAVIOUR_COLUMNS = ("user_id", "ts", "item_id", "category_id")
# Behaviour files: ts ascends within a user, so its deltas (minutes) pack into ~2 bytes
# where dictionary + zstd needs ~3.3 (measured on the industrial sample, `plan --storage`).
# Rows per row group of behaviour files: 4 narrow columns, so far more rows than an
# impression row group (reading 1k-row groups spent 2/3 of the reader's time in Parquet
# per-group overhead); 2**20 rows are 32 MB decoded.
BEHAVIOUR_ROW_GROUP = 1 << 20
BEHAVIOUR_PARQUET_OPTIONS: dict[str, Any] = {
    "use_dictionary": ["user_id", "item_id", "category_id"],
    "column_encoding": {"ts": "DELTA_BINARY_PACKED"},
}


# --------------------------------------------------------------------------- layout


def user_bucket(user_ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """``[n]`` int64 bucket of each user id: ``fmix64(uint64(id)) mod num_buckets``.

    MurmurHash3's finalizer: stable across runs, machines and numpy versions (unlike
    Python's ``hash``), and it spreads consecutive ids evenly over the buckets.
    """
    return (fmix64(user_ids) % np.uint64(num_buckets)).astype(np.int64)


def bucket_name(bucket: int) -> str:
    return f"bucket={bucket:04d}"


def impression_file(root: Path, day: int, bucket: int) -> Path:
    return Path(root) / day_dir_name(day) / f"{bucket_name(bucket)}.parquet"


def behaviour_dir(root: Path, bucket: int) -> Path:
    return Path(root) / BEHAVIORS_DIR / bucket_name(bucket)


def behaviour_file(root: Path, bucket: int, period: int) -> Path:
    return behaviour_dir(root, bucket) / f"part-{period:05d}.parquet"


def impression_schema(features: FeatureConfig) -> pa.Schema:
    """Columns of an impression file: ``impression_id`` + the per-row schema minus the histories."""
    rows = table_schema(features)
    fields = [pa.field(IMPRESSION_ID, pa.int64(), nullable=False)]
    fields += [f for f in rows if f.name not in (HIST_ITEMS, HIST_CATEGORIES)]
    return pa.schema(fields)


def behaviour_schema() -> pa.Schema:
    return pa.schema([pa.field(name, pa.int64(), nullable=False) for name in BEHAVIOUR_COLUMNS])


def read_layout(root: str | Path) -> dict[str, Any] | None:
    """``<root>/_layout.json`` parsed and checked, or None when absent (the per-row layout)."""
    path = Path(root) / LAYOUT_FILE
    spec = read_json_file(path, "layout file")
    if spec is None:
        return None
    n = spec.get("num_user_buckets")
    if spec.get("layout") != "joined" or not isinstance(n, int) or n <= 0:
        raise DataError(f"{path}: expected layout 'joined' and a positive num_user_buckets, got {spec}")
    if spec.get("bucket_hash") != BUCKET_HASH or spec.get("version") != LAYOUT_VERSION:
        raise DataError(
            f"{path}: bucket_hash {spec.get('bucket_hash')!r} / version {spec.get('version')!r} "
            f"not supported (this reader: {BUCKET_HASH!r} / {LAYOUT_VERSION})"
        )
    parts = spec.get(BEHAVIOUR_PARTS)  # absent in data sets written before it was recorded
    if parts is not None and not (
        isinstance(parts, list) and len(parts) == n
        and all(isinstance(p, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in p) for p in parts)
    ):
        raise DataError(f"{path}: {BEHAVIOUR_PARTS} must be {n} lists of part numbers (one per bucket)")
    return spec


def _behaviour_parts(root: Path, num_buckets: int) -> list[list[int]]:
    """Each bucket's behaviour part numbers on disk, ascending."""
    out = []
    for b in range(num_buckets):
        folder = behaviour_dir(root, b)
        names = folder.glob("part-*.parquet") if folder.is_dir() else []
        out.append(sorted(int(p.name[5:-8]) for p in names if p.name[5:-8].isdigit()))
    return out


def check_behaviour_parts(folder: Path, bucket: int, parts: list[Path], recorded: list[int] | None) -> None:
    """The bucket's part files are the ones ``_layout.json`` lists: a missing (or added) part
    would silently shorten (or change) histories."""
    if recorded is None:
        return
    want = [f"part-{p:05d}.parquet" for p in recorded]
    have = [p.name for p in parts]
    missing = sorted(set(want) - set(have))
    if missing:
        raise DataError(f"{folder / missing[0]}: behaviour file missing ({LAYOUT_FILE} lists {len(want)} part(s) "
                        f"for bucket {bucket}); histories would silently lose its behaviours")
    extra = sorted(set(have) - set(want))
    if extra:
        raise DataError(f"{folder / extra[0]}: behaviour file not listed in {LAYOUT_FILE} (written after the "
                        "data set was; rewrite the data set)")


def write_layout(root: Path, num_buckets: int) -> None:
    """Written last by every joined writer: it records each bucket's behaviour parts (checked on reading)."""
    spec = {"layout": "joined", "num_user_buckets": num_buckets, "bucket_hash": BUCKET_HASH,
            "version": LAYOUT_VERSION, BEHAVIOUR_PARTS: _behaviour_parts(Path(root), num_buckets)}
    tmp = Path(root) / (LAYOUT_FILE + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    tmp.replace(Path(root) / LAYOUT_FILE)


def remove_joined_artifacts(root: Path) -> None:
    """Drop ``_layout.json`` and ``behaviors/`` (a root being rewritten in the per-row layout)."""
    (Path(root) / LAYOUT_FILE).unlink(missing_ok=True)
    if (Path(root) / BEHAVIORS_DIR).is_dir():
        shutil.rmtree(Path(root) / BEHAVIORS_DIR)


def layout_days(root: str | Path, layout: str) -> list[int]:
    """Days present under ``root`` in ``layout`` (day directories holding that layout's files).

    Every ``day=*`` entry must be one (names :func:`is_ignored_name` accepts aside): one
    that is not a directory named ``day=<int>``, or holds none of the layout's files (the
    other layout's, or nothing), is a DataError naming it, never a day silently left out
    of what is converted or scored."""
    pattern, other = ("bucket=*.parquet", "part-*.parquet") if layout == "joined" else ("part-*.parquet",
                                                                                        "bucket=*.parquet")
    days = []
    for d in sorted(Path(root).glob("day=*")):
        if is_ignored_name(d.name):
            continue
        if not d.name[4:].isdigit() or not d.is_dir():
            raise DataError(f"{d}: not a day directory (day=NN) of the {layout}-layout data set {root}; "
                            "move or rename it")
        if not any(d.glob(pattern)):
            found = f"{other} files of the other layout" if any(d.glob(other)) else "no files"
            raise DataError(f"{d}: holds {found}, not the {pattern} files of the {layout}-layout data set "
                            f"{root}; a day must be in the data set's layout")
        days.append(int(d.name[4:]))
    return sorted(days)


# --------------------------------------------------------------------------- writing


def write_impressions(
    out: Path, day: int, table: pa.Table, features: FeatureConfig, num_buckets: int, row_group_size: int
) -> list[Path]:
    """One day's impressions (a per-row table in day order) as ``N`` bucket files.

    ``impression_id`` is the row's position in ``table``; the history lists are dropped
    (the behaviour log carries them).
    """
    day_dir = Path(out) / day_dir_name(day)
    day_dir.mkdir(parents=True, exist_ok=True)
    for old in [*day_dir.glob("part-*.parquet"), *day_dir.glob("bucket=*.parquet")]:
        old.unlink()
    schema = impression_schema(features)
    table = table.append_column(IMPRESSION_ID, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    table = table.select(schema.names).cast(schema)
    buckets = user_bucket(table.column("user_id").to_numpy(), num_buckets)
    order = np.argsort(buckets, kind="stable")  # stable: impression_id order within a bucket
    bounds = np.searchsorted(buckets[order], np.arange(num_buckets + 1))
    return [
        write_parquet(table.take(order[bounds[b] : bounds[b + 1]]), impression_file(out, day, b), row_group_size)
        for b in range(num_buckets)
    ]


def write_behaviour_part(
    out: Path, bucket: int, period: int, beh: Behaviours, row_group_size: int = BEHAVIOUR_ROW_GROUP
) -> Path:
    """One bucket's behaviours of one period (sorted by (user, ts); users of ``bucket``)."""
    path = behaviour_file(out, bucket, period)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_arrays([pa.array(getattr(beh, name)) for name in BEHAVIOUR_COLUMNS],
                                 schema=behaviour_schema())
    return write_parquet(table, path, row_group_size, **BEHAVIOUR_PARQUET_OPTIONS)


def write_behaviours(
    out: Path, period: int, beh: Behaviours, num_buckets: int, row_group_size: int = BEHAVIOUR_ROW_GROUP
) -> list[Path]:
    """One period's behaviours (sorted by (user, ts)) as one part per non-empty bucket."""
    buckets = user_bucket(beh.user_id, num_buckets)
    order = np.argsort(buckets, kind="stable")  # stable: keeps (user, ts) and log order
    bounds = np.searchsorted(buckets[order], np.arange(num_buckets + 1))
    written = []
    for b in range(num_buckets):
        behaviour_file(out, b, period).unlink(missing_ok=True)
        if bounds[b + 1] > bounds[b]:
            idx = order[bounds[b] : bounds[b + 1]]
            part = Behaviours(beh.user_id[idx], beh.ts[idx], beh.item_id[idx], beh.category_id[idx])
            written.append(write_behaviour_part(out, b, period, part, row_group_size))
    return written


def write_generated(cfg: JobConfig, out: Path, days: Sequence[int], fresh: bool) -> list[Path]:
    """Write synthetic ``days`` in the joined layout (see :func:`cdp_rec.data.synthetic.generate_dataset`).

    Writes every log period up to the last requested day (the log a later day's
    histories need) and the requested days' impressions. ``fresh``: the root held
    another spec, so an old ``behaviors/`` is removed first (its periods could outlive
    the ones rewritten here).
    """
    from cdp_rec.data.synthetic import generate_periods  # the generator; the reader never imports it

    n = cfg.data.num_user_buckets
    rg = cfg.data.row_group_size
    if fresh and (out / BEHAVIORS_DIR).is_dir():
        shutil.rmtree(out / BEHAVIORS_DIR)
    written: list[Path] = []
    for period in generate_periods(cfg, days, with_behaviours=True):
        assert period.behaviours is not None
        written += write_behaviours(out, period.index, period.behaviours, n)
        if period.impressions is not None:
            written += write_impressions(out, period.day, period.impressions, cfg.features, n, rg)
    write_layout(out, n)
    return written


# --------------------------------------------------------------------------- the join


@dataclass
class _BucketLog:
    """The part of one bucket's log that a set of impressions can see, in log order.

    ``users`` ``[U]`` are the impressions' distinct users (sorted); ``keys`` ``[m]`` int64
    ascending = ``local user index * span + (ts - t0)``; ``items`` / ``cats`` ``[m]``.
    """

    users: np.ndarray
    keys: np.ndarray
    items: np.ndarray
    cats: np.ndarray
    t0: int
    span: int

    def histories(self, users: np.ndarray, ts: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Last ``max_len`` behaviours strictly before ``ts`` for ``[n]`` impressions.

        Returns ``[n + 1]`` offsets and the ``[offsets[-1]]`` flat items and categories,
        oldest first. Every user must be in ``self.users``.
        """
        local = np.searchsorted(self.users, users)
        base = local * self.span
        end = np.searchsorted(self.keys, base + (ts - self.t0), side="left")
        first = np.searchsorted(self.keys, base, side="left")
        start = np.maximum(first, end - max_len)
        lengths = end - start
        offsets = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
        return offsets, self.items[flat], self.cats[flat]


def _parquet_min(pf: pq.ParquetFile, column: str) -> int | None:
    """Smallest value of an int column from the row-group statistics (None: unknown)."""
    idx = pf.schema_arrow.get_field_index(column)
    lows = []
    for rg in range(pf.metadata.num_row_groups):
        st = pf.metadata.row_group(rg).column(idx).statistics
        if st is None or not st.has_min_max:
            return None
        lows.append(st.min)
    return min(lows) if lows else None


def _check_bucket(where: str, users: np.ndarray, bucket: int, num_buckets: int) -> None:
    got = user_bucket(users, num_buckets)
    _check_bad(where, "user_id", got != bucket, users,
               f"user(s) hashing to another bucket than {bucket} of {num_buckets}")


class JoinedBatchReader(ParquetBatchReader):
    """Iterate fixed-size :class:`Batch` es over the joined layout (module docstring).

    Args:
        root: the data root (``_layout.json``, ``day=DD/``, ``behaviors/``).
        days: a day or the days to read, in that order.
        features: the feature spec the data must satisfy (``max_seq_len`` is ``L``).
        batch_size, drop_last: as :class:`ParquetBatchReader`; batches span buckets and days.
        rank, world_size: this reader takes buckets ``b % world_size == rank``.

    Batches are cut by the per-row reader's code from the joined blocks, so they hold
    exactly what :class:`ParquetBatchReader` yields for the same rows.
    """

    def __init__(
        self,
        root: str | Path,
        days: int | Sequence[int],
        features: FeatureConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        dedup_requests: bool = False,
        allow_empty_days: bool = False,
    ) -> None:
        super().__init__([], features, batch_size, rank=rank, world_size=world_size, drop_last=drop_last,
                         dedup_requests=dedup_requests)
        self.root = Path(root)
        layout = read_layout(self.root)
        if layout is None:
            raise DataError(
                f"{self.root}: not a joined-layout data set ({LAYOUT_FILE} missing); "
                "write one with `cdp-rec gen-data --layout joined` or `cdp-rec convert --to joined`"
            )
        self.num_buckets: int = layout["num_user_buckets"]
        self._behaviour_parts: list[list[int]] | None = layout.get(BEHAVIOUR_PARTS)
        self.days = [days] if isinstance(days, int) else [int(d) for d in days]
        self.buckets = list(range(rank, self.num_buckets, world_size))
        if not self.buckets:
            raise DataError(f"{self.root}: rank {rank} of {world_size} gets none of the {self.num_buckets} user "
                            "buckets; write the data with data.num_user_buckets >= the world size")
        # (day, bucket) units this rank reads; ``self.files`` (what num_rows() sums) are
        # their impression files.
        self.units: list[tuple[int, int]] = []
        for day in self.days:
            self._check_day(day, allow_empty_days)
            for b in self.buckets:
                path = impression_file(self.root, day, b)
                if not path.is_file():
                    raise DataError(f"{path}: impression file of bucket {b} missing ({self.num_buckets} buckets)")
                self.units.append((day, b))
        self.files = [impression_file(self.root, d, b) for d, b in self.units]
        if not (self.root / BEHAVIORS_DIR).is_dir():
            raise DataError(f"{self.root / BEHAVIORS_DIR}: behaviour log directory not found")
        self._imp_schema = impression_schema(features)

    def _check_day(self, day: int, allow_empty: bool) -> None:
        """The rows layout's day checks (:func:`~cdp_rec.data.loader.list_day_files`) for a
        joined day: an entry that is not one of the ``num_user_buckets`` impression files
        (a stray Parquet file, or a bucket of an earlier bucket count) would be silently
        left out, and a day whose files hold no rows at all is refused unless allowed.
        Every rank checks the whole day, so all ranks agree."""
        day_dir = self.root / day_dir_name(day)
        if not day_dir.is_dir():
            raise DataError(f"{day_dir}: day directory not found")
        expected = {impression_file(self.root, day, b).name for b in range(self.num_buckets)}
        refuse_stray_entries(day_dir, expected, lambda n: f"that {'is' if n == 1 else 'are'} not one of the "
                                                          f"{self.num_buckets} bucket files (bucket=0000.parquet ..)")
        files = [day_dir / name for name in sorted(expected) if (day_dir / name).is_file()]
        if files:  # a missing bucket file is the constructor's error, naming it
            check_day_has_rows(day_dir, files, allow_empty, "bucket file")

    def _blocks(self) -> Iterator[_Columns]:
        for day, bucket in self.units:
            for _, cols in self.iter_bucket(day, bucket):
                yield cols

    def iter_bucket(self, day: int, bucket: int) -> Iterator[tuple[np.ndarray, _Columns]]:
        """Joined row groups of one (day, bucket): ``([n] impression_id, _Columns)``, in file order."""
        path = impression_file(self.root, day, bucket)
        L = self.features.max_seq_len
        with _open(path) as pf:
            check_schema(path, pf.schema_arrow, self._imp_schema)
            if pf.metadata.num_rows == 0:
                return
            users_rg, ts_rg = [], []
            for where, t in row_groups(pf, path, ["user_id", "ts"]):
                for name in ("user_id", "ts"):
                    _check_no_nulls(where, name, t.column(name))
                u = t.column("user_id").to_numpy()
                _check_range(where, "user_id", u, self._ranges["user_id"])
                _check_bucket(where, u, bucket, self.num_buckets)
                users_rg.append(u)
                ts_rg.append(t.column("ts").to_numpy())
            log = self._load_log(bucket, np.concatenate(users_rg), np.concatenate(ts_rg))
            del users_rg, ts_rg  # the row groups below re-read them, validated

            last_id = -1
            names = self._imp_schema.names
            for where, table in row_groups(pf, path, names):
                if not table.num_rows:
                    continue
                single = self._convert_single(where, table)
                col = table.column(IMPRESSION_ID)
                _check_no_nulls(where, IMPRESSION_ID, col)
                ids = col.to_numpy()
                prev = np.concatenate([[last_id], ids[:-1]])
                _check_bad(where, IMPRESSION_ID, ids <= prev, ids, "value(s) not increasing (or negative)")
                last_id = int(ids[-1])
                offsets, items, cats = log.histories(single["user_id"], single["ts"], L)
                yield ids, _Columns(single, offsets, items, cats)

    def _load_log(self, bucket: int, users: np.ndarray, ts: np.ndarray) -> _BucketLog:
        """What ``[n]`` impressions (users, ts) of ``bucket`` can see of its log (class docstring)."""
        L = self.features.max_seq_len
        folder = behaviour_dir(self.root, bucket)
        parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
        check_behaviour_parts(folder, bucket, parts, self._behaviour_parts[bucket] if self._behaviour_parts else None)
        uniq, inv = np.unique(users, return_inverse=True)
        U = len(uniq)
        first_ts = np.full(U, np.iinfo(np.int64).max)
        np.minimum.at(first_ts, inv, ts)
        last_ts = np.full(U, np.iinfo(np.int64).min)
        np.maximum.at(last_ts, inv, ts)
        horizon = int(ts.max())
        need = np.ones(U, dtype=bool)
        count = np.zeros(U, dtype=np.int64)
        chunks: list[tuple[np.ndarray, ...]] = []
        schema = behaviour_schema()
        for part_idx in range(len(parts) - 1, -1, -1):
            if not need.any():
                break  # every user has L behaviours before its first impression: older parts are invisible
            path = parts[part_idx]
            with _open(path) as pf:
                check_schema(path, pf.schema_arrow, schema)
                low = _parquet_min(pf, "ts")
                if pf.metadata.num_rows == 0 or (low is not None and low >= horizon):
                    continue  # nothing in it is before the last impression (e.g. later days)
                still = need.copy()  # users wanting more when this part started
                part_chunks: list[tuple[np.ndarray, ...]] = []
                # int64 min, not -1: raw user ids (features.id_mapping) may be negative.
                prev_user, prev_ts = np.iinfo(np.int64).min, np.iinfo(np.int64).min
                for where, t in row_groups(pf, path, list(BEHAVIOUR_COLUMNS)):
                    if not t.num_rows:
                        continue
                    cols = {}
                    for name in BEHAVIOUR_COLUMNS:
                        _check_no_nulls(where, name, t.column(name))
                        cols[name] = t.column(name).to_numpy()
                    b_user, b_ts = cols["user_id"], cols["ts"]
                    _check_range(where, "user_id", b_user, self._ranges["user_id"])
                    _check_range(where, "item_id", cols["item_id"], self._ranges[HIST_ITEMS])
                    _check_range(where, "category_id", cols["category_id"], self._ranges[HIST_CATEGORIES])
                    _check_bucket(where, b_user, bucket, self.num_buckets)
                    pu = np.concatenate([[prev_user], b_user[:-1]])
                    pt = np.concatenate([[prev_ts], b_ts[:-1]])
                    _check_bad(where, "ts", (b_user < pu) | ((b_user == pu) & (b_ts < pt)), b_ts,
                               "row(s) out of (user_id, ts) order")
                    prev_user, prev_ts = int(b_user[-1]), int(b_ts[-1])

                    pos = np.minimum(np.searchsorted(uniq, b_user), U - 1)
                    member = uniq[pos] == b_user
                    # A behaviour at or after a user's last impression is invisible to all of them.
                    keep = member & still[pos] & (b_ts < last_ts[pos])
                    count += np.bincount(pos[keep & (b_ts < first_ts[pos])], minlength=U)
                    if keep.any():
                        part_chunks.append((pos[keep], b_ts[keep], cols["item_id"][keep],
                                            cols["category_id"][keep], np.full(int(keep.sum()), part_idx)))
            chunks = part_chunks + chunks  # parts are read newest first; keep log order
            need &= count < L
        if chunks:
            local, b_ts, items, cats, part = (np.concatenate(c) for c in zip(*chunks))
        else:
            local, b_ts, items, cats, part = (np.zeros(0, dtype=np.int64) for _ in range(5))
        t0 = int(min(ts.min(), b_ts.min())) if len(b_ts) else int(ts.min())
        span = max(horizon, int(b_ts.max()) if len(b_ts) else horizon) - t0 + 1
        if U * span >= 1 << 62:
            raise DataError(f"{folder}: ts range {span} too wide to pack with {U} users into int64 keys")
        keys = local * span + (b_ts - t0)
        order = np.argsort(keys, kind="stable")  # stable: equal (user, ts) stay in part, then file, order
        keys, local, part = keys[order], local[order], part[order]
        bad = (local[1:] == local[:-1]) & (part[1:] < part[:-1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{folder}: user {uniq[local[i]]} has a behaviour in {parts[part[i]].name} older than one in "
                f"{parts[part[i + 1]].name}; a user's behaviours must be in time order across parts"
            )
        return _BucketLog(users=uniq, keys=keys, items=items[order], cats=cats[order], t0=t0, span=span)


# --------------------------------------------------------------------------- choosing a reader


def open_reader(
    cfg: JobConfig,
    root: str | Path,
    days: int | Sequence[int],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> ParquetBatchReader:
    """The reader of ``cfg.data.layout`` for ``days`` of ``root`` (this rank's share).

    A root in the other layout is a DataError saying how to convert it, not a
    confusing schema error further down; a root whose ``_dataset.json`` was written for
    other features (another vocabulary or ``max_seq_len``: e.g. ``cdp-rec evaluate --data``
    of another data set, whose ids would fit the tables and score silently) is a DataError
    naming the key (:func:`~cdp_rec.data.loader.check_dataset_spec`).
    """
    root = Path(root)
    day_list = [days] if isinstance(days, int) else list(days)
    check_data_root(root)
    check_dataset_spec(root, cfg.features)
    on_disk = "joined" if (root / LAYOUT_FILE).is_file() else "rows"
    if on_disk != cfg.data.layout:
        raise DataError(
            f"{root}: holds the {on_disk} layout but data.layout is {cfg.data.layout!r}; set "
            f"data.layout={on_disk} or convert it: cdp-rec convert --src {root} --dst DIR --to {cfg.data.layout}"
        )
    if cfg.data.layout == "joined":
        return JoinedBatchReader(root, day_list, cfg.features, batch_size, rank=rank, world_size=world_size,
                                 dedup_requests=cfg.data.dedup_requests, allow_empty_days=cfg.data.allow_empty_days)
    if cfg.data.layout == "rows":
        files = dataset_files(root, day_list, allow_empty=cfg.data.allow_empty_days)
        return ParquetBatchReader(files, cfg.features, batch_size, rank=rank, world_size=world_size,
                                  dedup_requests=cfg.data.dedup_requests)
    raise ConfigError(f"data.layout must be one of ['rows', 'joined'], got {cfg.data.layout!r}")
