"""Benchmark: category-filtered mean pooling -- fused path vs naive vs unfiltered TorchRec pooling.

Run ``.venv/bin/python bench/pooling.py`` (full, several minutes) or ``--quick`` (< 30 s).

Methods (one ``[V, D]`` fp32 item table, histories of exactly ``L`` behaviours):

* ``fused``  -- :func:`embeddings.pooling.category_filtered_mean` on the table
  (a ``Parameter``; passing the EBC that holds it is the same call after a lookup of
  its weight) -- CPU path: chunked filter on the jagged values, then
  ``embedding_bag`` over the matches only;
* ``naive``  -- :func:`embeddings.pooling.category_filtered_mean_reference`: pad to
  ``[B, L]``, gather ``[B, L, D]``, mask, mean;
* ``ebc``    -- a plain TorchRec ``EmbeddingBagCollection`` MEAN-pooling the *unfiltered*
  sequence (all ``B * L`` rows): the cost of the lookup the model would do without the
  category filter.

What is measured, per case, each in a fresh subprocess (the table and inputs are built
first and are not counted):

* time: wall clock of one call, table requiring grad (training mode), min and median
  over repetitions after a warm-up call (naive at B=4096: one call of seconds, no
  warm-up); ``fwd+bwd`` adds ``out.sum().backward()``
  with a dense ``[V, D]`` table gradient for every method (allocated anew per step,
  as after ``zero_grad(set_to_none=True)``), and for the fused path also with
  ``sparse=True`` (a COO gradient of the matching rows only).
* peak memory: the increase of the process's peak resident set size (``VmHWM`` in
  ``/proc/self/status``, reset with ``/proc/self/clear_refs``) during the *first* call
  of its kind in the process, over the resident size just before it. It counts every
  page the call touches for outputs, temporaries, the autograd graph and (fwd+bwd) the
  new table gradient, plus any heap growth and first-touched library pages -- nothing
  torch allocates on the CPU escapes it, and nothing is reused from an earlier call of
  the same kind. It is not ``tracemalloc`` (which cannot see torch).
* bytes/s: bytes the fused kernel must read -- all ``N`` ids and ``N`` categories,
  the ``M`` matching rows of ``D`` floats, targets and offsets -- divided by its
  forward time, against a memory-copy rate measured in the same run (``dst.copy_(src)``
  of 1 GiB, 256 MiB with ``--quick``, in the first fused case's process after its
  timings; bytes copied per second -- the copy also writes as much as it reads).

The machine is a shared 2-core VM: other processes may run at the same time, so the
minimum over repetitions is the headline number; the JSON line has the medians too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402

L, D = 2000, 64
MiB = 2**20


# ---------------------------------------------------------------------------------------
# Worker side: one (method, size) case in a fresh process.
# ---------------------------------------------------------------------------------------


def _peak_increase_mib(fn) -> float:
    """Peak RSS increase (MiB) while running ``fn()``, over the RSS just before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = C.status_kib()["VmRSS"]
    fn()
    return (C.status_kib()["VmHWM"] - before) / 1024


def _times(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_case(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from embeddings.pooling import category_filtered_mean, category_filtered_mean_reference

    b, v, c, method = spec["batch"], spec["rows"], spec["cats"], spec["method"]
    g = torch.Generator().manual_seed(0)
    if method == "ebc":  # only this case imports torchrec (seconds of start-up)
        from embeddings.tables import TableSpec, build_embedding_bag_collection

        ebc = build_embedding_bag_collection([TableSpec("item", v, ("hist_item_ids",))], D, device="meta")
        ebc = ebc.to_empty(device="cpu")
        weight = ebc.embedding_bags["item"].weight
    else:
        weight = torch.nn.Parameter(torch.empty(v, D))
    with torch.no_grad():
        weight.uniform_(-0.05, 0.05, generator=g)
    lengths = torch.full((b,), L, dtype=torch.int64)
    n = b * L
    items = torch.randint(0, v, (n,), generator=g)
    cats = torch.randint(0, c, (n,), generator=g)
    target = torch.randint(0, c, (b,), generator=g)

    if method == "fused":
        def fwd():
            return category_filtered_mean(weight, items, cats, lengths, target)[0]
    elif method == "naive":
        def fwd():
            return category_filtered_mean_reference(weight, items, cats, lengths, target)[0]
    elif method == "ebc":
        from torchrec import KeyedJaggedTensor

        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["hist_item_ids"], values=items, lengths=lengths)

        def fwd():
            return ebc(kjt).to_dict()["hist_item_ids"]
    else:
        raise ValueError(method)

    def step():
        weight.grad = None
        fwd().sum().backward()

    def call():
        fwd()

    result = dict(spec)
    if method == "fused":
        with torch.no_grad():
            pos_counts = category_filtered_mean(weight, items, cats, lengths, target)[1]
        m = int(pos_counts.sum())
        result["matches"] = m
        result["bytes_read"] = n * (items.element_size() + cats.element_size()) + m * D * 4 + b * 8 + (b + 1) * 8
        del pos_counts
    # Peak of the first training-mode forward in this process (nothing cached from an
    # earlier call of the same kind: the conservative number), then timings.
    result["fwd_peak_mib"] = _peak_increase_mib(call)
    if spec.get("warmup", True):
        call()
    result["fwd_ms"] = [round(t * 1e3, 2) for t in _times(call, spec["reps"])]
    if spec["backward"]:
        weight.grad = None
        result["fwdbwd_peak_mib"] = _peak_increase_mib(step)  # includes the new [V, D] gradient
        result["fwdbwd_ms"] = [round(t * 1e3, 2) for t in _times(step, spec["bwd_reps"])]
        if method == "fused":  # the same with a sparse (COO) table gradient: what a 10M-row table wants

            def sparse_step():
                weight.grad = None
                category_filtered_mean(weight, items, cats, lengths, target, sparse=True)[0].sum().backward()

            weight.grad = None
            result["sparse_fwdbwd_peak_mib"] = _peak_increase_mib(sparse_step)
            result["sparse_fwdbwd_ms"] = [round(t * 1e3, 2) for t in _times(sparse_step, max(spec["bwd_reps"], 3))]
    result["threads"] = torch.get_num_threads()
    if spec.get("copy_mib"):
        del weight, items, cats
        result.update(run_copy(spec))
    return result


def run_copy(spec: dict) -> dict:
    import torch

    src = torch.ones(spec["copy_mib"] * MiB // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = _times(lambda: dst.copy_(src), 5)
    return {"copy_bytes": src.numel() * 4, "copy_ms": [round(t * 1e3, 2) for t in ts]}


# ---------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------


def _spawn(spec: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plan(quick: bool) -> list[dict]:
    small = {"batch": 512, "rows": 1_000_000, "cats": 100, "backward": False, "bwd_reps": 0}
    if quick:
        return [
            {**small, "method": "fused", "reps": 3, "copy_mib": 256},
            {**small, "method": "naive", "reps": 1, "warmup": False},
            {**small, "method": "ebc", "reps": 2},
        ]
    cases = []
    for b, v in ((512, 1_000_000), (512, 10_000_000), (4096, 1_000_000), (4096, 10_000_000)):
        for c in (100, 1000):
            for m in ("fused", "naive", "ebc"):
                slow = b == 4096 and m == "naive"  # seconds per call: one repetition, no warm-up
                case = {
                    "batch": b, "rows": v, "cats": c, "method": m,
                    "reps": 1 if slow else 3 if b == 4096 else 5,
                    "warmup": not slow,
                    # fwd+bwd for C=100 only: the backward of every method is dominated by the
                    # dense [V, D] gradient and the naive [B, L, D] graph, not by C.
                    "backward": c == 100,
                    "bwd_reps": 1 if b == 4096 or v == 10_000_000 else 3,
                }
                if (b, v, c, m) == (512, 1_000_000, 100, "fused"):
                    case["copy_mib"] = 1024
                cases.append(case)
    return cases


def _summary(by: dict, copy_rate: float) -> list[dict]:
    """One row per size: the three methods side by side, ratios from the same run."""
    rows = []
    for (b, v, c, m), r in by.items():
        if m != "fused":
            continue
        nv, eb = by[(b, v, c, "naive")], by[(b, v, c, "ebc")]
        f_t, n_t, e_t = min(r["fwd_ms"]), min(nv["fwd_ms"]), min(eb["fwd_ms"])
        f_m, n_m, e_m = r["fwd_peak_mib"], nv["fwd_peak_mib"], eb["fwd_peak_mib"]
        rate = r["bytes_read"] / (f_t / 1e3)
        row = {
            "batch": b, "rows": v, "cats": c, "seq_len": L, "dim": D,
            "matches": r["matches"], "bytes_read": r["bytes_read"],
            "fused_fwd_ms": r["fwd_ms"], "naive_fwd_ms": nv["fwd_ms"], "ebc_fwd_ms": eb["fwd_ms"],
            "fused_fwd_peak_mib": round(f_m, 1), "naive_fwd_peak_mib": round(n_m, 1), "ebc_fwd_peak_mib": round(e_m, 1),
            "speedup_vs_naive": round(n_t / f_t, 2), "speedup_vs_ebc": round(e_t / f_t, 2),
            "memory_ratio_vs_naive": round(n_m / max(f_m, 0.1), 1),
            "fused_bytes_per_s": round(rate), "fraction_of_copy": round(rate / copy_rate, 3),
        }
        if "fwdbwd_ms" in r:
            row.update(
                fused_fwdbwd_ms=r["fwdbwd_ms"], naive_fwdbwd_ms=nv["fwdbwd_ms"], ebc_fwdbwd_ms=eb["fwdbwd_ms"],
                fused_fwdbwd_peak_mib=round(r["fwdbwd_peak_mib"], 1),
                naive_fwdbwd_peak_mib=round(nv["fwdbwd_peak_mib"], 1),
                ebc_fwdbwd_peak_mib=round(eb["fwdbwd_peak_mib"], 1),
                fused_sparse_fwdbwd_ms=r["sparse_fwdbwd_ms"],
                fused_sparse_fwdbwd_peak_mib=round(r["sparse_fwdbwd_peak_mib"], 1),
            )
        rows.append(row)
    return rows


def _print_tables(rows: list[dict], copy: dict, copy_rate: float, threads: int) -> None:
    print(f"\nCategory-filtered mean pooling, L={L}, D={D}, fp32, {threads} threads; times are the min over "
          f"repetitions, peak = peak RSS increase during the first call in a fresh process")
    print(f"memory copy: {copy_rate / 1e9:.2f} GB/s (bytes copied per second, "
          f"{copy['copy_bytes'] // MiB} MiB dst.copy_(src))\n")
    print("forward")
    print(f"{'B':>5} {'V':>5} {'C':>5} {'M':>7} | {'fused ms':>9} {'naive ms':>9} {'ebc ms':>9} | "
          f"{'x naive':>7} {'x ebc':>6} | {'fused MiB':>9} {'naive MiB':>9} {'ebc MiB':>9} {'mem x naive':>11} | "
          f"{'GB/s':>6} {'% copy':>6}")
    for r in rows:
        f_t, n_t, e_t = min(r["fused_fwd_ms"]), min(r["naive_fwd_ms"]), min(r["ebc_fwd_ms"])
        print(
            f"{r['batch']:>5} {r['rows'] / 1e6:>4.0f}M {r['cats']:>5} {r['matches']:>7} | "
            f"{f_t:9.1f} {n_t:9.1f} {e_t:9.1f} | {n_t / f_t:7.1f} {e_t / f_t:6.1f} | "
            f"{r['fused_fwd_peak_mib']:9.1f} {r['naive_fwd_peak_mib']:9.1f} {r['ebc_fwd_peak_mib']:9.1f} "
            f"{r['memory_ratio_vs_naive']:11.1f} | "
            f"{r['fused_bytes_per_s'] / 1e9:6.2f} {100 * r['fraction_of_copy']:6.1f}"
        )
    bwd = [r for r in rows if "fused_fwdbwd_ms" in r]
    if not bwd:
        return
    print("\nforward + backward (dense [V, D] table gradient for every method; "
          "'sparse': the fused path with sparse=True)")
    print(f"{'B':>5} {'V':>5} {'C':>5} | {'fused ms':>9} {'naive ms':>9} {'ebc ms':>9} | {'x naive':>7} {'x ebc':>6} | "
          f"{'fused MiB':>9} {'naive MiB':>9} {'ebc MiB':>9} | {'sparse ms':>9} {'sparse MiB':>10}")
    for r in bwd:
        f_t, n_t, e_t = min(r["fused_fwdbwd_ms"]), min(r["naive_fwdbwd_ms"]), min(r["ebc_fwdbwd_ms"])
        print(
            f"{r['batch']:>5} {r['rows'] / 1e6:>4.0f}M {r['cats']:>5} | {f_t:9.1f} {n_t:9.1f} {e_t:9.1f} | "
            f"{n_t / f_t:7.1f} {e_t / f_t:6.1f} | {r['fused_fwdbwd_peak_mib']:9.1f} {r['naive_fwdbwd_peak_mib']:9.1f} "
            f"{r['ebc_fwdbwd_peak_mib']:9.1f} | {min(r['fused_sparse_fwdbwd_ms']):9.1f} "
            f"{r['fused_sparse_fwdbwd_peak_mib']:10.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small size (B=512, 1M rows, C=100), forward only, < 30 s")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads per case (default: torch's)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return

    t_start = time.perf_counter()
    load_start = C.loadavg()
    if load_start > (os.cpu_count() or 1) and not args.threads:
        print(f"warning: load average {load_start:.1f} on {os.cpu_count()} cores -- other jobs are running; "
              f"multi-threaded torch timings on an oversubscribed box are dominated by OpenMP barrier waits "
              f"(most for code with many small ops); --threads 1 gives steadier numbers", file=sys.stderr)
    results = []
    for spec in _plan(args.quick):
        spec["threads"] = args.threads
        r = _spawn(spec)
        results.append(r)
        print(
            f"  ran B={r['batch']} V={r['rows']:.0e} C={r['cats']} {r['method']:<5}: "
            f"fwd min {min(r['fwd_ms']):.1f} ms, peak +{r['fwd_peak_mib']:.1f} MiB",
            file=sys.stderr, flush=True,
        )
    copy = next(r for r in results if "copy_bytes" in r)  # measured in the same run, same kind of process
    copy_rate = copy["copy_bytes"] / (min(copy["copy_ms"]) / 1e3)
    rows = _summary({(r["batch"], r["rows"], r["cats"], r["method"]): r for r in results}, copy_rate)
    threads = results[0]["threads"]
    _print_tables(rows, copy, copy_rate, threads)
    total = time.perf_counter() - t_start
    load_end = C.loadavg()
    print(f"\n(total {total:.0f} s; 1-minute load average {load_start:.1f} at start, {load_end:.1f} at end, "
          f"{os.cpu_count()} cores)")
    print(json.dumps({
        "bench": "category_filtered_pooling", "quick": args.quick, "threads": threads,
        "copy_bytes_per_s": round(copy_rate), "loadavg_start": load_start, "loadavg_end": load_end,
        "cpus": os.cpu_count(), "results": rows, "wall_s": round(total, 1),
    }))


if __name__ == "__main__":
    main()
