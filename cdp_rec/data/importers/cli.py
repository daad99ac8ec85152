"""``cdp-rec import``: real event logs -> a training data set (see :mod:`cdp_rec.data.importers`).

``cdp_rec/cli.py`` registers it with ``add_import_parser(sub)``; ``cmd_import(args)`` runs it.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from cdp_rec.config import load_config
from cdp_rec.data.loader import DataError

FORMATS = ("taobao", "movielens", "events")


def add_import_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("import", help="turn event logs (Taobao UserBehavior, MovieLens, any CSV/Parquet) into a "
                                      "training data set plus its spec")
    p.add_argument("inputs", nargs="+", help="log file(s), read in this order (log order breaks ts ties)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output data root (must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--config", default=None,
                   help="YAML job config giving the context/scene features, max_seq_len and file sizes "
                        "(default: the embedded tiny config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--layout", choices=["rows", "joined"], default=None, help="storage layout (default: data.layout)")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--remap", dest="remap", action="store_true", default=True,
                     help="dense ids 0..n-1 per column, mapping in <out>/ids/ (default)")
    ids.add_argument("--raw-ids", dest="remap", action="store_false",
                     help="keep the raw (or hashed string) ids; tables whose ids are not row numbers become "
                          "managed-collision tables (features.id_mapping) in the written config")
    g = p.add_argument_group("labels and histories")
    g.add_argument("--positive", default=None,
                   help="positive rule: event types 'buy,cart,fav', a comparison 'rating>=4', or 'all' "
                        "(default: taobao all, movielens rating>=4, events value>0 if a value column else all)")
    g.add_argument("--history", default=None, help="which events enter histories: positive (default), all, or a rule")
    g.add_argument("--impressions", default="all", help="which events are impressions: all (default) or a rule")
    g.add_argument("--negatives", type=int, default=None,
                   help="sampled negatives per positive (implicit logs; default: taobao 4, else 0)")
    g.add_argument("--sampler", default="popularity",
                   choices=["popularity", "uniform", "category", "category-popularity"],
                   help="how negatives are drawn (default: popularity)")
    g.add_argument("--seed", type=int, default=0, help="negative sampling seed")
    g.add_argument("--max-seq-len", type=int, default=None, help="history length (default: features.max_seq_len)")
    t = p.add_argument_group("requests, days and the split")
    t.add_argument("--session-gap", type=int, default=1800,
                   help="seconds between a user's impressions that still belong to one request (default 1800)")
    t.add_argument("--request-scope", default="global", choices=["global", "user"],
                   help="the log's request column: global = ids unique across users (kept as logged); user = "
                        "counted per user (0, 1, ... for every user): each (user, request) pair is numbered")
    t.add_argument("--tz", default="UTC", help="time zone of the calendar days (IANA name, default UTC)")
    t.add_argument("--since", default=None, help="drop events before this local date (YYYY-MM-DD)")
    t.add_argument("--until", default=None, help="drop events after this local date (YYYY-MM-DD, inclusive)")
    t.add_argument("--allow-uneven-days", action="store_true",
                   help="keep a day split whose test day holds < 5%% of a typical day's rows or whose days are "
                        "mostly empty (refused by default: stray timestamps or a cut-off last day)")
    t.add_argument("--split", choices=["days", "last-fraction"], default=None,
                   help="days: the last train+test calendar days; last-fraction: each user's last fraction of "
                        "impressions is the test day (default: movielens last-fraction, else days)")
    t.add_argument("--train-days", type=int, default=None, help="training days (default: all but the test days)")
    t.add_argument("--test-days", type=int, default=1, help="test days (default 1)")
    t.add_argument("--test-fraction", type=float, default=0.2, help="with --split last-fraction (default 0.2)")
    t.add_argument("--buckets", type=int, default=None,
                   help="user buckets processed one at a time (joined: the layout's buckets); default ~1M events each")
    f = p.add_argument_group("format options")
    f.add_argument("--movies", default=None, help="movielens: movies.csv / movies.dat / u.item (default: beside)")
    f.add_argument("--genre", choices=["first", "all"], default="first",
                   help="movielens: the category is the first genre (default) or the whole genre list")
    f.add_argument("--mapping", default=None, help="events: YAML column mapping (see cdp_rec/data/importers/events.py)")
    f.add_argument("--columns", default=None, metavar="ROLE=COL,...",
                   help="events: user=,item=,category=,timestamp=,event=,value=,query=,request=")
    f.add_argument("--context", default=None, metavar="FEATURE=COL,...", help="events: context feature columns")
    f.add_argument("--scene", default=None, metavar="FEATURE=COL,...", help="events: scene feature columns")
    f.add_argument("--string-ids", default=None, metavar="ROLE,...", help="events: roles whose CSV ids are strings")
    f.add_argument("--event-types", default=None, metavar="T,...", help="events: the known event types")
    f.add_argument("--missing-category", default=None, metavar="ID",
                   help="events: the category of an event whose category cell is empty (default: an error)")
    f.add_argument("--ts-unit", default=None, choices=["s", "ms", "us", "ns", "iso"],
                   help="events: timestamp unit (iso: ISO-8601 strings; zone-less ones are local times of --tz)")
    f.add_argument("--delimiter", default=None, help="events: CSV delimiter (default ',')")
    f.add_argument("--names", default=None, metavar="COL,...", help="events: CSV column names (file has no header)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_import)
    return p


def build_source(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The format's :class:`Source` and its default options."""
    files = [Path(x) for x in args.inputs]
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: " + ("a directory, not a log file (pass its files)" if path.is_dir()
                                           else "file not found"))
    if args.format == "taobao":
        from cdp_rec.data.importers import taobao

        return taobao.source(files), dict(taobao.DEFAULTS)
    if args.format == "movielens":
        from cdp_rec.data.importers import movielens

        return movielens.source(files, args.movies, args.genre), dict(movielens.DEFAULTS)
    from cdp_rec.data.importers import events

    m = events.load_mapping(args.mapping)
    cols = dict(m.get("columns") or {})
    cols.update(events.parse_pairs(args.columns, "--columns"))
    m["columns"] = cols
    for key, flag in (("context", args.context), ("scene", args.scene)):
        if flag:
            m[key] = {**(m.get(key) or {}), **events.parse_pairs(flag, f"--{key}")}
    if args.string_ids:
        m["string_ids"] = [s.strip() for s in args.string_ids.split(",") if s.strip()]
    if args.event_types:
        m["event_types"] = [s.strip() for s in args.event_types.split(",") if s.strip()]
    if args.ts_unit:
        m["ts_unit"] = args.ts_unit
    if args.missing_category is not None:
        m["missing_category"] = args.missing_category
    if args.delimiter:
        m["delimiter"] = "\t" if args.delimiter in ("\\t", "tab") else args.delimiter
    if args.names:
        m["header"] = False
        m["names"] = [s.strip() for s in args.names.split(",")]
    src = events.source(files, m, tz=args.tz)
    defaults = dict(events.DEFAULTS)
    defaults["positive"] = events.default_positive(src)
    return src, defaults


def options_from_args(args: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    from cdp_rec.data.importers.common import ImportOptions

    cfg = load_config(args.config, args.set)
    if args.max_seq_len is not None:
        if args.max_seq_len <= 0:
            raise DataError(f"--max-seq-len must be > 0, got {args.max_seq_len}")
        cfg.features.max_seq_len = args.max_seq_len
    return ImportOptions(
        out=Path(args.out), base=cfg, layout=args.layout or cfg.data.layout, remap=args.remap,
        positive=args.positive if args.positive is not None else defaults.get("positive"),
        history=args.history if args.history is not None else defaults.get("history", "positive"),
        impressions=args.impressions,
        negatives=args.negatives if args.negatives is not None else defaults.get("negatives", 0),
        sampler=args.sampler, seed=args.seed, session_gap=args.session_gap,
        request_scope=args.request_scope, tz=args.tz,
        split=args.split or defaults.get("split", "days"), train_days=args.train_days, test_days=args.test_days,
        test_fraction=args.test_fraction, since=args.since, until=args.until, buckets=args.buckets,
        allow_uneven_days=args.allow_uneven_days,
        force=args.force, verbose=not args.quiet,
    )


def cmd_import(args: argparse.Namespace) -> int:
    from cdp_rec.data.importers.common import run_import

    src, defaults = build_source(args)
    opts = options_from_args(args, defaults)
    result = run_import(src, opts)
    print(summary(result, args.config))
    return 0


def summary(result: Any, config: str | None) -> str:
    """What the spec tells a user, in a few lines."""
    s = result.spec
    lines = [f"imported {s['source']['events_kept']:,} events ({s['source']['format']}) into {result.out} "
             f"({s['data']['layout']} layout): {s['rows']:,} rows, CTR {s['ctr']:.4f}"]
    lines.append("day  split  rows        positives  ctr     requests  date")
    for d in s["day_stats"]:
        ctr = f"{d['ctr']:.4f}" if d["ctr"] is not None else "  n/a "
        lines.append(f"{d['day']:>3}  {d['split']:<5}  {d['rows']:>10,}  {d['positives']:>9,}  {ctr}  "
                     f"{d['requests']:>8,}  {d.get('date', '')}")
    card = ", ".join(f"{k} {v['distinct']:,}" for k, v in s["cardinality"].items())
    lines.append(f"distinct ids (exact): {card}")
    h = s["history_length"]
    if h.get("mean") is not None:
        lines.append(f"history length: mean {h['mean']:.1f}, p50 {h['p50']}, p90 {h['p90']}, p99 {h['p99']} of "
                     f"max_seq_len {h['max_seq_len']}; empty {h['empty_fraction']:.1%}, full {h['full_fraction']:.1%}")
    if s.get("duplicate_events"):
        lines.append(f"note: {s['duplicate_events']:,} events repeat an earlier one exactly (user, item, category, "
                     f"time, rules, context); each is kept as its own event - deduplicate the log if they are "
                     f"logging artefacts")
    if s.get("items_with_several_categories"):
        lines.append(f"note: {s['items_with_several_categories']:,} items are logged under more than one category; "
                     f"rows and histories keep each event's own, a sampled negative its item's first")
    split = s.get("split") or {}
    if split.get("kind") == "last-fraction" and s["rows"]:
        test_rows = sum(d["rows"] for d in s["day_stats"] if d["split"] == "test")
        f = split["test_fraction"]
        if test_rows < 0.5 * f * s["rows"]:
            lines.append(f"note: the test day holds {test_rows / s['rows']:.1%} of the rows, not the --test-fraction "
                         f"{f:g}: a user keeps floor({f:g} * n) of its n impressions for the test, so users with "
                         f"fewer than {math.ceil(1 / f - 1e-9)} train only and the test "
                         f"scores the heavy users; --split days tests every user active on the last day(s)")
    neg = s["rules"]["negatives"]
    if neg:
        lines.append(f"negatives: {neg['per_positive']} per positive ({neg['sampler']}, seed {neg['seed']}), observed "
                     f"{neg['observed_per_positive']:.3f}, {neg['dropped']} dropped")
    if s["ids"].get("managed_tables"):
        lines.append(f"raw ids: managed-collision tables {', '.join(s['ids']['managed_tables'])} (rows: distinct ids "
                     f"+ 25%; features.id_mapping in the fragment and the flags below)")
    lines.append(f"spec: {result.out}/_dataset.json; config fragment: {result.out}/train.yaml "
                 f"(or the --set flags in {result.out}/train_args)")
    if any(ch.isspace() for o in result.overrides for ch in o):
        lines.append(f"note: {result.out} holds whitespace, which `$(cat train_args)` splits: use the command below")
    base = f"--config {config} " if config else ""
    lines.append("train it: cdp-rec train " + base + " ".join(f"--set {shlex.quote(o)}" for o in result.overrides))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - handy for manual runs
    ap = argparse.ArgumentParser(prog="cdp-rec")
    add_import_parser(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args()
    try:
        sys.exit(a.func(a))
    except DataError as e:
        print(f"cdp-rec import: error: {e}", file=sys.stderr)
        sys.exit(2)
