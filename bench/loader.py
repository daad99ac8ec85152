"""Benchmark: the Parquet -> KJT loader vs a bare pyarrow read vs what training consumes; its memory.

Data: ``--days`` (8) days generated with :func:`cdp_rec.data.synthetic.generate_dataset`
into a temporary directory (deleted afterwards; ``--data DIR`` reuses / keeps one),
configs/small.yaml's features and file layout (200k rows per day in 2 files of 5 row
groups, zstd; histories up to 200 behaviours, ~130 on average). ``--quick``:
configs/tiny.yaml, 3,000 rows per day.

What is measured, each part in a fresh subprocess:

* throughput (one day's files, read from the page cache -- they are read once first):

  - ``bare pyarrow``: ``pq.ParquetFile(f).read_row_group(rg, columns=...)`` for every row
    group, each single-valued column ``to_numpy()``, each list column flattened to numpy
    values + lengths (``pc.list_flatten`` / ``pc.list_value_length``) -- the least any
    reader must do;
  - ``loader``: :class:`cdp_rec.data.loader.ParquetBatchReader` -- the same read plus
    validation (nulls, id ranges, lengths), batching across row groups and KJT assembly;
  - one untimed pass of each, then the two interleaved, ``--reps`` passes each, median;
    rows/s and behaviours/s;
  - training consumption: samples/s of the unsharded training step
    (``Trainer(cfg, None).train_steps``) for ``base`` and ``cdp`` on the loader's first
    ``--train-batches`` batches, held in memory (no IO in the timed loop), after 3
    warm-up steps. The loader must be >= 3x faster than training consumes (then loading
    inline costs at most 25% of the step time);
  - end to end: training straight from the reader (the loader inline in the training
    thread, as ``cdp_rec.training.trainer`` does); and, when a
    ``cdp_rec.data.prefetch.Prefetcher`` exists, the same through it (``--prefetch-depth``
    batches read ahead by a background thread). Not needed so far: the loader is far
    above 3x, so the module was not written.

* memory: RSS (``VmRSS``) after streaming day 0 and after streaming all ``--days`` days
  (one reader per day, as the trainer does; batches dropped), growth in %, target
  <= 5%; also the RSS after each day, the process's peak RSS (``VmHWM``) and pyarrow's
  allocated bytes. A second process repeats it calling pyarrow's pool
  ``release_unused()`` and glibc's ``malloc_trim(0)`` after each day, so its RSS tracks
  live memory rather than freed memory the allocators keep for reuse: it tells a leak
  from allocator noise (the target is checked on the first, untrimmed run). Both
  processes import the loader only, so their RSS is mostly the interpreter, torch and
  pyarrow plus one row group's working set; the growth is the signal.

    .venv/bin/python bench/loader.py                          # full: 8 small days (~1 min to generate)
    .venv/bin/python bench/loader.py --data /tmp/cdp-8days    # generate once into DIR, reuse later
    .venv/bin/python bench/loader.py --quick                  # smoke: 8 tiny days

Not a test: numbers depend on the machine and its load (a shared 2-core VM here).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402

TARGET_SPEEDUP = 3.0  # loader rows/s >= 3x training samples/s
TARGET_GROWTH = 0.05  # RSS growth from 1 to N days <= 5%
DEFAULT_CONFIG = str(ROOT / "configs/small.yaml")


def _cfg(spec: dict):
    return C.bench_config(spec["config"], spec["set"])


# --------------------------------------------------------------------------- workers


def bare_read(files, columns, list_columns) -> tuple[int, int]:
    """Every row group of ``files`` to numpy, nothing else; returns (rows, behaviours)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = behaviours = 0
    for f in files:
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=columns)
            for name in columns:
                col = t.column(name)
                if name in list_columns:
                    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
                    lengths = pc.list_value_length(arr).to_numpy()
                    values = pc.list_flatten(arr).to_numpy()
                    if name == list_columns[0]:
                        behaviours += len(values)
                        assert len(lengths) == t.num_rows
                else:
                    col.to_numpy()
            rows += t.num_rows
    return rows, behaviours


def run_throughput(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from cdp_rec.data.loader import ParquetBatchReader, list_day_files
    from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, table_schema
    from cdp_rec.training.trainer import Trainer

    cfg = _cfg(spec)
    B = cfg.train.batch_size
    files = list_day_files(spec["root"], 0)
    columns = table_schema(cfg.features).names
    for f in files:  # into the page cache: measure decoding, not the disk
        Path(f).read_bytes()

    def loader_pass() -> int:
        return sum(len(b) for b in ParquetBatchReader(files, cfg.features, B))

    bare_read(files, columns, [HIST_ITEMS, HIST_CATEGORIES])  # warm-up passes (first-call costs), not timed
    loader_pass()
    bare_s, loader_s = [], []
    rows = behaviours = 0
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        rows, behaviours = bare_read(files, columns, [HIST_ITEMS, HIST_CATEGORIES])
        bare_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loader_rows = loader_pass()
        loader_s.append(time.perf_counter() - t0)
        assert loader_rows == rows, (loader_rows, rows)
    result = {
        **spec, "batch": B, "rows": rows, "behaviours": behaviours, "files": len(files),
        "bare_s": bare_s, "loader_s": loader_s,
        "bare_rows_per_s": rows / C.median(bare_s), "loader_rows_per_s": rows / C.median(loader_s),
        "bare_behaviours_per_s": behaviours / C.median(bare_s),
        "loader_behaviours_per_s": behaviours / C.median(loader_s),
    }

    n = spec["train_batches"]
    held = list(itertools.islice(iter(ParquetBatchReader(files, cfg.features, B)), n))
    warmup = 3
    try:
        from cdp_rec.data.prefetch import Prefetcher
    except ImportError:
        Prefetcher = None
    train = {}
    for model in spec["models"]:
        cfg_m = C.bench_config(spec["config"], [*spec["set"], f"model.name={model}"])
        trainer = Trainer(cfg_m, None)
        trainer.train_steps(held[:warmup], lambda out: None)
        t0 = time.perf_counter()
        samples = [0]

        def on_step(out):
            out["loss"].item()
            samples[0] += out["logits"].numel()

        trainer.train_steps(held[warmup:], on_step)
        held_s = time.perf_counter() - t0
        r = {"held_samples_per_s": samples[0] / held_s, "held_steps": len(held) - warmup}

        def from_reader(wrap):
            samples[0] = 0
            t0 = time.perf_counter()
            it = itertools.islice(iter(ParquetBatchReader(files, cfg.features, B)), warmup, n)
            trainer.train_steps(wrap(it), on_step)
            return samples[0] / (time.perf_counter() - t0)

        # Inline (as the trainer does) and prefetched: the same batches (skipping the
        # warm-up ones is part of the timed reading, as in a resumed run).
        r["inline_samples_per_s"] = from_reader(lambda it: it)
        if Prefetcher is not None:
            r["prefetch_samples_per_s"] = from_reader(lambda it: Prefetcher(it, spec["prefetch_depth"]))
        r["loader_speedup_vs_training"] = result["loader_rows_per_s"] / r["held_samples_per_s"]
        train[model] = r
    result["train"] = train
    result["prefetch_available"] = Prefetcher is not None
    result["threads"] = torch.get_num_threads()
    result["loadavg"] = C.loadavg()
    return result


def run_memory(spec: dict) -> dict:
    import pyarrow as pa

    from cdp_rec.data.loader import ParquetBatchReader, list_day_files

    cfg = _cfg(spec)
    B = cfg.train.batch_size
    trim = _malloc_trim() if spec.get("trim") else None
    rss_start = C.rss_mib()
    per_day = []
    rows = 0
    for day in range(spec["days"]):
        for b in ParquetBatchReader(list_day_files(spec["root"], day), cfg.features, B):
            rows += len(b)
        if trim is not None:  # hand freed pages back to the kernel: RSS ~ live memory
            pa.default_memory_pool().release_unused()
            trim(0)
        per_day.append(round(C.rss_mib(), 1))
    rss1, rssn = per_day[0], per_day[-1]
    return {
        **spec, "batch": B, "rows": rows, "rss_start_mib": round(rss_start, 1), "rss_per_day_mib": per_day,
        "rss_after_1_day_mib": rss1, f"rss_after_{spec['days']}_days_mib": rssn,
        "rss_after_last_day_mib": rssn, "growth": (rssn - rss1) / rss1,
        "peak_rss_mib": round(C.peak_rss_mib(), 1), "pyarrow_allocated_mib": pa.total_allocated_bytes() / C.MiB,
        "pyarrow_pool": pa.default_memory_pool().backend_name, "trimmed": trim is not None,
    }


def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- driver


def generate(args, root: Path) -> tuple[float, bool]:
    from cdp_rec.data.synthetic import dataset_is_complete, generate_dataset

    cfg = C.bench_config(args.config, args.set)
    if dataset_is_complete(cfg, root):
        return 0.0, False
    if root.exists() and any(root.iterdir()):  # never overwrite someone's data set
        raise SystemExit(f"{root} holds data of another config (or an incomplete set); "
                         f"give an empty or new directory to --data")
    t0 = time.perf_counter()
    generate_dataset(cfg, root)
    return time.perf_counter() - t0, True


def print_report(tp: dict, mem: dict, gen_s: float, wall: float, load0: float, load1: float) -> None:
    config = os.path.relpath(tp["config"], ROOT)
    print(f"\n### Loader throughput, {config}, day 0 ({tp['rows']:,} rows, {tp['files']} files, "
          f"{tp['behaviours'] / tp['rows']:.0f} behaviours/row on average), batch {tp['batch']}, "
          f"{tp['threads']} torch threads\n")
    bare, load = tp["bare_rows_per_s"], tp["loader_rows_per_s"]
    print(C.md_table(
        ["reader", "rows/s", "behaviours/s", "vs bare pyarrow", "passes"],
        [["bare pyarrow (read_row_group -> numpy)", f"{bare:,.0f}", f"{tp['bare_behaviours_per_s']:,.0f}", "1.00x",
          len(tp["bare_s"])],
         ["ParquetBatchReader (-> KJT batches)", f"{load:,.0f}", f"{tp['loader_behaviours_per_s']:,.0f}",
          f"{load / bare:.2f}x", len(tp["loader_s"])]]))
    print(f"\n### Training consumption (unsharded step on the loader's batches held in memory) vs the loader\n")
    headers = ["model", "train samples/s (held)", "loader / training", f">= {TARGET_SPEEDUP:.0f}x?",
               "samples/s, loader inline"]
    if tp["prefetch_available"]:
        headers += [f"samples/s, Prefetcher(depth {tp['prefetch_depth']})", "prefetch / inline"]
    rows = []
    for m, r in tp["train"].items():
        row = [m, f"{r['held_samples_per_s']:,.0f}", f"{r['loader_speedup_vs_training']:.2f}x",
               "yes" if r["loader_speedup_vs_training"] >= TARGET_SPEEDUP else "NO",
               f"{r['inline_samples_per_s']:,.0f}"]
        if "prefetch_samples_per_s" in r:
            pf = r["prefetch_samples_per_s"]
            row += [f"{pf:,.0f}", f"{pf / r['inline_samples_per_s']:.2f}x"]
        rows.append(row)
    print(C.md_table(headers, rows))
    steps = next(iter(tp["train"].values()))["held_steps"]
    print(f"\n({steps} timed steps after 3 warm-up steps per model; 'inline' / 'Prefetcher': training straight from "
          f"a reader over the same batches, reading included)")
    days = mem["days"]
    print(f"\n### Loader memory: RSS while streaming {days} days ({mem['rows']:,} rows), one reader per day\n")
    print(C.md_table(
        ["RSS at start MiB", "after day 0 MiB", f"after {days} days MiB", "growth", f"<= {TARGET_GROWTH:.0%}?",
         "peak RSS MiB", "pyarrow allocated MiB"],
        [[f"{mem['rss_start_mib']:,.0f}", f"{mem['rss_after_1_day_mib']:,.1f}", f"{mem['rss_after_last_day_mib']:,.1f}",
          f"{100 * mem['growth']:+.2f}%", "yes" if mem["growth"] <= TARGET_GROWTH else "NO",
          f"{mem['peak_rss_mib']:,.0f}", f"{mem['pyarrow_allocated_mib']:.1f}"]]))
    print(f"\nRSS after each day (MiB): {', '.join(f'{x:,.1f}' for x in mem['rss_per_day_mib'])}")
    tr = mem.get("trimmed_run")
    if tr and tr["trimmed"]:
        print(f"the same in a second process calling pyarrow's release_unused() and malloc_trim(0) after each day "
              f"(RSS ~ live memory, not what the allocators keep for reuse): "
              f"{', '.join(f'{x:,.1f}' for x in tr['rss_per_day_mib'])}; "
              f"growth {100 * tr['growth']:+.2f}%")
    print(f"pyarrow memory pool: {mem['pyarrow_pool']}")
    worst = min(r["loader_speedup_vs_training"] for r in tp["train"].values())
    print(f"\ntarget loader >= {TARGET_SPEEDUP:.0f}x faster than training consumes: worst model {worst:.2f}x -> "
          f"{'HOLDS' if worst >= TARGET_SPEEDUP else 'DOES NOT HOLD'}")
    print(f"target RSS growth 1 -> {days} days <= {TARGET_GROWTH:.0%}: {100 * mem['growth']:+.2f}% -> "
          f"{'HOLDS' if mem['growth'] <= TARGET_GROWTH else 'DOES NOT HOLD'}")
    gen = f"data generated in {gen_s:.0f} s (not counted), " if gen_s else "data reused, "
    print(f"\n({gen}total {wall:.0f} s; 1-minute load average {load0:.1f} at start, {load1:.1f} at end, "
          f"{os.cpu_count()} cores)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 tiny days of 3,000 rows")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="features, file layout, batch size (--quick: tiny)")
    ap.add_argument("--days", type=int, default=8)
    ap.add_argument("--data", help="data directory to (generate and) reuse; default: a temporary one, deleted")
    ap.add_argument("--reps", type=int, default=3, help="passes over day 0 per reader")
    ap.add_argument("--train-batches", type=int, default=40, help="batches for the training rates (3 are warm-up)")
    ap.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=["base", "cdp"])
    ap.add_argument("--prefetch-depth", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--set", action="append", default=[], help="config override")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_throughput(spec) if spec["part"] == "throughput" else run_memory(spec)))
        return
    if args.quick:
        if args.config == DEFAULT_CONFIG:
            args.config = str(ROOT / "configs/tiny.yaml")
        args.set = ["data.samples_per_day=3000", "data.rows_per_file=1500", "data.row_group_size=500", *args.set]
        args.reps, args.train_batches = 1, 6
    args.set = [f"data.train_days={args.days - 1}", "data.test_days=1", *args.set]

    C.warn_if_loaded(args.threads)
    t0, load0 = time.perf_counter(), C.loadavg()
    tmp = None
    if args.data:
        root = Path(args.data)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
        root = tmp / "data"
    try:
        print(f"  data in {root} ...", file=sys.stderr, flush=True)
        gen_s, _ = generate(args, root)
        t1 = time.perf_counter()
        common = {"config": args.config, "set": args.set, "root": str(root), "threads": args.threads}
        tp = C.spawn_worker(__file__, {**common, "part": "throughput", "reps": args.reps, "models": args.models,
                                       "train_batches": args.train_batches, "prefetch_depth": args.prefetch_depth})
        print(f"  throughput: loader {tp['loader_rows_per_s']:,.0f} rows/s", file=sys.stderr, flush=True)
        mem = C.spawn_worker(__file__, {**common, "part": "memory", "days": args.days})
        mem["trimmed_run"] = C.spawn_worker(__file__, {**common, "part": "memory", "days": args.days, "trim": True})
        wall = time.perf_counter() - t1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    load1 = C.loadavg()
    print_report(tp, mem, gen_s, wall, load0, load1)
    worst = min(r["loader_speedup_vs_training"] for r in tp["train"].values())
    C.write_json(args.json, {
        "bench": "loader", "quick": args.quick, "config": args.config, "days": args.days,
        "target_speedup": TARGET_SPEEDUP, "target_growth": TARGET_GROWTH, "cpus": os.cpu_count(),
        "loadavg_start": load0, "loadavg_end": load1, "generate_s": round(gen_s, 1), "wall_s": round(wall, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "loader_rows_per_s": tp["loader_rows_per_s"], "bare_rows_per_s": tp["bare_rows_per_s"],
        "loader_behaviours_per_s": tp["loader_behaviours_per_s"], "bare_behaviours_per_s": tp["bare_behaviours_per_s"],
        "worst_loader_speedup_vs_training": worst, "speedup_holds": worst >= TARGET_SPEEDUP,
        "rss_growth": mem["growth"], "growth_holds": mem["growth"] <= TARGET_GROWTH,
        "rss_growth_trimmed": mem["trimmed_run"]["growth"],
        "throughput": tp, "memory": mem,
    })


if __name__ == "__main__":
    main()
