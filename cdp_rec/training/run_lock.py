"""One ``train`` per run directory: an exclusive ``fcntl.flock`` on ``<run_dir>/.lock``.

The lock file holds its holder's pid, host and start time (JSON), for the error a second
run gets: ``run directory X is in use by pid P on host H (since T)``. The kernel drops a
flock when its holder exits, however it exits (crash, SIGKILL, OOM kill), so a lock file
left behind by a dead process is simply not held: the next run takes it and rewrites it.
For file systems whose flock outlives the process (or a child that inherited the
descriptor), a lock file naming a pid that is no longer alive on this very host is also
treated as stale: it is removed and a fresh one is locked.

A custom ``checkpoint.dir`` (outside the run directory) is locked the same way, through
a sibling file ``.<name>.lock`` (:func:`acquire_checkpoint_lock`): two runs of different
names must not write, prune and resume from one checkpoint directory.

In a distributed job only rank 0 locks (the other ranks belong to the same job); a
torchrun restart's new rank 0 re-takes the lock because the old rank 0 is dead (the
agent stops all workers before restarting them).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockError(RuntimeError):
    """Another process holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OSError:
        return True
    return True


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


class RunLock:
    """An acquired lock; :meth:`release` (or the end of a ``with`` block, or process exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            # Remove the file while still holding it, so no one can lock this inode after us.
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_run_lock(run_dir: str | Path, wait_s: float = 0.0) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process, or raise :class:`RunLockError`.

    ``wait_s``: keep retrying that long while another process holds it (a torchrun restart
    whose previous rank 0 is still exiting); 0 fails at once.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return _acquire(run_dir / LOCK_FILE, wait_s, f"run directory {run_dir}",
                    "use another train.run_dir / train.run_name")


def checkpoint_lock_path(ckpt_dir: str | Path) -> Path:
    """The lock of a custom ``checkpoint.dir``: a sibling file, not a file inside it, because
    a fresh run moves an earlier run's checkpoint directory aside by renaming it."""
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.parent / f".{ckpt_dir.name}.lock"


def acquire_checkpoint_lock(ckpt_dir: str | Path, wait_s: float = 0.0) -> RunLock:
    """Lock a ``checkpoint.dir`` outside the run directory (two runs with different run
    names would otherwise write, prune and resume from one directory)."""
    path = checkpoint_lock_path(ckpt_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _acquire(path, wait_s, f"checkpoint directory {ckpt_dir}",
                    "give each run its own checkpoint.dir")


def _acquire(path: Path, wait_s: float, what: str, advice: str) -> RunLock:
    host = socket.gethostname()
    deadline = time.monotonic() + wait_s
    removed_stale = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO / device: ftruncate below fails with EINVAL
            os.close(fd)
            raise RunLockError(f"{path}: the lock file of the {what} is not a regular file (a FIFO, device or "
                               "socket); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(path)
            pid = holder.get("pid")
            if (not removed_stale and isinstance(pid, int) and holder.get("host") == host
                    and pid != os.getpid() and not _pid_alive(pid)):
                # Held, but by no live process of the recorded holder: stale (see module doc).
                log.warning("%s: lock of dead pid %d on this host is stale; replacing it", path, pid)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                removed_stale = True
                continue
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise RunLockError(
                f"{what} is in use by pid {pid if pid is not None else '?'} on host "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for it to finish, "
                f"or {advice}"
            ) from None
        # Locked. If the file was replaced meanwhile (a releaser unlinked it, or a stale lock
        # was removed), we hold an orphaned inode: start over on the current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": host,
                "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        return RunLock(path, fd)
