"""Benchmark: training throughput of 1 vs 2 gloo processes, and the input-dist share of a step.

Runs the real trainer (``cdp_rec.training.trainer.Trainer``) on the same global batch
size three ways — unsharded single process, DMP with 1 rank, DMP with 2 ranks — and
prints samples/s and ratios measured in this run, plus the share of profiled step time
spent in TorchRec's input distribution / all-to-all (torch.profiler, rank 0).

    .venv/bin/python bench/dist_train.py                 # small config
    .venv/bin/python bench/dist_train.py --quick         # tiny config, a few steps (smoke)

Not a test: numbers depend on the machine. On a 2-core box two ranks share the cores
(each rank gets cores / world threads), so expect a ratio below 2: the point is the
overhead of sharding and its communication, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402
from cdp_rec.config import JobConfig, load_config  # noqa: E402

COMM_MARKERS = ("all_to_all", "alltoall", "input_dist", "kjtalltoall", "all_reduce", "allreduce", "gloo")


def _batches(cfg: JobConfig, rank: int, world: int, n: int, local_bs: int):
    from cdp_rec.data.loader import ParquetBatchReader, list_day_files

    files = list_day_files(cfg.data.root, 0)
    out = []
    for b in ParquetBatchReader(files, cfg.features, local_bs, rank=rank, world_size=world):
        out.append(b)
        if len(out) == n:
            break
    return out


def _measure(trainer, batches, warmup: int, profile_steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    trainer.train_steps(batches[:warmup], lambda out: None)
    timed = batches[warmup: len(batches) - profile_steps]
    t0 = time.perf_counter()
    trainer.train_steps(timed, lambda out: None)
    seconds = time.perf_counter() - t0
    result = {"steps": len(timed), "seconds": seconds, "local_samples": sum(len(b) for b in timed)}
    if profile_steps:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t1 = time.perf_counter()
            trainer.train_steps(batches[len(batches) - profile_steps:], lambda out: None)
            wall = time.perf_counter() - t1
        comm_us = 0.0
        for ev in prof.key_averages():
            name = ev.key.lower()
            # Self time of the collective ops: nested wrappers would count the same wait twice.
            if any(m in name for m in COMM_MARKERS):
                comm_us += ev.self_cpu_time_total
        result["comm_share"] = comm_us / 1e6 / wall if wall > 0 else float("nan")
    return result


def _worker(rank: int, world: int, port: int, cfg_dict: dict, n: int, warmup: int, prof: int, out: str) -> None:
    import torch.distributed as dist

    from cdp_rec.config import config_from_dict
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer, local_batch_size

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cfg = config_from_dict(cfg_dict)
    ctx = init_from_env("cpu")
    try:
        batches = _batches(cfg, rank, world, n, local_batch_size(cfg, world))
        res = _measure(Trainer(cfg, ctx), batches, warmup, prof)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/small.yaml"))
    p.add_argument("--steps", type=int, default=120, help="timed steps (after warm-up)")
    p.add_argument("--quick", action="store_true", help="tiny config, few steps: checks the benchmark runs")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    config = str(ROOT / "configs/tiny.yaml") if args.quick else args.config
    steps = 8 if args.quick else args.steps
    warmup, prof = (2, 2) if args.quick else (10, 20)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    cfg = load_config(config, ["model.name=base", "train.progress=false", *args.set])
    if args.quick:
        cfg.data.root = str(tmp / "data")
        cfg.data.samples_per_day, cfg.data.rows_per_file, cfg.data.row_group_size = 20_000, 10_000, 5_000
    from cdp_rec.training.trainer import Trainer, ensure_data

    ensure_data(cfg, Path(cfg.data.root))
    n = warmup + steps + prof
    rows = {}
    # Unsharded single process: the plain `cdp-rec train` path.
    rows["single (unsharded)"] = _measure(Trainer(cfg, None), _batches(cfg, 0, 1, n - prof, cfg.train.batch_size), warmup, 0)
    for world in (1, 2):
        out = tmp / f"w{world}.json"
        mp.spawn(_worker, args=(world, C.free_port(), cfg.to_dict(), n, warmup, prof, str(out)), nprocs=world, join=True)
        rows[f"DMP, {world} rank(s)"] = json.loads(out.read_text())

    base = rows["DMP, 1 rank(s)"]
    base_rate = base["local_samples"] / base["seconds"]
    print(f"\nconfig {config}, model base, global batch {cfg.train.batch_size}, {steps} timed steps, "
          f"{os.cpu_count()} cores")
    print(f"{'run':<22} {'samples/s':>12} {'vs DMP 1 rank':>14} {'comm share':>11}")
    report = {}
    for name, r in rows.items():
        world = 2 if "2 rank" in name else 1
        rate = r["local_samples"] * world / r["seconds"]
        share = r.get("comm_share")
        print(f"{name:<22} {rate:>12,.0f} {rate / base_rate:>13.2f}x {'' if share is None else f'{share:>10.1%}'}")
        report[name] = {**r, "samples_per_s": rate, "ratio_vs_dmp1": rate / base_rate}
    print(json.dumps({"bench": "dist_train", "config": config, "results": report}))


if __name__ == "__main__":
    main()
