"""Benchmark: ``cdp-rec import`` on a generated Taobao-format log -- events/s and peak RSS.

Data: a UserBehavior-style CSV (``user,item,category,type,unix ts``, no header) of
``--events`` events (10M) by ``--users`` users (50k), written into a temporary directory
(deleted afterwards; ``--data DIR`` keeps / reuses it): user activity log-normal, items
Zipf(1.1) over ``--items`` (500k) in 5k categories, half of each user's events uniform
within one of 3 favourite categories (so a model has something to learn), types 89.5% pv
/ 5.5% cart / 2.9% fav / 2.1% buy (the public data set's mix), timestamps uniform over 9
days. ``--write-log PATH`` only writes such a log (the README's sample).

What is measured: the import (``--format taobao --negatives 4``, the defaults otherwise:
max_seq_len of ``--config``, ~1M events per user bucket) into each of ``--layouts`` (joined
and rows), each in a fresh
subprocess: wall time, input events/s, output rows/s, the process's peak RSS (``VmHWM``)
and its RSS right before the import started (interpreter + numpy + pyarrow + torch), the
input and output sizes. With ``--sizes`` several log sizes are imported (same users,
items and days) so peak RSS can be compared across sizes: bounded memory means it grows
with the buckets and the vocabularies, not with the log.

    .venv/bin/python bench/import.py                       # 10M events x 50k users (~2 min to write the log)
    .venv/bin/python bench/import.py --sizes 2500000,10000000
    .venv/bin/python bench/import.py --quick               # smoke: 200k events x 2k users, rows layout

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DEFAULT_CONFIG = "configs/small.yaml"
TYPES = ("pv", "cart", "fav", "buy")
TYPE_MIX = (0.895, 0.055, 0.029, 0.021)
FAVOURITE_SHARE = 0.5


def write_log(path: Path, events: int, users: int, items: int, seed: int = 0) -> float:
    """The synthetic UserBehavior CSV; returns the seconds it took."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.0, size=users)
    user_cdf = np.cumsum(activity) / activity.sum()
    item_w = 1.0 / np.arange(1, items + 1) ** 1.1
    item_cdf = np.cumsum(item_w[rng.permutation(items)]) / item_w.sum()
    n_cat = 5_000
    item_cat = rng.integers(0, n_cat, size=items)
    by_cat = np.argsort(item_cat, kind="stable")
    cat_off = np.searchsorted(item_cat[by_cat], np.arange(n_cat + 1))
    favourite = rng.integers(0, n_cat, size=(users, 3))  # some signal: users return to 3 categories
    t_start = 1_511_539_200  # 2017-11-25 00:00 +08:00
    chunk = 1_000_000
    with pacsv.CSVWriter(path, pa.schema([("u", pa.int64()), ("i", pa.int64()), ("c", pa.int64()),
                                          ("t", pa.string()), ("ts", pa.int64())]),
                         write_options=pacsv.WriteOptions(include_header=False, quoting_style="none")) as w:
        for s in range(0, events, chunk):
            n = min(chunk, events - s)
            u = np.minimum(np.searchsorted(user_cdf, rng.random(n)), users - 1) + 1
            i = np.minimum(np.searchsorted(item_cdf, rng.random(n)), items - 1)
            fav = rng.random(n) < FAVOURITE_SHARE
            c = favourite[u[fav] - 1, rng.integers(0, 3, size=int(fav.sum()))]
            size = cat_off[c + 1] - cat_off[c]
            ok = size > 0
            pick = cat_off[c] + (rng.random(len(c)) * size).astype(np.int64)
            i[np.flatnonzero(fav)[ok]] = by_cat[pick[ok]]
            t = np.array(TYPES)[rng.choice(4, size=n, p=TYPE_MIX)]
            ts = t_start + rng.integers(0, 9 * 86_400, size=n)
            w.write_table(pa.table({"u": u, "i": i + 1, "c": item_cat[i] + 1, "t": t, "ts": ts}))
    return time.perf_counter() - t0


def run_import(spec: dict) -> dict:
    """Worker: one import in this (fresh) process."""
    import argparse as ap

    from cdp_rec.data.importers.cli import add_import_parser

    parser = ap.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["import", "--format", "taobao", spec["log"], "--out", spec["out"], "--force",
                              "--config", spec["config"], "--quiet", *spec["extra"]])
    rss0 = C.rss_mib()
    C.reset_peak()
    t0 = time.perf_counter()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        args.func(args)
    wall = time.perf_counter() - t0
    s = json.loads((Path(spec["out"]) / "_dataset.json").read_text())
    out_bytes = sum(p.stat().st_size for p in Path(spec["out"]).rglob("*") if p.is_file())
    return {"events": s["source"]["events_kept"], "rows": s["rows"], "wall_s": wall,
            "events_per_s": s["source"]["events_kept"] / wall, "rows_per_s": s["rows"] / wall,
            "rss_before_mib": rss0, "peak_rss_mib": C.peak_rss_mib(), "out_bytes": out_bytes,
            "buckets": s["train_config"]["data"].get("num_user_buckets"),
            "hist_mean": s["history_length"]["mean"], "max_seq_len": s["history_length"]["max_seq_len"],
            "ctr": s["ctr"], "users": s["cardinality"]["user_id"]["distinct"],
            "items": s["cardinality"]["item_id"]["distinct"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 200k events x 2k users, tiny config")
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--sizes", default=None, help="comma-separated event counts (default: --events)")
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--items", type=int, default=500_000)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="features / file sizes (default configs/small.yaml)")
    p.add_argument("--negatives", type=int, default=4)
    p.add_argument("--layouts", default="joined,rows", help="output layouts, each imported separately")
    p.add_argument("--data", default=None, help="keep the generated logs and outputs here")
    p.add_argument("--json", default=None)
    p.add_argument("--write-log", default=None, metavar="PATH", help="only write a log of --events x --users")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_import(json.loads(args.worker))))
        return
    if args.write_log:
        Path(args.write_log).parent.mkdir(parents=True, exist_ok=True)
        s = write_log(Path(args.write_log), args.events, args.users, args.items)
        print(f"wrote {args.events:,} events of {args.users:,} users to {args.write_log} ({s:.1f} s)")
        return
    if args.quick:
        args.events, args.users, args.items, args.config = 200_000, 2_000, 20_000, "configs/tiny.yaml"
        args.sizes, args.layouts = None, "rows"
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [args.events]
    base = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="cdp-import-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    load0 = C.loadavg()
    results = []
    try:
        for n in sizes:
            log = base / f"UserBehavior-{n}-{args.users}.csv"
            gen_s = 0.0
            if not log.exists():
                gen_s = write_log(log, n, args.users, args.items)
            for layout in args.layouts.split(","):
                out = base / f"out-{n}-{layout}"
                spec = {"log": str(log), "out": str(out), "config": args.config,
                        "extra": ["--negatives", str(args.negatives), "--layout", layout]}
                r = C.spawn_worker(__file__, spec, timeout=3600)
                r.update({"layout": layout, "in_bytes": log.stat().st_size, "gen_s": gen_s})
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
                if not args.data:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.data:
            shutil.rmtree(base, ignore_errors=True)
    rows = [[f"{r['events']:,}", f"{args.users:,}", r["layout"], f"{r['rows']:,}", f"{r['wall_s']:.1f}", f"{r['events_per_s']:,.0f}",
             f"{r['rows_per_s']:,.0f}", f"{r['peak_rss_mib']:,.0f}", f"{r['rss_before_mib']:,.0f}",
             f"{r['in_bytes'] / 1e6:,.0f}", f"{r['out_bytes'] / 1e6:,.0f}", r["buckets"] or "-",
             f"{r['hist_mean']:.1f} / {r['max_seq_len']}"] for r in results]
    print(C.md_table(["events", "users", "layout", "rows out", "wall s", "events/s", "rows/s", "peak RSS MiB",
                      "RSS before MiB", "CSV MB", "out MB", "buckets", "hist mean / L"], rows))
    print(f"\nconfig {args.config}, --negatives {args.negatives}; "
          f"load average {load0:.1f} -> {C.loadavg():.1f}; {os.cpu_count()} cores")
    C.write_json(args.json, {"bench": "import", "quick": args.quick, "config": args.config,
                             "negatives": args.negatives, "rows": results})


if __name__ == "__main__":
    main()
