"""``cdp-rec`` command line: ``gen-data`` and ``train``.

Every subcommand takes ``--config FILE`` (default: the embedded tiny config) and any
number of ``--set key=value`` overrides (``--set model.name=base``). Bad configs and
bad data exit with status 2 and one line naming the key or file, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cdp_rec.config import ConfigError, JobConfig, load_config


def _config(args: argparse.Namespace) -> JobConfig:
    return load_config(args.config, args.set)


def cmd_gen_data(args: argparse.Namespace) -> int:
    from cdp_rec.data.synthetic import dataset_is_complete, generate_dataset

    cfg = _config(args)
    out = Path(args.out or cfg.data.root)
    if dataset_is_complete(cfg, out) and not args.force:
        print(f"{out} is up to date for this config (use --force to rewrite)")
        return 0
    files = generate_dataset(cfg, out)
    print(f"wrote {len(files)} files under {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cdp_rec.training.trainer import train

    cfg = _config(args)
    result = train(cfg, args.data)
    m = result.metrics
    print(
        f"{m['model']}: AUC {_fmt(m['auc'])}  UAUC {_fmt(m['uauc'])}  GAUC {_fmt(m['gauc'])}  "
        f"({m['num_train_samples']} train / {m['num_eval_samples']} eval samples, "
        f"{m['train_samples_per_s']:.0f} samples/s)"
    )
    print(f"metrics: {result.run_dir / 'metrics.json'}")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdp-rec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="YAML job config (default: embedded tiny config)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")

    p = sub.add_parser("gen-data", help="write a deterministic synthetic search-log data set")
    common(p)
    p.add_argument("--out", default=None, help="output root (default: data.root)")
    p.add_argument("--force", action="store_true", help="rewrite even if the data set is up to date")
    p.set_defaults(func=cmd_gen_data)

    p = sub.add_parser("train", help="train on the training days and evaluate on the test days")
    common(p)
    p.add_argument("--data", default=None, help="data root (default: data.root)")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from cdp_rec.data.loader import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"cdp-rec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
