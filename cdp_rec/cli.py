"""``cdp-rec`` command line: ``gen-data``, ``import``, ``convert``, ``train``, ``evaluate``, ``export``, ``predict``, ``plan`` and ``compare``.

Training-side subcommands take ``--config FILE`` (default: the embedded tiny config) and any
number of ``--set key=value`` overrides (``--set model.name=base``). Bad configs, bad
data, a diverged training, a run directory in use, a plan that does not fit and a
read-only or full disk exit with status 2 and one line naming the key or file, not a
traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys
from pathlib import Path

from cdp_rec.config import MAX_THREADS, ConfigError, JobConfig, load_config
from cdp_rec.metrics import format_metric, sample_share


def _config(args: argparse.Namespace) -> JobConfig:
    return load_config(args.config, args.set)


def cmd_gen_data(args: argparse.Namespace) -> int:
    from cdp_rec.data.synthetic import dataset_is_complete, generate_dataset

    cfg = _config(args)
    if args.layout:
        cfg.data.layout = args.layout
    out = Path(args.out or cfg.data.root)
    args.where = out
    if dataset_is_complete(cfg, out) and not args.force:
        print(f"{out} is up to date for this config (use --force to rewrite)")
        return 0
    files = generate_dataset(cfg, out, force=args.force)
    print(f"wrote {len(files)} files under {out} ({cfg.data.layout} layout)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Rewrite a data set in the other storage layout (streaming; see cdp_rec/data/convert.py)."""
    from cdp_rec.data.convert import convert

    cfg = _config(args)
    s = convert(cfg, args.src, args.dst, args.to, force=args.force)
    extra = f", {s.behaviours:,} behaviours" if args.to == "joined" else ""
    print(f"converted days {s.days} of {args.src} to the {args.to} layout under {args.dst}: "
          f"{s.impressions:,} impressions{extra}, {s.files} files")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cdp_rec.training.trainer import train

    from embeddings.capacity import CapacityError

    cfg = _config(args)
    args.where = Path(cfg.train.run_dir) / (cfg.train.run_name or "")  # what an OSError without a file names
    try:
        result = train(cfg, args.data)
    except CapacityError as e:  # imported lazily (TorchRec), so handled here
        print(f"cdp-rec train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the job
    m = result.metrics
    print(
        f"{m['model']}: AUC {format_metric(m['auc'])}  {_groups(m)}  "
        f"({m['num_train_samples']} train / {m['num_eval_samples']} eval samples, "
        f"{m['train_samples_per_s']:.0f} samples/s)"
    )
    best = m.get("restored") or m.get("best_validation")
    if best:
        how = "stopped early" if m.get("stopped_early") else "ran"
        used = "tested with its weights" if m.get("restored") else "tested with the last weights"
        print(f"validation: best {best['monitor']} {format_metric(best['value'])} at epoch {best['epoch']} "
              f"step {best['step']} ({how} {m['epochs_run']} of {cfg.train.epochs} epochs; {used})")
    print(f"metrics: {result.run_dir / 'metrics.json'}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the capacity plan; a plan that does not fit exits 2 naming the tables.

    ``--storage``: instead, the bytes on disk of each storage layout at this config.
    """
    cfg = _config(args)
    if args.storage:
        from cdp_rec.data import storage

        est = storage.estimate_storage(cfg, args.sample_impressions, args.behaviours_per_user_day)
        name = args.config or "<embedded default>"
        print(storage.report_json(est) if args.json else storage.format_report(est, name))
        return 0

    from embeddings import capacity

    try:
        what_if = capacity.WhatIf(
            scale_rows=capacity.parse_table_values(args.scale_table, "--scale-table", float),
            dims=capacity.parse_table_values(args.dim, "--dim", int),
            dtype=args.dtype,
            caching=args.caching,
            cache_load_factor=args.cache_load_factor,
        )
        name = args.config or "<embedded default>"
        steps = None
        if args.find_min_gpus:
            report, steps = capacity.find_min_world_size(
                cfg, args.local_world_size, args.hbm_gb, args.ddr_gb, what_if, args.max_world_size, name
            )
        elif args.world_size is None:
            raise capacity.CapacityError("--world-size is required unless --find-min-gpus is given")
        else:
            report = capacity.plan_capacity(
                cfg, args.world_size, args.local_world_size, args.hbm_gb, args.ddr_gb, what_if, name
            )
    except capacity.CapacityError as e:
        # Imported lazily (TorchRec), so handled here rather than in main()'s except.
        print(f"cdp-rec plan: error: {e}", file=sys.stderr)
        return 2
    print(capacity.report_json(report, steps) if args.json else capacity.format_report(report, steps))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train several models x seeds on the same data; print and write the comparison tables."""
    from cdp_rec.compare import run_compare

    results = run_compare(args.config, args.set, args.models, args.seeds, args.out, args.quick, args.data,
                          reuse=not args.fresh, jobs=args.jobs, report=not args.no_report)
    if args.no_report:
        return 0
    print(results["markdown"], end="")
    print(f"wrote {Path(args.out) / 'results.md'} and {Path(args.out) / 'results.json'}")
    return 0


def _check_days(args: argparse.Namespace) -> None:
    """A day given twice would be read twice: scored twice (predict) or counted twice in the
    metrics (evaluate's AUC / UAUC / GAUC over duplicated impressions)."""
    repeated = sorted({d for d in args.day if args.day.count(d) > 1})
    if repeated:
        raise ConfigError(f"--day {repeated[0]} is given more than once; each day is read once")


def _check_same_id_mapping(trained_on: Path, data: Path) -> None:
    """DataError when ``data`` is an import whose dense ids follow another mapping than the
    import the checkpoint trained on (both ``_dataset.json`` record one; see
    :mod:`cdp_rec.data.id_maps`): its ids would fit the tables and score silently."""
    from cdp_rec.data.id_maps import dataset_id_maps, mismatch
    from cdp_rec.data.loader import DataError, read_json_file
    from cdp_rec.data.spec import DATASET_SPEC_FILE

    if not (trained_on / DATASET_SPEC_FILE).is_file() or trained_on.resolve() == data.resolve():
        return  # the training data is not on this machine (or is the data): nothing to compare
    want = dataset_id_maps(read_json_file(trained_on / DATASET_SPEC_FILE, "data set spec"))
    have = dataset_id_maps(read_json_file(data / DATASET_SPEC_FILE, "data set spec"))
    col = mismatch(want, have)
    if col is not None:
        raise DataError(f"{data / DATASET_SPEC_FILE}: column '{col}' holds dense ids of another import's mapping "
                        f"than {trained_on}, which the checkpoint trained on: its ids would look up other ids' "
                        "rows; score rows imported together with the training log")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score the test days of a data set with a checkpoint (any world size wrote it)."""
    from cdp_rec.data.joined import open_reader
    from cdp_rec.training.checkpoint import load_unsharded
    from cdp_rec.training.trainer import Trainer

    _check_days(args)
    model, cfg = load_unsharded(Path(args.checkpoint), args.set)
    root = Path(args.data or cfg.data.root)
    if args.data:
        _check_same_id_mapping(Path(cfg.data.root), root)
    days = args.day if args.day else list(range(cfg.data.train_days, cfg.data.train_days + cfg.data.test_days))
    trainer = Trainer(cfg, None, model=model)
    m = trainer.evaluate(open_reader(cfg, root, days, cfg.train.eval_batch_size))
    d = m.to_dict()
    print(f"{cfg.model.name} @ {args.checkpoint} on days {days}: AUC {format_metric(d['auc'])}  {_groups(d)}  "
          f"({d['num_samples']} samples)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.serving:
        return _export_serving(args)
    if args.dtype or args.compile:
        print("cdp-rec export: error: --dtype and --compile apply to --serving packages only", file=sys.stderr)
        return 2
    from cdp_rec.training.checkpoint import export

    manifest = export(Path(args.checkpoint), Path(args.out), force=args.force)
    print(f"exported {len(manifest['tables'])} tables + dense weights of step {manifest['global_step']} to {args.out}")
    return 0


def _export_serving(args: argparse.Namespace) -> int:
    """``export --serving``: a self-contained package (quantized tables, exported dense graph, id mappings)."""
    from cdp_rec.serving.export import export_serving

    manifest, sha = export_serving(Path(args.checkpoint), Path(args.out), dtype=args.dtype or "fp32",
                                   compile=args.compile or "none", force=args.force)
    dense = manifest["dense"]
    how = "exported program + AOTInductor build" if dense.get("aoti") else "exported program"
    if dense.get("aoti_error"):
        how += f" (AOTInductor failed: {dense['aoti_error']})"
    print(f"exported {manifest['model']} serving package ({len(manifest['tables'])} {manifest['dtype']} tables, "
          f"{how}) of step {manifest['source'].get('global_step')} to {args.out}")
    print(f"package sha256 {sha} (load_package(..., expected_sha256=...) / predict --expect-sha256 pin it)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Score Parquet logs with a serving package: ``request_id, item_id, score`` Parquet."""
    import torch

    from cdp_rec.serving.predict import predict_to_parquet
    from cdp_rec.serving.runtime import load_package

    if args.batch_size <= 0:
        print(f"cdp-rec predict: error: --batch-size must be > 0, got {args.batch_size}", file=sys.stderr)
        return 2
    _check_days(args)
    if not 0 <= args.threads <= MAX_THREADS:  # -1: a RuntimeError traceback; 100000: a segfault
        print(f"cdp-rec predict: error: --threads must be in [0, {MAX_THREADS}], got {args.threads}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.where = Path(args.out)
    model = load_package(Path(args.model), native=args.native, expected_sha256=args.expect_sha256)
    stats = predict_to_parquet(model, Path(args.data), Path(args.out), batch_size=args.batch_size, days=args.day,
                               force=args.force)
    print(f"scored {stats.rows} rows in {stats.batches} batches with {model.model_name} ({model.dtype} tables, "
          f"{model.dense_format} dense graph) in {stats.seconds:.1f} s -> {args.out}")
    return 0


def _groups(m: dict) -> str:
    """UAUC and GAUC with how many users / requests they average (those with both labels)
    and the share of the samples those hold: a GAUC of a handful of requests must not read
    like one of thousands."""
    def share(key: str) -> str:
        pct = sample_share(m, key)
        return "" if pct is None else f", {pct} of samples"

    users, requests = share("num_samples_users_used"), share("num_samples_requests_used")
    return (f"UAUC {format_metric(m['uauc'])} ({m['num_users_used']:,} users{users})  "
            f"GAUC {format_metric(m['gauc'])} ({m['num_requests_used']:,} requests{requests})")


class _Parser(argparse.ArgumentParser):
    """``@FILE`` anywhere on the command line stands for the shell words in FILE (``#``
    comments allowed), e.g. an import's ``train_args``: ``cdp-rec train --config c.yaml
    @data/mine/train_args``. That is how a launcher that cannot run ``$(cat FILE)`` (torchx
    splits its list arguments at commas, which JSON values hold) passes them."""

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        try:
            return shlex.split(arg_line, comments=True)
        except ValueError as e:  # an unclosed quote: one line and exit 2, not a traceback
            self.error(f"an @FILE line cannot be split into words ({e}): {arg_line.strip()[:200]!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cdp-rec", description=__doc__.splitlines()[0], fromfile_prefix_chars="@")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="YAML job config (default: embedded tiny config)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")

    p = sub.add_parser("gen-data", help="write a deterministic synthetic search-log data set")
    common(p)
    p.add_argument("--out", default=None, help="output root (default: data.root)")
    p.add_argument("--force", action="store_true",
                   help="rewrite even if the data set is up to date, and write into a non-empty directory that "
                        "gen-data did not write (replacing the day files and behaviors/ there)")
    p.add_argument("--layout", choices=["rows", "joined"], default=None,
                   help="storage layout (default: data.layout, which defaults to rows)")
    p.set_defaults(func=cmd_gen_data)

    p = sub.add_parser("convert", help="rewrite a data set in the other storage layout (rows <-> joined)")
    common(p)
    p.add_argument("--src", required=True, help="source data root (either layout)")
    p.add_argument("--dst", required=True, help="destination root (empty or new)")
    p.add_argument("--to", required=True, choices=["rows", "joined"], help="target layout")
    p.add_argument("--force", action="store_true", help="replace a data set already in --dst")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train on the training days and evaluate on the test days")
    common(p)
    p.add_argument("--data", default=None, help="data root (default: data.root)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score test days with a checkpoint: AUC / UAUC / GAUC")
    p.add_argument("--checkpoint", required=True, help="a committed checkpoint directory (.../checkpoints/step-N)")
    p.add_argument("--data", default=None, help="data root (default: the checkpoint config's data.root)")
    p.add_argument("--day", type=int, action="append", default=[], help="day(s) to score (default: the test days)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="unsharded serving artifact (tables, dense weights, config) from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing export in --out")
    p.add_argument("--serving", action="store_true",
                   help="write a self-contained serving package (TorchRec-quantized tables, torch.export dense "
                        "graph, id mappings, feature spec, manifest) for `cdp-rec predict` / load_package()")
    p.add_argument("--dtype", choices=["fp32", "fp16", "int8"], default=None,
                   help="with --serving: table weights (int8: row-wise, fp16 scale + bias per row; default fp32)")
    p.add_argument("--compile", choices=["none", "aoti"], default=None,
                   help="with --serving: also build the dense graph with AOTInductor (native code, ~1 min; "
                        "used by predict --native; default none)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="score Parquet logs with a serving package -> request_id, item_id, score")
    p.add_argument("--model", required=True, help="serving package directory (export --serving)")
    p.add_argument("--data", required=True,
                   help="Parquet file, directory of *.parquet, or data root with day=NN directories (training schema; "
                        "label optional)")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--day", type=int, action="append", default=[],
                   help="with a data root: day(s) to score (default all)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per scoring call (default 4096)")
    p.add_argument("--native", action="store_true",
                   help="run the package's AOTInductor build (native code from the package: trusted packages only)")
    p.add_argument("--expect-sha256", default=None, metavar="HEX",
                   help="refuse the package unless its manifest.json has this SHA-256 (printed by export)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("plan", help="embedding capacity plan: sharding and memory per table and per rank")
    common(p)
    p.add_argument("--world-size", type=int, default=None, help="number of devices (required unless --find-min-gpus)")
    p.add_argument("--local-world-size", type=int, default=8, help="devices per host (default: 8)")
    p.add_argument("--hbm-gb", type=float, default=None, help="HBM per device, GiB (default: sharding.hbm_gb)")
    p.add_argument("--ddr-gb", type=float, default=None, help="host memory per device, GiB (default: sharding.ddr_gb)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--find-min-gpus", action="store_true", help="search the smallest world size (whole hosts) that fits")
    p.add_argument("--max-world-size", type=int, default=1024, help="upper end of --find-min-gpus (default: 1024)")
    p.add_argument("--scale-table", action="append", default=[], metavar="TABLE=FACTOR", help="what-if: scale a table's rows")
    p.add_argument("--dim", action="append", default=[], metavar="TABLE=DIM", help="what-if: a table's embedding dim")
    p.add_argument("--dtype", choices=["fp32", "fp16", "int8"], default=None, help="what-if: weight dtype of all tables")
    p.add_argument("--caching", action="store_true", help="what-if: UVM caching kernel (HBM cache + host DDR)")
    p.add_argument("--cache-load-factor", type=float, default=0.2, help="with --caching: rows cached in HBM (default 0.2)")
    p.add_argument("--storage", action="store_true",
                   help="instead: bytes on disk per impression / day / all days of each storage layout, measured "
                        "on a synthetic sample written by the real writers")
    p.add_argument("--sample-impressions", type=int, default=4000,
                   help="with --storage: impressions in the measured sample day (default 4000)")
    p.add_argument("--behaviours-per-user-day", type=float, default=None,
                   help="with --storage: behaviours each user logs per day (default: the generator's 0.1 x max_seq_len)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="train several models x seeds on the same data and tabulate AUC/UAUC/GAUC")
    common(p)
    p.add_argument("--models", default="all", help="'all' or a comma-separated list of model names (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, one run per model and seed (default: 3)")
    p.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    p.add_argument("--quick", action="store_true", help="CI-sized data (20k samples/day) and learning rates")
    p.add_argument("--data", default=None, help="data root (default: data.root)")
    p.add_argument("--fresh", action="store_true",
                   help="retrain every run; by default a run whose directory under --out already holds the "
                        "metrics of the same config is reused, so an interrupted compare continues")
    p.add_argument("--jobs", type=int, default=1,
                   help="train in this many worker processes (cores / jobs threads each), then tabulate")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker
    p.set_defaults(func=cmd_compare)
    from cdp_rec.data.importers.cli import add_import_parser

    add_import_parser(sub)
    return parser


# OS errors that are the environment's, not a bug: reported in one line even without a file name.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST,
                errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EFBIG, errno.EMFILE, errno.ENAMETOOLONG}


def setup_logging() -> None:
    """Our loggers (``cdp_rec``, ``embeddings``, ``launch``) at INFO; everything else at WARNING.

    The root logger stays at WARNING: fbgemm_gpu logs each of its ~15 ``Successfully
    loaded`` libraries to root at INFO, and TorchRec every pipeline refill.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("cdp_rec", "embeddings", "launch"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("torchrec").setLevel(logging.WARNING)


def _os_error_line(e: OSError, args: argparse.Namespace) -> str | None:
    """``<file>: <cause>`` for an OSError a user can act on (read-only / full disk, a file
    where a directory belongs, ...); None for anything else (a bug: let it traceback)."""
    if e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{where}: {e.strerror or e}"
    if e.errno in _USER_ERRNOS:
        # e.g. pyarrow's writes: no file name, so name where this command was writing.
        where = getattr(args, "where", None) or getattr(args, "out", None) or getattr(args, "dst", None) or "."
        return f"{where}: {os.strerror(e.errno)}"
    return None


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    from cdp_rec.data.loader import DataError
    from cdp_rec.training.checkpoint import CheckpointError
    from cdp_rec.training.run_lock import RunLockError

    user_errors: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError, RunLockError)
    if args.command in ("train", "compare", "evaluate"):
        from cdp_rec.training.trainer import TrainingError
        from embeddings.capacity import CapacityError

        user_errors += (TrainingError, CapacityError)
    if args.command in ("export", "predict"):
        from cdp_rec.serving.package import PackageError

        user_errors += (PackageError,)
    try:
        return args.func(args)
    except user_errors as e:
        return _fail(args, _one_line(e))
    except KeyboardInterrupt:
        # A committed checkpoint is never half written (staged, then renamed), so the same
        # command resumes from the newest one; say so instead of a traceback.
        resume = "; the same command resumes from the newest checkpoint" if args.command == "train" else ""
        print(f"cdp-rec {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except OSError as e:
        line = _os_error_line(e, args)
        if line is None:
            raise
        return _fail(args, line)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip()


def _fail(args: argparse.Namespace, message: str) -> int:
    """Print the one-line error; under torchrun also leave it in the torchelastic error file,
    which torchrun passes up (``torchx status`` shows it instead of no message at all)."""
    line = f"cdp-rec {args.command}: error: {message}"
    print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time

        try:
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}) + "\n")
        except OSError:
            pass
    return 2


if __name__ == "__main__":
    sys.exit(main())
