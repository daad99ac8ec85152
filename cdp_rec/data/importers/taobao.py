"""Taobao UserBehavior (Tianchi data set 649): ``user_id,item_id,category_id,behavior_type,timestamp``.

No header; ``behavior_type`` is one of ``pv`` (page view = click), ``cart``, ``fav``,
``buy``; ``timestamp`` is unix seconds. Every event is a positive interaction, so the
format's defaults sample negatives (``--negatives 4``) and every type enters histories.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cdp_rec.data.importers.common import (
    EventBatch,
    Source,
    check_types,
    first_line,
    iter_csv,
    line_locator,
    parse_int,
    parse_ts,
)
from cdp_rec.data.loader import DataError

BEHAVIOUR_TYPES = ("pv", "cart", "fav", "buy")
COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
DEFAULTS = {"positive": "all", "history": "positive", "negatives": 4, "split": "days"}


def source(files: list[Path], block_size: int = 16 << 20) -> Source:
    files = [Path(f) for f in files]

    def batches() -> Iterator[EventBatch]:
        for path in files:
            _refuse_header(path)
            for line0, rb in iter_csv(path, COLUMNS, COLUMNS, ",", block_size):
                locate = line_locator(path, line0, ",")
                cols = {c: rb.column(c) for c in COLUMNS}
                check_types(cols["behavior_type"], BEHAVIOUR_TYPES, "behavior_type", locate)
                yield EventBatch(
                    user=parse_int(cols["user_id"], "user_id", locate),
                    item=parse_int(cols["item_id"], "item_id", locate),
                    category=parse_int(cols["category_id"], "category_id", locate),
                    ts=parse_ts(cols["timestamp"], "timestamp", locate),
                    etype=cols["behavior_type"],
                    locate=locate,
                )

    return Source(format="taobao", files=files, batches=batches, has_event=True, event_types=BEHAVIOUR_TYPES)


def _refuse_header(path: Path) -> None:
    """UserBehavior.csv has no header; a file with one would fail on line 1 as an unknown
    behaviour type 'behavior_type' - say what it is instead."""
    first = first_line(path).lstrip("\ufeff").strip()
    fields = [f.strip() for f in first.split(",")]
    if len(fields) == len(COLUMNS) and fields[3] not in BEHAVIOUR_TYPES and not fields[4].lstrip("-").isdigit():
        raise DataError(f"{path}: line 1 {first[:80]!r} looks like a header; the taobao format (UserBehavior.csv) "
                        f"has none: remove the line, or import the file with --format events --columns ...")
