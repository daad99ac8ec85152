"""Benchmark: save / load time and on-disk size of a training checkpoint.

Builds the real trainer for a config (unsharded single process, or DMP over 2 gloo
ranks with each rank writing its own shards), takes a few training steps so the
optimizer state exists, then times ``Checkpointer.save`` (DCP write + commit rename),
``Checkpointer.load`` into a freshly built trainer, and ``cdp-rec export`` (tables
streamed shard by shard into memory-mapped ``.npy``), and reports bytes on disk next to
the bytes of the model's parameters (the rest is optimizer state).

    .venv/bin/python bench/checkpoint.py --config configs/small.yaml            # 1 process and 2 ranks
    .venv/bin/python bench/checkpoint.py --quick                               # tiny config (smoke)

Not a test: times depend on the machine and its disk (page cache included: a save
right after another is mostly memory bandwidth).
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

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402
from cdp_rec.config import load_config  # noqa: E402


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run(rank: int, world: int, port: int, config: str, overrides: list[str], out: str, steps: int) -> None:
    from cdp_rec.data.loader import ParquetBatchReader, list_day_files
    from cdp_rec.training.checkpoint import Checkpointer, Position
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = load_config(config, overrides)
    ctx = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        ctx = init_from_env("cpu")
    ckdir = Path(out) / f"ck-w{world}"
    trainer = Trainer(cfg, ctx)
    bs = cfg.train.batch_size // world
    files = list_day_files(cfg.data.root, 0)
    reader = ParquetBatchReader(files, cfg.features, bs, rank=rank, world_size=world)
    batches = [b for _, b in zip(range(steps), reader)]
    trainer.train_steps(batches, lambda o: None)

    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    barrier()
    t0 = time.perf_counter()
    path = Checkpointer(ckdir, 1).save(trainer, Position(steps, steps * cfg.train.batch_size), {"local_batch_size": bs})
    save_s = time.perf_counter() - t0
    fresh = Trainer(cfg, ctx)
    barrier()
    t0 = time.perf_counter()
    Checkpointer(ckdir, 1).load(fresh, path)
    barrier()
    load_s = time.perf_counter() - t0
    from embeddings.state import gather_full_state

    saved, loaded = gather_full_state(trainer.module), gather_full_state(fresh.module)
    same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    if rank == 0:
        from cdp_rec.models import build_model

        params = sum(p.numel() * p.element_size() for p in build_model(cfg, device="meta").parameters())
        result = {"world_size": world, "save_s": save_s, "load_s": load_s, "checkpoint": str(path),
                  "checkpoint_bytes": _dir_bytes(path), "parameter_bytes": params, "loaded_equal": same}
        (Path(out) / f"result-w{world}.json").write_text(json.dumps(result))
    barrier()
    if ctx is not None:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--worlds", default="1,2", help="comma-separated world sizes (1 = unsharded process)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny config and data (smoke run)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    from cdp_rec.data.synthetic import generate_dataset
    from cdp_rec.training.checkpoint import export

    work = Path(tempfile.mkdtemp(prefix="cdp-bench-ckpt-"))
    try:
        overrides = list(args.set)
        if args.quick:
            args.config = str(ROOT / "configs" / "tiny.yaml")
            overrides += [f"data.root={work}/data", "data.samples_per_day=4000", "data.rows_per_file=2000",
                          "data.row_group_size=1000"]
            args.steps = 3
        cfg = load_config(args.config, overrides)
        generate_dataset(cfg, cfg.data.root, days=[0])
        rows = []
        for world in (int(w) for w in args.worlds.split(",")):
            if world == 1:
                _run(0, 1, 0, args.config, overrides, str(work), args.steps)
            else:
                mp.spawn(_run, args=(world, C.free_port(), args.config, overrides, str(work), args.steps), nprocs=world)
            row = json.loads((work / f"result-w{world}.json").read_text())
            # Export is an offline, single-process job (DCP loads are collective inside a group).
            t0 = time.perf_counter()
            export(Path(row["checkpoint"]), work / f"export-w{world}")
            row["export_s"] = time.perf_counter() - t0
            row["export_bytes"] = _dir_bytes(work / f"export-w{world}")
            rows.append(row)
        mib = 2**20
        print(f"checkpoint cost, {args.config} ({args.steps} training steps first)\n")
        print("| ranks | save s | load s | export s | checkpoint MiB | params MiB | ckpt / params | export MiB | loaded == saved |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['world_size']} | {r['save_s']:.2f} | {r['load_s']:.2f} | {r['export_s']:.2f} | "
                  f"{r['checkpoint_bytes'] / mib:.1f} | {r['parameter_bytes'] / mib:.1f} | "
                  f"{r['checkpoint_bytes'] / r['parameter_bytes']:.2f} | {r['export_bytes'] / mib:.1f} | {r['loaded_equal']} |")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"bench": "checkpoint", "quick": args.quick, "config": args.config, "results": rows}, indent=2) + "\n")
        return 0 if all(r["loaded_equal"] for r in rows) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
