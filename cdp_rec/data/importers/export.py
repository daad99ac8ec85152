"""The synthetic generator's logs as one event log, for round trips through ``import --format events``.

The generator's rows carry histories drawn from a behaviour log that is not made of
impressions, so an export of the impressions alone cannot rebuild them: the export holds
both, told apart by the ``event`` column (``behaviour`` / ``impression``), in log order
(every period's behaviours in the generator's order, then that day's impressions).

Columns: ``user_id, item_id, category_id, ts, event, label`` (behaviours: 1),
``query_id, request_id`` and the config's context and scene columns (behaviours: 0).
Timestamps are shifted by ``EXPORT_EPOCH`` (a UTC midnight): the generator's pre-history
has negative ts, which a real log cannot. Imported with :data:`IMPORT_ARGS` (and the
config's ``max_seq_len``), the rows equal the generator's, ``ts`` shifted by the epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdp_rec.config import JobConfig

EXPORT_EPOCH = 1_599_955_200  # 2020-09-13 00:00:00 UTC
BEHAVIOUR, IMPRESSION = "behaviour", "impression"


def import_args(cfg: JobConfig) -> list[str]:
    """``cdp-rec import`` arguments that rebuild the generator's rows from the export."""
    f = cfg.features
    ctx = ",".join(f"{c}={c}" for c in f.context_features)
    scene = ",".join(f"{s}={s}" for s in f.scene_features)
    return ["--format", "events",
            "--columns", "user=user_id,item=item_id,category=category_id,timestamp=ts,event=event,value=label,"
                         "query=query_id,request=request_id",
            "--context", ctx, "--scene", scene,
            "--impressions", IMPRESSION, "--history", BEHAVIOUR, "--positive", "label>0", "--raw-ids",
            "--train-days", str(cfg.data.train_days), "--test-days", str(cfg.data.test_days),
            "--max-seq-len", str(f.max_seq_len)]


def export_synthetic_events(cfg: JobConfig, path: str | Path, days: Iterable[int] | None = None) -> Path:
    """Write the event log of ``days`` (default: all train + test days) to the Parquet file ``path``."""
    from cdp_rec.data.synthetic import generate_periods

    f = cfg.features
    if days is None:
        days = range(cfg.data.train_days + cfg.data.test_days)
    extra = [*f.context_features, *f.scene_features]
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("category_id", pa.int64()),
                        ("ts", pa.int64()), ("event", pa.string()), ("label", pa.int8()), ("query_id", pa.int64()),
                        ("request_id", pa.int64()), *[(c, pa.int64()) for c in extra]])
    path = Path(path)
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for period in generate_periods(cfg, days, with_behaviours=True):
            b = period.behaviours
            assert b is not None
            n = len(b.user_id)
            zeros = np.zeros(n, np.int64)
            cols = {"user_id": b.user_id, "item_id": b.item_id, "category_id": b.category_id,
                    "ts": b.ts + EXPORT_EPOCH, "event": pa.array([BEHAVIOUR] * n, pa.string()),
                    "label": np.ones(n, np.int8), "query_id": zeros, "request_id": zeros,
                    **{c: zeros for c in extra}}
            w.write_table(pa.Table.from_pydict(cols, schema=schema))
            t = period.impressions
            if t is not None:
                m = t.num_rows
                cols = {c: t.column(c) for c in ("user_id", "item_id", "category_id", "label", "query_id",
                                                  "request_id", *extra)}
                cols["ts"] = pa.array(t.column("ts").to_numpy() + EXPORT_EPOCH)
                cols["event"] = pa.array([IMPRESSION] * m, pa.string())
                w.write_table(pa.Table.from_pydict(cols, schema=schema))
    return path
