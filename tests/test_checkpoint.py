"""Checkpoints: exact resume, resharding across world sizes and plans, export, bad checkpoints.

Distributed parts run real gloo processes (torch.multiprocessing.spawn).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cdp_rec.cli import main
from cdp_rec.config import JobConfig, load_config
from cdp_rec.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    Position,
    export,
    list_checkpoints,
    load_unsharded,
)
from bench._common import free_port


def _overrides(root: Path, run_dir: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.root={root}", "data.samples_per_day=8000", "data.rows_per_file=4000", "data.row_group_size=1000",
        f"train.run_dir={run_dir}", f"train.run_name={name}", "train.progress=false", "train.batch_size=256",
        "train.epochs=1", "checkpoint.every_steps=10", *extra,
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from cdp_rec.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("ckpt") / "data"
    generate_dataset(load_config(None, _overrides(root, root, "x")), root)
    return root


def _train(overrides: list[str]) -> dict:
    from cdp_rec.training.trainer import train

    return train(load_config(None, overrides)).metrics


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    model, _ = load_unsharded(list_checkpoints(run / "checkpoints")[-1])
    return model.state_dict()


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    for k in ("auc", "uauc", "gauc", "logloss", "num_train_samples"):
        assert ma[k] == mb[k], (k, ma[k], mb[k])
    sa, sb = _final_state(a), _final_state(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted_single_process(data_root, tmp_path):
    _train(_overrides(data_root, tmp_path, "full"))
    first = _train(_overrides(data_root, tmp_path, "cut", "train.max_steps=25"))
    assert first["train_steps"] == 25
    # A crash in the middle of a later save leaves only a staging directory behind.
    (tmp_path / "cut" / "checkpoints" / ".step-000000030.tmp").mkdir()
    resumed = _train(_overrides(data_root, tmp_path, "cut"))
    assert resumed["resumed_from_step"] == 25
    _assert_same_run(tmp_path / "full", tmp_path / "cut")
    kept = [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")]
    assert len(kept) == 2 and kept[-1] == f"step-{resumed['train_steps']:09d}"


def _train_worker(rank: int, ports: list[int], jobs: list[list[str]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2")
    for port, overrides in zip(ports, jobs):
        os.environ["MASTER_PORT"] = str(port)
        _train(overrides)


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted_two_ranks(data_root, tmp_path):
    jobs = [
        _overrides(data_root, tmp_path, "full2"),
        _overrides(data_root, tmp_path, "cut2", "train.max_steps=25"),
        _overrides(data_root, tmp_path, "cut2"),
    ]
    mp.spawn(_train_worker, args=([free_port() for _ in jobs], jobs), nprocs=2, join=True)
    assert json.loads((tmp_path / "cut2" / "metrics.json").read_text())["resumed_from_step"] == 25
    _assert_same_run(tmp_path / "full2", tmp_path / "cut2")


def _reshard_worker(rank: int, world: int, port: int, ckpt: str, sharding: str, out: str) -> None:
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer
    from embeddings.state import gather_full_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    ctx = init_from_env("cpu")
    try:
        cfg = JobConfig()
        cfg.sharding.constraints = {"item": sharding, "user": sharding}
        trainer = Trainer(cfg, ctx)
        if Path(ckpt).exists():
            Checkpointer(Path(ckpt).parent, 2).load(trainer, Path(ckpt))
        else:  # writer: move the weights off the seeded init so the check means something
            with torch.no_grad():
                for p in trainer.module.parameters():
                    p.add_(0.01)
            trainer.optimizer.init_state()
            Checkpointer(Path(ckpt).parent, 2).save(trainer, Position(7, 7 * 256), {"local_batch_size": 128})
        state = gather_full_state(trainer.module)
        if rank == 0:
            torch.save(state, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reshard_two_ranks_to_one_and_to_another_plan(tmp_path):
    ckpt = tmp_path / "ck" / "step-000000007"
    # Written row_wise: user and item are saved as one shard per rank.
    mp.spawn(_reshard_worker, args=(2, free_port(), str(ckpt), "row_wise", str(tmp_path / "w2.pt")), nprocs=2)
    saved = torch.load(tmp_path / "w2.pt")
    # 2 ranks (row_wise) -> 1 unsharded process, bit for bit.
    model, _ = load_unsharded(ckpt)
    loaded = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    # The serving export assembles the row shards into whole tables, bit for bit.
    from torch.distributed.checkpoint import FileSystemReader

    chunks = {k: len(m.chunks) for k, m in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.items()
              if k.endswith("embedding_bags.user.weight")}
    assert list(chunks.values()) == [2], chunks
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "art")]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    for table, info in manifest["tables"].items():
        np.testing.assert_array_equal(np.load(tmp_path / "art" / "tables" / f"{table}.npy"), saved[info["key"]].numpy())
    # 2 ranks row_wise -> 2 ranks table_wise, and -> 1 rank DMP (another plan).
    for world, sharding in ((2, "table_wise"), (1, "row_wise")):
        out = tmp_path / f"r{world}.pt"
        mp.spawn(_reshard_worker, args=(world, free_port(), str(ckpt), sharding, str(out)), nprocs=world)
        got = torch.load(out)
        for k, v in saved.items():
            assert torch.equal(got[k], v), (world, sharding, k)


def test_export_writes_every_table_and_dense_weights(data_root, tmp_path):
    _train(_overrides(data_root, tmp_path, "e", "train.max_steps=12", "model.name=base"))
    ckpt = list_checkpoints(tmp_path / "e" / "checkpoints")[-1]
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "art")]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    model, _ = load_unsharded(ckpt)
    state = model.state_dict()
    assert set(manifest["tables"]) >= {"query", "user", "item", "category"}
    for table, info in manifest["tables"].items():
        np.testing.assert_array_equal(np.load(tmp_path / "art" / "tables" / f"{table}.npy"), state[info["key"]].numpy())
    dense = torch.load(tmp_path / "art" / "dense.pt")
    for k, v in dense.items():
        assert torch.equal(v, state[k]), k
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data_root)]) == 0


def test_bad_checkpoints_are_refused_with_the_difference(data_root, tmp_path, capsys):
    _train(_overrides(data_root, tmp_path, "b", "train.max_steps=10", "model.name=base"))
    ckpt = list_checkpoints(tmp_path / "b" / "checkpoints")[-1]
    with pytest.raises(CheckpointError, match=r"table 'item' is \[5000, 16\] .* but \[9000, 16\]"):
        load_unsharded(ckpt, ["features.num_items=9000"])
    with pytest.raises(CheckpointError, match="checkpoint is of model 'base'"):
        load_unsharded(ckpt, ["model.name=cdp"])
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    for f in broken.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # truncated shard files
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_unsharded(broken)
    (broken / "meta.json").unlink()
    assert main(["evaluate", "--checkpoint", str(broken)]) == 2
    assert "not a committed checkpoint" in capsys.readouterr().err
