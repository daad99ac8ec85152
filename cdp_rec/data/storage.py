"""Bytes on disk of the two storage layouts at a config's scale, measured then extrapolated.

Nothing is hand-written: :func:`estimate_storage` generates a small synthetic sample with
the config's sequence length, context / scene columns and Parquet settings, writes it in
both layouts with the real writers (:func:`cdp_rec.data.synthetic.write_rows_day`,
:func:`cdp_rec.data.joined.write_impressions` / :func:`~cdp_rec.data.joined.write_behaviours`:
zstd, ``data.row_group_size`` rows per row group for impressions and
:data:`~cdp_rec.data.joined.BEHAVIOUR_ROW_GROUP` for behaviours), measures the files,
and scales:

* rows:   ``bytes/impression x samples_per_day x days``;
* joined: ``impression bytes/impression x samples_per_day x days
  + bytes/behaviour x behaviours/user/day x num_users x days
  + bytes/behaviour x behaviours/user before day 0 x num_users`` (the log is stored once).

The sample. A world of the config's size cannot be built here (400M users), so the
sample has ``U_s = sample_impressions x num_users / samples_per_day`` users (the same
impressions per user per day as the config), at most ``ITEM_CAP`` items and
``QUERY_CAP`` queries, and its ids are then spread over the config's vocabularies by a
bijective affine map, so the written ids have the magnitudes (and entropy) of real ones.
The measured day is ``SAMPLE_DAY``. Histories keep growing over a run (the generator
logs 0.5 L behaviours per user before day 0 and 0.1 L per day, at mean activity, so
low-activity users fill up late), so the rows layout's history columns are scaled from
the sample day's mean history length to the run's mean
(:func:`cdp_rec.data.synthetic.mean_history_lengths`, from the same rates): e.g. 1,716
on day 6 vs 1,873 over 61 days at L = 2000. Parquet's per-column sizes split the two.
One user bucket is used so that per-file overhead of a tiny sample does not count; at
scale a bucket file holds ``samples_per_day / N`` rows.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cdp_rec.config import ConfigError, JobConfig
from cdp_rec.data import joined as J
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, table_schema
from cdp_rec.data.synthetic import generate_periods, mean_history_lengths
from cdp_rec.data.writer import Behaviours, write_rows_day

ITEM_CAP = 100_000
QUERY_CAP = 20_000
SAMPLE_DAY = 6  # generating a later day costs ~1 s of log per day at L = 2000


@dataclass
class StorageEstimate:
    """Measured sizes (bytes) and their extrapolation to the config (decimal units in the report)."""

    samples_per_day: int
    days: int
    train_days: int
    test_days: int
    num_users: int
    max_seq_len: int
    row_group_size: int
    # The sample.
    sample_day: int
    sample_impressions: int
    sample_users: int
    sample_mean_history: float
    run_mean_history: float  # over all days of the config, from the generator's rates
    sample_behaviours_day: int  # behaviours logged on the sample day
    sample_behaviours_pre: int
    # Measured (rows_bytes_per_impression: scaled to run_mean_history).
    rows_bytes_per_impression_sample: float
    rows_bytes_per_impression: float
    joined_impression_bytes_per_impression: float
    behaviour_bytes_day: float  # per behaviour, day parts
    behaviour_bytes_pre: float  # per behaviour, the part before day 0
    # Assumptions used for the extrapolation.
    behaviours_per_user_day: float
    behaviours_per_user_pre: float
    # Extrapolated.
    rows_per_day: float
    rows_total: float
    joined_impressions_per_day: float
    joined_behaviours_per_day: float
    joined_behaviours_pre: float
    joined_per_day: float
    joined_total: float

    @property
    def joined_bytes_per_impression(self) -> float:
        return self.joined_per_day / self.samples_per_day

    @property
    def break_even_behaviours_per_user_day(self) -> float:
        """Daily behaviours per user below which the joined layout is the smaller one."""
        return (self.rows_per_day - self.joined_impressions_per_day) / (self.behaviour_bytes_day * self.num_users)


def _spread(ids: np.ndarray, small: int, big: int, salt: int) -> np.ndarray:
    """Map ids in ``[0, small)`` injectively into ``[0, big)``: ``(a * id + salt) mod big``
    with ``gcd(a, big) = 1`` (a bijection of Z_big), so small ids get the spread of real ones."""
    if big <= small:
        return ids
    a = int(big * 0.6180339887) | 1
    while math.gcd(a, big) != 1:
        a += 2
    # Python ints for a, salt: a * id stays below 2**63 for vocabularies < 3e9.
    return (ids.astype(np.int64) * a + salt) % big


def _sample_config(cfg: JobConfig, sample_impressions: int) -> tuple[JobConfig, int]:
    s = copy.deepcopy(cfg)
    f, d = cfg.features, cfg.data
    users = int(round(sample_impressions * f.num_users / d.samples_per_day))
    s.features.num_users = max(50, min(users, 50_000, f.num_users))
    s.features.num_items = min(f.num_items, ITEM_CAP)
    s.features.num_queries = min(f.num_queries, QUERY_CAP)
    s.features.num_categories = min(f.num_categories, s.features.num_items)
    s.data.samples_per_day = sample_impressions
    s.data.rows_per_file = sample_impressions
    s.data.num_user_buckets = 1
    day = min(SAMPLE_DAY, d.train_days + d.test_days - 1)
    return s, day


def _remap_table(t: pa.Table, s: JobConfig, cfg: JobConfig) -> pa.Table:
    fs, f = s.features, cfg.features
    cols = {name: t.column(name) for name in t.column_names}
    cols["user_id"] = pa.array(_spread(t.column("user_id").to_numpy(), fs.num_users, f.num_users, 7))
    cols["item_id"] = pa.array(_spread(t.column("item_id").to_numpy(), fs.num_items, f.num_items, 11))
    cols["query_id"] = pa.array(_spread(t.column("query_id").to_numpy(), fs.num_queries, f.num_queries, 13))
    for name, small, big, salt in ((HIST_ITEMS, fs.num_items, f.num_items, 11),
                                   (HIST_CATEGORIES, fs.num_categories, f.num_categories, 17)):
        arr = t.column(name).combine_chunks()
        values = _spread(pc.list_flatten(arr).to_numpy(), small, big, salt)
        cols[name] = pa.ListArray.from_arrays(arr.offsets, pa.array(values))
    cols["category_id"] = pa.array(_spread(t.column("category_id").to_numpy(), fs.num_categories,
                                           f.num_categories, 17))
    schema = table_schema(f)
    return pa.Table.from_arrays([cols[n] for n in schema.names], schema=schema)


def _remap_behaviours(b: Behaviours, s: JobConfig, cfg: JobConfig) -> Behaviours:
    fs, f = s.features, cfg.features
    users = _spread(b.user_id, fs.num_users, f.num_users, 7)
    # The map need not preserve order; the files must stay sorted by (user, ts).
    order = np.lexsort((b.ts, users))
    return Behaviours(users[order], b.ts[order],
                      _spread(b.item_id, fs.num_items, f.num_items, 11)[order],
                      _spread(b.category_id, fs.num_categories, f.num_categories, 17)[order])


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def _column_bytes(paths: list[Path], columns: tuple[str, ...]) -> int:
    """Compressed bytes of ``columns`` in ``paths``, from the Parquet footers."""
    total = 0
    for path in paths:
        md = pq.read_metadata(path)
        for rg in range(md.num_row_groups):
            for i in range(md.num_columns):
                col = md.row_group(rg).column(i)
                if col.path_in_schema.split(".")[0] in columns:
                    total += col.total_compressed_size
    return total


def estimate_storage(
    cfg: JobConfig, sample_impressions: int = 4000, behaviours_per_user_day: float | None = None
) -> StorageEstimate:
    """Measure both layouts on a sample and extrapolate to ``cfg`` (module docstring)."""
    if sample_impressions < 100:
        raise ConfigError(f"--sample-impressions must be >= 100, got {sample_impressions}")
    if behaviours_per_user_day is not None and behaviours_per_user_day < 0:
        raise ConfigError(f"--behaviours-per-user-day must be >= 0, got {behaviours_per_user_day}")
    s, day = _sample_config(cfg, sample_impressions)
    rg = cfg.data.row_group_size
    with tempfile.TemporaryDirectory(prefix="cdp-storage-") as tmp:
        rows_dir, joined_dir = Path(tmp) / "rows", Path(tmp) / "joined"
        rows_files: list[Path] = []
        imp_files: list[Path] = []
        pre_files: list[Path] = []
        day_files: list[Path] = []
        n_pre = n_day = n_days_total = 0
        mean_hist = 0.0
        for period in generate_periods(s, [day], with_behaviours=True):
            assert period.behaviours is not None
            beh = _remap_behaviours(period.behaviours, s, cfg)
            written = J.write_behaviours(joined_dir, period.index, beh, 1)
            if period.index == 0:
                pre_files += written
                n_pre = len(beh.user_id)
            else:
                day_files += written
                n_days_total += len(beh.user_id)
                n_day = len(beh.user_id)
            if period.impressions is not None:
                table = _remap_table(period.impressions, s, cfg)
                mean_hist = float(pc.mean(pc.list_value_length(table.column(HIST_ITEMS))).as_py() or 0.0)
                rows_files = write_rows_day(rows_dir, period.day, table, s.data.rows_per_file, rg)
                imp_files = J.write_impressions(joined_dir, period.day, table, cfg.features, 1, rg)
        rows_bytes = _size(rows_files)
        hist_bytes = _column_bytes(rows_files, (HIST_ITEMS, HIST_CATEGORIES))
        imp_bpi = _size(imp_files) / sample_impressions
        beh_day = _size(day_files) / max(n_days_total, 1)
        beh_pre = _size(pre_files) / max(n_pre, 1)

    users_s = s.features.num_users
    f, d = cfg.features, cfg.data
    days = d.train_days + d.test_days
    run_hist = float(mean_history_lengths(s, range(days)).mean())
    scale = run_hist / mean_hist if mean_hist else 1.0
    rows_bpi = (rows_bytes - hist_bytes + hist_bytes * scale) / sample_impressions
    per_user_day = behaviours_per_user_day if behaviours_per_user_day is not None else n_days_total / (day + 1) / users_s
    per_user_pre = n_pre / users_s
    rows_per_day = rows_bpi * d.samples_per_day
    imp_day = imp_bpi * d.samples_per_day
    beh_per_day = beh_day * per_user_day * f.num_users
    beh_pre_total = beh_pre * per_user_pre * f.num_users
    return StorageEstimate(
        samples_per_day=d.samples_per_day, days=days, train_days=d.train_days, test_days=d.test_days,
        num_users=f.num_users, max_seq_len=f.max_seq_len, row_group_size=rg,
        sample_day=day, sample_impressions=sample_impressions, sample_users=users_s,
        sample_mean_history=mean_hist, run_mean_history=run_hist, sample_behaviours_day=n_day, sample_behaviours_pre=n_pre,
        rows_bytes_per_impression_sample=rows_bytes / sample_impressions,
        rows_bytes_per_impression=rows_bpi, joined_impression_bytes_per_impression=imp_bpi,
        behaviour_bytes_day=beh_day, behaviour_bytes_pre=beh_pre,
        behaviours_per_user_day=per_user_day, behaviours_per_user_pre=per_user_pre,
        rows_per_day=rows_per_day, rows_total=rows_per_day * days,
        joined_impressions_per_day=imp_day, joined_behaviours_per_day=beh_per_day,
        joined_behaviours_pre=beh_pre_total, joined_per_day=imp_day + beh_per_day,
        joined_total=(imp_day + beh_per_day) * days + beh_pre_total,
    )


def _fmt_bytes(x: float) -> str:
    """Decimal units (1 kB = 1000 B), as disks and object stores bill."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x:,.0f} B"


def format_report(e: StorageEstimate, name: str) -> str:
    ratio = e.joined_total / e.rows_total if e.rows_total else float("nan")
    beh_bpi = e.joined_behaviours_per_day / e.samples_per_day
    lines = [
        f"storage plan: {name}: {e.samples_per_day:,} impressions/day x {e.days} days "
        f"({e.train_days} train + {e.test_days} test), max_seq_len {e.max_seq_len:,}, {e.num_users:,} users",
        f"measured: synthetic day {e.sample_day} of {e.sample_impressions:,} impressions, {e.sample_users:,} users "
        f"(mean history {e.sample_mean_history:,.0f} of {e.max_seq_len:,}), {e.sample_behaviours_day:,} behaviours that "
        f"day and {e.sample_behaviours_pre:,} before day 0; written with the data sets' writers (zstd, row groups of "
        f"{e.row_group_size:,} impressions / {J.BEHAVIOUR_ROW_GROUP:,} behaviours, 1 user bucket); ids spread over "
        f"the config's vocabularies",
        f"assumptions: {e.behaviours_per_user_day:,.1f} behaviours per user per day and "
        f"{e.behaviours_per_user_pre:,.0f} per user before day 0, stored once (the generator's 0.1 and 0.5 x "
        f"max_seq_len at mean activity unless --behaviours-per-user-day); rows' history columns scaled from the "
        f"sample day's mean length to the run's, {e.run_mean_history:,.0f} (the generator's rates; "
        f"{e.rows_bytes_per_impression_sample:,.0f} B per impression unscaled); decimal units",
        "",
        f"{'layout':<34}{'per impression':>16}{'per day':>14}{f'all {e.days} days':>16}",
        f"{'rows   (histories inline)':<34}{e.rows_bytes_per_impression:>14,.0f} B"
        f"{_fmt_bytes(e.rows_per_day):>14}{_fmt_bytes(e.rows_total):>16}",
        f"{'joined (behaviour log once)':<34}{e.joined_bytes_per_impression:>14,.0f} B"
        f"{_fmt_bytes(e.joined_per_day):>14}{_fmt_bytes(e.joined_total):>16}",
        f"{'  impressions':<34}{e.joined_impression_bytes_per_impression:>14,.0f} B"
        f"{_fmt_bytes(e.joined_impressions_per_day):>14}{_fmt_bytes(e.joined_impressions_per_day * e.days):>16}",
        f"{f'  behaviours ({e.behaviour_bytes_day:.2f} B each)':<34}{beh_bpi:>14,.0f} B"
        f"{_fmt_bytes(e.joined_behaviours_per_day):>14}{_fmt_bytes(e.joined_behaviours_per_day * e.days):>16}",
        f"{f'  behaviours before day 0 ({e.behaviour_bytes_pre:.2f} B each)':<34}{'':>16}{'':>14}"
        f"{_fmt_bytes(e.joined_behaviours_pre):>16}",
        "",
        f"joined / rows: {ratio:.3f}" + (f" ({1 / ratio:,.1f}x smaller)" if ratio < 1 else f" ({ratio:,.2f}x larger)")
        + f"; raw int64 history lists would be {16 * e.max_seq_len:,} B per impression",
        f"break-even: joined is smaller below {e.break_even_behaviours_per_user_day:,.0f} behaviours per user per day "
        f"(here {e.samples_per_day / e.num_users:.2f} impressions per user per day; rows costs the same per impression "
        f"at any behaviour rate once histories are full)",
    ]
    return "\n".join(lines)


def report_json(e: StorageEstimate) -> str:
    d: dict[str, Any] = asdict(e)
    d["joined_bytes_per_impression"] = e.joined_bytes_per_impression
    d["break_even_behaviours_per_user_day"] = e.break_even_behaviours_per_user_day
    return json.dumps(d, indent=2)
