"""``cdp-rec compare``: train several models on the same data for several seeds and tabulate.

Every (model, seed) run is an ordinary :func:`cdp_rec.training.trainer.train` call on
the same config, data root and test day(s), with ``--set model.name=<model>`` and
``--set train.seed=<seed>`` added, so the runs differ only in the model and its
initialisation / noise draws (the data set is generated once, by its own
``data.seed``). The report is the paper's Table 1 (baselines vs CDP) and, when CDP
ablations were run, Table 2: AUC / UAUC / GAUC as mean ± sample std over the seeds,
training throughput (samples/s, from ``metrics.json``) and inference latency. When
``lr_counts`` (logistic regression on streaming click-rate counts, no behaviour
history) ran, it is the *floor*: listed first, and every table gets a column with each
model's AUC minus the floor's (a model at or below it learns nothing the counts do not).

Inference latency (ms/batch) is measured separately from the evaluation pass: a fresh
model of the same config scores the first ``train.eval_batch_size`` rows of the test
day — ``prepare_batch`` + ``forward`` under ``torch.no_grad`` in eval mode, the fastest
of a few repetitions after one warm-up (robust to other load on the machine), data
reading excluded. The cost of a forward does
not depend on the weights, so an untrained model times the same as the trained one.

Outputs (``--out``, default ``runs/compare``): ``results.md``, ``results.json`` (every
run's metrics plus the summary), the runs' own ``<model>-<hash>/`` directories and, if
matplotlib is importable, ``results.png`` (AUC bars with std error bars).

Timings on a shared or loaded machine are noisy; compare them within one report only.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdp_rec.config import ConfigError, JobConfig, load_config
from cdp_rec.metrics import format_metric, sample_share

log = logging.getLogger(__name__)

# Paper Table 1 order (the count floor, the base model and our extra baselines around it), then Table 2.
FLOOR = "lr_counts"
TABLE1_ORDER = (FLOOR, "base", "din", "sim", "qin", "twin", "hstu", "ddrm", "diffrec", "diffumin", "cdp")
TABLE2_ORDER = ("cdp_no_condition", "cdp_no_collab", "cdp_no_context", "cdp_no_moe", "cdp_no_diffusion", "cdp")
DISPLAY = {
    FLOOR: "LR on click counts (floor)",
    "base": "Base (mean pooling)",
    "din": "DIN",
    "sim": "SIM",
    "qin": "QIN",
    "twin": "TWIN",
    "hstu": "HSTU",
    "ddrm": "DDRM",
    "diffrec": "DiffRec",
    "diffumin": "DiffuMIN",
    "cdp": "CDP",
    "cdp_no_condition": "No condition",
    "cdp_no_collab": "No collaborative",
    "cdp_no_context": "No other conditions",
    "cdp_no_moe": "No MoE fusion",
    "cdp_no_diffusion": "No diffusion (filtered mean only)",
}
METRICS = ("auc", "uauc", "gauc")

# ``--quick``: a CI-sized data set and learning rates that show learning on it.
QUICK_OVERRIDES = (
    "data.samples_per_day=20000",
    "data.rows_per_file=10000",
    "data.row_group_size=5000",
    "train.batch_size=512",
    "train.dense_lr=0.003",
    "train.sparse_lr=0.01",
)


def resolve_models(spec: str) -> list[str]:
    """``"all"`` or a comma-separated list -> model names in table order; unknown names are an error."""
    from cdp_rec.models import MODELS

    order = list(dict.fromkeys([*TABLE1_ORDER, *TABLE2_ORDER, *MODELS]))
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if "all" in names:  # "all" or "all,base": every model (not "unknown model 'all'; known: all, ...")
        return [m for m in order if m in MODELS]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ConfigError(f"--models: unknown model(s) {unknown or [spec]}; known: all, {', '.join(sorted(MODELS))}")
    return sorted(dict.fromkeys(names), key=order.index)


@dataclass
class Summary:
    """One model's numbers over the seeds."""

    model: str
    seeds: list[int]
    mean: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    train_samples_per_s: float = 0.0
    inference_ms_per_batch: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "seeds": self.seeds,
            "mean": self.mean,
            "std": self.std,
            "train_samples_per_s": self.train_samples_per_s,
            "inference_ms_per_batch": self.inference_ms_per_batch,
        }


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize(runs: list[dict[str, Any]]) -> list[Summary]:
    """Group run records (``{"model", "seed", "metrics", "inference_ms_per_batch"}``) by model."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    out = []
    for model, rs in by_model.items():
        s = Summary(model, [r["seed"] for r in rs])
        for k in METRICS:
            s.mean[k], s.std[k] = _mean_std([r["metrics"].get(k) for r in rs])
        s.train_samples_per_s = statistics.fmean(r["metrics"]["train_samples_per_s"] for r in rs)
        s.inference_ms_per_batch = statistics.fmean(r["inference_ms_per_batch"] for r in rs)
        out.append(s)
    return out


def measure_inference_ms(cfg: JobConfig, root: Path, reps: int = 5) -> float:
    """Fastest ms of ``prepare_batch`` + ``forward`` (eval, no grad) on one eval batch of the test day."""
    from cdp_rec.data.joined import open_reader
    from cdp_rec.models import build_model

    batch = next(iter(open_reader(cfg, root, cfg.data.train_days, cfg.train.eval_batch_size)))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).eval()
    times = []
    with torch.no_grad():
        for i in range(reps + 1):
            t0 = time.perf_counter()
            model(model.prepare_batch(batch))
            if i:  # the first call warms up
                times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def markdown(summaries: list[Summary], header: dict[str, Any]) -> str:
    """The report: Table 1 (every non-ablation model), Table 2 (ablations + CDP) when ablations ran."""
    by_name = {s.model: s for s in summaries}
    n_seeds = max((len(s.seeds) for s in summaries), default=0)
    metric_hdr = " | ".join(k.upper() + (" (mean ± std)" if n_seeds > 1 else "") for k in METRICS)
    floor_auc = by_name[FLOOR].mean["auc"] if FLOOR in by_name else None

    def vs_floor(name: str) -> str:
        if name == FLOOR:
            return "floor"
        auc = by_name[name].mean["auc"]
        return "n/a" if auc is None or floor_auc is None else f"{auc - floor_auc:+.4f}"

    def table(names: list[str]) -> list[str]:
        extra = FLOOR in by_name
        lines = [
            f"| Model | {metric_hdr} | train samples/s | inference ms/batch |" + (" AUC - floor |" if extra else ""),
            "|---|" + "---|" * (len(METRICS) + 2 + int(extra)),
        ]
        for name in names:
            s = by_name[name]
            cells = [_fmt(s.mean[k], s.std[k], len(s.seeds)) for k in METRICS]
            lines.append(
                f"| {DISPLAY.get(name, name)} | {' | '.join(cells)} | {s.train_samples_per_s:,.0f} | "
                f"{s.inference_ms_per_batch:.1f} |" + (f" {vs_floor(name)} |" if extra else "")
            )
        return lines

    ablations = [n for n in TABLE2_ORDER[:-1] if n in by_name]
    table1 = [s.model for s in summaries if s.model not in ablations]
    out = ["# Model comparison", ""]
    out += [f"- {k}: {v}" for k, v in header.items()]
    out += ["", "## Table 1: baselines and CDP", ""] + table(table1)
    if ablations:
        out += ["", "## Table 2: CDP ablations", ""] + table(ablations + (["cdp"] if "cdp" in by_name else []))
    out += [
        "",
        "AUC / UAUC / GAUC on the held-out test day(s) (UAUC: unweighted mean per-user AUC; GAUC: "
        "impression-weighted per-request AUC). Throughput and latency are single-process CPU numbers "
        "from this machine; compare them within this report only.",
    ]
    if floor_auc is not None:
        out += ["", "Floor: logistic regression on smoothed click rates of user, item, query, category and "
                "(user, category), counted leak-free over the training stream (`lr_counts`, no behaviour "
                "history). `AUC - floor` is each model's mean AUC minus the floor's."]
    return "\n".join(out) + "\n"


def bar_chart(summaries: list[Summary], path: Path) -> bool:
    """AUC bars with std error bars -> ``path``; False (and a printed note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the bar chart (results.png)")
        return False
    names = [DISPLAY.get(s.model, s.model) for s in summaries]
    means = [s.mean["auc"] or 0.0 for s in summaries]
    stds = [s.std["auc"] or 0.0 for s in summaries]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    ax.bar(range(len(names)), means, yerr=stds, capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    lo = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, lo - 0.02), max(m + s for m, s in zip(means, stds)) + 0.01)
    ax.set_ylabel("test AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_compare(
    config: str | None,
    overrides: list[str],
    models: str = "all",
    seeds: int = 3,
    out_dir: str | Path = "runs/compare",
    quick: bool = False,
    data_root: str | None = None,
    reuse: bool = True,
    jobs: int = 1,
    report: bool = True,
) -> dict[str, Any]:
    """Train ``models`` x ``range(seeds)``, write the report files, return the results dict.

    With ``reuse``, a (model, seed) whose run directory already has a ``metrics.json``
    of exactly this config (same config hash) is not retrained: its metrics and
    throughput are the ones measured when it ran, and only the inference latency is
    measured again (seconds). An interrupted ``compare`` therefore continues where it
    stopped.

    ``jobs > 1`` trains in that many worker processes (``cdp-rec compare`` on a share of
    the models each, ``OMP_NUM_THREADS`` = cores / jobs): on a small CPU box, processes
    with one thread each get more from the cores than one process whose small ops
    cannot use two threads well (45 small-config runs: 44 min with 2 jobs on 2 cores).
    The parent then collects the finished runs by ``reuse`` and writes the report;
    throughput columns are then measured under each other's load.
    """
    from cdp_rec.training.run_record import read_metrics
    from cdp_rec.training.trainer import run_name, train

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    names = resolve_models(models)
    out = Path(out_dir)
    # Benchmarks: no progress bars, no checkpoint writes inside the timed training loop, and
    # never "resume" a finished run of an earlier compare (its throughput would be void).
    base = ["train.progress=false", "checkpoint.at_day_end=false", "checkpoint.resume=never"]
    if quick:
        root = load_config(config, list(overrides)).data.root
        base += [*QUICK_OVERRIDES, f"data.root={root.rstrip('/')}-quick"]
    common = [*base, *overrides, f"train.run_dir={out}"]
    cfg0 = load_config(config, common)  # fail fast on a bad config, before any training
    root = Path(data_root or cfg0.data.root)
    out.mkdir(parents=True, exist_ok=True)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1:
        from cdp_rec.training.trainer import ensure_data

        ensure_data(cfg0, root)  # once, before the workers could race to generate it
        _train_in_workers(config, overrides, names, seeds, out, quick, data_root, reuse, jobs)
        reuse = True

    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        for name in names:
            cfg = load_config(config, [*common, f"model.name={name}", f"train.seed={seed}"])
            t0 = time.perf_counter()
            done = out / run_name(cfg) / "metrics.json"
            # An unreadable metrics.json (a run killed while writing it) is retrained, not a traceback.
            previous = read_metrics(done.parent) if reuse else None
            if previous is not None and previous.get("config_hash") == cfg.hash():
                m, run_dir = previous, done.parent
                print(f"[compare] {name} seed {seed}: reusing {done}", flush=True)
            else:
                result = train(cfg, root)
                m, run_dir = result.metrics, result.run_dir
            ms = measure_inference_ms(cfg, root)
            print(
                f"[compare] {name} seed {seed}: AUC {format_metric(m.get('auc'))} UAUC {format_metric(m.get('uauc'))} "
                f"GAUC {format_metric(m.get('gauc'))}  {m['train_samples_per_s']:,.0f} samples/s  "
                f"{ms:.1f} ms/batch  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            runs.append({"model": name, "seed": seed, "run_dir": str(run_dir), "metrics": m,
                         "inference_ms_per_batch": round(ms, 3)})

    if not report:
        return {"runs": runs}
    summaries = summarize(runs)
    header = {
        "config": config or "<embedded default>",
        "overrides": " ".join(overrides) or "none",
        "quick": quick,
        "data root": str(root),
        "seeds": ", ".join(map(str, range(seeds))),
        "train / eval samples per run": f"{runs[0]['metrics']['num_train_samples']} / "
        f"{runs[0]['metrics']['num_eval_samples']}",
        "UAUC / GAUC groups (users / requests with both labels on the test days)": _group_counts(runs[0]["metrics"]),
        "eval batch size (latency)": cfg0.train.eval_batch_size,
        "torch threads": torch.get_num_threads(),
    }
    report = markdown(summaries, header)
    results = {"header": header, "runs": runs, "summary": [s.to_dict() for s in summaries]}
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    png = out / "results.png"
    if bar_chart(summaries, png):
        results["png"] = str(png)
    results["markdown"] = report
    return results


def _group_counts(m: dict[str, Any]) -> str:
    """``"1,018 / 26 (97% / 0.6% of test samples)"``: how many groups UAUC / GAUC average and
    the share of the samples they hold (absent in a reused metrics.json of an older cdp-rec)."""
    text = f"{m['num_users_used']:,} / {m['num_requests_used']:,}"
    shares = [sample_share(m, k) or "0%" for k in ("num_samples_users_used", "num_samples_requests_used")]
    return text if "num_samples_users_used" not in m else text + " ({} / {} of test samples)".format(*shares)


def _train_in_workers(
    config: str | None,
    overrides: list[str],
    names: list[str],
    seeds: int,
    out: Path,
    quick: bool,
    data_root: str | None,
    reuse: bool,
    jobs: int,
) -> None:
    """Train ``names`` x seeds in ``jobs`` ``cdp-rec compare`` subprocesses (models dealt round-robin)."""
    import os
    import subprocess
    import sys

    shares = [names[i::jobs] for i in range(jobs) if names[i::jobs]]
    threads = max(1, (os.cpu_count() or 1) // len(shares))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = []
    for share in shares:
        cmd = [sys.executable, "-m", "cdp_rec.cli", "compare", "--models", ",".join(share), "--seeds", str(seeds),
               "--out", str(out), "--no-report"]
        cmd += ["--config", config] if config else []
        cmd += [a for ov in overrides for a in ("--set", ov)]
        cmd += ["--quick"] if quick else []
        cmd += ["--data", data_root] if data_root else []
        cmd += [] if reuse else ["--fresh"]
        log_path = out / f"worker-{len(procs)}.log"
        print(f"[compare] worker {len(procs)} ({threads} thread(s)): {', '.join(share)} -> {log_path}", flush=True)
        procs.append((share, log_path, subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)))
    failed = [(share, log) for share, log, p in procs if p.wait() != 0]
    if failed:
        raise RuntimeError("compare workers failed: " + "; ".join(f"{','.join(s)} (see {log})" for s, log in failed))
