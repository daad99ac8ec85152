"""Tests for ``cdp-rec import`` (cdp_rec/data/importers): every format on small files written here.

Histories are checked against a brute-force reference (each row's user, every history
event strictly before its ts, sorted by (ts, log order), last L), which also proves there
is no leakage; negatives against the user-day positives; the events path against the
synthetic generator's own rows (round trip through an exported event log).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdp_rec.config import JobConfig
from cdp_rec.data import joined as J
from cdp_rec.data.importers.cli import add_import_parser, cmd_import
from cdp_rec.data.importers.common import hash_strings
from cdp_rec.data.loader import DataError, ParquetBatchReader, check_dataset_spec, dataset_files
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS

DAY = 86_400
T0 = 1_511_740_800  # 2017-11-27 00:00:00 UTC


def run(args: list[str]) -> int:
    ap = argparse.ArgumentParser()
    add_import_parser(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(["import", *args, "--quiet"])
    return a.func(a)


def spec_of(root: Path) -> dict:
    return json.loads((root / "_dataset.json").read_text())


def id_map(root: Path, name: str) -> np.ndarray:
    t = pq.read_table(root / "ids" / f"{name}.parquet")
    assert np.array_equal(t.column("id").to_numpy(), np.arange(t.num_rows))
    return t.column("raw").to_numpy()


def read_rows(root: Path, raw: bool = False) -> list[dict]:
    """Every row of a rows-layout data set, ids mapped back to raw ids, in file order."""
    spec = spec_of(root)
    maps = {} if raw else {c: id_map(root, c) for c in ("user_id", "item_id", "category_id")}
    rows = []
    for day in spec["days"]:
        for f in sorted((root / f"day={day:02d}").glob("part-*.parquet")):
            for r in pq.read_table(f).to_pylist():
                r["day"] = day
                for c in maps:
                    r[c] = int(maps[c][r[c]])
                if maps:
                    r[HIST_ITEMS] = [int(maps["item_id"][x]) for x in r[HIST_ITEMS]]
                    r[HIST_CATEGORIES] = [int(maps["category_id"][x]) for x in r[HIST_CATEGORIES]]
                rows.append(r)
    return rows


def reference_history(events: list[tuple], user: int, ts: int, is_hist, L: int) -> list[int]:
    """``events``: (user, item, cat, ts, kind, ...) in log order -> the items of the history."""
    past = [(e[3], k, e[1]) for k, e in enumerate(events) if e[0] == user and is_hist(e) and e[3] < ts]
    return [item for _, _, item in sorted(past)][-L:]


# --------------------------------------------------------------------------- taobao


def taobao_events(seed: int = 0, n: int = 400) -> list[tuple]:
    """(user, item, category, type, ts) with ties, one-event users and an empty calendar day (day 2)."""
    rng = np.random.default_rng(seed)
    events = []
    for _ in range(n):
        u = int(rng.integers(1, 25))
        i = int(rng.integers(100, 160))
        day = int(rng.choice([0, 1, 3, 4]))
        ts = T0 + day * DAY + int(rng.integers(0, 6)) * 600  # few distinct seconds: many ts ties
        t = str(rng.choice(["pv", "pv", "pv", "cart", "fav", "buy"]))
        events.append((u, i, i % 7, t, ts))
    events.append((999, 150, 150 % 7, "pv", T0 + 4 * DAY + 5))  # a user with one event
    events.append((5, 101, 101 % 7, "pv", T0 + 4 * DAY + 3000))  # tie with the next one
    events.append((5, 102, 102 % 7, "buy", T0 + 4 * DAY + 3000))
    events.append((5, 103, 103 % 7, "pv", T0 + 4 * DAY + 3001))
    return events


def write_taobao(path: Path, events: list[tuple]) -> Path:
    path.write_text("".join(",".join(map(str, e)) + "\n" for e in events))
    return path


def test_taobao_negatives_histories_requests(tmp_path):
    events = taobao_events()
    src = write_taobao(tmp_path / "UserBehavior.csv", events)
    out = tmp_path / "out"
    assert run(["--format", "taobao", str(src), "--out", str(out), "--negatives", "3", "--max-seq-len", "6",
                "--buckets", "2", "--session-gap", "900"]) == 0
    spec = spec_of(out)
    assert spec["data"]["train_days"] == 4 and spec["data"]["test_days"] == 1
    assert [d["date"] for d in spec["day_stats"]] == ["2017-11-27", "2017-11-28", "2017-11-29", "2017-11-30",
                                                      "2017-12-01"]
    assert spec["day_stats"][2]["rows"] == 0  # the empty calendar day is there, with no rows
    assert list((out / "day=02").glob("part-*.parquet"))
    assert spec["cardinality"]["user_id"] == {"distinct": len({e[0] for e in events}), "method": "exact"}
    assert spec["rules"]["negatives"]["observed_per_positive"] == 3.0
    assert spec["history_length"]["max_seq_len"] == 6

    rows = read_rows(out)
    pos = [r for r in rows if r["label"] == 1]
    neg = [r for r in rows if r["label"] == 0]
    assert len(pos) == len(events) and len(neg) == 3 * len(events)
    # Positives: exactly the log's events with the reference histories (every type is history).
    ev = [(u, i, c, ts, t) for (u, i, c, t, ts) in events]
    got = Counter((r["user_id"], r["item_id"], r["category_id"], r["ts"], tuple(r[HIST_ITEMS])) for r in pos)
    want = Counter((u, i, c, ts, tuple(reference_history(ev, u, ts, lambda e: True, 6))) for (u, i, c, ts, _) in ev)
    assert got == want
    # No leakage: every history item is an event of the user strictly before the row.
    by_user: dict[int, list[tuple]] = {}
    for e in ev:
        by_user.setdefault(e[0], []).append(e)
    for r in rows:
        assert len(r[HIST_ITEMS]) <= 6
        for item in r[HIST_ITEMS]:
            assert any(e[1] == item and e[3] < r["ts"] for e in by_user[r["user_id"]])
    # The tie: (5, 101) and (5, 102) share a ts, so the event at +3001 sees both, in log order.
    (row,) = [r for r in pos if r["user_id"] == 5 and r["item_id"] == 103 and r["ts"] == T0 + 4 * DAY + 3001]
    assert row[HIST_ITEMS][-2:] == [101, 102]
    # Negatives share the positive's request, ts and history, and are never a positive of that user-day.
    positives = {(u, (ts - T0) // DAY, i) for (u, i, c, t, ts) in events}
    for r in neg:
        assert (r["user_id"], (r["ts"] - T0) // DAY, r["item_id"]) not in positives
    for k in range(0, len(rows), 4):  # positive then its 3 negatives
        group = rows[k : k + 4]
        assert [r["label"] for r in group] == [1, 0, 0, 0]
        assert len({(r["request_id"], r["ts"], r["user_id"], tuple(r[HIST_ITEMS])) for r in group}) == 1
    # Requests: a user's impressions of a day with gaps <= 900 s.
    for u, evs in by_user.items():
        for day in range(5):
            ts = sorted(e[3] for e in evs if (e[3] - T0) // DAY == day)
            want_groups = 1 + sum(1 for a, b in zip(ts, ts[1:]) if b - a > 900) if ts else 0
            got_groups = len({r["request_id"] for r in pos if r["user_id"] == u and r["day"] == day})
            assert got_groups == want_groups
    # The training reader accepts it with the fragment's features.
    cfg = JobConfig()
    for k, v in spec["features"].items():
        setattr(cfg.features, k, v)
    assert check_dataset_spec(out, cfg.features) is not None
    assert spec["train_config"]["data"]["allow_empty_days"] is True
    reader = ParquetBatchReader(dataset_files(out, spec["days"], allow_empty=True), cfg.features, batch_size=64)
    assert sum(len(b) for b in reader) == len(rows)


def test_taobao_explicit_labels_joined_layout_equals_rows(tmp_path):
    events = taobao_events(seed=1)
    src = write_taobao(tmp_path / "ub.csv", events)
    common = ["--format", "taobao", str(src), "--negatives", "0", "--positive", "buy,cart,fav", "--history", "all",
              "--max-seq-len", "5", "--buckets", "3"]
    run([*common, "--out", str(tmp_path / "rows")])
    run([*common, "--out", str(tmp_path / "joined"), "--layout", "joined"])
    spec = spec_of(tmp_path / "rows")
    assert spec["rows"] == len(events) and spec["rules"]["negatives"] is None
    n_pos = sum(e[3] != "pv" for e in events)
    assert abs(spec["ctr"] - n_pos / len(events)) < 1e-12
    cfg = JobConfig()
    for k, v in spec["features"].items():
        setattr(cfg.features, k, v)
    rows_reader = ParquetBatchReader(dataset_files(tmp_path / "rows", spec["days"], allow_empty=True), cfg.features,
                                     batch_size=10**6)
    joined_reader = J.JoinedBatchReader(tmp_path / "joined", spec["days"], cfg.features, batch_size=10**6,
                                        allow_empty_days=True)  # the import holds a calendar day without events

    def samples(reader):
        out = []
        for b in reader:
            d = {k: v.to_dense() for k, v in b.sparse.to_dict().items()}
            for i in range(len(b)):
                out.append(tuple(tuple(d[k][i].tolist()) for k in d) + (float(b.labels[i]), int(b.request_ids[i])))
        return out

    assert samples(rows_reader) == samples(joined_reader)  # same buckets, same order


# --------------------------------------------------------------------------- movielens


RATINGS = [  # user, movie, rating, ts
    (1, 10, 5.0, T0 + 10), (1, 20, 3.0, T0 + 20), (1, 30, 4.0, T0 + 20), (1, 10, 2.0, T0 + 500),
    (1, 40, 4.5, T0 + 900), (2, 20, 4.0, T0 + 5), (3, 30, 1.0, T0 + 7), (3, 40, 5.0, T0 + 8 * DAY),
    (3, 10, 4.0, T0 + 8 * DAY + 1), (3, 20, 4.0, T0 + 9 * DAY), (3, 30, 5.0, T0 + 9 * DAY),
]
MOVIES = {10: ("Toy Story (1995)", "Animation|Children's|Comedy"), 20: ("Heat, The (1995)", "Action|Crime"),
          30: ("Casino (1995)", "Crime|Drama"), 40: ("Solo (2018)", "(no genres listed)")}
U_ITEM_FLAGS = {10: [3, 4, 5], 20: [1, 6], 30: [6, 8], 40: [0]}


def write_movielens(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / kind
    d.mkdir()
    if kind == "csv":
        (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                       + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in RATINGS))
        (d / "movies.csv").write_text("movieId,title,genres\n"
                                      + "".join(f'{m},"{t}",{g}\n' for m, (t, g) in MOVIES.items()))
        return d / "ratings.csv"
    if kind == "dat":
        (d / "ratings.dat").write_text("".join(f"{u}::{m}::{int(r)}::{t}\n" for u, m, r, t in RATINGS))
        (d / "movies.dat").write_bytes("".join(f"{m}::{t}::{g}\n" for m, (t, g) in MOVIES.items()).encode("latin-1"))
        return d / "ratings.dat"
    (d / "u.data").write_text("".join(f"{u}\t{m}\t{int(r)}\t{t}\n" for u, m, r, t in RATINGS))
    lines = []
    for m, (t, _) in MOVIES.items():
        flags = ["1" if k in U_ITEM_FLAGS[m] else "0" for k in range(19)]
        lines.append("|".join([str(m), t, "01-Jan-1995", "", "http://x"] + flags) + "\n")
    (d / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return d / "u.data"


FIRST_GENRE = {"csv": {10: "Animation", 20: "Action", 30: "Crime", 40: "(no genres listed)"},
               "dat": {10: "Animation", 20: "Action", 30: "Crime", 40: "(no genres listed)"},
               "udata": {10: "Animation", 20: "Action", 30: "Crime", 40: "unknown"}}


@pytest.mark.parametrize("kind", ["csv", "dat", "udata"])
def test_movielens_formats_last_fraction(tmp_path, kind):
    src = write_movielens(tmp_path, kind)
    out = tmp_path / "out"
    run(["--format", "movielens", str(src), "--out", str(out), "--max-seq-len", "3", "--test-fraction", "0.4"])
    spec = spec_of(out)
    assert spec["split"]["kind"] == "last-fraction" and spec["days"] == [0, 1]
    rows = read_rows(out)
    assert len(rows) == len(RATINGS)
    # Categories: the first genre, hashed; ids/category_id.parquet keeps the strings.
    cats = pq.read_table(out / "ids" / "category_id.parquet").to_pylist()
    name_of = {c["raw"]: c["key"] for c in cats}
    for r in rows:
        assert name_of[r["category_id"]] == FIRST_GENRE[kind if kind != "udata" else "udata"][r["item_id"]]
        rating = next(x[2] for x in RATINGS if (x[0], x[1], x[3]) == (r["user_id"], r["item_id"], r["ts"]))
        assert r["label"] == int(rating >= 4)
    # History: positive ratings strictly before, ties in log order; leakage-free by construction.
    ev = [(u, m, 0, t, rt) for u, m, rt, t in RATINGS]
    for r in rows:
        assert r[HIST_ITEMS] == reference_history(ev, r["user_id"], r["ts"], lambda e: e[4] >= 4, 3)
    # Split: each user's last floor(0.4 n) ratings are day 1; user 2 (one rating) trains only.
    for u, n in Counter(x[0] for x in RATINGS).items():
        ts_sorted = sorted((x[3], k) for k, x in enumerate(RATINGS) if x[0] == u)
        test = ts_sorted[len(ts_sorted) - int(0.4 * n + 1e-9):]
        got = sorted(r["ts"] for r in rows if r["user_id"] == u and r["day"] == 1)
        assert got == sorted(t for t, _ in test)
        # No test event inside a training history: training rows come before the user's first test row.
        first_test = min((t for t, _ in test), default=None)
        if first_test is not None:
            assert all(r["ts"] <= first_test for r in rows if r["user_id"] == u and r["day"] == 0)


# --------------------------------------------------------------------------- events


def test_events_csv_string_ids_context_and_iso_time(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "who,what,kind,when,clicked,page,app\n"
        "alice,sku-1,shoes,2021-03-01T10:00:00Z,1,1,ios\n"
        "bob,sku-2,hats,2021-03-01T11:00:00Z,0,2,web\n"
        "alice,sku-2,hats,2021-03-02T09:00:00Z,0,1,ios\n"
        "alice,sku-3,shoes,2021-03-02T09:00:00Z,1,3,ios\n"
        "carol,sku-1,shoes,2021-03-03T08:00:00Z,1,1,web\n"
        "alice,sku-1,shoes,2021-03-03T12:00:00Z,0,2,ios\n")
    out = tmp_path / "out"
    run(["--format", "events", str(log), "--out", str(out), "--ts-unit", "iso",
         "--columns", "user=who,item=what,category=kind,timestamp=when,value=clicked",
         "--context", "page=page", "--scene", "client=app", "--string-ids", "user,item,category,client",
         "--session-gap", "0", "--history", "all"])
    spec = spec_of(out)
    assert spec["rules"]["positive"] == "value>0"
    assert spec["ids"]["string_columns"] == ["category", "client", "item", "user"]
    users = pq.read_table(out / "ids" / "user_id.parquet").to_pylist()
    assert {u["key"] for u in users} == {"alice", "bob", "carol"}
    assert {u["key"]: u["raw"] for u in users}["alice"] == int(hash_strings(pa.array(["alice"]))[0])
    rows = read_rows(out)
    assert spec["features"]["context_features"]["page"] == 8  # the config's vocab, 3 pages fit
    assert spec["features"]["scene_features"]["client"] == 3
    assert spec["context_features"]["hour"] == "local hour of ts" and spec["scene_features"]["search_source"] == "constant 0"
    assert spec["cardinality"]["page"] == {"distinct": 3, "method": "exact"}
    last = [r for r in rows if r["day"] == 2]  # 2021-03-03 is the test day
    assert spec["day_stats"][2]["date"] == "2021-03-03" and spec["day_stats"][2]["split"] == "test"
    assert len(last) == 2 and all(r["search_source"] == 0 for r in rows)
    (alice,) = [r for r in last if r["ts"] == 1614729600 + 12 * 3600]
    by_key = {u["key"]: u["raw"] for u in users}
    assert alice["user_id"] == by_key["alice"] and alice["hour"] == 12
    items = {x["key"]: x["raw"] for x in pq.read_table(out / "ids" / "item_id.parquet").to_pylist()}
    # History (all events): sku-1 (03-01), then the two 03-02 09:00 ties in log order.
    assert alice[HIST_ITEMS] == [items["sku-1"], items["sku-2"], items["sku-3"]]


def test_unsigned_64_bit_ids_are_refused_not_wrapped_and_import_as_strings(tmp_path):
    """A Parquet uint64 id above 2**63 - 1 (a 64-bit hash) is not cast to a negative id: the
    import names the row and the flag, and with --string-ids the mapping keeps the value."""
    big = 2**63 + 12345
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({
        "u": pa.array([1, 2, 1, 2], pa.int64()), "i": pa.array([5, big, 5, 7], pa.uint64()),
        "c": pa.array([1, 1, 1, 2], pa.int64()),
        "t": pa.array([1614592800, 1614679200, 1614765600, 1614765600], pa.int64()),
        "v": pa.array([1, 0, 1, 0], pa.int64()),
    }), log)
    out = tmp_path / "out"
    args = ["--format", "events", str(log), "--columns", "user=u,item=i,category=c,timestamp=t,value=v",
            "--train-days", "1"]
    with pytest.raises(DataError) as e:
        run([*args, "--out", str(out)])
    assert f"{log}" in str(e.value) and f"column 'i': {big} is above the signed 64-bit range of ids" in str(e.value)
    assert "--string-ids item" in str(e.value) and not out.exists()
    run([*args, "--out", str(out), "--string-ids", "item"])
    items = {x["key"]: x["raw"] for x in pq.read_table(out / "ids" / "item_id.parquet").to_pylist()}
    assert set(items) == {"5", str(big), "7"}


def test_train_args_survive_the_shells_word_splitting(tmp_path):
    """README: `cdp-rec train --config BASE $(cat <out>/train_args)`. The shell splits that at
    whitespace and keeps quotes, so a widened context vocabulary (a mapping) must be one bare
    word that the config loader reads back."""
    from cdp_rec.cli import build_parser
    from cdp_rec.config import load_config

    log = tmp_path / "log.csv"
    lines = ["who,what,kind,when,clicked,page"]
    for k in range(40):  # 20 pages: above the config's 8, so the import widens the vocabulary
        lines.append(f"u{k % 7},{k % 11},{k % 3},{1614592800 + k * 7200},{k % 2},p{k % 20}")
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run(["--format", "events", str(log), "--out", str(out), "--columns",
         "user=who,item=what,category=kind,timestamp=when,value=clicked", "--context", "page=page",
         "--string-ids", "user,page"])
    words = (out / "train_args").read_text().split()  # what $(cat ...) passes
    assert any(w.startswith("features.context_features=") for w in words), words
    args = build_parser().parse_args(["train", "--config", "configs/tiny.yaml", *words])
    cfg = load_config(args.config, args.set)
    assert cfg.features.context_features == {"hour": 24, "page": 20}
    assert cfg.data.root == str(out) and cfg.features.num_users == 7


def test_raw_ids_import_writes_a_config_that_trains(tmp_path, capsys):
    """--raw-ids: tables whose ids are hashes or sparse 64-bit numbers get managed-collision
    mappings sized from the log; near-dense ones stay dense; `train` runs on the flags as
    `$(cat train_args)` passes them."""
    from cdp_rec.cli import main

    rng = np.random.default_rng(0)
    lines = ["who,what,kind,when,clicked,app"]
    t0 = 1614556800  # 2021-03-01 00:00 UTC
    for k in range(600):
        user, item = f"u{rng.integers(40)}", int(rng.integers(60)) * 1_000_003_000_017 + 7
        lines.append(f"{user},{item},{item % 5},{t0 + k * 400},{int(rng.random() < 0.3)},{['ios', 'web'][k % 2]}")
    log = tmp_path / "log.csv"
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run(["--format", "events", str(log), "--out", str(out), "--raw-ids", "--string-ids", "user,client",
         "--columns", "user=who,item=what,category=kind,timestamp=when,value=clicked", "--scene", "client=app",
         "--session-gap", "0"])
    features = spec_of(out)["train_config"]["features"]
    assert features["id_mapping"] == {"user": "managed", "item": "managed", "scene_client": "managed"}
    n_items = spec_of(out)["cardinality"]["item_id"]["distinct"]
    assert features["num_items"] == n_items + n_items // 4 + 1 and features["num_categories"] == 5  # dense 0..4
    words = (out / "train_args").read_text().split()  # what $(cat ...) passes
    run_dir = tmp_path / "runs"
    assert main(["train", "--config", "configs/tiny.yaml", *words, "--set", "train.epochs=1",
                 "--set", f"train.run_dir={run_dir}", "--set", "train.run_name=raw", "--set", "train.progress=false",
                 "--set", "train.batch_size=64"]) == 0
    metrics = json.loads((run_dir / "raw" / "metrics.json").read_text())
    assert metrics["num_samples"] == 168 and metrics["id_mapping_days"]  # the test day, scored
    # The summary says how many users / requests the group AUCs average over.
    printed = capsys.readouterr().out
    share = 100 * metrics["num_samples_users_used"] / metrics["num_samples"]  # ... and what share of the rows
    assert f"({metrics['num_users_used']:,} users, {share:.0f}% of samples)  GAUC " in printed, printed
    assert metrics["num_requests_used"] == 0 and "GAUC n/a (0 requests)" in printed, printed  # one row a request


def test_missing_category_fills_empty_cells_only_when_asked(tmp_path):
    src = tmp_path / "log.csv"
    src.write_text("u,i,c,t,v\n1,2,7,1614592800,1\n1,3,,1614679200,0\n2,3,7,1614765600,1\n2,2,8,1614765601,0\n")
    args = ["--format", "events", str(src), "--columns", "user=u,item=i,category=c,timestamp=t,value=v",
            "--train-days", "1"]
    with pytest.raises(DataError, match=r"line 3: column 'c': empty value"):
        run([*args, "--out", str(tmp_path / "a")])
    run([*args, "--out", str(tmp_path / "b"), "--missing-category", "0"])
    cats = id_map(tmp_path / "b", "category_id")
    assert sorted(cats.tolist()) == [0, 7, 8]
    assert spec_of(tmp_path / "b")["source"]["missing_category"] == "0"
    with pytest.raises(DataError, match="--missing-category 'x'"):
        run([*args, "--out", str(tmp_path / "c"), "--missing-category", "x"])


def test_decimal_timestamps_read_like_integers(tmp_path):
    """Exports often write '1614592800.0': floored to the second like a float column."""
    plain = tmp_path / "plain.csv"
    plain.write_text("u,i,t,v\n1,2,1614592800,1\n1,3,1614679200,0\n2,3,1614765600,1\n2,2,1614765601,0\n")
    dec = tmp_path / "dec.csv"
    dec.write_text("u,i,t,v\n1,2,1614592800.0,1\n1,3,1614679200.25,0\n2,3,1614765600.,1\n2,2,1614765601.9,0\n")
    for src in (plain, dec):
        run(["--format", "events", str(src), "--out", str(tmp_path / src.stem), "--columns",
             "user=u,item=i,timestamp=t,value=v", "--train-days", "1"])
    assert read_rows(tmp_path / "dec") == read_rows(tmp_path / "plain")


def test_header_with_a_byte_order_mark_or_spaces_reads_like_a_plain_one(tmp_path):
    """Excel writes a UTF-8 BOM before the header; hand-made files put spaces after commas."""
    plain = tmp_path / "plain.csv"
    plain.write_text("u,i,t,v\n1,2,1614592800,1\n1,3,1614679200,0\n2,3,1614765600,1\n2,2,1614765600,0\n")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    spaced = tmp_path / "spaced.csv"
    spaced.write_text(plain.read_text().replace("u,i,t,v", "u, i , t,v"))
    for src in (plain, bom, spaced):
        run(["--format", "events", str(src), "--out", str(tmp_path / src.stem), "--columns",
             "user=u,item=i,timestamp=t,value=v", "--train-days", "1"])
    assert read_rows(tmp_path / "bom") == read_rows(tmp_path / "plain") == read_rows(tmp_path / "spaced")


def test_string_hash_is_pinned():
    # fnv1a64 -> fmix64 -> top bit cleared; a change would silently change every imported string id.
    got = [int(x) for x in hash_strings(pa.array(["alice", "sku-1", "", "ünï"]))]
    assert got[:2] == [3821251815001557236, 3702201369639972457]
    assert got == [_ref_hash(s.encode()) for s in ("alice", "sku-1", "", "ünï")]
    assert all(0 <= x < 1 << 63 for x in got)


def _ref_hash(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) % (1 << 64)
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) % (1 << 64)
    h ^= h >> 33
    return h & ((1 << 63) - 1)


def test_events_round_trip_of_the_synthetic_generator(tmp_path):
    from cdp_rec.data.importers.export import EXPORT_EPOCH, export_synthetic_events, import_args
    from cdp_rec.data.synthetic import generate_dataset

    cfg = JobConfig()
    cfg.data.samples_per_day = 2_000
    cfg.data.rows_per_file = 1_000
    cfg.data.row_group_size = 500
    generate_dataset(cfg, tmp_path / "gen")
    log = export_synthetic_events(cfg, tmp_path / "events.parquet")
    run([str(log), *import_args(cfg), "--out", str(tmp_path / "imp"), "--buckets", "2"])

    def canon(rows, shift):
        return sorted((r["day"], r["request_id"], r["user_id"], r["query_id"], r["item_id"], r["category_id"],
                       r["ts"] - shift, *(r[c] for c in (*cfg.features.context_features, *cfg.features.scene_features)),
                       r["label"], tuple(r[HIST_ITEMS]), tuple(r[HIST_CATEGORIES])) for r in rows)

    gen = []
    for day in range(3):
        for f in sorted((tmp_path / "gen" / f"day={day:02d}").glob("part-*.parquet")):
            gen += [{**r, "day": day} for r in pq.read_table(f).to_pylist()]
    imp = read_rows(tmp_path / "imp", raw=True)
    assert len(imp) == len(gen) == 6_000
    assert canon(imp, EXPORT_EPOCH) == canon(gen, 0)


# --------------------------------------------------------------------------- negative sampling


@pytest.mark.parametrize("sampler", ["popularity", "category-popularity", "category"])
def test_negative_sampling_rate_and_exclusion(tmp_path, sampler):
    rng = np.random.default_rng(3)
    n, n_items = 6_000, 300
    pop = 1.0 / np.arange(1, n_items + 1)
    items = rng.choice(n_items, size=n, p=pop / pop.sum())
    users = rng.integers(0, 60, size=n)
    ts = T0 + rng.integers(0, 3 * DAY, size=n)
    log = tmp_path / "log.csv"
    log.write_text("u,i,c,t\n" + "".join(f"{u},{i},{i % 5},{t}\n" for u, i, t in zip(users, items, ts)))
    out = tmp_path / "out"
    run(["--format", "events", str(log), "--out", str(out), "--columns", "user=u,item=i,category=c,timestamp=t",
         "--negatives", "4", "--sampler", sampler, "--seed", "7", "--train-days", "2"])
    spec = spec_of(out)
    neg = spec["rules"]["negatives"]
    rows = read_rows(out)
    n_pos = sum(r["label"] for r in rows)
    assert n_pos == n and len(rows) - n_pos == 4 * n - neg["dropped"]
    assert neg["observed_per_positive"] == pytest.approx(4.0, abs=0.01)
    positives = set(zip(users.tolist(), ((ts - T0) // DAY).tolist(), items.tolist()))
    negs = [r for r in rows if r["label"] == 0]
    assert not any((r["user_id"], (r["ts"] - T0) // DAY, r["item_id"]) in positives for r in negs)
    drawn = Counter(r["item_id"] for r in negs)
    if sampler == "popularity":
        # Rate: popularity (positive events + 1) renormalised over the items not excluded for the
        # positive's user-day; expected draws per item summed over the positives, within 4 sigma.
        weight = np.bincount(items, minlength=n_items) + 1.0
        excluded: dict[tuple[int, int], set[int]] = {}
        for u, d, i in positives:
            excluded.setdefault((u, d), set()).add(i)
        expect = np.zeros(n_items)
        for (u, d), ex in excluded.items():
            w = weight.copy()
            w[list(ex)] = 0
            n_here = 4 * sum(1 for uu, tt in zip(users, ts) if uu == u and (tt - T0) // DAY == d)
            expect += n_here * w / w.sum()
        for item in np.argsort(-expect)[:20]:
            assert abs(drawn[int(item)] - expect[item]) < 4 * np.sqrt(expect[item]) + 2, (item, drawn[int(item)],
                                                                                       expect[item])
    else:
        # Same category as the positive (items' category is i % 5 here).
        groups = [rows[k : k + 5] for k in range(0, len(rows), 5)]
        for g in groups:
            if len(g) == 5 and g[0]["label"] == 1:
                assert all(r["item_id"] % 5 == g[0]["item_id"] % 5 for r in g[1:])
    # Seeded: the same command gives the same rows.
    run(["--format", "events", str(log), "--out", str(out), "--force", "--columns",
         "user=u,item=i,category=c,timestamp=t", "--negatives", "4", "--sampler", sampler, "--seed", "7",
         "--train-days", "2"])
    assert read_rows(out) == rows


# --------------------------------------------------------------------------- bad input


BAD = [
    ("missing column", "events", "u,i,t\n1,2,100\n", ["--columns", "user=u,item=item,timestamp=t"], "column 'item' missing"),
    ("unparsable ts", "events", "u,i,t\n1,2,100\n1,3,soon\n", ["--columns", "user=u,item=i,timestamp=t"],
     "line 3: column 't': 'soon' is not a unix timestamp"),
    ("non-numeric id", "events", "u,i,t\n1,2,100\nx7,3,200\n", ["--columns", "user=u,item=i,timestamp=t"],
     "line 3: column 'u': 'x7' is not an integer"),
    ("negative ts", "taobao", "1,2,3,pv,100\n1,2,3,pv,-5\n", [], "line 2: column 'timestamp': negative timestamp -5"),
    ("unknown type", "taobao", "1,2,3,pv,100\n1,2,3,pv,101\n1,2,3,click,102\n", [],
     "line 3: column 'behavior_type': unknown behaviour type 'click'"),
    ("short line", "taobao", "1,2,3,pv,100\n1,2,3,pv\n", [], "line 2: expected 5 fields, got 4"),
    ("empty id", "taobao", "1,2,3,pv,100\n1,,3,pv,100\n", [], "line 2: column 'item_id': empty value"),
    # The reader skips blank lines; the message still names the file's own line.
    ("blank lines", "taobao", "1,2,3,pv,100\n\n\r\n1,2,3,pv,101\n1,2,3,click,102\n", [],
     "line 5: column 'behavior_type': unknown behaviour type 'click'"),
    ("blank lines, header", "events", "u,i,t\n\n1,2,100\n\n1,3,soon\n", ["--columns", "user=u,item=i,timestamp=t"],
     "line 5: column 't': 'soon' is not a unix timestamp"),
    ("ms timestamps", "taobao", "1,2,3,pv,1511539200000\n", [],
     "line 1: column 'timestamp': 1511539200000 is after 2200-01-01 as a unix timestamp in s: milliseconds or finer?"),
    ("id beyond int64", "taobao", "1,2,3,pv,100\n99999999999999999999999,2,3,pv,101\n", [],
     "line 2: column 'user_id': 99999999999999999999999 is beyond the signed 64-bit range of ids"),
    ("taobao header", "taobao", "user_id,item_id,category_id,behavior_type,timestamp\n1,2,3,pv,100\n", [],
     "line 1 'user_id,item_id,category_id,behavior_type,timestamp' looks like a header; the taobao format"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_naming_file_line_column(tmp_path, case):
    _, fmt, text, extra, message = case
    src = tmp_path / "log.csv"
    src.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        run(["--format", fmt, str(src), "--out", str(out), *extra])
    assert str(src) in str(e.value) and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["log.csv"]  # no staging left


def test_bad_parquet_event_and_time_values_are_one_line(tmp_path):
    """A null event type and a NaN float timestamp: named like every other bad value."""
    base = {"u": [1, 2], "i": [5, 6], "t": [1614592800.0, 1614679200.0], "e": ["buy", "pv"]}
    args = ["--columns", "user=u,item=i,timestamp=t,event=e", "--positive", "buy"]
    for name, edit, message in (("null-event", {"e": ["buy", None]}, "row 1: column 'e': empty value"),
                                ("nan-ts", {"t": [1614592800.0, float("nan")]},
                                 "row 1: column 't': nan is not a unix timestamp (s)")):
        src = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({**base, **edit}), src)
        with pytest.raises(DataError) as e:
            run(["--format", "events", str(src), "--out", str(tmp_path / name), *args])
        assert str(src) in str(e.value) and message in str(e.value), str(e.value)
    (tmp_path / "logs").mkdir()
    with pytest.raises(DataError, match="logs: a directory, not a log file"):
        run(["--format", "taobao", str(tmp_path / "logs"), "--out", str(tmp_path / "o")])


def test_out_must_be_new_or_forced_and_failures_keep_the_old_data(tmp_path):
    src = write_taobao(tmp_path / "ub.csv", taobao_events(n=50))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        run(["--format", "taobao", str(src), "--out", str(out)])
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,pv,100\n1,2,3,nope,100\n")
    with pytest.raises(DataError):
        run(["--format", "taobao", str(bad), "--out", str(out), "--force"])
    assert (out / "keep.txt").exists()  # a failed import leaves the old directory alone
    run(["--format", "taobao", str(src), "--out", str(out), "--force"])
    assert not (out / "keep.txt").exists() and (out / "_dataset.json").exists()


def test_stray_timestamps_or_a_cut_off_test_day_are_refused_not_split_on(tmp_path):
    """One event 300 days before the log stretched the calendar split to 300+ mostly empty
    days; one event days after it became the whole test day. Both are refused naming the
    fix; --allow-uneven-days keeps the split, --since / --until bound it."""
    events = taobao_events(n=400)
    last = max(e[4] for e in events)
    out = tmp_path / "out"
    early = write_taobao(tmp_path / "early.csv", events + [(1, 2, 3, "pv", T0 - 300 * DAY)])
    with pytest.raises(DataError, match=r"of the 30\d days hold no rows .*--since / --until.*--allow-uneven-days"):
        run(["--format", "taobao", str(early), "--out", str(out)])
    assert not out.exists()
    late = write_taobao(tmp_path / "late.csv", events + [(1, 2, 3, "pv", last + 3 * DAY)])
    with pytest.raises(DataError, match=r"test day \d+ \(\d{4}-\d\d-\d\d\) holds 5 rows against a median of"):
        run(["--format", "taobao", str(late), "--out", str(out)])
    run(["--format", "taobao", str(late), "--out", str(out), "--allow-uneven-days"])
    assert spec_of(out)["day_stats"][-1]["rows"] == 5  # the stray event and its 4 sampled negatives
    bound = (dt.datetime.fromtimestamp(last, dt.timezone.utc)).date().isoformat()
    run(["--format", "taobao", str(late), "--out", str(tmp_path / "bound"), "--until", bound])
    assert spec_of(tmp_path / "bound")["day_stats"][-1]["rows"] > 5


def test_duplicate_events_are_counted(tmp_path, capsys):
    events = taobao_events(n=200)
    clean = tmp_path / "clean"
    run(["--format", "taobao", str(write_taobao(tmp_path / "a.csv", events)), "--out", str(clean)])
    base = spec_of(clean)["duplicate_events"]  # the generator's own repeats (few distinct seconds)
    doubled = events + events[:30] + events[:5]  # 35 more copies, anywhere in the log
    run(["--format", "taobao", str(write_taobao(tmp_path / "b.csv", doubled)), "--out", str(tmp_path / "dup")])
    assert spec_of(tmp_path / "dup")["duplicate_events"] == base + 35
    assert f"note: {base + 35:,} events repeat an earlier one exactly" in capsys.readouterr().out


def test_items_logged_under_several_categories_are_counted(tmp_path, capsys):
    events = taobao_events(n=200)
    events += [(7, 100, 6, "pv", T0 + 4 * DAY + 9), (8, 101, 2, "pv", T0 + 4 * DAY + 9)]  # 100 % 7 == 2, 101 % 7 == 3
    run(["--format", "taobao", str(write_taobao(tmp_path / "ub.csv", events)), "--out", str(tmp_path / "out")])
    assert spec_of(tmp_path / "out")["items_with_several_categories"] == 2
    assert "note: 2 items are logged under more than one category" in capsys.readouterr().out


def test_all_positive_log_without_negatives_is_refused(tmp_path):
    src = write_taobao(tmp_path / "ub.csv", taobao_events(n=50))
    with pytest.raises(DataError, match="--negatives K"):
        run(["--format", "taobao", str(src), "--out", str(tmp_path / "out"), "--negatives", "0"])


def test_cli_summary_prints_the_train_command(tmp_path, capsys):
    src = write_taobao(tmp_path / "ub.csv", taobao_events(n=80))
    run(["--format", "taobao", str(src), "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert "train it: cdp-rec train --set data.root=" in text and "features.num_users=" in text
    assert "distinct ids (exact)" in text and "history length" in text


def test_gzip_input_tz_days_and_since_until(tmp_path):
    import gzip

    bj = T0 - 8 * 3600  # 2017-11-27 00:00 in Asia/Shanghai
    events = [(1, 10, 1, "pv", bj + 60), (1, 11, 1, "pv", bj + DAY + 60), (2, 10, 1, "pv", bj + DAY - 60),
              (2, 12, 2, "buy", bj + 2 * DAY + 5), (1, 12, 2, "pv", 100),  # a stray 1970 timestamp
              (2, 11, 1, "pv", bj + 2 * DAY + 10)]
    src = tmp_path / "UserBehavior.csv.gz"
    src.write_bytes(gzip.compress("".join(",".join(map(str, e)) + "\n" for e in events).encode()))
    out = tmp_path / "out"
    run(["--format", "taobao", str(src), "--out", str(out), "--tz", "Asia/Shanghai", "--since", "2017-11-27",
         "--until", "2017-11-29", "--negatives", "1"])
    spec = spec_of(out)
    assert spec["source"]["events_read"] == 6 and spec["source"]["events_kept"] == 5
    assert [d["date"] for d in spec["day_stats"]] == ["2017-11-27", "2017-11-28", "2017-11-29"]
    assert [d["positives"] for d in spec["day_stats"]] == [2, 1, 2]  # 2's event at 23:59 is on the 27th
    rows = read_rows(out)
    assert {r["hour"] for r in rows if r["label"] == 1} == {0, 23}  # local hours


def test_day_split_covers_the_impression_days_not_history_only_events(tmp_path):
    """A behaviour log beside an ad log (Taobao display ads: 22 days of pv/cart/buy, 8 days of
    ad impressions) in one file with --impressions / --history rules: the default split is the
    days that hold impressions, not every calendar day of the log (which left 16 empty leading
    training days and was refused as 'stray timestamps'); earlier behaviours still feed the
    histories, and a behaviour after the last impression day adds no empty test day."""
    lines = ["u,i,c,t,ev,clk"]
    for u in range(6):
        for d in range(20):  # behaviours on days 0..19
            lines.append(f"{u},{100 + d},{d % 3},{T0 + d * DAY + 3600 * (u + 1)},pv,0")
        for d in range(16, 20):  # impressions on days 16..19 only
            for k in range(5):
                lines.append(f"{u},{200 + k},{k % 3},{T0 + d * DAY + 3600 * (u + 1) + 60 * (k + 1)},imp,{int(k == u % 5)}")
    lines.append(f"0,999,0,{T0 + 22 * DAY},pv,0")  # a behaviour two days after the last impression
    src = tmp_path / "log.csv"
    src.write_text("\n".join(lines) + "\n")
    args = ["--format", "events", str(src), "--columns", "user=u,item=i,category=c,timestamp=t,event=ev,value=clk",
            "--impressions", "imp", "--history", "pv", "--positive", "value>0"]
    run([*args, "--out", str(tmp_path / "a")])
    spec = spec_of(tmp_path / "a")
    assert (spec["data"]["train_days"], spec["data"]["test_days"]) == (3, 1)
    assert [d["rows"] for d in spec["day_stats"]] == [30, 30, 30, 30]
    first = dt.datetime.fromtimestamp(T0 + 16 * DAY, dt.timezone.utc).date().isoformat()
    assert spec["day_stats"][0]["date"] == first
    rows = read_rows(tmp_path / "a")
    assert min(len(r[HIST_ITEMS]) for r in rows) == 17  # the behaviours of days 0..16 (day 16: before its impressions)
    assert 999 not in {x for r in rows for x in r[HIST_ITEMS]}
    # --train-days counts back from the last impression day too.
    run([*args, "--out", str(tmp_path / "b"), "--train-days", "2"])
    spec = spec_of(tmp_path / "b")
    assert [d["rows"] for d in spec["day_stats"]] == [30, 30, 30]
    assert spec["day_stats"][0]["date"] == (dt.date.fromisoformat(first) + dt.timedelta(days=1)).isoformat()


def test_zone_less_timestamps_are_local_times_of_tz(tmp_path):
    """Tianchi / Tmall logs write wall-clock times without a zone ('2017-05-06 23:30:00',
    Beijing). With --tz Asia/Shanghai they fall on that local day and hour; they were read as
    UTC, moving every event 8 h and splitting one local day over two. Strings with an offset
    and zone-aware Parquet timestamps are unchanged; zone-less Parquet timestamps read like
    zone-less strings."""
    wall = ["2017-05-06 00:30:00", "2017-05-06 23:30:00", "2017-05-07 00:30:00", "2017-05-07 23:30:00",
            "2017-05-07 12:00:00"]
    body = "".join(f"{u},{i},7,{t},{v}\n" for (u, i, v), t in zip([(1, 2, 1), (1, 3, 0), (2, 3, 1), (2, 2, 0), (1, 4, 0)], wall))
    naive = tmp_path / "naive.csv"
    naive.write_text("u,i,c,t,v\n" + body)
    offset = tmp_path / "offset.csv"
    offset.write_text("u,i,c,t,v\n" + body.replace(":00,", ":00+08:00,"))
    pq_naive = tmp_path / "naive.parquet"
    stamps = [dt.datetime.fromisoformat(t) for t in wall]
    pq.write_table(pa.table({"u": [1, 1, 2, 2, 1], "i": [2, 3, 3, 2, 4], "c": [7] * 5, "v": [1, 0, 1, 0, 0],
                             "t": pa.array(stamps, pa.timestamp("us"))}), pq_naive)
    cols = ["--columns", "user=u,item=i,category=c,timestamp=t,value=v", "--tz", "Asia/Shanghai"]
    for src in (naive, offset, pq_naive):
        run(["--format", "events", str(src), "--out", str(tmp_path / f"out-{src.name}"), *cols,
             *(["--ts-unit", "iso"] if src.suffix == ".csv" else [])])
        spec = spec_of(tmp_path / f"out-{src.name}")
        assert [(d["date"], d["rows"]) for d in spec["day_stats"]] == [("2017-05-06", 2), ("2017-05-07", 3)], src
        rows = read_rows(tmp_path / f"out-{src.name}")
        assert sorted(r["ts"] for r in rows)[0] == 1494001800  # 2017-05-06 00:30 +08:00
        assert sorted(r["hour"] for r in rows) == [0, 0, 12, 23, 23]
    assert read_rows(tmp_path / "out-naive.csv") == read_rows(tmp_path / "out-offset.csv") \
        == read_rows(tmp_path / "out-naive.parquet")
    # Without --tz zone-less times stay UTC, as before.
    run(["--format", "events", str(naive), "--out", str(tmp_path / "utc"), "--ts-unit", "iso",
         "--columns", "user=u,item=i,category=c,timestamp=t,value=v"])
    assert min(r["ts"] for r in read_rows(tmp_path / "utc")) == 1494030600  # 2017-05-06 00:30 UTC


def test_last_fraction_names_a_test_day_far_below_the_fraction(tmp_path, capsys):
    """Review logs (Amazon-like: most users with 1-3 events) keep floor(f * n) = 0 test events
    for light users: the summary says the test day is far below --test-fraction and why."""
    lines = ["u,i,t,v"]
    for u in range(40):
        n = 10 if u < 4 else 2
        lines += [f"{u},{(u + k) % 7},{T0 + 3600 * k + u},{(u + k) % 2}" for k in range(n)]
    src = tmp_path / "log.csv"
    src.write_text("\n".join(lines) + "\n")
    args = ["--format", "events", str(src), "--columns", "user=u,item=i,timestamp=t,value=v", "--split", "last-fraction"]
    run([*args, "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "note: the test day holds 7.1% of the rows, not the --test-fraction 0.2" in out
    assert "users with fewer than 5 train only" in out
    run([*args, "--out", str(tmp_path / "b"), "--test-fraction", "0.5"])
    assert "note: the test day" not in capsys.readouterr().out  # 56 of 112 rows


def test_request_ids_counted_per_user_are_refused_or_numbered_per_user(tmp_path):
    """A log whose request column counts each user's searches (0, 1, ...) merged every user's
    first search into one GAUC group; without --request-scope user it is refused, with it each
    (user, request) pair is one request."""
    lines = ["u,i,c,t,r,v"]
    for u in range(5):
        for day in range(3):
            for req in range(2):
                for k in range(3):
                    ts = T0 + day * DAY + 3600 * (req + 1) + 60 * k + u
                    lines.append(f"{u},{10 + k + req},{k},{ts},{day * 2 + req},{int(k == (u + req) % 3)}")
    src = tmp_path / "log.csv"
    src.write_text("\n".join(lines) + "\n")
    args = ["--format", "events", str(src), "--columns", "user=u,item=i,category=c,timestamp=t,request=r,value=v"]
    with pytest.raises(DataError, match=r"request column: id \d+ \(and \d+ more\) is logged for several users.*"
                                        r"--request-scope user"):
        run([*args, "--out", str(tmp_path / "a")])
    run([*args, "--out", str(tmp_path / "b"), "--request-scope", "user"])
    rows = read_rows(tmp_path / "b")
    by_request: dict[int, set] = {}
    for r in rows:
        by_request.setdefault(r["request_id"], set()).add((r["user_id"], r["day"]))
    assert len(by_request) == 5 * 3 * 2  # every (user, search) its own request
    assert all(len(owners) == 1 for owners in by_request.values())
    assert spec_of(tmp_path / "b")["requests"]["scope"] == "user"
    # Ids that are already one user's each are kept as logged.
    src.write_text("\n".join([lines[0], *[f"{line.rsplit(',', 2)[0]},{int(line.split(',')[0]) * 100 + int(line.split(',')[4])},"
                                          f"{line.rsplit(',', 1)[1]}" for line in lines[1:]]]) + "\n")
    run([*args, "--out", str(tmp_path / "c")])
    assert {r["request_id"] for r in read_rows(tmp_path / "c")} == {u * 100 + q for u in range(5) for q in range(6)}
