"""Checkpoint safety: no code runs from a foreign checkpoint, damaged files are refused before
they are read, bad meta.json / RNG files give one-line errors, export never leaves a half artifact.

Checkpoints here are saved from an untrained single-process Trainer (no data needed); the
2-rank case runs real gloo processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from cdp_rec.cli import main
from cdp_rec.training import checkpoint as ck
from cdp_rec.training.checkpoint import CheckpointError, Checkpointer, Position, export, load_unsharded, read_meta
from cdp_rec.training.safe_load import (
    MetadataUnpickler,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    load_metadata,
)
from bench._common import free_port
from checkpoint_helpers import base_config, base_trainer, ckpt, saved  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


class _OpenFile:
    """Unpickling it creates ``path``: what a malicious ``.metadata`` could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class _System:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite(ckpt: Path, name: str, data: bytes, *, update_digest: bool = True) -> None:
    """Replace a checkpoint file; ``update_digest`` also rewrites meta.json, as an attacker would."""
    (ckpt / name).write_bytes(data)
    if update_digest:
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["files"][name] = {"size": len(data), "sha256": _sha256(ckpt / name)}
        (ckpt / "meta.json").write_text(json.dumps(meta))


def _edit_meta(ckpt: Path, **changes: Any) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg


# ----------------------------------------------------------------------------- code execution


@pytest.mark.parametrize("payload, global_name", [(_OpenFile, "io.open"), (_System, "system")],
                         ids=["open", "os.system"])
def test_foreign_pickle_in_metadata_runs_nothing(ckpt, tmp_path, payload, global_name):
    # The payload is real: a plain unpickle (what DCP's FileSystemReader does) creates its file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(payload(probe)))
    assert probe.exists()
    marker = tmp_path / "marker"
    _rewrite(ckpt, ".metadata", pickle.dumps(payload(marker)))
    with pytest.raises(CheckpointError) as e:
        load_unsharded(ckpt)
    assert not marker.exists()
    msg = _one_line(str(e.value))
    assert msg.startswith(f"{ckpt / '.metadata'}: refused to unpickle ") and global_name in msg
    assert "not a class DCP metadata uses" in msg
    # The same through export and through a resume.
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        export(ckpt, tmp_path / "art")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        Checkpointer(ckpt.parent, 1).load(base_trainer(), ckpt)
    assert not marker.exists() and not (tmp_path / "art").exists()


def test_foreign_pickle_is_refused_in_a_checkpoint_without_digests(ckpt, tmp_path):
    """An old-format checkpoint skips the digest check, not the allow-list."""
    marker = tmp_path / "marker"
    _edit_meta(ckpt, files=None)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_OpenFile(marker)))
    with pytest.raises(CheckpointError, match=r"refused to unpickle io\.open"):
        load_unsharded(ckpt)
    assert not marker.exists()


def test_foreign_pickle_with_a_stale_digest_is_refused_before_unpickling(ckpt, tmp_path):
    marker = tmp_path / "marker"
    _rewrite(ckpt, ".metadata", pickle.dumps(_OpenFile(marker)), update_digest=False)
    with pytest.raises(CheckpointError, match=r"\.metadata: cannot read checkpoint: is \d+ bytes but \d+ were saved"):
        load_unsharded(ckpt)
    assert not marker.exists()


def test_cli_evaluate_of_a_foreign_pickle_exits_2_with_one_line(ckpt, tmp_path):
    marker = tmp_path / "marker"
    _rewrite(ckpt, ".metadata", pickle.dumps(_System(marker)))
    r = subprocess.run([sys.executable, "-m", "cdp_rec.cli", "evaluate", "--checkpoint", str(ckpt)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"cdp-rec evaluate: error: {ckpt / '.metadata'}: refused to unpickle posix.system: "
        "not a class DCP metadata uses"
    ]
    assert not marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(ckpt):
    md = load_metadata(ckpt / ".metadata")
    info = next(iter(md.storage_data.values()))
    info.relative_path = "/etc/passwd"
    _rewrite(ckpt, ".metadata", pickle.dumps(md))
    with pytest.raises(CheckpointError, match="data file '/etc/passwd' outside the checkpoint directory"):
        load_unsharded(ckpt)


def test_allow_list_covers_real_metadata_and_nothing_else(saved):
    md = load_metadata(saved / ".metadata")
    assert md.state_dict_metadata
    for name in ("builtins.eval", "os.system", "torch.load", "torch.distributed.checkpoint.metadata.os"):
        module, _, attr = name.rpartition(".")
        with pytest.raises(UnsafeCheckpointError, match="refused to unpickle"):
            MetadataUnpickler(io.BytesIO(pickle.dumps(None))).find_class(module, attr)


def test_non_tensor_entries_are_loaded_weights_only(tmp_path):
    """DCP's default planner torch.loads bytes entries with weights_only=False; ours does not."""
    good, bad, marker = tmp_path / "good", tmp_path / "bad", tmp_path / "marker"
    dcp.save({"lr": 0.1, "betas": (0.9, 0.999), "w": torch.ones(3)}, checkpoint_id=str(good))
    dcp.save({"lr": _OpenFile(marker)}, checkpoint_id=str(bad))
    state: dict[str, Any] = {"lr": 0.0, "betas": (0.0, 0.0), "w": torch.zeros(3)}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(good)), planner=SafeLoadPlanner())
    assert state["lr"] == 0.1 and state["betas"] == (0.9, 0.999) and torch.equal(state["w"], torch.ones(3))
    with pytest.raises(CheckpointError, match=r"refused by the weights-only unpickler: .*io\.open") as e:
        ck._dcp_load({"lr": 0.0}, bad)
    _one_line(str(e.value))
    assert not marker.exists()
    dcp.load({"lr": 0.0}, checkpoint_id=str(bad))  # DCP's own planner runs the payload
    assert marker.exists()


# ----------------------------------------------------------------------------- digests


def test_legit_checkpoint_records_every_file_and_loads(saved, ckpt):
    meta = read_meta(saved)
    names = sorted(p.name for p in saved.iterdir() if p.name != "meta.json")
    assert sorted(meta["files"]) == names and ".metadata" in names and "rng-rank0.pt" in names
    for name, rec in meta["files"].items():
        assert rec == {"size": (saved / name).stat().st_size, "sha256": _sha256(saved / name)}, name
    model, _ = load_unsharded(ckpt)
    trainer = base_trainer()
    pos, _ = Checkpointer(ckpt.parent, 1).load(trainer, ckpt)
    assert pos == Position(3, 768, False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trainer.module.state_dict()[k]), k


def test_truncated_shard_is_refused_before_loading(ckpt):
    shard = next(ckpt.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 64])  # the tail: optimizer state, which DCP would not miss
    with pytest.raises(CheckpointError) as e:
        Checkpointer(ckpt.parent, 1).load(base_trainer(), ckpt)
    assert _one_line(str(e.value)) == (f"{shard}: cannot read checkpoint: is {len(data) - 64} bytes but "
                                       f"{len(data)} were saved (truncated or changed after the save)")


def test_flipped_byte_is_refused(ckpt):
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read checkpoint: sha256 differs"):
        load_unsharded(ckpt)


@pytest.mark.parametrize("problem, files, match", [
    ("missing", lambda f: f, r"rng-rank0\.pt: cannot read checkpoint: missing"),
    ("unlisted", lambda f: {k: v for k, v in f.items() if not k.endswith(".distcp")}, "not among the files"),
    ("malformed", lambda f: {**f, ".metadata": {"size": 1}}, r"'files' entry '\.metadata' has no valid sha256"),
    ("escaping", lambda f: {**f, "../x": next(iter(f.values()))}, r"'files' lists '\.\./x'"),
], ids=["missing", "unlisted", "malformed", "escaping"])
def test_digest_list_problems_are_refused(ckpt, problem, files, match):
    if problem == "missing":
        (ckpt / "rng-rank0.pt").unlink()
    _edit_meta(ckpt, files=files(read_meta(ckpt)["files"]))
    with pytest.raises(CheckpointError, match=match):
        load_unsharded(ckpt)


def test_checkpoint_without_digests_loads_with_a_warning(ckpt, caplog):
    _edit_meta(ckpt, files=None)
    with caplog.at_level(logging.WARNING):
        load_unsharded(ckpt)
    assert "saved without file digests" in caplog.text


# ----------------------------------------------------------------------------- meta.json, rng


@pytest.mark.parametrize("content, match", [
    (b"{not json", r"meta\.json: not JSON \(Expecting property name"),
    (b"\xff\xfe", r"meta\.json: not JSON"),
    (b"[1, 2]", r"meta\.json: holds a JSON array, not an object"),
], ids=["not-json", "not-text", "array"])
def test_unparsable_meta_is_one_line(ckpt, content, match):
    (ckpt / "meta.json").write_bytes(content)
    for load in (load_unsharded, lambda p: Checkpointer(p.parent, 1).load(base_trainer(), p)):
        with pytest.raises(CheckpointError, match=match) as e:
            load(ckpt)
        _one_line(str(e.value))


@pytest.mark.parametrize("changes, match", [
    ({"config": None}, r"meta\.json: no 'config' \(every save writes it"),
    ({"global_step": None}, r"meta\.json: no 'global_step'"),
    ({"global_step": "3"}, r"meta\.json: 'global_step' is a JSON string, not a JSON number"),
    ({"tables": [1]}, r"meta\.json: 'tables' is a JSON array, not a JSON object"),
], ids=["no-config", "no-global_step", "string-step", "list-tables"])
def test_meta_without_a_key_is_one_line(ckpt, changes, match):
    _edit_meta(ckpt, **changes)
    with pytest.raises(CheckpointError, match=match):
        Checkpointer(ckpt.parent, 1).load(base_trainer(), ckpt)
    with pytest.raises(CheckpointError, match=match):
        export(ckpt, ckpt.parent / "art")
    assert main(["evaluate", "--checkpoint", str(ckpt)]) == 2


@pytest.mark.parametrize("content, match", [
    (b"garbage", r"rng-rank0\.pt: unreadable RNG state \("),
    (None, r"rng-rank0\.pt: not a torch RNG state"),
], ids=["garbage", "no-torch-key"])
def test_corrupt_rng_file_on_resume_is_one_line(ckpt, content, match):
    if content is None:
        buf = io.BytesIO()
        torch.save({"numpy": torch.zeros(3)}, buf)
        content = buf.getvalue()
    _rewrite(ckpt, "rng-rank0.pt", content)
    with pytest.raises(CheckpointError, match=match) as e:
        Checkpointer(ckpt.parent, 1).load(base_trainer(), ckpt)
    _one_line(str(e.value))


# ----------------------------------------------------------------------------- export


def test_export_is_staged_checksummed_and_refuses_to_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "serving" / "art"
    manifest = export(ckpt, out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([*manifest["files"], "manifest.json"]) and "dense.pt" in files
    for name, rec in manifest["files"].items():
        assert rec == {"size": (out / name).stat().st_size, "sha256": _sha256(out / name)}, name
    assert sorted(p.name for p in out.parent.iterdir()) == ["art"]  # no staging directory left
    # A previous export is replaced only with force; the CLI says so with exit 2.
    with pytest.raises(CheckpointError, match="holds a previous export; use --force to replace it"):
        export(ckpt, out)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "holds a previous export" in capsys.readouterr().err
    (out / "stale.txt").write_text("from the previous export")
    export(ckpt, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["art"]
    # Anything else that is not empty is never replaced, force or not.
    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    for force in (False, True):
        with pytest.raises(CheckpointError, match="is not empty and holds no previous export"):
            export(ckpt, other, force=force)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a plain directory"):
        export(ckpt, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    export(ckpt, empty)
    assert (empty / "manifest.json").is_file()


def test_failed_export_leaves_nothing(ckpt, tmp_path, monkeypatch):
    calls = []
    real = ck._dcp_load

    def fail_on_dense(state: dict[str, Any], path: Path) -> None:
        calls.append(state)
        if len(calls) > 1:  # the first table is on disk already
            raise CheckpointError(f"{path}: cannot read checkpoint (simulated)")
        real(state, path)

    monkeypatch.setattr(ck, "_dcp_load", fail_on_dense)
    with pytest.raises(CheckpointError, match="simulated"):
        export(ckpt, tmp_path / "art")
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # neither art nor art.tmp-<pid>


# ----------------------------------------------------------------------------- 2 ranks


def _two_rank_worker(rank: int, port: int, root: str, out: str) -> None:
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    ctx = init_from_env("cpu")
    try:
        cfg = base_config()
        cfg.sharding.constraints = {"item": "row_wise", "user": "row_wise"}
        trainer = Trainer(cfg, ctx)
        trainer.optimizer.init_state()
        path = Checkpointer(Path(root), 2).save(trainer, Position(5, 5 * 256), {"local_batch_size": 128})
        Checkpointer(Path(root), 2).load(Trainer(cfg, ctx), path)  # intact: loads on both ranks
        if rank == 0:
            # Damage, same size, the file rank 1 hashes (largest first, dealt round-robin).
            records = read_meta(path)["files"]
            victim = ck._share(list(records), records, 1, 2)[0]
            data = bytearray((path / victim).read_bytes())
            data[-1] ^= 0xFF
            (path / victim).write_bytes(bytes(data))
        dist.barrier()
        try:
            Checkpointer(Path(root), 2).load(Trainer(cfg, ctx), path)
            msg = "loaded"
        except CheckpointError as e:  # every rank must get it, or rank 0 would wait in DCP
            msg = str(e)
        Path(out, f"rank{rank}.txt").write_text(msg)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_save_records_all_ranks_files_and_a_damaged_one_fails_every_rank(tmp_path):
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path / "ck"), str(tmp_path)), nprocs=2, join=True)
    path = tmp_path / "ck" / "step-000000005"
    names = sorted(read_meta(path)["files"])
    assert names == sorted(p.name for p in path.iterdir() if p.name != "meta.json")
    assert {"rng-rank0.pt", "rng-rank1.pt", ".metadata"} <= set(names) and len(list(path.glob("*.distcp"))) == 2
    msgs = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(msgs) == 1 and "sha256 differs" in msgs.pop()
