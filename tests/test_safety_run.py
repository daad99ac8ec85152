"""Run-directory / CLI / launch safety (issue 12): nothing of the user's is lost, errors are one line.

* gen-data refuses a non-empty directory it did not write (unless --force);
* checkpoint.resume=never moves an earlier run's checkpoints aside instead of pruning against them;
* one train per run directory (flock on ``<run_dir>/.lock``; stale locks of dead pids are reused);
* a diverging loss stops the run naming the step and the learning rates;
* a full or read-only disk, a file where a directory belongs: one line, exit 2;
* the torchx component runs without the venv's bin on PATH;
* no fbgemm "Successfully loaded" chatter.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdp_rec.cli import main
from cdp_rec.config import load_config
from os_helpers import mount_tmpfs, umount

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["data.samples_per_day=2000", "data.rows_per_file=1000", "data.row_group_size=500"]


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (directories as "dir")."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("cdp-rec ")]
    assert len(errors) == 1, err
    return errors[0]


def _sets(*overrides: str) -> list[str]:
    return [a for ov in overrides for a in ("--set", ov)]


def _foreign_data(root: Path) -> Path:
    """A directory of someone's Parquet logs (no _dataset.json): day files and behaviors/."""
    (root / "day=00").mkdir(parents=True)
    (root / "day=00" / "part-00000.parquet").write_bytes(b"PAR1 real search logs PAR1")
    (root / "behaviors").mkdir()
    (root / "behaviors" / "period=000.parquet").write_bytes(b"PAR1 real behaviours PAR1")
    return root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from cdp_rec.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("safety") / "data"
    generate_dataset(load_config(None, SMALL), root)
    return root


# --------------------------------------------------------------------------- gen-data


def test_gen_data_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    real = _foreign_data(tmp_path / "real")
    before = _snapshot(real)
    assert main(["gen-data", "--out", str(real), *_sets(*SMALL)]) == 2
    line = _err_line(capsys)
    assert str(real) in line and "--force" in line and "not written by gen-data" in line
    assert _snapshot(real) == before  # byte-identical

    # The library refuses too (not only the CLI), and so does train's auto-generation path.
    from cdp_rec.data.loader import DataError
    from cdp_rec.data.synthetic import generate_dataset
    from cdp_rec.training.trainer import ensure_data

    with pytest.raises(DataError, match="not written by gen-data"):
        generate_dataset(load_config(None, SMALL), real)
    ensure_data(load_config(None, SMALL), real)  # an existing root is only checked, never written
    assert _snapshot(real) == before

    # --force replaces it.
    assert main(["gen-data", "--out", str(real), "--force", *_sets(*SMALL)]) == 0
    assert (real / "_dataset.json").is_file()
    assert not (real / "behaviors").exists()


def _ensure_data_worker(root: str, result: str) -> None:
    from cdp_rec.data.loader import ParquetBatchReader, list_day_files
    from cdp_rec.training.trainer import ensure_data

    try:
        cfg = load_config(None, [*SMALL, "data.samples_per_day=20000", "data.rows_per_file=2000"])
        ensure_data(cfg, Path(root))
        rows = sum(b.labels.numel() for d in range(3)
                   for b in ParquetBatchReader(list_day_files(root, d), cfg.features, 4096))
        Path(result).write_text(f"ok {rows}")
    except BaseException as e:  # report, do not hang the parent
        Path(result).write_text(f"{type(e).__name__}: {e}")


def test_two_runs_on_one_missing_root_generate_it_once(tmp_path):
    """A sweep's runs start together on a missing synthetic root: the second waits for the
    first one's generation (a lock beside the root), then reads the complete data set."""
    import multiprocessing as mp

    root = tmp_path / "gen"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ensure_data_worker, args=(str(root), str(tmp_path / f"r{k}.txt"))) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    results = [(tmp_path / f"r{k}.txt").read_text() for k in range(2)]
    assert results == ["ok 60000", "ok 60000"], results
    assert (root / "_dataset.json").is_file() and not (root / "_dataset.json.tmp").exists()


def test_gen_data_rewrites_its_own_directories(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["gen-data", "--out", str(out), *_sets(*SMALL)]) == 0
    capsys.readouterr()
    assert main(["gen-data", "--out", str(out), *_sets(*SMALL)]) == 0
    assert "up to date" in capsys.readouterr().out
    # Another config over its own data set: allowed without --force (it wrote it).
    assert main(["gen-data", "--out", str(out), *_sets(*SMALL, "data.seed=3")]) == 0
    assert json.loads((out / "_dataset.json").read_text())["seed"] == 3
    # An interrupted generation (only the in-progress spec left) is still recognised as its own.
    os.replace(out / "_dataset.json", out / "_dataset.json.tmp")
    assert main(["gen-data", "--out", str(out), *_sets(*SMALL)]) == 0
    assert not (out / "_dataset.json.tmp").exists() and (out / "_dataset.json").is_file()
    # An empty existing directory is fine.
    (tmp_path / "empty").mkdir()
    assert main(["gen-data", "--out", str(tmp_path / "empty"), *_sets(*SMALL)]) == 0


def test_gen_data_out_naming_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    assert main(["gen-data", "--out", str(f), *_sets(*SMALL)]) == 2
    line = _err_line(capsys)
    assert str(f) in line and "not a directory" in line
    assert f.read_text() == "mine\n"


def test_gen_data_force_help_says_both():
    help_text = " ".join(subprocess.run([sys.executable, "-m", "cdp_rec.cli", "gen-data", "--help"], cwd=ROOT,
                                        capture_output=True, text=True).stdout.split())
    assert "up to date" in help_text and "did not write" in help_text


# --------------------------------------------------------------------------- resume=never


def test_resume_never_moves_an_older_runs_checkpoints_aside(small_data, tmp_path, caplog):
    from cdp_rec.training.checkpoint import list_checkpoints
    from cdp_rec.training.trainer import train

    base = [*SMALL, f"data.root={small_data}", f"train.run_dir={tmp_path}", "train.run_name=r", "train.epochs=1",
            "train.progress=false", "train.batch_size=128", "checkpoint.every_steps=5", "checkpoint.keep_last=2"]
    old = train(load_config(None, [*base, "train.epochs=2"])).metrics
    ckpts = tmp_path / "r" / "checkpoints"
    steps = old["train_steps"]  # 2 epochs x 2 days x 16 batches
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step-{steps - steps % 5:09d}", f"step-{steps:09d}"]
    before = _snapshot(ckpts)

    caplog.set_level("INFO", logger="cdp_rec")
    new = train(load_config(None, [*base, "checkpoint.resume=never", "checkpoint.every_steps=3"])).metrics
    n = new["train_steps"]
    assert new["resumed_from_step"] == 0 and n == steps // 2
    # The fresh run's checkpoints survive its own pruning (before: the old run's higher step numbers
    # won and the new ones were deleted); the old ones were moved, not deleted or mixed in.
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step-{n - (n % 3 or 3):09d}", f"step-{n:09d}"]
    aside = [p for p in tmp_path.joinpath("r").iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == before
    moved = [r.getMessage() for r in caplog.records if "moved the existing checkpoints" in r.getMessage()]
    assert len(moved) == 1 and str(aside[0]) in moved[0] and "\n" not in moved[0]

    # A later resume=auto resumes the new run, not the stale one.
    again = train(load_config(None, [*base, "checkpoint.every_steps=3"])).metrics
    assert again["resumed_from_step"] == n


# --------------------------------------------------------------------------- run lock


_HOLDER = """
import sys, time
from cdp_rec.training.run_lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_train_on_a_locked_run_dir_exits_2_naming_the_holder(small_data, tmp_path):
    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"auc": 0.7}\n')  # the first run's results
    (run / "config.yaml").write_text("model:\n  name: cdp\n")
    holder = _start_holder(run)
    try:
        before = _snapshot(run)
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "cdp_rec.cli", "train", *_sets(*SMALL, f"data.root={small_data}",
             f"train.run_dir={tmp_path / 'runs'}", "train.run_name=busy", "train.progress=false")],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env=dict(os.environ, TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json")),  # as under torchrun
        )
        elapsed = time.monotonic() - t0
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, r.stderr
        assert f"run directory {run} is in use by pid {holder.pid} on host {socket.gethostname()} (since " in lines[0]
        assert elapsed < 60, elapsed  # refused at start, not after training
        assert _snapshot(run) == before  # metrics.json / config.yaml of the first run untouched
        # torchrun passes the worker's error file up, so torchx shows the reason instead of no message.
        assert json.loads((tmp_path / "error.json").read_text())["message"] == lines[0]
    finally:
        holder.kill()
        holder.wait()


_CKPT_HOLDER = """
import sys, time
from cdp_rec.training.run_lock import acquire_checkpoint_lock
lock = acquire_checkpoint_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_shared_custom_checkpoint_dir_is_refused_to_a_second_run(small_data, tmp_path):
    from cdp_rec.training.run_lock import RunLockError, acquire_checkpoint_lock, checkpoint_lock_path

    ckpt = tmp_path / "shared-ckpts"
    assert checkpoint_lock_path(ckpt) == tmp_path / ".shared-ckpts.lock"  # beside it: survives a move-aside
    with acquire_checkpoint_lock(ckpt):
        with pytest.raises(RunLockError, match=rf"checkpoint directory {ckpt} is in use by pid {os.getpid()} .*"
                                               r"give each run its own checkpoint.dir"):
            acquire_checkpoint_lock(ckpt)
    assert not checkpoint_lock_path(ckpt).exists()

    holder = subprocess.Popen([sys.executable, "-c", _CKPT_HOLDER, str(ckpt)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        r = subprocess.run(
            [sys.executable, "-m", "cdp_rec.cli", "train", *_sets(*SMALL, f"data.root={small_data}",
             f"train.run_dir={tmp_path / 'runs'}", "train.run_name=other", f"checkpoint.dir={ckpt}",
             "train.progress=false")],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"checkpoint directory {ckpt} is in use by pid {holder.pid}" in lines[0], r.stderr
        assert not (tmp_path / "runs" / "other" / ".lock").exists()  # the run lock was given back
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_exclusive_in_process_and_released(tmp_path):
    from cdp_rec.training.run_lock import RunLockError, acquire_run_lock

    lock = acquire_run_lock(tmp_path / "run")
    info = json.loads((tmp_path / "run" / ".lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["since"].endswith("Z")
    with pytest.raises(RunLockError, match=f"in use by pid {os.getpid()}"):
        acquire_run_lock(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()
    with acquire_run_lock(tmp_path / "run"):
        pass


def test_lock_of_a_killed_holder_is_reused(tmp_path):
    from cdp_rec.training.run_lock import acquire_run_lock

    run = tmp_path / "run"
    holder = _start_holder(run)
    holder.kill()  # SIGKILL: no cleanup; the OS drops the flock, the file stays
    holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
    with acquire_run_lock(run):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_lock_file_of_a_dead_pid_on_this_host_is_stale_even_if_flocked(tmp_path):
    """Robustness: a flock that outlived its recorded holder (e.g. an inherited descriptor)."""
    import fcntl

    from cdp_rec.training.run_lock import RunLockError, acquire_run_lock

    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "x"}))
    fd = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # someone still holds the old inode
    try:
        with acquire_run_lock(run):
            assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        # A live holder on another host is never taken over.
        (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "since": "t0"}))
        fd2 = os.open(run / ".lock", os.O_RDWR)
        fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunLockError, match=f"in use by pid {dead.pid} on host elsewhere \\(since t0\\)"):
            acquire_run_lock(run)
        os.close(fd2)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- divergence


def test_diverging_training_stops_naming_the_step_and_the_learning_rates(small_data, tmp_path, capsys):
    rc = main(["train", *_sets(*SMALL, f"data.root={small_data}", f"train.run_dir={tmp_path}", "train.run_name=d",
                               "train.progress=false", "train.batch_size=128", "train.sparse_lr=1e9")])
    assert rc == 2
    line = _err_line(capsys)
    assert "training diverged at step" in line and "train.sparse_lr" in line
    assert not (tmp_path / "d" / "metrics.json").exists()
    assert not (tmp_path / "d" / ".lock").exists()  # released on the error path


def test_loss_guard_rules():
    from cdp_rec.training.trainer import LossGuard, TrainingError

    g = LossGuard()
    for step in range(1, 500):  # a sane run: 0.69 falling to ~0.3, noisy, a few bad batches
        bce = 0.3 + 0.39 * 0.99 ** step + (0.5 if step % 97 == 0 else 0.0)
        g.update(bce * 1.01, bce, step)
    with pytest.raises(TrainingError, match="step 500: smoothed BCE"):
        LossGuard().update(1e28, 1e28, 500)
    g = LossGuard(max_bce=1e9)
    for step in range(1, 51):
        g.update(0.5, 0.5, step)
    with pytest.raises(TrainingError, match=r"step \d+: smoothed loss .* > 100 x its level 0.5 after 50 steps"):
        for step in range(51, 200):
            g.update(1000.0, 0.5, step)
    with pytest.raises(TrainingError, match="non-finite"):
        LossGuard().update(float("nan"), 0.5, 1)


# --------------------------------------------------------------------------- OS errors at the CLI


def test_full_disk_is_one_line_naming_the_directory(tmp_path, capsys):
    mnt = tmp_path / "small"
    mount_tmpfs(mnt, "2m")
    try:
        (mnt / "mine.bin").write_bytes(os.urandom(1024 * 1024 + 512 * 1024))  # the user's file: 1.5 of 2 MiB
        before = _snapshot(mnt)
        out = mnt / "data"
        # ~6 MB of Parquet: does not fit in what is left.
        rc = main(["gen-data", "--out", str(out), *_sets("data.samples_per_day=40000", "data.rows_per_file=20000",
                                                          "data.row_group_size=5000")])
        assert rc == 2
        line = _err_line(capsys)
        assert str(out) in line and os.strerror(errno.ENOSPC) in line
        assert {k: v for k, v in _snapshot(mnt).items() if not k.startswith("data")} == before
    finally:
        umount(mnt)


def test_read_only_directory_is_one_line_naming_the_file(tmp_path, capsys):
    ro = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through chmod: use a read-only tmpfs instead
        mount_tmpfs(ro, "1m")
        (ro / "mine.txt").write_text("keep\n")
        r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        if r.returncode != 0:
            umount(ro)
            pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
        cause = os.strerror(errno.EROFS)
    else:
        ro.mkdir()
        (ro / "mine.txt").write_text("keep\n")
        ro.chmod(0o555)
        cause = os.strerror(errno.EACCES)
    try:
        before = _snapshot(ro)
        assert main(["gen-data", "--out", str(ro / "data"), *_sets(*SMALL)]) == 2
        line = _err_line(capsys)
        assert str(ro / "data") in line and cause in line
        # train into a read-only run directory: the same, before any training.
        assert main(["train", *_sets(*SMALL, f"train.run_dir={ro / 'runs'}", f"data.root={tmp_path / 'nodata'}")]) == 2
        line = _err_line(capsys)
        assert str(ro / "runs") in line and cause in line
        assert _snapshot(ro) == before
    finally:
        if os.geteuid() == 0:
            umount(ro)
        else:
            ro.chmod(0o755)


def test_export_file_exists_and_force_are_passed_through(tmp_path, capsys, monkeypatch):
    import cdp_rec.training.checkpoint as ck

    calls = []

    def fake_export(path, out, force=False):
        calls.append(force)
        if not force:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
        return {"tables": {}, "global_step": 1}

    monkeypatch.setattr(ck, "export", fake_export)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(tmp_path / "c"), "--out", str(out)]) == 2
    assert _err_line(capsys) == f"cdp-rec export: error: {out}: File exists"
    assert main(["export", "--checkpoint", str(tmp_path / "c"), "--out", str(out), "--force"]) == 0
    assert calls == [False, True]

    def buggy_export(path, out, force=False):
        raise OSError("an internal bug, not the user's disk")

    monkeypatch.setattr(ck, "export", buggy_export)
    with pytest.raises(OSError, match="internal bug"):  # bugs still traceback
        main(["export", "--checkpoint", str(tmp_path / "c"), "--out", str(out)])


# --------------------------------------------------------------------------- logging


def test_no_fbgemm_load_chatter_on_stderr(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cdp_rec.cli", "gen-data", "--out", str(tmp_path / "d"), *_sets(*SMALL)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Successfully loaded" not in r.stderr and "INFO root" not in r.stderr, r.stderr[:2000]
    assert r.stdout.startswith("wrote ")


# --------------------------------------------------------------------------- launch


def _no_venv_path() -> str:
    return ":".join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":")
                    if p and Path(p).resolve() != BIN.resolve() and not (Path(p) / "torchrun").exists())


def test_component_runs_torchrun_with_this_python_whatever_path(tmp_path):
    # The Slurm dry run prints the job's command on one line (local_cwd's is pretty-printed).
    r = subprocess.run([str(BIN / "torchx"), "run", "--workspace", "", "--dryrun", "-s", "slurm",
                        "launch/components.py:train", "--nnodes", "1", "--nproc_per_node", "2", "--max_retries", "1"],
                       cwd=ROOT, env=dict(os.environ, PATH=_no_venv_path()), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"_cdp_py={sys.executable};" in r.stdout
    assert 'torchrun() { exec "$_cdp_py" -m torch.distributed.run "$@"; }' in r.stdout
    assert "torchrun --max-restarts 1 --monitor-interval 1 --rdzv_backend" in r.stdout


def _job_command(python: str, cmd: str) -> str:
    """The bash command a component's role runs, with ``cmd`` as dist.ddp's torchrun line."""
    import torchx.specs as specs

    from launch.components import _torchrun_of_this_python

    role = specs.Role(name="t", image="", entrypoint="bash", args=["-c", cmd])
    _torchrun_of_this_python(role, python)
    return string.Template(role.args[-1]).safe_substitute()  # what torchx's macro substitution does


def test_job_command_uses_this_python_or_says_why_not(tmp_path):
    env = dict(os.environ, PATH=_no_venv_path(), TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"))
    r = subprocess.run(["bash", "-c", _job_command(sys.executable, "torchrun --help")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--nproc_per_node" in r.stdout, r.stderr[-2000:]

    r = subprocess.run(["bash", "-c", _job_command("/nonexistent/python", "torchrun --help")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 127
    assert "torchrun is not on PATH here and /nonexistent/python" in r.stderr
    assert "/nonexistent/python" in json.loads((tmp_path / "error.json").read_text())["message"]


@pytest.mark.slow
def test_local_cwd_launch_without_the_venv_on_path(tmp_path):
    overrides = ",".join([f"data.root={tmp_path}/data", f"train.run_dir={tmp_path}/runs", "train.run_name=np",
                          *SMALL, "train.progress=false", "model.name=base"])
    r = subprocess.run([str(BIN / "torchx"), "run", "-s", "local_cwd", "launch/components.py:train", "--nnodes", "1",
                        "--nproc_per_node", "1", "--overrides", overrides],
                       cwd=ROOT, env=dict(os.environ, PATH=_no_venv_path()), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert json.loads((tmp_path / "runs" / "np" / "metrics.json").read_text())["model"] == "base"


def test_rerunning_a_finished_run_keeps_what_it_measured(small_data, tmp_path, caplog):
    """A probe reran a finished run: it resumed at the last step, trained nothing, and
    metrics.json said 0 samples/s and no loss. Each invocation is listed, and the timing of
    the one that trained stays on top."""
    import logging

    sets = [*SMALL, f"data.root={small_data}", f"train.run_dir={tmp_path}", "train.run_name=r",
            "model.name=base", "train.progress=false"]
    args = ["train", *_sets(*sets, "train.epochs=1")]
    assert main(args) == 0
    first = json.loads((tmp_path / "r" / "metrics.json").read_text())
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    assert not [r for r in caplog.records if "saved with other settings" in r.getMessage()]
    again = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert first["train_samples_per_s"] > 0 and first["resumed_from_step"] == 0
    assert again["resumed_from_step"] == first["train_steps"]
    assert [i["resumed_from_step"] for i in again["invocations"]] == [0, first["train_steps"]]
    assert again["invocations"][0]["train_samples_per_s"] == first["train_samples_per_s"]
    assert again["invocations"][1]["train_seconds"] == 0
    for key in ("train_seconds", "train_samples_per_s", "final_train_loss"):
        assert again[key] == first[key], key
    assert again["auc"] == first["auc"]
    # The same run name with more epochs and another lr resumes the finished run: say so, and what changed.
    with caplog.at_level(logging.WARNING):
        assert main(["train", *_sets(*sets, "train.epochs=2", "train.dense_lr=0.002")]) == 0
    (warned,) = [r.getMessage() for r in caplog.records if "saved with other settings" in r.getMessage()]
    assert "(train.dense_lr 0.001 -> 0.002; train.epochs 1 -> 2)" in warned, warned
    assert "but it had finished, so nothing more is trained" in warned


def test_training_on_data_generated_with_other_settings_says_so(small_data, caplog):
    import logging

    from cdp_rec.training.trainer import ensure_data

    with caplog.at_level(logging.WARNING, logger="cdp_rec.training.trainer"):
        ensure_data(load_config(None, SMALL), small_data)
        assert not caplog.records
        ensure_data(load_config(None, [*SMALL, "data.seed=1", "data.samples_per_day=3000"]), small_data)
    (record,) = caplog.records
    assert (f"{small_data} was generated with other settings than this config's: data.seed 1 (data set: 0); "
            "data.samples_per_day 3000 (data set: 2000)") in record.getMessage()


def test_a_validation_set_of_a_few_clicks_is_warned_about(small_data, tmp_path, caplog):
    """Early stopping on an AUC of a handful of clicks follows noise: say so, once."""
    import logging

    with caplog.at_level(logging.WARNING, logger="cdp_rec.training.early_stop"):
        assert main(["train", *_sets(*SMALL, f"data.root={small_data}", f"train.run_dir={tmp_path}",
                                     "train.run_name=v", "model.name=base", "train.epochs=2", "train.batch_size=32",
                                     "data.valid_fraction=0.02", "train.progress=false")]) == 0
    warned = [r.getMessage() for r in caplog.records if "validation holds" in r.getMessage()]
    assert len(warned) == 1 and "is noise, and early stopping / the restored best point follow it" in warned[0]
