"""Any CSV or Parquet event log, its columns named by flags or a YAML mapping.

Mapping (YAML, ``--mapping FILE``; every key also has a flag, which wins)::

    columns:            # role -> column of the log; user, item and timestamp are required
      user: uid
      item: item
      category: cat     # optional: without it every item is category 0
      timestamp: time
      event: action     # optional: event type strings, for --positive buy,cart / --history ...
      value: label      # optional: a number (label 0/1, rating, ...), for --positive "value>0"
      query: query      # optional: the query_id feature (else 0)
      request: req_id   # optional: requests (GAUC groups) from the log instead of sessions
    context: {page: page_no}       # feature -> column; lands in features.context_features
    scene: {client: platform}      # feature -> column; lands in features.scene_features
    string_ids: [user, item]       # roles whose ids are strings (hashed); CSV only, Parquet
                                   # string columns are always hashed
    event_types: [click, buy]      # declared types: any other is an error (default: any)
    ts_unit: s                     # s | ms | us | ns (integers) | iso (ISO-8601 strings; zone-less
                                   # ones, like zone-less Parquet timestamps, are local times of --tz)
    delimiter: ","                 # CSV only
    header: true                   # CSV only; false: give names
    names: [uid, item, ...]        # CSV column names when there is no header

Files ending in ``.parquet`` / ``.pq`` are read as Parquet (row groups streamed), every
other file as CSV. Defaults: ``--positive "value>0"`` when there is a value column, else
every event is positive (give ``--negatives K``); histories are the positive events.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from cdp_rec.data.importers.common import (
    EventBatch,
    Source,
    check_no_nulls,
    check_types,
    iter_csv,
    line_locator,
    parse_id,
    parse_ts,
    parse_value,
    read_header,
)
from cdp_rec.data.loader import DataError

ROLES = ("user", "item", "category", "timestamp", "event", "value", "query", "request")
REQUIRED = ("user", "item", "timestamp")
ID_ROLES = ("user", "item", "category", "query", "request")
DEFAULTS = {"history": "positive", "negatives": 0, "split": "days"}


def load_mapping(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    try:
        m = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{p}: cannot read the column mapping: {e}") from None
    if not isinstance(m, dict):
        raise DataError(f"{p}: the column mapping must be a YAML mapping")
    known = {"columns", "context", "scene", "string_ids", "event_types", "ts_unit", "delimiter", "header", "names"}
    unknown = sorted(set(m) - known)
    if unknown:
        raise DataError(f"{p}: unknown key(s) {unknown} in the column mapping (known: {sorted(known)})")
    return m


def parse_pairs(text: str | None, flag: str) -> dict[str, str]:
    """``a=x,b=y`` -> {a: x, b: y}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise DataError(f"{flag} {text!r}: expected NAME=COLUMN pairs separated by commas")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def source(
    files: list[Path],
    mapping: dict[str, Any] | None = None,
    block_size: int = 16 << 20,
    tz: str | None = None,
) -> Source:
    """``tz``: the import's ``--tz``, the zone of zone-less timestamps (None: UTC)."""
    files = [Path(f) for f in files]
    m = dict(mapping or {})
    cols: dict[str, str] = dict(m.get("columns") or {})
    unknown = sorted(set(cols) - set(ROLES))
    if unknown:
        raise DataError(f"column mapping: unknown role(s) {unknown} (roles: {list(ROLES)})")
    missing = [r for r in REQUIRED if r not in cols]
    if missing:
        raise DataError(f"column mapping: role(s) {missing} need a column (--columns {missing[0]}=NAME)")
    context: dict[str, str] = dict(m.get("context") or {})
    scene: dict[str, str] = dict(m.get("scene") or {})
    string_ids = set(m.get("string_ids") or [])
    bad = sorted(string_ids - set(ID_ROLES) - set(context) - set(scene))
    if bad:
        raise DataError(f"string_ids: {bad} are not id roles or context/scene features")
    event_types = tuple(m["event_types"]) if m.get("event_types") else None
    ts_unit = str(m.get("ts_unit", "s"))
    missing_category = m.get("missing_category")
    if missing_category is not None and "category" not in cols:
        raise DataError("--missing-category: the log has no category column (--columns category=NAME)")
    delimiter = str(m.get("delimiter", ","))
    header = bool(m.get("header", True))
    names = list(m.get("names") or [])
    if not header and not names:
        raise DataError("a CSV log without a header needs its column names (mapping key 'names')")
    if len(delimiter) != 1:
        raise DataError(f"delimiter {delimiter!r}: must be one character")

    # Which source column feeds what: (role or feature, column).
    wanted: list[tuple[str, str]] = [(r, c) for r, c in cols.items()]
    wanted += [(f"context:{k}", c) for k, c in context.items()] + [(f"scene:{k}", c) for k, c in scene.items()]
    needed = list(dict.fromkeys(c for _, c in wanted))

    # String roles: declared, plus (Parquet) string-typed columns.
    roles = set(string_ids)
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        if _is_parquet(path):
            try:
                schema = pq.read_schema(path)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: not a readable Parquet file: {e}") from None
            for c in needed:
                if c not in schema.names:
                    raise DataError(f"{path}: column '{c}' missing (file has columns {schema.names})")
            for key, c in wanted:
                role = key.split(":", 1)[-1]
                if (role in ID_ROLES or ":" in key) and pa.types.is_string(schema.field(c).type):
                    roles.add(role)
        else:
            have = read_header(path, delimiter) if header else names
            for c in needed:
                if c not in have:
                    raise DataError(f"{path}: column '{c}' missing (file has columns {have})")

    def convert(cols_in: dict[str, pa.Array], locate) -> EventBatch:
        strings: dict[str, tuple[np.ndarray, pa.Array]] = {}

        def ident(role: str, column: str) -> np.ndarray:
            return parse_id(cols_in[column], column, locate, role in roles, role, strings)

        n = len(cols_in[cols["user"]])
        if missing_category is not None and cols_in[cols["category"]].null_count:
            arr = cols_in[cols["category"]]
            try:
                fill = pa.scalar(str(missing_category)).cast(arr.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(f"--missing-category {missing_category!r}: not a value of column "
                                f"'{cols['category']}' ({arr.type})") from None
            cols_in = {**cols_in, cols["category"]: pc.fill_null(arr, fill)}
        etype = None
        if "event" in cols:
            etype = cols_in[cols["event"]]
            check_no_nulls(etype, cols["event"], locate)  # a null type matches no rule, and sorts with nothing
            if not (pa.types.is_string(etype.type) or pa.types.is_large_string(etype.type)):
                etype = etype.cast(pa.string())
            if event_types is not None:
                check_types(etype, event_types, cols["event"], locate)
        return EventBatch(
            user=ident("user", cols["user"]),
            item=ident("item", cols["item"]),
            category=ident("category", cols["category"]) if "category" in cols else np.zeros(n, np.int64),
            ts=parse_ts(cols_in[cols["timestamp"]], cols["timestamp"], locate, ts_unit, tz),
            etype=etype,
            value=parse_value(cols_in[cols["value"]], cols["value"], locate) if "value" in cols else None,
            query=ident("query", cols["query"]) if "query" in cols else None,
            request=ident("request", cols["request"]) if "request" in cols else None,
            context={k: ident(k, c) for k, c in context.items()},
            scene={k: ident(k, c) for k, c in scene.items()},
            locate=locate,
            strings=strings,
        )

    def batches() -> Iterator[EventBatch]:
        for path in files:
            if _is_parquet(path):
                pf = pq.ParquetFile(path)
                rg_ends = np.cumsum([pf.metadata.row_group(k).num_rows for k in range(pf.num_row_groups)])
                row0 = 0
                rows = max(1, block_size // 64)
                for rb in pf.iter_batches(batch_size=rows, columns=needed):
                    def locate(i: int, p=path, r0=row0) -> str:
                        g = int(np.searchsorted(rg_ends, r0 + i, side="right"))
                        start = int(rg_ends[g - 1]) if g else 0
                        return f"{p}: row group {g}, row {r0 + i - start}"

                    yield convert({c: rb.column(c) for c in needed}, locate)
                    row0 += rb.num_rows
            else:
                for line0, rb in iter_csv(path, None if header else names, needed, delimiter, block_size):
                    yield convert({c: rb.column(c) for c in needed},
                                  line_locator(path, line0, delimiter))

    if missing_category is not None and "category" not in roles:
        try:
            int(str(missing_category))
        except ValueError:
            raise DataError(f"--missing-category {missing_category!r}: the category ids are integers (string "
                            "categories: --string-ids category)") from None
    value_names = ("value", cols["value"]) if "value" in cols else ()
    return Source(
        format="events", files=files, batches=batches, has_event="event" in cols, has_value="value" in cols,
        value_names=value_names, has_category="category" in cols, has_query="query" in cols,
        has_request="request" in cols, context_columns=context, scene_columns=scene, event_types=event_types,
        string_roles=tuple(sorted(roles)), notes={"columns": cols, "ts_unit": ts_unit,
                                                    "zone_less_timestamps": f"local times of {tz or 'UTC'}",
                                                    **({"missing_category": str(missing_category)}
                                                       if missing_category is not None else {})},
    )


def default_positive(src: Source) -> str:
    return "value>0" if src.has_value else "all"

