"""Helpers shared by the benchmarks in ``bench/`` (not a benchmark itself).

* memory: the process's resident set size and its high-water mark from
  ``/proc/self/status`` (``VmRSS`` / ``VmHWM``; the same number as
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, but resettable: writing ``5`` to
  ``/proc/self/clear_refs`` sets ``VmHWM`` back to the current RSS, so the peak of one
  phase can be measured in a process that already ran another). It counts every page
  torch, numpy, pyarrow and Python touch; ``tracemalloc`` sees none of torch's memory.
* synthetic in-memory batches with exactly ``L`` behaviours per sample;
* fresh-subprocess workers (``--worker JSON`` on the benchmark's own file), markdown
  tables, the load average, JSON output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 2**20
# Share of a sample's behaviours whose category equals the target item's. Measured on
# data/small (configs/small.yaml, day 0, first row group): 21.5%.
MATCH_RATE = 0.2


# --------------------------------------------------------------------------- memory


def status_kib() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def rss_mib() -> float:
    return status_kib()["VmRSS"] / 1024


def peak_rss_mib() -> float:
    return status_kib()["VmHWM"] / 1024


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def warn_if_loaded(threads: int) -> None:
    load = loadavg()
    if load > (os.cpu_count() or 1) - 0.5 and not threads:
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores -- other jobs are running; absolute "
              f"numbers are depressed, ratios measured in this run are what counts", file=sys.stderr)


# --------------------------------------------------------------------------- batches


def synthetic_batches(features: Any, batch_size: int, seq_len: int, n: int, seed: int = 0,
                      match_rate: float = MATCH_RATE) -> list:
    """``n`` distinct :class:`cdp_rec.data.schema.Batch` es with exactly ``seq_len`` behaviours per sample.

    Ids are uniform over each vocabulary; a behaviour's category is the target item's
    with probability ``match_rate`` (else uniform), so CDP's category filter keeps about
    ``match_rate * L`` behaviours per sample, as on the synthetic logs. KJT values are
    key-major in :func:`cdp_rec.data.schema.sparse_keys` order, like the loader's.
    """
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch, id_ranges, sparse_keys

    g = torch.Generator().manual_seed(seed)
    # Vocabulary sizes as dense ids (a raw-id table's size is its row count; callers scramble if they want raw ids).
    ranges = id_ranges(dataclasses.replace(features, id_mapping={}))
    keys = sparse_keys(features)
    singles = [k for k in keys if k not in (HIST_ITEMS, HIST_CATEGORIES)]
    B, L = batch_size, seq_len
    out = []
    for _ in range(n):
        cols = {k: torch.randint(0, ranges[k], (B,), generator=g) for k in singles}
        items = torch.randint(0, ranges[HIST_ITEMS], (B * L,), generator=g)
        cats = torch.randint(0, ranges[HIST_CATEGORIES], (B * L,), generator=g)
        match = torch.rand(B * L, generator=g) < match_rate
        cats = torch.where(match, cols["category_id"].repeat_interleave(L), cats)
        values = torch.cat([cols[k] for k in singles] + [items, cats])
        lengths = torch.cat([torch.ones(B * len(singles), dtype=torch.int64),
                             torch.full((2 * B,), L, dtype=torch.int64)])
        kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
        labels = (torch.rand(B, generator=g) < 0.2).float()
        out.append(Batch(kjt, labels, cols["user_id"].clone(), torch.arange(B, dtype=torch.int64) // 8))
    return out


def bench_config(config: str, overrides: list[str]) -> Any:
    from cdp_rec.config import load_config

    return load_config(config, ["train.progress=false", *overrides])


# --------------------------------------------------------------------------- workers


def spawn_worker(script: str, spec: dict | list, timeout: float | None = None) -> Any:
    """Run ``python script --worker JSON(spec)`` in a fresh process; its last stdout line is the result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"case {spec} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_reps(fn, min_reps: int, max_reps: int, min_seconds: float) -> list[float]:
    """Wall-clock seconds of ``fn()`` calls: at least ``min_reps``, then until ``min_seconds`` or ``max_reps``."""
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - t_start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); with fewer than 100 values p99 is the maximum."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# --------------------------------------------------------------------------- output


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return v if isinstance(v, str) else format(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a spawned gloo group's MASTER_PORT."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
