"""Hostile inputs (third probe): each case was a hang, a crash without a message, a traceback
or a silently accepted nonsense value, and is now a one-line error naming the file or key.

Checkpoints are saved from an untrained single-process Trainer (no data needed), as in
tests/test_safety_checkpoint.py; nothing here trains.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from cdp_rec.config import ConfigError, load_config
from cdp_rec.training.checkpoint import (
    CheckpointError,
    Checkpointer,
    Position,
    export,
    load_unsharded,
    read_meta,
    verify_files,
)
from checkpoint_helpers import base_trainer, ckpt, saved  # noqa: F401 (fixtures)
from os_helpers import mount_tmpfs, umount

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging the suite if the code under test blocks (a FIFO read)."""
    def expired(*_: Any) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _edit_meta(ckpt: Path, **changes: Any) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(changes)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg


# ----------------------------------------------------------------------------- config YAML


def test_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path):
    # 10**8 keys once expanded: walked per alias use, it exhausted memory (MemoryError traceback).
    lines = ["a: &a {" + ", ".join(f"k{i}: 1" for i in range(10)) + "}"]
    for prev, name in zip("abcdefg", "bcdefgh"):
        lines.append(f"{name}: &{name} {{" + ", ".join(f"k{i}: *{prev}" for i in range(10)) + "}")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")

    def cap_memory() -> None:  # a regression must not take the machine's memory with it
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    r = subprocess.run([sys.executable, "-c", "import sys\nfrom cdp_rec.config import ConfigError, load_config\n"
                        "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n",
                        str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120, preexec_fn=cap_memory)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.match(rf"{cfg}:\d+: more than 100000 keys once YAML aliases are expanded", r.stdout), r.stdout


def test_yaml_mapping_that_contains_itself_is_refused(tmp_path):
    # a: &a {b: *a}: the key walk recursed until RecursionError.
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("train: &t\n  early_stop: *t\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:\d+: train.early_stop is an alias of a mapping that contains it"):
        load_config(cfg)


def test_yaml_aliases_of_a_finite_tree_still_load(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("train: &t\n  epochs: 3\n  early_stop: {patience: 2}\n")
    assert load_config(cfg).train.epochs == 3


# ----------------------------------------------------------------------------- checkpoint meta.json


@pytest.mark.parametrize("changes, match", [
    ({"global_step": -5}, r"meta\.json: 'global_step' is -5, a save writes a count >= 0"),
    ({"samples": -100}, r"meta\.json: 'samples' is -100, a save writes a count >= 0"),
    ({"world_size": 0}, r"meta\.json: 'world_size' is 0, a save writes a count >= 1"),
    # a string "final" was truthy: the run "resumed" finished, trained nothing and reported the metrics
    ({"final": "no"}, r"meta\.json: 'final' is a JSON string, not a JSON boolean"),
], ids=["negative-step", "negative-samples", "world-0", "string-final"])
def test_meta_counts_out_of_range_are_refused(ckpt, changes, match):
    _edit_meta(ckpt, **changes)
    with pytest.raises(CheckpointError, match=match) as e:
        read_meta(ckpt)
    _one_line(str(e.value))
    with pytest.raises(CheckpointError, match=match):
        Checkpointer(ckpt.parent, 1).load(base_trainer(), ckpt)


def test_deeply_nested_meta_json_is_one_line(ckpt):
    (ckpt / "meta.json").write_text("[" * 200_000 + "]" * 200_000)  # was a RecursionError traceback
    with pytest.raises(CheckpointError, match=r"meta\.json: not JSON \(maximum recursion depth"):
        read_meta(ckpt)


def test_resume_past_the_end_of_the_schedule_is_refused(tmp_path):
    from cdp_rec.training.schedule import TrainSchedule, resume

    class FakeCheckpointer:
        def latest(self) -> Path:
            return tmp_path / "step-000001000"

        def load(self, trainer: Any, path: Path) -> tuple[Position, dict[str, Any]]:
            return Position(1000, 256_000), {"world_size": 1, "local_batch_size": 256}

    schedule = TrainSchedule(1, [0, 1], {0: 3, 1: 2})
    with pytest.raises(CheckpointError, match=r"step-000001000/meta\.json: 'global_step' is 1000, but this "
                                              r"config's schedule has 5 steps"):
        resume(FakeCheckpointer(), None, schedule, 1, 256, True, logging.getLogger("test"))


# ----------------------------------------------------------------------------- checkpoint files


def _fifo_in_place_of(ckpt: Path, name: str, record: bool = True) -> None:
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    if record:
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["files"][name] = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
        (ckpt / "meta.json").write_text(json.dumps(meta))


def _data_file(ckpt: Path) -> str:
    return next(p.name for p in ckpt.iterdir() if p.suffix == ".distcp")


def test_fifo_in_a_checkpoint_is_refused_not_read(ckpt):
    # meta.json rewritten to match an empty file: hashing the FIFO blocked forever.
    name = _data_file(ckpt)
    _fifo_in_place_of(ckpt, name)
    with _deadline(30), pytest.raises(CheckpointError, match=rf"{name}: cannot read checkpoint: not a regular "
                                                            r"file \(a FIFO, device or socket\)"):
        verify_files(ckpt, read_meta(ckpt))
    with _deadline(60), pytest.raises(CheckpointError, match="not a regular file"):
        load_unsharded(ckpt)


def test_link_to_a_device_in_a_checkpoint_is_refused(ckpt):
    name = _data_file(ckpt)
    (ckpt / name).unlink()
    os.symlink("/dev/zero", ckpt / name)  # st_size 0, endless to read
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with _deadline(30), pytest.raises(CheckpointError, match="not a regular file"):
        verify_files(ckpt, read_meta(ckpt))


def test_fifo_metadata_of_a_checkpoint_without_digests_is_refused(ckpt):
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]  # a pre-digest checkpoint: nothing recorded, .metadata opened directly
    (ckpt / "meta.json").write_text(json.dumps(meta))
    _fifo_in_place_of(ckpt, ".metadata", record=False)
    with _deadline(30), pytest.raises(CheckpointError, match=r"\.metadata: (cannot read checkpoint: )?not a regular file"):
        load_unsharded(ckpt)


def test_checkpoint_entry_that_is_a_directory_says_so(ckpt):
    (ckpt / "rng-rank0.pt").unlink()
    (ckpt / "rng-rank0.pt").mkdir()  # was "is 4096 bytes but N were saved"
    with pytest.raises(CheckpointError, match=r"rng-rank0\.pt: cannot read checkpoint: not a regular file "
                                              r"\(a directory\)"):
        verify_files(ckpt, read_meta(ckpt))


# ----------------------------------------------------------------------------- writes that fail


def test_checkpoint_save_over_the_file_size_limit_names_the_os_reason(tmp_path):
    # torch's writers report "unexpected pos 704 vs 598"; the OSError (EFBIG here, ENOSPC on a
    # full disk) is only in the exception's context. Python ignores SIGXFSZ, so writes get EFBIG.
    trainer = base_trainer()
    trainer.optimizer.init_state()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointError) as e:
            Checkpointer(tmp_path / "ck", 1).save(trainer, Position(1, 256), {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = _one_line(str(e.value))
    assert msg.startswith(f"{tmp_path / 'ck' / '.step-000000001.tmp'}: cannot write checkpoint: ")
    assert msg.endswith(os.strerror(errno.EFBIG)), msg


def test_export_onto_a_full_disk_is_one_line_not_sigbus(ckpt, tmp_path):
    # The tables are memory-mapped sparse files: a store into a page with no block behind it
    # killed the process with SIGBUS (exit 135, no message) and left <out>.tmp-<pid> behind.
    mnt = tmp_path / "small"
    mount_tmpfs(mnt, "400k")  # the default config's tables need ~650 KB
    try:
        out = mnt / "art"
        r = subprocess.run([sys.executable, "-m", "cdp_rec.cli", "export", "--checkpoint", str(ckpt), "--out",
                            str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"cdp-rec export: error: {out}: export failed ({os.strerror(errno.ENOSPC)}: "), last
        assert ".npy" in last
        assert sorted(p.name for p in mnt.iterdir()) == []  # the staging directory is gone
    finally:
        umount(mnt)


def test_export_still_writes_every_table(ckpt, tmp_path):
    manifest = export(ckpt, tmp_path / "art")
    for table, entry in manifest["tables"].items():
        import numpy as np

        arr = np.load(tmp_path / "art" / "tables" / f"{table}.npy")
        assert list(arr.shape) == entry["shape"]
        assert torch.isfinite(torch.from_numpy(np.asarray(arr))).all()


# ----------------------------------------------------------------------------- serving packages


@pytest.fixture(scope="module")
def package(saved: Path, tmp_path_factory) -> Path:
    from cdp_rec.serving.export import export_serving

    out = tmp_path_factory.mktemp("pkg") / "pkg"
    export_serving(saved, out)
    return out


@pytest.fixture
def pkg(package: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(package, dst)
    return dst


def test_fifo_in_a_package_is_refused_not_hashed(pkg):
    from cdp_rec.serving import load_package
    from cdp_rec.serving.package import PackageError

    name = "spec.json"
    (pkg / name).unlink()
    os.mkfifo(pkg / name)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"][name] = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with _deadline(60), pytest.raises(PackageError, match=rf"{pkg / name}: is not a regular file \(a FIFO"):
        load_package(pkg)


def test_deeply_nested_package_manifest_is_one_line(pkg):
    from cdp_rec.serving import load_package
    from cdp_rec.serving.package import PackageError

    (pkg / "manifest.json").write_text('{"a": ' * 200_000 + "1" + "}" * 200_000)
    with pytest.raises(PackageError, match=r"manifest\.json: not JSON \(maximum recursion depth") as e:
        load_package(pkg)
    _one_line(str(e.value))


# ----------------------------------------------------------------------------- CLI arguments


@pytest.mark.parametrize("threads", ["-1", "100000"])  # -1: RuntimeError traceback; 100000: segfault (exit 139)
def test_predict_threads_out_of_range_is_one_line(tmp_path, threads):
    # in a subprocess: a regression must not segfault the test session
    r = subprocess.run([sys.executable, "-m", "cdp_rec.cli", "predict", "--model", str(tmp_path / "pkg"), "--data",
                        str(tmp_path / "d"), "--threads", threads, "--out", str(tmp_path / "p.parquet")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1] == f"cdp-rec predict: error: --threads must be in [0, 1024], got {threads}"


def test_omp_num_threads_beyond_the_cap_is_a_config_error():
    from cdp_rec.training.threads import choose_threads

    with pytest.raises(ConfigError, match=r"OMP_NUM_THREADS must be <= 1024, got '100000'"):
        choose_threads(0, "100000", 2, 1, None)
    assert choose_threads(0, "1024", 2, 1, None).threads == 1024


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_day_given_twice_is_refused(capsys, tmp_path, command):
    # it was read twice: predict wrote every row twice, evaluate counted each impression twice
    from cdp_rec.cli import main

    where = ["--model", str(tmp_path / "pkg"), "--out", str(tmp_path / "p.parquet"), "--data", str(tmp_path)] \
        if command == "predict" else ["--checkpoint", str(tmp_path / "ck")]
    assert main([command, *where, "--day", "2", "--day", "1", "--day", "2"]) == 2
    assert capsys.readouterr().err.strip() == (f"cdp-rec {command}: error: --day 2 is given more than once; "
                                               "each day is read once")


def test_predict_directory_with_a_file_it_would_not_read_is_refused(tmp_path):
    # b.PARQUET and c.parq were skipped by the *.parquet glob: their rows went unscored, silently
    from cdp_rec.data.loader import DataError
    from cdp_rec.serving.predict import input_files

    d = tmp_path / "logs"
    d.mkdir()
    for name in ("a.parquet", "b.PARQUET", "_SUCCESS", ".a.parquet.crc", "x.parquet.tmp"):
        (d / name).write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{d / 'b.PARQUET'}: not a \*\.parquet file, in the directory being "
                                        rf"scored \(--data {d}\)"):
        input_files(d)
    (d / "b.PARQUET").unlink()
    (d / "sub").mkdir()
    with pytest.raises(DataError, match=rf"^{d / 'sub'}: not a \*\.parquet file"):
        input_files(d)
    (d / "sub").rmdir()
    assert input_files(d) == [d / "a.parquet"]  # markers and unfinished writes are still ignored


# ----------------------------------------------------------------------------- states.pt (id-mapping report)


@pytest.fixture(scope="module")
def saved_with_report(tmp_path_factory) -> Path:
    from cdp_rec.training.id_report import IdMappingReport

    trainer = base_trainer()
    trainer.optimizer.init_state()
    ckpt = Checkpointer(tmp_path_factory.mktemp("report") / "ck", 1)
    ckpt.attach("id_report", IdMappingReport(None, active=True))
    return ckpt.save(trainer, Position(3, 768), {"local_batch_size": 256})


def _load_with_report(path: Path) -> Any:
    from cdp_rec.training.id_report import IdMappingReport

    ckpt = Checkpointer(path.parent, 1)
    report = IdMappingReport(None, active=True)
    ckpt.attach("id_report", report)
    ckpt.load(base_trainer(), path)
    return report


@pytest.mark.parametrize("damage, match", [
    (lambda s: s["id_report"].pop("rows"), r"has no 'rows'"),                       # was KeyError: 'rows'
    (lambda s: s["id_report"].update(seen=[1, 2]), r"has an invalid 'seen': \[1, 2\]"),  # AttributeError
    (lambda s: s["id_report"].update(hist=torch.zeros(3)), r"has an invalid 'hist': a tensor of shape \[3\]"),
    (lambda s: s["id_report"].update(version=2), r"has version 2; this cdp-rec reads version 1"),  # silently dropped
    (lambda s: s.update(id_report=[1]), r"is a list, not a dict"),                   # silently dropped
], ids=["no-rows", "list-seen", "hist-shape", "version-2", "not-a-dict"])
def test_damaged_id_report_state_is_one_line(saved_with_report, tmp_path, damage, match):
    path = tmp_path / "ck" / saved_with_report.name
    shutil.copytree(saved_with_report, path)
    state = torch.load(path / "states.pt", weights_only=True)
    damage(state)
    torch.save(state, path / "states.pt")
    data = (path / "states.pt").read_bytes()
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["states.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"^{path / 'states.pt'}: the saved id_report state {match}") as e:
        _load_with_report(path)
    _one_line(str(e.value))


def test_intact_id_report_state_still_loads(saved_with_report):
    report = _load_with_report(saved_with_report)
    assert report._saved is not None and report._saved[1] == 3


# ----------------------------------------------------------------------------- run lock


def test_run_lock_that_is_a_fifo_is_one_line(tmp_path):
    # ftruncate of a FIFO: "OSError: [Errno 22] Invalid argument" traceback with no file name
    from cdp_rec.training.run_lock import RunLockError, acquire_run_lock

    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".lock")
    with _deadline(30), pytest.raises(RunLockError, match=rf"^{run / '.lock'}: the lock file of the run directory "
                                                         rf"{run} is not a regular file \(a FIFO"):
        acquire_run_lock(run)
    (run / ".lock").unlink()
    lock = acquire_run_lock(run)  # a regular lock file still works
    lock.release()
