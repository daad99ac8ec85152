"""Benchmark: serving latency of the eager model vs its serving package (fp32 and int8 tables).

What is measured, per model (``base``, ``cdp``, ``sim``; fresh subprocess each), history
length L and batch of R requests:

* latency of scoring one batch, wall clock per call, p50 and p99 (nearest rank; with
  fewer than 100 calls p99 is the slowest call), one torch thread, variants measured
  *interleaved* (round-robin, a few calls of each per round) so load from other
  processes hits all of them alike:

  - ``eager``: the training model, ``model.prepare_batch(batch)`` + ``model(batch)`` under
    ``torch.inference_mode()`` (fp32 TorchRec EBC/EC, eager dense layers);
  - ``pkg fp32`` / ``pkg int8``: ``load_package(PKG).predict(batch)`` of a package written by
    ``cdp-rec export --serving`` (:func:`cdp_rec.serving.export.write_package`) from the
    same weights: TorchRec quantized lookups (fbgemm CPU kernels) + the ``torch.export``
    program, plus the id mapping, range checks and the sigmoid;
  - ``eager dedup`` / ``pkg int8 dedup``: the same on the request-deduplicated form of the
    batch (``data.dedup_requests``: one history per request plus ``Batch.history_row``,
    made by :func:`cdp_rec.data.loader.share_histories` before timing): base and CDP's
    eager models and the package look up / filter / pool once per request (and target
    category); eager SIM expands the histories back per row, the package does its search
    once per (request, category);
  - ``pkg int8 aoti`` (``--aoti``): the same package's AOTInductor build (``native=True``);
    compiling it takes ~20-30 s per model, excluded from the latency;
  - with ``--cdp-sample-steps K`` a second CDP model, ``cdp K=<K>``
    (``model.diffusion.sample_steps=K``, the skip-step sampler), is measured the same way.

* inputs: synthetic request-grouped batches in the loader's per-impression format: R
  requests of K ~ U{4..12} impressions (the generator's), each request one user, query,
  context, scene and history of exactly L behaviours, copied into each of its
  impressions; a request's impressions are mostly (85%) of one category and a behaviour's
  category is that one with probability 0.2 (as on data/small). Two distinct batches cycled.
* weights: the model's deterministic random init (``torch.manual_seed(0)``, configs/small.yaml
  sizes); latency does not depend on training. The logits of each package variant are
  compared with eager on the first batch (``max_abs_diff``).

    .venv/bin/python bench/serving.py                       # full: L=200,2000 x R=1,64,512
    .venv/bin/python bench/serving.py --aoti --cdp-sample-steps 5 --json runs/bench/serving.json
    .venv/bin/python bench/serving.py --quick               # smoke: tiny sizes, 2-step CDP, one process

Not a test: numbers depend on the machine and its load (a shared 2-core VM here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402

DEFAULT_CONFIG = str(ROOT / "configs/small.yaml")
MODELS = ("base", "cdp", "sim")


# --------------------------------------------------------------------------- inputs


def request_batches(features, n_requests: int, seq_len: int, n: int, seed: int = 0,
                    match_rate: float = C.MATCH_RATE) -> list:
    """``n`` Batches of ``n_requests`` requests (K ~ U{4..12} impressions each), L behaviours per request."""
    import dataclasses

    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch, id_ranges, sparse_keys

    g = torch.Generator().manual_seed(seed)
    ranges = id_ranges(dataclasses.replace(features, id_mapping={}))
    keys = sparse_keys(features)
    per_request = [k for k in keys if k not in (HIST_ITEMS, HIST_CATEGORIES, "item_id", "category_id")]
    R, L = n_requests, seq_len
    out = []
    for _ in range(n):
        k = torch.randint(4, 13, (R,), generator=g)
        req = torch.repeat_interleave(torch.arange(R), k)
        B = int(k.sum())
        cols = {c: torch.randint(0, ranges[c], (R,), generator=g)[req] for c in per_request}
        main_cat = torch.randint(0, ranges["category_id"], (R,), generator=g)
        other = torch.randint(0, ranges["category_id"], (B,), generator=g)
        cols["category_id"] = torch.where(torch.rand(B, generator=g) < 0.85, main_cat[req], other)
        cols["item_id"] = torch.randint(0, ranges["item_id"], (B,), generator=g)
        items = torch.randint(0, ranges[HIST_ITEMS], (R, L), generator=g)
        cats = torch.randint(0, ranges[HIST_CATEGORIES], (R, L), generator=g)
        cats = torch.where(torch.rand(R, L, generator=g) < match_rate, main_cat[:, None], cats)
        singles = [c for c in keys if c not in (HIST_ITEMS, HIST_CATEGORIES)]
        values = torch.cat([cols[c] for c in singles] + [items[req].reshape(-1), cats[req].reshape(-1)])
        lengths = torch.cat([torch.ones(B * len(singles), dtype=torch.int64),
                             torch.full((2 * B,), L, dtype=torch.int64)])
        kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
        labels = (torch.rand(B, generator=g) < 0.2).float()
        out.append(Batch(kjt, labels, cols["user_id"].clone(), req.clone()))
    return out


# --------------------------------------------------------------------------- worker


def run_model(spec: dict) -> list[dict]:
    """Every (L, R) case of one model: build it, write and load its packages, time the variants."""
    import torch

    torch.set_num_threads(spec["threads"])
    from cdp_rec.models import build_model
    from cdp_rec.serving import load_package
    from cdp_rec.serving.export import write_package

    name = spec["model"]
    model_name = "cdp" if name.startswith("cdp K=") else name
    overrides = [f"features.max_seq_len={max(spec['seq_lens'])}", f"model.name={model_name}",
                 "data.dedup_requests=true", *spec["set"]]  # models other than base / CDP expand shared histories
    if spec.get("sample_steps"):
        overrides.append(f"model.diffusion.sample_steps={spec['sample_steps']}")
    cfg = C.bench_config(spec["config"], overrides)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    build: dict[str, float] = {}
    packages = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        for dtype in spec["dtypes"]:
            t0 = time.perf_counter()
            compile = "aoti" if spec["aoti"] and dtype == "int8" else "none"
            manifest, _ = write_package(model, cfg, Path(tmp) / dtype, dtype, compile)
            build[f"export {dtype}"] = round(time.perf_counter() - t0, 2)
            if manifest["dense"].get("aoti_compile_s") is not None:
                build["aoti compile int8"] = manifest["dense"]["aoti_compile_s"]
            t0 = time.perf_counter()
            packages[f"pkg {dtype}"] = load_package(Path(tmp) / dtype)
            build[f"load {dtype}"] = round(time.perf_counter() - t0, 2)
            if compile == "aoti":
                if manifest["dense"].get("aoti"):
                    packages[f"pkg {dtype} aoti"] = load_package(Path(tmp) / dtype, native=True)
                else:
                    build["aoti_error"] = manifest["dense"].get("aoti_error")
        results = []
        for L in spec["seq_lens"]:
            for R in spec["requests"]:
                results.append(_time_case(spec, model, packages, cfg, L, R, name, build))
    return results


def _time_case(spec: dict, model, packages: dict, cfg, L: int, R: int, name: str, build: dict) -> dict:
    import torch

    from cdp_rec.data.loader import share_histories

    plain = request_batches(cfg.features, R, L, 2, seed=1)
    # The form the reader emits with data.dedup_requests: one history per request + history_row.
    shared = [share_histories(b) for b in plain]

    def eager(b):
        return model(model.prepare_batch(b))[1]["logits"]

    fns = {"eager": (eager, plain), "eager dedup": (eager, shared)}
    for k, p in packages.items():
        fns[k] = (p.logits, plain)
        if k == "pkg int8":
            fns["pkg int8 dedup"] = (p.logits, shared)
    with torch.inference_mode():
        ref = eager(plain[0])
        diffs = {k: float((fn(bs[0]) - ref).abs().max()) for k, (fn, bs) in fns.items() if k != "eager"}
    state = {"i": 0}

    def caller(fn, batches):
        def call():
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            return fn(b)

        return call

    variants = {k: caller(fn, bs) for k, (fn, bs) in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            for _ in range(spec["warmup"]):
                fn()
        t_start, rounds = time.perf_counter(), 0
        while rounds < spec["max_rounds"] and (rounds < spec["min_rounds"]
                                               or time.perf_counter() - t_start < spec["min_seconds"]):
            for k, fn in variants.items():
                for _ in range(spec["per_round"]):
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            rounds += 1
    return {
        "model": name, "seq_len": L, "requests": R, "impressions": len(plain[0]),
        "variants": {k: {"p50_ms": C.median(ts) * 1e3, "p99_ms": C.percentile(ts, 99) * 1e3, "calls": len(ts)}
                     for k, ts in times.items()},
        "max_abs_logit_diff_vs_eager": diffs, "build_s": build, "threads": torch.get_num_threads(),
        "loadavg": C.loadavg(),
    }


# --------------------------------------------------------------------------- driver


def summarize(cases: list[dict]) -> list[dict]:
    rows = []
    for c in cases:
        v = c["variants"]
        eager = v["eager"]["p50_ms"]
        row = {"model": c["model"], "seq_len": c["seq_len"], "requests": c["requests"],
               "impressions": c["impressions"]}
        for k, x in v.items():
            row[f"{k}|p50_ms"] = round(x["p50_ms"], 3)
            row[f"{k}|p99_ms"] = round(x["p99_ms"], 3)
            if k != "eager":
                row[f"{k}|p50_vs_eager"] = round(x["p50_ms"] / eager, 3)
        rows.append(row)
    return rows


def print_report(cases: list[dict], wall: float, load0: float, load1: float, config: str) -> None:
    names = list(dict.fromkeys(k for c in cases for k in c["variants"]))
    print(f"\n### Serving latency per batch, {cases[0]['threads']} torch thread(s), {os.path.relpath(config, ROOT)}\n")
    print("Synthetic request-grouped batches (R requests x U{4..12} impressions, exactly L behaviours each). "
          "p50 / p99 ms per call (nearest rank), variants interleaved; x = p50 relative to eager.\n")
    headers = ["model", "L", "requests", "impressions"] + [f"{n} p50 / p99" for n in names]
    rows = []
    for c in cases:
        v, eager = c["variants"], c["variants"]["eager"]["p50_ms"]
        cells = []
        for n in names:
            if n not in v:
                cells.append("")
                continue
            cell = f"{v[n]['p50_ms']:.2f} / {v[n]['p99_ms']:.2f}"
            if n != "eager":
                cell += f" ({v[n]['p50_ms'] / eager:.2f}x)"
            cells.append(cell)
        rows.append([c["model"], c["seq_len"], c["requests"], c["impressions"], *cells])
    print(C.md_table(headers, rows))
    print()
    seen = set()
    for c in cases:
        if c["model"] in seen:
            continue
        seen.add(c["model"])
        diffs = ", ".join(f"{k} {d:.1e}" for k, d in c["max_abs_logit_diff_vs_eager"].items())
        builds = ", ".join(f"{k} {s}" + ("" if isinstance(s, str) else " s") for k, s in c["build_s"].items())
        print(f"{c['model']}: max |logit - eager| {diffs} (L={c['seq_len']}, R={c['requests']}); {builds}")
    print(f"\n(total {wall:.0f} s; 1-minute load average {load0:.1f} at start, {load1:.1f} at end, "
          f"{os.cpu_count()} cores)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: configs/tiny.yaml, L=50, R=1,4, few calls")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="features and model sizes (--quick: configs/tiny.yaml)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[200, 2000])
    ap.add_argument("--requests", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 512])
    ap.add_argument("--min-seconds", type=float, default=6.0, help="per (model, L, R), all variants together")
    ap.add_argument("--min-rounds", type=int, default=10)
    ap.add_argument("--max-rounds", type=int, default=200)
    ap.add_argument("--per-round", type=int, default=2, help="calls of each variant per round")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--aoti", action="store_true", help="also time the int8 package's AOTInductor build")
    ap.add_argument("--cdp-sample-steps", type=int, default=0,
                    help="also time CDP with model.diffusion.sample_steps=K (the skip-step sampler)")
    ap.add_argument("--set", action="append", default=[], help="config override for every model")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps([case for one in (spec if isinstance(spec, list) else [spec]) for case in run_model(one)]))
        return
    timing = {"warmup": 2, "min_rounds": args.min_rounds, "max_rounds": args.max_rounds,
              "per_round": args.per_round, "min_seconds": args.min_seconds}
    if args.quick:
        if args.config == DEFAULT_CONFIG:
            args.config = str(ROOT / "configs/tiny.yaml")
        args.seq_lens, args.requests = [50], [1, 4]
        timing = {"warmup": 1, "min_rounds": 2, "max_rounds": 2, "per_round": 1, "min_seconds": 0.0}
        # Smoke only: a 2-step reverse process keeps CDP's export (tracing the unrolled loop) short.
        args.set = [*args.set, "model.diffusion.inference_steps=2"]
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    plan = [{"model": m} for m in models]
    if args.cdp_sample_steps:
        plan.append({"model": f"cdp K={args.cdp_sample_steps}", "sample_steps": args.cdp_sample_steps})
    for spec in plan:
        spec.update(config=args.config, seq_lens=args.seq_lens, requests=args.requests, threads=args.threads,
                    set=args.set, dtypes=["fp32", "int8"], aoti=args.aoti, **timing)

    t0, load0 = time.perf_counter(), C.loadavg()
    cases = []
    # One fresh process per model; --quick runs them all in one (imports dominate its time).
    for group in ([plan] if args.quick else [[spec] for spec in plan]):
        got = C.spawn_worker(__file__, group)
        cases += got
        print("  ran " + ", ".join(f"{c['model']} L={c['seq_len']} R={c['requests']} eager "
                                   f"{c['variants']['eager']['p50_ms']:.2f} ms" for c in got),
              file=sys.stderr, flush=True)
    wall, load1 = time.perf_counter() - t0, C.loadavg()
    print_report(cases, wall, load0, load1, args.config)
    C.write_json(args.json, {
        "bench": "serving", "quick": args.quick, "config": args.config, "threads": args.threads,
        "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": load1, "wall_s": round(wall, 1),
        "rows": summarize(cases), "cases": cases,
    })


if __name__ == "__main__":
    main()
