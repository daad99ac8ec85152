"""Benchmark: training-step cost of CDP vs the base model (and DIN / SIM) at long histories.

What is measured, per (model, history length L, batch B), each case in a fresh subprocess:

* the real unsharded single-process step -- ``cdp_rec.training.trainer.Trainer(cfg, None)``
  and its ``train_steps`` (``prepare_batch``, forward, ``zero_grad``, backward, the sparse
  row-lazy Adam + dense Adam step, ``loss.item()`` in ``on_step``), one call per step;
* on synthetic in-memory batches (no disk IO in the timed loop): configs/small.yaml's
  features with ``features.max_seq_len=L``, and **every sample has exactly L behaviours**
  (the worst case the config allows; real logs are shorter on average -- data/small has
  a mean of 0.66 * max_seq_len). Ids are uniform over each vocabulary; a behaviour's
  category is the target's with probability 0.2 (21.5% on data/small), so CDP's filter
  keeps ~0.2 * L behaviours per sample. Two distinct batches alternate;
* time: wall clock per step after ``--warmup`` steps (excluded; the first steps also
  allocate optimizer state and fault in the allocator's pages), at least ``--min-steps``
  timed steps and then until ``--min-seconds`` have passed (at most ``--max-steps``);
  samples/s = B / median step time. Cost per sample relative to base = base samples/s /
  model samples/s, measured in the same run (cases of one (L, B) run back to back);
* memory: resident-set high-water mark from ``/proc/self/status`` (``VmHWM``, what
  ``resource.getrusage().ru_maxrss`` reports, but resettable through
  ``/proc/self/clear_refs``): ``peak RSS`` is the process's peak over the whole case
  (interpreter, model, optimizer state, the two batches, the steps); ``+MiB/step`` is
  the steady-state transient of one step -- the peak during the timed steps minus the RSS
  just before them. Not tracemalloc (it cannot see torch's allocations).

The issue's target -- CDP costs at most 1.3x the base model per sample at L=2000 -- is
checked and printed for every batch size.

Request-level deduplication (``--dedup``, issue 16): the cases run on *request-shaped*
batches instead -- requests of K ~ U{4..12} impressions (the generator's), cut at the
batch edge, sharing user, query, context, scene and one history of exactly L behaviours
(a behaviour's category is the request's query category with probability 0.2, else
uniform); an impression's target category is the query's with probability 0.7 (the
generator's ``ITEM_FROM_QUERY_CATEGORY``), else uniform -- each model once with
``data.dedup_requests=false`` (every row carries its copy) and once with ``true`` (the
batches in the reader's deduplicated form, :func:`cdp_rec.data.loader.share_histories`).
The two run in *one* process, steps alternating (off, on, off, ...), so load from other
jobs hits both alike: the speed-up of dedup over no dedup is measured within each pair
(wall clock and process CPU time); peak RSS is then the pair's, the per-step increase is
not measured.

    .venv/bin/python bench/train_step.py                        # full: L=200,1000,2000 x B=512,4096 x base,cdp,din,sim
    .venv/bin/python bench/train_step.py --models base,cdp --json runs/bench/train_step.json
    .venv/bin/python bench/train_step.py --quick                # smoke: tiny sizes, 2 steps
    .venv/bin/python bench/train_step.py --dedup --models base,cdp --seq-lens 200,2000 --batches 512 --threads 1

Not a test: numbers depend on the machine and its load (a shared 2-core VM here: compare
ratios from one run, not absolute numbers across runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402

TARGET_RATIO = 1.3  # CDP cost per sample <= 1.3x base at L=2000
TARGET_L = 2000
DEFAULT_CONFIG = str(ROOT / "configs/small.yaml")


# --------------------------------------------------------------------------- worker


IMPRESSIONS_PER_REQUEST = (4, 12)  # the generator's K ~ U{4..12}
FROM_QUERY_CATEGORY = 0.7  # the generator's ITEM_FROM_QUERY_CATEGORY


def request_batches(features, batch_size: int, seq_len: int, n: int, seed: int = 0) -> list:
    """``n`` request-shaped :class:`Batch` es, every row with its own copy of its request's history.

    Requests of K ~ U{4..12} impressions (the last one cut at the batch edge) share user,
    query, context, scene and one history of exactly ``seq_len`` behaviours whose category
    is the request's query category with probability ``C.MATCH_RATE``, else uniform; an
    impression's item category is the query's with probability 0.7, else uniform.
    """
    import dataclasses

    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch, id_ranges, sparse_keys

    g = torch.Generator().manual_seed(seed)
    ranges = id_ranges(dataclasses.replace(features, id_mapping={}))
    keys = sparse_keys(features)
    per_request = {"user_id", "query_id", *features.context_features, *features.scene_features}
    B, L = batch_size, seq_len
    lo, hi = IMPRESSIONS_PER_REQUEST
    out = []
    for _ in range(n):
        sizes = torch.randint(lo, hi + 1, (B // lo + 1,), generator=g)
        R = int(torch.searchsorted(sizes.cumsum(0), torch.tensor(B))) + 1
        sizes = sizes[:R].clone()
        sizes[-1] -= int(sizes.sum()) - B
        req = torch.repeat_interleave(torch.arange(R), sizes)  # [B] request of each row
        qcat = torch.randint(0, ranges["category_id"], (R,), generator=g)
        cols = {}
        for k in keys[:-2]:
            draw = torch.randint(0, ranges[k], (R if k in per_request else B,), generator=g)
            cols[k] = draw[req] if k in per_request else draw
        from_query = torch.rand(B, generator=g) < FROM_QUERY_CATEGORY
        cols["category_id"] = torch.where(from_query, qcat[req], cols["category_id"])
        items = torch.randint(0, ranges[HIST_ITEMS], (R, L), generator=g)
        cats = torch.randint(0, ranges[HIST_CATEGORIES], (R, L), generator=g)
        cats = torch.where(torch.rand(R, L, generator=g) < C.MATCH_RATE, qcat[:, None], cats)
        values = torch.cat([cols[k] for k in keys[:-2]] + [items[req].reshape(-1), cats[req].reshape(-1)])
        lengths = torch.cat([torch.ones(B * (len(keys) - 2), dtype=torch.int64),
                             torch.full((2 * B,), L, dtype=torch.int64)])
        kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
        labels = (torch.rand(B, generator=g) < 0.2).float()
        out.append(Batch(kjt, labels, cols["user_id"].clone(), req))
    return out


def run_dedup_pair(spec: dict) -> list[dict]:
    """One model with ``data.dedup_requests`` off and on, on the same request-shaped batches, steps alternating."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from cdp_rec.data.loader import share_histories
    from cdp_rec.training.trainer import Trainer

    model, L, B = spec["model"], spec["seq_len"], spec["batch"]
    trainers, data = {}, {}
    for dedup in (False, True):
        cfg = C.bench_config(spec["config"], [f"features.max_seq_len={L}", f"model.name={model}",
                                              f"train.batch_size={B}", f"data.dedup_requests={str(dedup).lower()}",
                                              *spec.get("set", [])])
        batches = request_batches(cfg.features, B, L, 2, seed=spec.get("seed", 0))
        data[dedup] = [share_histories(b) for b in batches] if dedup else batches
        trainers[dedup] = Trainer(cfg, None)

    def step(dedup: bool, i: int) -> None:
        trainers[dedup].train_steps([data[dedup][i % 2]], lambda out: out["loss"].item())

    for i in range(spec["warmup"]):
        for dedup in (False, True):
            step(dedup, i)
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    t_start = time.perf_counter()
    i = spec["warmup"]
    while len(times[True]) < spec["max_steps"] and (
        len(times[True]) < spec["min_steps"] or time.perf_counter() - t_start < 2 * spec["min_seconds"]
    ):
        for dedup in (False, True):
            c0, t0 = time.process_time(), time.perf_counter()
            step(dedup, i)
            times[dedup].append(time.perf_counter() - t0)
            cpu[dedup].append(time.process_time() - c0)
        i += 1
    peak = C.peak_rss_mib()
    out = []
    for dedup in (False, True):
        med = C.median(times[dedup])
        out.append({
            **spec, "dedup": dedup,
            "step_s": [round(t, 5) for t in times[dedup]],
            "median_step_s": med,
            "median_step_cpu_s": C.median(cpu[dedup]),
            "samples_per_s": B / med,
            "behaviours_per_step": B * L,
            "history_ids_in_batch": int(data[dedup][0].sparse["hist_item_ids"].lengths().sum()),
            "peak_rss_mib": round(peak, 1),
            "step_peak_increase_mib": None,
            "threads": torch.get_num_threads(),
            "loadavg": C.loadavg(),
        })
    return out


def run_case(spec: dict) -> dict | list[dict]:
    import torch

    if spec.get("pair"):
        return run_dedup_pair(spec)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from cdp_rec.data.loader import share_histories
    from cdp_rec.training.trainer import Trainer

    model, L, B = spec["model"], spec["seq_len"], spec["batch"]
    dedup = spec.get("dedup", False)
    cfg = C.bench_config(spec["config"], [f"features.max_seq_len={L}", f"model.name={model}",
                                          f"train.batch_size={B}", f"data.dedup_requests={str(dedup).lower()}",
                                          *spec.get("set", [])])
    if spec.get("batches", "uniform") == "requests":
        batches = request_batches(cfg.features, B, L, 2, seed=spec.get("seed", 0))
        if dedup:
            batches = [share_histories(b) for b in batches]
    else:
        batches = C.synthetic_batches(cfg.features, B, L, 2, seed=spec.get("seed", 0))
    cuda = spec.get("device") == "cuda"
    if cuda:
        trainer = _cuda_trainer(cfg)
    else:
        trainer = Trainer(cfg, None)
    n_params = sum(p.numel() for p in trainer.model.parameters())

    def on_step(out):
        out["loss"].item()  # what the real loop does every step (and a CUDA sync)

    def step(i: int) -> None:
        trainer.train_steps([batches[i % len(batches)]], on_step)

    rss_built = C.rss_mib()
    peak = C.peak_rss_mib()
    C.reset_peak()
    for i in range(spec["warmup"]):
        step(i)
    peak = max(peak, C.peak_rss_mib())
    rss_warm = C.rss_mib()
    reset_ok = C.reset_peak()
    if cuda:
        torch.cuda.synchronize()
        hbm_warm = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    cpu: list[float] = []  # process CPU time per step: blind to time spent descheduled on a loaded box
    t_start = time.perf_counter()
    i = spec["warmup"]
    while len(times) < spec["max_steps"] and (
        len(times) < spec["min_steps"] or time.perf_counter() - t_start < spec["min_seconds"]
    ):
        c0, t0 = time.process_time(), time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        i += 1
    step_peak = C.peak_rss_mib()
    peak = max(peak, step_peak)
    med = C.median(times)
    return {
        **spec,
        "step_s": [round(t, 5) for t in times],
        "median_step_s": med,
        "median_step_cpu_s": C.median(cpu),
        "samples_per_s": B / med,
        "behaviours_per_step": B * L,
        "history_ids_in_batch": int(batches[0].sparse["hist_item_ids"].lengths().sum()),
        "rss_built_mib": round(rss_built, 1),
        "rss_after_warmup_mib": round(rss_warm, 1),
        "peak_rss_mib": round(peak, 1),
        "step_peak_increase_mib": round(step_peak - rss_warm, 1) if reset_ok else None,
        "params": n_params,
        "threads": torch.get_num_threads(),
        "loadavg": C.loadavg(),
        **({"device": "cuda", "gpu": torch.cuda.get_device_name(), "hbm_after_warmup_mib": round(hbm_warm / 2**20, 1),
            "hbm_step_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cuda else {}),
    }


def _cuda_trainer(cfg):
    """A 1-GPU sharded trainer: DistributedModelParallel on CUDA with fbgemm's fused sparse
    optimizer (what a GPU job runs), without the input pipeline so each step is timed alone."""
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(C.free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    cfg.sharding.compute_device = "cuda"
    cfg.sharding.pipeline = False
    return Trainer(cfg, init_from_env("cuda"))


# --------------------------------------------------------------------------- driver


def _plan(args) -> list[dict]:
    common = {"config": args.config, "threads": args.threads, "set": args.set, "device": args.device}
    if args.quick:
        lens, batches, models = [50, 200], [64], args.models or ["base", "cdp", "din", "sim"]  # one process
        reps = {"warmup": 1, "min_steps": 2, "max_steps": 2, "min_seconds": 0.0}
        # ... and the dedup comparison once (base, cdp; request-shaped batches at L=50).
        extra = [{"model": m, "seq_len": 50, "batch": 64, "batches": "requests", "pair": True, **common, **reps}
                 for m in ("base", "cdp")]
    else:
        lens, batches, models = args.seq_lens, args.batches, args.models or ["base", "cdp", "din", "sim"]
        reps = {"warmup": args.warmup, "min_steps": args.min_steps, "max_steps": args.max_steps,
                "min_seconds": args.min_seconds}
        extra = []
    if args.dedup:
        return [{"model": m, "seq_len": L, "batch": B, "batches": "requests", "pair": True, **common, **reps}
                for L in lens for B in batches for m in models]
    return [
        {"model": m, "seq_len": L, "batch": B, "batches": "uniform", "dedup": False, **common, **reps}
        for L in lens for B in batches for m in models
    ] + extra


def summarize(results: list[dict]) -> dict:
    def key(r: dict) -> tuple:
        return r["seq_len"], r["batch"], r["model"], r.get("batches", "uniform"), r.get("dedup", False)

    by = {key(r): r for r in results}
    rows = []
    for (L, B, m, kind, dedup), r in by.items():
        base = by.get((L, B, "base", kind, dedup))  # the base model on the same batches, same dedup setting
        ratio = base["samples_per_s"] / r["samples_per_s"] if base else None
        plain = by.get((L, B, m, kind, False)) if dedup else None
        rows.append({
            "seq_len": L, "batch": B, "model": m, "batches": kind, "dedup": dedup,
            "dedup_speedup": None if plain is None else round(r["samples_per_s"] / plain["samples_per_s"], 3),
            "median_step_cpu_ms": round(r["median_step_cpu_s"] * 1e3, 2),
            "dedup_speedup_cpu": (None if plain is None
                                  else round(plain["median_step_cpu_s"] / r["median_step_cpu_s"], 3)),
            "history_ids_in_batch": r.get("history_ids_in_batch"),
            "median_step_ms": round(r["median_step_s"] * 1e3, 2),
            "samples_per_s": round(r["samples_per_s"], 1),
            "cost_per_sample_vs_base": None if ratio is None else round(ratio, 3),
            "peak_rss_mib": r["peak_rss_mib"],
            "step_peak_increase_mib": r["step_peak_increase_mib"],
            "timed_steps": len(r["step_s"]),
            **({k: r[k] for k in ("hbm_after_warmup_mib", "hbm_step_peak_mib")} if r.get("device") == "cuda" else {}),
        })
    target = {}
    check_len = TARGET_L if any(k[0] == TARGET_L for k in by) else max(k[0] for k in by)
    kinds = {k[3] for k in by}
    check_kind = "uniform" if "uniform" in kinds else "requests"  # the per-row worst case when it ran
    for (L, B, m, kind, dedup), r in by.items():
        if L == check_len and m == "cdp" and kind == check_kind and not dedup and (L, B, "base", kind, False) in by:
            ratio = by[(L, B, "base", kind, False)]["samples_per_s"] / r["samples_per_s"]
            target[str(B)] = {"seq_len": L, "ratio": round(ratio, 3), "holds": ratio <= TARGET_RATIO}
    return {"rows": rows, "target": target}


def _print_cpu_tables(summary: dict, results: list[dict]) -> None:
    threads, config = results[0]["threads"], os.path.relpath(results[0]["config"], ROOT)
    print(f"\n### Training step, unsharded single process (Trainer(cfg, None).train_steps), {threads} torch threads\n")
    print(f"Synthetic in-memory batches, exactly L behaviours per sample, {config} features "
          "(max_seq_len=L); median over timed steps after warm-up. peak RSS = process high-water mark "
          "(VmHWM); +MiB/step = peak during timed steps minus RSS before them.\n")
    headers = ["L", "batch", "model", "step ms (median)", "samples/s", "cost/sample vs base", "peak RSS MiB",
               "+MiB/step", "steps"]
    plain = [r for r in summary["rows"] if r["batches"] == "uniform"]
    rows = [[r["seq_len"], r["batch"], r["model"], f"{r['median_step_ms']:.1f}", f"{r['samples_per_s']:,.0f}",
             "" if r["cost_per_sample_vs_base"] is None else f"{r['cost_per_sample_vs_base']:.2f}x",
             f"{r['peak_rss_mib']:,.0f}",
             "n/a" if r["step_peak_increase_mib"] is None else f"{r['step_peak_increase_mib']:,.0f}",
             r["timed_steps"]] for r in plain]
    if rows:
        print(C.md_table(headers, rows))
    requests = [r for r in summary["rows"] if r["batches"] == "requests"]
    if requests:
        print(f"\n#### Request-level deduplication (data.dedup_requests), request-shaped batches "
              f"(K ~ U{{{IMPRESSIONS_PER_REQUEST[0]}..{IMPRESSIONS_PER_REQUEST[1]}}} impressions per request, "
              f"one history of exactly L per request)\n")
        headers = ["L", "batch", "model", "dedup", "history ids in batch", "step ms (median)", "CPU ms/step",
                   "samples/s", "dedup speed-up (CPU)", "cost/sample vs base", "peak RSS MiB", "+MiB/step", "steps"]
        rows = [[r["seq_len"], r["batch"], r["model"], "on" if r["dedup"] else "off",
                 f"{r['history_ids_in_batch']:,}", f"{r['median_step_ms']:.1f}", f"{r['median_step_cpu_ms']:.1f}",
                 f"{r['samples_per_s']:,.0f}",
                 "" if r["dedup_speedup"] is None else f"{r['dedup_speedup']:.2f}x ({r['dedup_speedup_cpu']:.2f}x)",
                 "" if r["cost_per_sample_vs_base"] is None else f"{r['cost_per_sample_vs_base']:.2f}x",
                 f"{r['peak_rss_mib']:,.0f}",
                 "n/a" if r["step_peak_increase_mib"] is None else f"{r['step_peak_increase_mib']:,.0f}",
                 r["timed_steps"]] for r in requests]
        print(C.md_table(headers, rows))


def print_report(summary: dict, results: list[dict], wall: float, load0: float, load1: float) -> None:
    if results[0].get("device") == "cuda":
        print(f"\n### Training step on {results[0]['gpu']}: 1-GPU sharded DMP (fused sparse optimizer, no pipeline)\n")
        headers = ["L", "batch", "model", "step ms (median)", "samples/s", "cost/sample vs base", "HBM after warm-up MiB",
                   "HBM step peak MiB", "steps"]
        rows = [[r["seq_len"], r["batch"], r["model"], f"{r['median_step_ms']:.2f}", f"{r['samples_per_s']:,.0f}",
                 "" if r["cost_per_sample_vs_base"] is None else f"{r['cost_per_sample_vs_base']:.2f}x",
                 f"{r['hbm_after_warmup_mib']:,.0f}", f"{r['hbm_step_peak_mib']:,.0f}", r["timed_steps"]]
                for r in summary["rows"]]
        print(C.md_table(headers, rows))
    else:
        _print_cpu_tables(summary, results)
    print()
    for B, t in summary["target"].items():
        verdict = "HOLDS" if t["holds"] else "DOES NOT HOLD"
        print(f"target CDP <= {TARGET_RATIO}x base cost per sample at L={t['seq_len']}, batch {B}: "
              f"{t['ratio']:.2f}x -> {verdict}")
    if not summary["target"]:
        print("target not checked (needs models base and cdp)")
    print(f"\n(total {wall:.0f} s; 1-minute load average {load0:.1f} at start, {load1:.1f} at end, "
          f"{os.cpu_count()} cores)")


def _flat(results: list) -> list[dict]:
    return [r for x in results for r in (x if isinstance(x, list) else [x])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: L=50,200, B=64, 2 steps per case")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="features and model sizes (--quick: configs/tiny.yaml)")
    ap.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=None,
                    help="comma-separated (default base,cdp,din,sim)")
    ap.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[200, 1000, 2000])
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[512, 4096])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-steps", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--min-seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--set", action="append", default=[], help="config override for every case")
    ap.add_argument("--dedup", action="store_true",
                    help="request-shaped batches, each model with data.dedup_requests off and on")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: the unsharded single-process step (default); cuda: the 1-GPU sharded step "
                         "(DistributedModelParallel, fused sparse optimizer, no input pipeline)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda" and args.dedup:
        ap.error("--dedup runs on CPU only")
    if args.worker:  # one case, or (--quick) a list of cases in one process
        spec = json.loads(args.worker)
        print(json.dumps(_flat([run_case(s) for s in spec]) if isinstance(spec, list) else run_case(spec)))
        return
    if args.quick and args.config == DEFAULT_CONFIG:
        args.config = str(ROOT / "configs/tiny.yaml")  # tiny tables: seconds to build and step

    C.warn_if_loaded(args.threads)
    t0, load0 = time.perf_counter(), C.loadavg()
    plan = _plan(args)
    # Full: a fresh process per case (clean peak RSS). Quick: one process for all (start-up dominates).
    results = C.spawn_worker(__file__, plan) if args.quick else []
    for spec in [] if args.quick else plan:
        out = C.spawn_worker(__file__, spec)
        results.extend(out if isinstance(out, list) else [out])
        for r in out if isinstance(out, list) else [out]:
            print(f"  ran L={r['seq_len']} B={r['batch']} {r['model']:<5}{' dedup' if r.get('dedup') else ''}: "
                  f"{r['median_step_s'] * 1e3:.1f} ms/step, {r['samples_per_s']:,.0f} samples/s, "
                  f"peak {r['peak_rss_mib']:,.0f} MiB", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    summary = summarize(results)
    load1 = C.loadavg()
    print_report(summary, results, wall, load0, load1)
    C.write_json(args.json, {
        "bench": "train_step", "quick": args.quick, "config": args.config, "target_ratio": TARGET_RATIO,
        "lengths": "exactly L behaviours per sample", "memory": "VmHWM (peak RSS), /proc/self/status",
        "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": load1, "wall_s": round(wall, 1),
        **summary, "cases": results,
    })


if __name__ == "__main__":
    main()
