"""Tests for the joined storage layout (cdp_rec.data.joined), conversion and the storage plan.

"Identical batches" (cdp_rec/data/joined.py): every impression gets the same values,
history and label in both layouts; with one user bucket the batches are identical batch
for batch, with more the rows come bucket-major, so samples are compared as multisets
and by impression_id order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdp_rec.cli import main
from cdp_rec.config import ConfigError, FeatureConfig, JobConfig, load_config
from cdp_rec.data import joined as J
from cdp_rec.data import synthetic as S
from cdp_rec.data.convert import convert
from cdp_rec.data.loader import DataError, ParquetBatchReader, _Columns, dataset_files
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch, table_schema

DAYS = [0, 1, 2]


def small_config(layout: str = "rows", buckets: int = 4) -> JobConfig:
    cfg = JobConfig()
    cfg.data.samples_per_day = 3_000
    cfg.data.rows_per_file = 1_000
    cfg.data.row_group_size = 300
    cfg.data.layout = layout
    cfg.data.num_user_buckets = buckets
    return cfg


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """The same synthetic data: per-row, generated joined (4 buckets), converted rows -> joined."""
    base = tmp_path_factory.mktemp("joined")
    S.generate_dataset(small_config("rows"), base / "rows")
    S.generate_dataset(small_config("joined"), base / "joined")
    convert(small_config("joined"), base / "rows", base / "converted", "joined")
    return {"rows": base / "rows", "joined": base / "joined", "converted": base / "converted"}


def samples(batches: list[Batch]) -> list[tuple]:
    """One hashable tuple per sample: every KJT feature (histories as tuples), label, user, request."""
    out: list[tuple] = []
    for b in batches:
        d = b.sparse.to_dict()
        cols = []
        for jt in d.values():
            lengths = jt.lengths().numpy()
            values = jt.values().numpy()
            ends = np.cumsum(lengths)
            cols.append([tuple(values[e - n : e]) for n, e in zip(lengths, ends)])
        for i in range(len(b)):
            out.append((*(c[i] for c in cols), float(b.labels[i]), int(b.user_ids[i]), int(b.request_ids[i])))
    return out


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert [len(x) for x in a] == [len(y) for y in b]
    for x, y in zip(a, b):
        dx, dy = x.sparse.to_dict(), y.sparse.to_dict()
        assert list(dx) == list(dy)
        for k in dx:
            np.testing.assert_array_equal(dx[k].lengths().numpy(), dy[k].lengths().numpy(), err_msg=k)
            np.testing.assert_array_equal(dx[k].values().numpy(), dy[k].values().numpy(), err_msg=k)
        for name in ("labels", "user_ids", "request_ids"):
            np.testing.assert_array_equal(getattr(x, name).numpy(), getattr(y, name).numpy(), err_msg=name)


# --------------------------------------------------------------------------- equality


def test_one_bucket_gives_the_rows_batches_batch_for_batch(roots, tmp_path):
    cfg = small_config("joined", buckets=1)
    S.generate_dataset(cfg, tmp_path / "j1")
    convert(cfg, roots["rows"], tmp_path / "c1", "joined")
    for day in DAYS:
        rows = list(ParquetBatchReader(dataset_files(roots["rows"], [day]), cfg.features, 333))
        assert_same_batches(rows, list(J.JoinedBatchReader(tmp_path / "j1", day, cfg.features, 333)))
        assert_same_batches(rows, list(J.JoinedBatchReader(tmp_path / "c1", day, cfg.features, 333)))


@pytest.mark.parametrize("which", ["joined", "converted"])
def test_same_samples_as_rows_and_impression_id_restores_the_order(roots, which):
    cfg = small_config()
    for day in DAYS:
        rows = list(ParquetBatchReader(dataset_files(roots["rows"], [day]), cfg.features, 512))
        reader = J.JoinedBatchReader(roots[which], day, cfg.features, 512)
        assert reader.num_batches() == len(rows)
        got = samples(list(reader))
        want = samples(rows)
        assert len(got) == len(want) == 3_000
        assert sorted(got) == sorted(want)
        assert got != want  # 4 buckets: bucket-major order, not the day order

        # Stable-sorting every bucket's rows by impression_id gives the per-row sequence.
        blocks = [blk for b in range(4) for blk in reader.iter_bucket(day, b)]
        ids = np.concatenate([i for i, _ in blocks])
        cols = blocks[0][1]
        for _, c in blocks[1:]:
            cols = _Columns.concat(cols, c)
        order = np.argsort(ids, kind="stable")
        np.testing.assert_array_equal(ids[order], np.arange(3_000))
        table = pa.concat_tables(pq.read_table(f) for f in dataset_files(roots["rows"], [day]))
        for name, values in cols.single.items():
            np.testing.assert_array_equal(values[order], table.column(name).to_numpy(), err_msg=name)
        lengths = np.diff(cols.offsets)[order]
        np.testing.assert_array_equal(lengths, pa.compute.list_value_length(table.column(HIST_ITEMS)).to_numpy())
        flat = np.concatenate([cols.hist_items[cols.offsets[i] : cols.offsets[i + 1]] for i in order])
        np.testing.assert_array_equal(flat, pa.compute.list_flatten(table.column(HIST_ITEMS)).to_numpy())


def test_rank_split_is_disjoint_by_bucket_and_covers_everything(roots):
    cfg = small_config()
    everything = samples(list(J.JoinedBatchReader(roots["joined"], DAYS, cfg.features, 700)))
    parts = []
    for rank in range(2):
        reader = J.JoinedBatchReader(roots["joined"], DAYS, cfg.features, 700, rank=rank, world_size=2)
        assert reader.buckets == [rank, rank + 2]
        batches = list(reader)
        assert reader.num_batches() == len(batches)
        users = np.concatenate([b.user_ids.numpy() for b in batches])
        assert set(J.user_bucket(users, 4) % 2) == {rank}
        parts.append(samples(batches))
    assert len(parts[0]) + len(parts[1]) == len(everything) == 9_000
    assert sorted(parts[0] + parts[1]) == sorted(everything)
    with pytest.raises(DataError, match="none of the 4 user buckets"):
        J.JoinedBatchReader(roots["joined"], DAYS, cfg.features, 700, rank=4, world_size=5)


def test_open_reader_picks_the_layout_and_refuses_the_other(roots):
    rows_cfg, joined_cfg = small_config("rows"), small_config("joined")
    assert type(J.open_reader(rows_cfg, roots["rows"], 0, 64)) is ParquetBatchReader
    assert type(J.open_reader(joined_cfg, roots["joined"], [0, 1], 64, 1, 2)) is J.JoinedBatchReader
    with pytest.raises(DataError, match="holds the rows layout but data.layout is 'joined'.*--to joined"):
        J.open_reader(joined_cfg, roots["rows"], 0, 64)
    with pytest.raises(DataError, match="holds the joined layout but data.layout is 'rows'"):
        J.open_reader(rows_cfg, roots["joined"], 0, 64)


# --------------------------------------------------------------------------- join semantics


FEATURES = FeatureConfig(max_seq_len=3)


def _impressions(users: list[int], ts: list[int]) -> pa.Table:
    """A per-row table (empty histories) for write_impressions: only user / ts matter here."""
    n = len(users)
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(np.arange(n)), "user_id": pa.array(np.array(users, dtype=np.int64)),
        "query_id": pa.array(np.zeros(n, dtype=np.int64)), "item_id": pa.array(np.zeros(n, dtype=np.int64)),
        "category_id": pa.array(np.zeros(n, dtype=np.int64)), "ts": pa.array(np.array(ts, dtype=np.int64)),
    }
    for col in (*FEATURES.context_features, *FEATURES.scene_features):
        cols[col] = pa.array(np.zeros(n, dtype=np.int64))
    cols["label"] = pa.array(np.zeros(n, dtype=np.int8))
    for name in (HIST_ITEMS, HIST_CATEGORIES):
        cols[name] = pa.array([[] for _ in range(n)], pa.list_(pa.int64()))
    schema = table_schema(FEATURES)
    return pa.Table.from_arrays([cols[c] for c in schema.names], schema=schema)


def _hand_built(root: Path) -> None:
    """User 5's log over two parts, with a tie at ts 20 (items 3 then 2: log order, not item order)."""
    pre = S.Behaviours(np.array([5, 5, 5, 7]), np.array([10, 20, 20, 15]), np.array([1, 3, 2, 9]),
                       np.array([0, 1, 1, 4]))
    day = S.Behaviours(np.array([5, 5, 5, 5]), np.array([20, 30, 40, 50]), np.array([4, 5, 6, 7]),
                       np.array([2, 2, 3, 3]))
    # Tiny row groups: a user's run spans row groups, which must not reorder it.
    order = np.lexsort((pre.ts, pre.user_id))
    pre = S.Behaviours(*(getattr(pre, c)[order] for c in J.BEHAVIOUR_COLUMNS))
    J.write_behaviour_part(root, 0, 0, pre, row_group_size=2)
    J.write_behaviour_part(root, 0, 1, day, row_group_size=2)
    J.write_impressions(root, 0, _impressions([5, 5, 5, 5, 5, 5, 7, 8], [10, 11, 20, 21, 30, 100, 15, 50]),
                        FEATURES, 1, row_group_size=3)
    J.write_layout(root, 1)


def test_history_is_the_last_L_strictly_before_the_impression_in_log_order(tmp_path):
    _hand_built(tmp_path)
    (batch,) = list(J.JoinedBatchReader(tmp_path, 0, FEATURES, 100))
    hist = batch.sparse[HIST_ITEMS]
    ends = np.cumsum(hist.lengths().numpy())
    got = [list(hist.values().numpy()[e - n : e]) for n, e in zip(hist.lengths().numpy(), ends)]
    assert got == [
        [],  # ts 10: the behaviour at ts 10 is not before it
        [1],  # ts 11
        [1],  # ts 20: nothing at ts 20 leaks in
        [3, 2, 4],  # ts 21: last 3 of 1, 3, 2, 4 (ties at 20 in log order, across parts)
        [3, 2, 4],  # ts 30
        [5, 6, 7],  # ts 100: the last 3, oldest first
        [],  # user 7 at ts 15: its behaviour is at 15
        [],  # user 8: no log at all
    ]
    cats = batch.sparse[HIST_CATEGORIES].values().numpy()
    np.testing.assert_array_equal(cats, [0, 0, 1, 1, 2, 1, 1, 2, 2, 3, 3])


def test_parts_that_cannot_be_seen_are_not_read(tmp_path):
    """Later parts (min ts >= the last impression) and parts older than L behaviours are skipped."""
    bad_items = S.Behaviours(np.array([5]), np.array([1]), np.array([10**9]), np.array([0]))  # out of range
    J.write_behaviour_part(tmp_path, 0, 0, bad_items, row_group_size=2)
    J.write_behaviour_part(tmp_path, 0, 1, S.Behaviours(*(np.array(v) for v in ([5] * 3, [2, 3, 4], [1, 2, 3],
                                                                                   [0, 0, 0]))), 2)
    future = S.Behaviours(np.array([5]), np.array([500]), np.array([10**9]), np.array([0]))
    J.write_behaviour_part(tmp_path, 0, 2, future, row_group_size=2)
    J.write_impressions(tmp_path, 0, _impressions([5], [100]), FEATURES, 1, row_group_size=3)
    J.write_layout(tmp_path, 1)  # last, as the writers do: it lists the behaviour parts
    (batch,) = list(J.JoinedBatchReader(tmp_path, 0, FEATURES, 100))
    assert batch.sparse[HIST_ITEMS].values().tolist() == [1, 2, 3]
    # An impression at ts 4 needs the older part, and its bad ids are reported.
    J.write_impressions(tmp_path, 0, _impressions([5], [4]), FEATURES, 1, row_group_size=3)
    with pytest.raises(DataError, match=r"part-00000.parquet: row group 0: column 'item_id': 1 value\(s\) out of range"):
        list(J.JoinedBatchReader(tmp_path, 0, FEATURES, 100))


# --------------------------------------------------------------------------- conversion


def test_convert_round_trip_gives_identical_files(roots, tmp_path):
    cfg = small_config("joined")
    assert main(["convert", "--set", "data.samples_per_day=3000", "--set", "data.rows_per_file=1000",
                 "--set", "data.row_group_size=300", "--src", str(roots["converted"]), "--dst",
                 str(tmp_path / "back"), "--to", "rows"]) == 0
    for day in DAYS:
        want = dataset_files(roots["rows"], [day])
        got = dataset_files(tmp_path / "back", [day])
        assert [f.name for f in got] == [f.name for f in want]
        for a, b in zip(want, got):
            ta, tb = pq.read_table(a), pq.read_table(b)
            assert ta.schema.equals(tb.schema) and ta.equals(tb)
            assert a.read_bytes() == b.read_bytes()
    spec = json.loads((tmp_path / "back" / S.DATASET_SPEC_FILE).read_text())
    assert spec == json.loads((roots["rows"] / S.DATASET_SPEC_FILE).read_text())
    assert json.loads((roots["converted"] / S.DATASET_SPEC_FILE).read_text())["data"]["layout"] == "joined"
    assert S.dataset_is_complete(cfg, roots["converted"])
    # Generated joined data goes back to the same rows too.
    convert(cfg, roots["joined"], tmp_path / "back2", "rows")
    for day in DAYS:
        for a, b in zip(dataset_files(roots["rows"], [day]), dataset_files(tmp_path / "back2", [day])):
            assert pq.read_table(a).equals(pq.read_table(b))


def test_convert_refuses_histories_that_are_not_windows_of_one_log(tmp_path):
    cfg = JobConfig()
    cfg.features = FEATURES
    cfg.data.num_user_buckets = 2
    t = _impressions([5, 5], [20, 20])
    hist = pa.array([[1, 2], [1, 3]], pa.list_(pa.int64()))  # same user and ts, different histories
    t = t.set_column(t.schema.get_field_index(HIST_ITEMS), pa.field(HIST_ITEMS, pa.list_(pa.int64()), False), hist)
    t = t.set_column(t.schema.get_field_index(HIST_CATEGORIES),
                     pa.field(HIST_CATEGORIES, pa.list_(pa.int64()), False), pa.array([[0, 0], [0, 0]],
                                                                                         pa.list_(pa.int64())))
    S.write_rows_day(tmp_path / "src", 0, t, 10, 10)
    with pytest.raises(DataError, match=r"impression_id 1 \(user 5\).*not windows of one behaviour log"):
        convert(cfg, tmp_path / "src", tmp_path / "dst", "joined")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "day=00").mkdir()
    with pytest.raises(DataError, match="destination is not empty"):
        convert(cfg, tmp_path / "src", tmp_path / "full", "joined")
    with pytest.raises(DataError, match="already in the rows layout"):
        convert(cfg, tmp_path / "src", tmp_path / "dst2", "rows")


# --------------------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_file_and_column(roots, tmp_path):
    cfg = small_config()
    bad = tmp_path / "bad"
    shutil.copytree(roots["joined"], bad)
    shutil.rmtree(bad / J.BEHAVIORS_DIR)
    with pytest.raises(DataError, match=r"behaviors: behaviour log directory not found"):
        J.JoinedBatchReader(bad, 0, cfg.features, 64)

    shutil.rmtree(bad)
    shutil.copytree(roots["joined"], bad)
    part = J.behaviour_file(bad, 1, 1)
    t = pq.read_table(part)
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", t.column("item_id").cast(pa.int32()))
    pq.write_table(t, part)
    with pytest.raises(DataError, match=r"bucket=0001/part-00001.parquet: column 'item_id' has type int32, expected int64"):
        list(J.JoinedBatchReader(bad, 0, cfg.features, 64))

    t = t.set_column(t.schema.get_field_index("item_id"), "item_id",
                     pa.array(np.full(t.num_rows, cfg.features.num_items, dtype=np.int64)))
    pq.write_table(t, part)
    with pytest.raises(DataError, match=r"part-00001.parquet: row group 0: column 'item_id': \d+ value\(s\) out of range"):
        list(J.JoinedBatchReader(bad, 0, cfg.features, 64))

    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array([None] * t.num_rows, pa.int64()))
    pq.write_table(t, part)
    with pytest.raises(DataError, match=r"part-00001.parquet: row group 0: column 'item_id': \d+ null value"):
        list(J.JoinedBatchReader(bad, 0, cfg.features, 64))

    # A behaviour part of another bucket's users, and an unsorted one.
    shutil.copy(J.behaviour_file(roots["joined"], 2, 1), part)
    with pytest.raises(DataError, match=r"column 'user_id': \d+ user\(s\) hashing to another bucket than 1 of 4"):
        list(J.JoinedBatchReader(bad, 0, cfg.features, 64))
    t = pq.read_table(J.behaviour_file(roots["joined"], 1, 1))
    pq.write_table(t.take(pa.array(np.arange(t.num_rows)[::-1])), part)
    with pytest.raises(DataError, match=r"column 'ts': \d+ row\(s\) out of \(user_id, ts\) order"):
        list(J.JoinedBatchReader(bad, 0, cfg.features, 64))

    shutil.copy(J.behaviour_file(roots["joined"], 1, 1), part)
    imp = J.impression_file(bad, 0, 3)
    t = pq.read_table(imp)
    pq.write_table(t.drop_columns([J.IMPRESSION_ID]), imp)
    with pytest.raises(DataError, match=r"day=00/bucket=0003.parquet: column 'impression_id' is missing"):
        list(J.JoinedBatchReader(bad, 0, cfg.features, 64, rank=1, world_size=2))
    imp.unlink()
    with pytest.raises(DataError, match=r"day=00/bucket=0003.parquet: impression file of bucket 3 missing"):
        J.JoinedBatchReader(bad, 0, cfg.features, 64)
    (bad / J.LAYOUT_FILE).write_text('{"layout": "joined", "num_user_buckets": 0}')
    with pytest.raises(DataError, match=r"_layout.json: expected layout 'joined' and a positive"):
        J.JoinedBatchReader(bad, 0, cfg.features, 64)


def test_stray_entries_and_empty_days_are_refused_like_the_rows_layout(roots, tmp_path, caplog):
    cfg = small_config()
    bad = tmp_path / "bad"
    shutil.copytree(roots["joined"], bad)
    day = bad / "day=01"
    (day / "_SUCCESS").write_text("")  # bookkeeping names are skipped, as in the rows layout
    J.JoinedBatchReader(bad, 1, cfg.features, 64)
    # A Parquet file under another name, or a bucket of an earlier bucket count, would be left out.
    shutil.copy(J.impression_file(bad, 1, 0), day / "bucket=0007.parquet")
    shutil.copy(J.impression_file(bad, 1, 0), day / "extra.parquet")
    for rank in (0, 1):  # every rank checks the whole day
        with pytest.raises(DataError, match=r"day=01: 2 entries that are not one of the 4 bucket files "
                                            r"\(bucket=0000.parquet ..\) would be ignored: bucket=0007.parquet, extra.parquet"):
            J.JoinedBatchReader(bad, [0, 1], cfg.features, 64, rank=rank, world_size=2)
    (day / "bucket=0007.parquet").unlink()
    (day / "extra.parquet").unlink()
    # A day whose bucket files hold no rows at all.
    for b in range(4):
        path = J.impression_file(bad, 1, b)
        pq.write_table(pq.read_table(path).slice(0, 0), path)
    with pytest.raises(DataError, match=r"day=01: day=01 has 0 rows in its 4 bucket file\(s\); "
                                        r"set data.allow_empty_days=true"):
        J.JoinedBatchReader(bad, [0, 1], cfg.features, 64)
    with caplog.at_level("WARNING"):
        reader = J.JoinedBatchReader(bad, [0, 1], cfg.features, 64, allow_empty_days=True)
    assert "skipped (data.allow_empty_days)" in caplog.text
    assert sum(len(b) for b in reader) == sum(len(b) for b in J.JoinedBatchReader(bad, 0, cfg.features, 64))


def test_convert_carries_an_empty_day_only_when_allowed(roots, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(roots["joined"], src)
    for b in range(4):
        path = J.impression_file(src, 1, b)
        pq.write_table(pq.read_table(path).slice(0, 0), path)
    cfg = small_config("rows")
    with pytest.raises(DataError, match=r"day=01 has 0 rows in its 4 bucket file\(s\)"):
        convert(cfg, src, tmp_path / "rows", "rows")
    cfg.data.allow_empty_days = True
    convert(cfg, src, tmp_path / "rows2", "rows")
    rows = {d: sum(len(b) for b in ParquetBatchReader(dataset_files(tmp_path / "rows2", [d], allow_empty=True),
                                                      cfg.features, 10**6)) for d in DAYS}
    assert rows[1] == 0 and rows[0] > 0 and rows[2] > 0
    # ... and back: the empty rows day becomes an empty joined day.
    cfg = small_config("joined")
    with pytest.raises(DataError, match=r"day=01 has 0 rows"):
        convert(cfg, tmp_path / "rows2", tmp_path / "joined", "joined")
    cfg.data.allow_empty_days = True
    convert(cfg, tmp_path / "rows2", tmp_path / "joined2", "joined")
    reader = J.JoinedBatchReader(tmp_path / "joined2", [1], cfg.features, 10**6, allow_empty_days=True)
    assert sum(len(b) for b in reader) == 0


# --------------------------------------------------------------------------- config, CLI, training


def test_config_layout_is_validated():
    assert JobConfig().data.layout == "rows"
    assert load_config(None, ["data.layout=joined"]).data.layout == "joined"
    with pytest.raises(ConfigError, match="data.layout must be one of"):
        load_config(None, ["data.layout=columns"])
    with pytest.raises(ConfigError, match="data.num_user_buckets must be > 0"):
        load_config(None, ["data.num_user_buckets=0"])


def test_gen_data_layout_flag_and_spec(tmp_path, capsys):
    args = ["--set", "data.samples_per_day=1000", "--set", "data.rows_per_file=1000", "--set",
            "data.row_group_size=500", "--set", "data.num_user_buckets=2", "--out", str(tmp_path)]
    assert main(["gen-data", "--layout", "joined", *args]) == 0
    assert "(joined layout)" in capsys.readouterr().out
    assert json.loads((tmp_path / J.LAYOUT_FILE).read_text())["num_user_buckets"] == 2
    assert sorted(p.name for p in (tmp_path / "day=02").iterdir()) == ["bucket=0000.parquet", "bucket=0001.parquet"]
    assert sorted(p.name for p in J.behaviour_dir(tmp_path, 0).iterdir()) == [
        f"part-{p:05d}.parquet" for p in range(4)]
    assert main(["gen-data", "--layout", "joined", *args]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["gen-data", *args]) == 0  # default layout: rows, replacing the joined files
    assert not (tmp_path / J.LAYOUT_FILE).exists() and not (tmp_path / J.BEHAVIORS_DIR).exists()
    assert [p.name for p in (tmp_path / "day=02").iterdir()] == ["part-00000.parquet"]


def test_training_on_the_joined_layout(tmp_path):
    from cdp_rec.training.trainer import train

    cfg = load_config(None, [f"data.root={tmp_path / 'data'}", "data.layout=joined", "data.samples_per_day=2000",
                             "data.num_user_buckets=4", "model.name=base", f"train.run_dir={tmp_path / 'runs'}",
                             "train.progress=false", "checkpoint.at_day_end=false", "train.epochs=1"])
    result = train(cfg, tmp_path / "data")  # generated (joined) because the root is missing
    assert (tmp_path / "data" / J.LAYOUT_FILE).is_file()
    held_out = result.metrics["validation"][-1]["num_samples"]  # data.valid_fraction of day 1
    assert result.metrics["num_train_samples"] + held_out == 4_000 and result.metrics["num_eval_samples"] == 2_000


# --------------------------------------------------------------------------- storage plan


def test_plan_storage_measures_both_layouts(capsys):
    base = ["plan", "--storage", "--config", "configs/industrial.yaml", "--sample-impressions", "300"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "rows   (histories inline)" in out and "break-even" in out and "all 61 days" in out

    assert main([*base, "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["max_seq_len"] == 2_000 and e["days"] == 61 and e["samples_per_day"] == 300_000_000
    # zstd removes most of the 32 KB of raw ids per row (a request's rows share one history) ...
    assert 200 < e["rows_bytes_per_impression"] < 16 * 2_000 / 4
    # ... and the joined layout wins exactly below the break-even behaviour rate.
    assert (e["joined_total"] < e["rows_total"]) == (e["behaviours_per_user_day"] < e["break_even_behaviours_per_user_day"])

    assert main([*base, "--json", "--behaviours-per-user-day", "20"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["joined_total"] < 0.4 * e["rows_total"]
    assert e["joined_impression_bytes_per_impression"] < 0.05 * e["rows_bytes_per_impression"]


# --------------------------------------------------------------------------- hostile layouts


def test_convert_refuses_a_destination_inside_the_source_or_around_it(roots, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(roots["rows"], src)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    cfg = small_config("joined")
    for dst in (src / "j", src / "day=00" / "j"):  # inside: a stray entry in the source's day
        with pytest.raises(DataError, match=r"destination and source .* must not lie inside one another"):
            convert(cfg, src, dst, "joined")
    with pytest.raises(DataError, match=r"must not lie inside one another"):
        convert(cfg, src, tmp_path, "joined", force=True)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # nothing created in the source


def test_a_day_in_the_other_layout_is_an_error_not_left_out(roots, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(roots["joined"], mixed)
    shutil.copytree(roots["rows"] / "day=02", mixed / "day=03")
    with pytest.raises(DataError, match=r"day=03: holds part-\*\.parquet files of the other layout, not the "
                                        r"bucket=\*\.parquet files of the joined-layout data set"):
        convert(small_config("rows"), mixed, tmp_path / "out", "rows")
    rows = tmp_path / "rows"
    shutil.copytree(roots["rows"], rows)
    shutil.copytree(roots["joined"] / "day=02", rows / "day=03")
    with pytest.raises(DataError, match=r"day=03: holds bucket=\*\.parquet files of the other layout"):
        convert(small_config("joined"), rows, tmp_path / "out2", "joined")
    shutil.rmtree(rows / "day=03")
    (rows / "day=03").mkdir()
    with pytest.raises(DataError, match=r"day=03: holds no files, not the part-\*\.parquet files"):
        J.layout_days(rows, "rows")
    (rows / "day=03").rmdir()
    (rows / "day=3x").mkdir()
    with pytest.raises(DataError, match=r"day=3x: not a day directory \(day=NN\)"):
        J.layout_days(rows, "rows")


def test_a_missing_behaviour_part_is_an_error_not_shorter_histories(roots, tmp_path):
    layout = json.loads((roots["joined"] / J.LAYOUT_FILE).read_text())
    assert layout[J.BEHAVIOUR_PARTS] == J._behaviour_parts(roots["joined"], 4) and all(layout[J.BEHAVIOUR_PARTS])
    cfg = small_config("joined")
    gone = tmp_path / "gone"
    shutil.copytree(roots["joined"], gone)
    shutil.rmtree(J.behaviour_dir(gone, 1))  # a whole bucket's log
    with pytest.raises(DataError, match=r"behaviors/bucket=0001/part-00000\.parquet: behaviour file missing "
                                        r"\(_layout\.json lists \d+ part\(s\) for bucket 1\)"):
        list(J.JoinedBatchReader(gone, DAYS, cfg.features, 10**6))
    with pytest.raises(DataError, match=r"bucket=0001/part-00000\.parquet: behaviour file missing"):
        convert(small_config("rows"), gone, tmp_path / "rows", "rows")
    part = tmp_path / "part"
    shutil.copytree(roots["joined"], part)
    J.behaviour_file(part, 2, 2).unlink()  # one day's part
    with pytest.raises(DataError, match=r"bucket=0002/part-00002\.parquet: behaviour file missing"):
        list(J.JoinedBatchReader(part, DAYS, cfg.features, 10**6))
    shutil.copy(J.behaviour_file(roots["joined"], 2, 2), J.behaviour_file(part, 2, 2))  # restored
    shutil.copy(J.behaviour_file(part, 2, 1), J.behaviour_file(part, 2, 9))  # one written afterwards
    with pytest.raises(DataError, match=r"bucket=0002/part-00009\.parquet: behaviour file not listed in _layout\.json"):
        list(J.JoinedBatchReader(part, DAYS, cfg.features, 10**6))
    # A data set written before the listing was recorded is read as before.
    legacy = json.loads((part / J.LAYOUT_FILE).read_text())
    del legacy[J.BEHAVIOUR_PARTS]
    (part / J.LAYOUT_FILE).write_text(json.dumps(legacy))
    J.behaviour_file(part, 2, 9).unlink()
    assert sum(len(b) for b in J.JoinedBatchReader(part, DAYS, cfg.features, 10**6)) == 3 * 3_000
