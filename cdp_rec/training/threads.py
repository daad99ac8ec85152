"""How many intra-op (OpenMP) threads a training process uses: ``train.threads``.

PyTorch's default is one thread per core of the machine, whatever else runs there. On
a small shared box that oversubscribes the cores: a tiny-config train with 2 threads next
to one other busy process ran at 458 samples/s against 22k single-threaded (the small
ops of these models spin-wait on each other's threads). The choice, in order:

1. ``train.threads`` > 0: that many;
2. ``OMP_NUM_THREADS`` set in the environment: that many (the launcher or the user
   chose: torchrun sets 1 for several local ranks, ``cdp-rec compare --jobs`` sets
   cores / jobs, the test suite sets 1);
3. otherwise (``train.threads`` 0, the default): the cores this process may run on
   (``os.sched_getaffinity``) shared among the job's processes on this host
   (``LOCAL_WORLD_SIZE``), and no more than the cores that other processes leave idle
   (their busy time on those cores over 0.5 s at start-up, from ``/proc/stat``, rounded
   to whole cores), at least 1. A process that is idle while it starts measures the
   others only, so a train next to a busy one uses the free core and not both.

Thread count did not change results: tiny-size base and CDP runs with 1 and 2 threads
ended with bit-identical weights (checked when this was added); it changes throughput.

The choice and why is logged at start-up and written to ``metrics.json`` (``threads``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cdp_rec.config import MAX_THREADS, ConfigError


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "train.threads" | "OMP_NUM_THREADS" | "auto"
    detail: str  # the inputs of an automatic choice, in words

    def describe(self) -> str:
        return f"{self.threads} intra-op thread(s) ({self.source}{': ' + self.detail if self.detail else ''})"

    def to_dict(self) -> dict[str, object]:
        return {"count": self.threads, "source": self.source, "detail": self.detail}


def choose_threads(requested: int, omp_env: str | None, cores: int, local_processes: int,
                   busy: float | None) -> ThreadChoice:
    """The thread count by the rules of the module docstring (pure: every input given).

    ``cores``: cores in this process's affinity; ``local_processes``: the job's processes
    on this host; ``busy``: how many of those cores other processes keep busy (None:
    unknown, not used).
    """
    if requested > 0:
        return ThreadChoice(requested, "train.threads", "")
    if omp_env is not None and omp_env.strip():
        try:
            n = int(omp_env)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"environment: OMP_NUM_THREADS must be a positive integer, got {omp_env!r} "
                              "(unset it, or set train.threads)")
        if n > MAX_THREADS:  # OpenMP segfaults starting 100000 threads
            raise ConfigError(f"environment: OMP_NUM_THREADS must be <= {MAX_THREADS}, got {omp_env!r} "
                              "(unset it, or set train.threads)")
        return ThreadChoice(n, "OMP_NUM_THREADS", "")
    share = max(1, cores // max(1, local_processes))
    detail = f"{cores} core(s) / {local_processes} local process(es)"
    threads = share
    if busy is not None:
        idle = max(0, cores - int(busy + 0.5))
        threads = max(1, min(share, idle))
        detail += f", {busy:.1f} busy with other processes"
    return ThreadChoice(threads, "auto", detail + "; set train.threads to override")


def affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def _cpu_times(path: str, cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` from a ``/proc/stat`` file, or None."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        total += user + nice + system + idle + iowait + irq + softirq + steal
        busy += user + nice + system + irq + softirq + steal
    return (busy, total) if total else None


def busy_cores(cpus: set[int], window_s: float = 0.5, path: str = "/proc/stat") -> float | None:
    """Cores of ``cpus`` kept busy over the next ``window_s`` seconds (this process sleeps
    meanwhile, so it is everyone else); None where ``/proc/stat`` cannot tell."""
    first = _cpu_times(path, cpus)
    if first is None:
        return None
    time.sleep(window_s)
    second = _cpu_times(path, cpus)
    if second is None or second[1] <= first[1]:
        return None
    return len(cpus) * (second[0] - first[0]) / (second[1] - first[1])


def pick_threads(requested: int, local_processes: int) -> ThreadChoice:
    """:func:`choose_threads` on this process's environment, affinity and the others' load
    (measured only when the rules get that far)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    cpus = affinity()
    busy = busy_cores(cpus) if requested <= 0 and not (omp or "").strip() else None
    return choose_threads(requested, omp, len(cpus), local_processes, busy)


@contextmanager
def torch_threads(choice: ThreadChoice) -> Iterator[ThreadChoice]:
    """Run with ``torch.set_num_threads(choice.threads)``; the previous count is put back
    after (a library caller, e.g. ``compare`` training models in turn, keeps its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        yield choice
    finally:
        torch.set_num_threads(before)
