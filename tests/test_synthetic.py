"""Tests for the synthetic search-log generator (cdp_rec.data.synthetic)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cdp_rec.config import JobConfig
from cdp_rec.data import synthetic as S
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, day_dir_name, id_ranges, table_schema


def small_config(seed: int = 0, **features) -> JobConfig:
    cfg = JobConfig()
    cfg.data.samples_per_day = 6_000
    cfg.data.rows_per_file = 2_500
    cfg.data.row_group_size = 700
    cfg.data.seed = seed
    for k, v in features.items():
        setattr(cfg.features, k, v)
    return cfg


def read_day(root: Path, day: int) -> pa.Table:
    files = sorted((root / day_dir_name(day)).glob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank AUC with tied scores sharing their average rank."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(len(scores))
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[JobConfig, Path]:
    cfg = small_config()
    root = tmp_path_factory.mktemp("synthetic")
    S.generate_dataset(cfg, root)
    return cfg, root


@pytest.fixture(scope="module")
def all_days(generated) -> pa.Table:
    cfg, root = generated
    return pa.concat_tables(read_day(root, d) for d in range(3))


def test_layout_schema_and_spec(generated):
    cfg, root = generated
    for day in range(cfg.data.train_days + cfg.data.test_days):
        files = sorted((root / day_dir_name(day)).glob("part-*.parquet"))
        assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
        assert rows == [2_500, 2_500, 1_000]
        md = pq.ParquetFile(files[0]).metadata
        assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [700, 700, 700, 400]
        assert md.row_group(0).column(0).compression == "ZSTD"
        for f in files:
            assert pq.read_schema(f).equals(table_schema(cfg.features), check_metadata=False)
    spec = json.loads((root / S.DATASET_SPEC_FILE).read_text())
    assert spec["seed"] == 0 and spec["days"] == [0, 1, 2]
    assert spec["features"]["num_items"] == cfg.features.num_items
    assert spec["features"]["context_features"] == cfg.features.context_features
    assert spec["data"]["samples_per_day"] == 6_000
    assert not list(root.rglob("*.tmp"))


def test_deterministic_and_seed_dependent(generated, tmp_path):
    cfg, root = generated
    S.generate_dataset(small_config(), tmp_path / "again", days=[1])
    assert read_day(tmp_path / "again", 1).equals(read_day(root, 1))
    S.generate_dataset(small_config(seed=1), tmp_path / "other", days=[1])
    other = read_day(tmp_path / "other", 1)
    assert not other.equals(read_day(root, 1))
    assert not np.array_equal(other["item_id"].to_numpy(), read_day(root, 1)["item_id"].to_numpy())


def test_single_day_equals_day_of_full_run(generated, tmp_path):
    cfg, root = generated
    S.generate_dataset(cfg, tmp_path, days=[2])
    assert read_day(tmp_path, 2).equals(read_day(root, 2))
    assert not (tmp_path / day_dir_name(0)).exists()
    assert json.loads((tmp_path / S.DATASET_SPEC_FILE).read_text())["days"] == [2]


def test_ids_in_range_and_requests_consistent(generated, all_days):
    cfg, _ = generated
    t = all_days
    for col, hi in id_ranges(cfg.features).items():
        values = t[col].to_numpy() if not col.startswith("hist_") else pc.list_flatten(t[col]).to_numpy()
        assert values.min() >= 0 and values.max() < hi, col
    world = S.build_world(cfg)
    np.testing.assert_array_equal(t["category_id"].to_numpy(), world.item_category[t["item_id"].to_numpy()])
    # Request ids are unique across days and group 4..12 impressions sharing the context.
    req = t["request_id"].to_numpy()
    _, starts, sizes = np.unique(req, return_index=True, return_counts=True)
    assert sizes.max() <= 12 and np.mean(sizes[:-1] >= 4) > 0.99
    assert np.all(np.diff(req) >= 0)
    for col in ("user_id", "query_id", "ts", *cfg.features.context_features, *cfg.features.scene_features):
        v = t[col].to_numpy()
        np.testing.assert_array_equal(v, np.repeat(v[starts], sizes), err_msg=col)
    ts = t["ts"].to_numpy()
    day_of = ts // S.SECONDS_PER_DAY
    assert set(day_of) == {0, 1, 2}
    np.testing.assert_array_equal(t["hour"].to_numpy(), (ts % 86_400) // 3_600)
    page = t["page"].to_numpy()
    assert np.mean(page == 0) > np.mean(page == 3) > 0  # skewed towards the first page


def test_histories_well_formed(generated, all_days):
    cfg, _ = generated
    t = all_days
    items, cats = t[HIST_ITEMS].combine_chunks(), t[HIST_CATEGORIES].combine_chunks()
    li = pc.list_value_length(items).to_numpy()
    np.testing.assert_array_equal(li, pc.list_value_length(cats).to_numpy())
    assert li.max() == cfg.features.max_seq_len
    empty = np.mean(li == 0)
    assert 0.0 < empty < 0.1
    world = S.build_world(cfg)
    np.testing.assert_array_equal(
        pc.list_flatten(cats).to_numpy(), world.item_category[pc.list_flatten(items).to_numpy()]
    )


def test_histories_are_last_behaviours_strictly_before_ts(generated):
    """Brute-force check against the untruncated behaviour log, for a sample of rows."""
    cfg, root = generated
    day = 2
    t = read_day(root, day)
    world = S.build_world(cfg)
    logs = [S._period_log(cfg, world, p) for p in range(day + 2)]  # pre-history, days 0..2
    keys = np.concatenate([lg.keys for lg in logs])
    log_items = np.concatenate([lg.items for lg in logs])
    log_user = keys >> S._TS_BITS
    log_ts = (keys & ((1 << S._TS_BITS) - 1)) - S._TS_OFFSET
    order = np.lexsort((log_ts, log_user))  # ties keep period order, as the merge does
    log_user, log_ts, log_items = log_user[order], log_ts[order], log_items[order]

    rng = np.random.default_rng(0)
    users, ts = t["user_id"].to_numpy(), t["ts"].to_numpy()
    hist = t[HIST_ITEMS]
    with_future = 0
    for row in rng.choice(t.num_rows, size=150, replace=False):
        mine = log_user == users[row]
        expected = log_items[mine & (log_ts < ts[row])][-cfg.features.max_seq_len :]
        assert hist[int(row)].as_py() == expected.tolist(), row
        with_future += bool((mine & (log_ts >= ts[row])).any())
    # The log does hold later behaviours of these users, so "strictly before" is tested.
    assert with_future > 50


def test_ctr_and_planted_signal(generated, all_days):
    cfg, _ = generated
    t = all_days
    label = t["label"].to_numpy()
    assert label.dtype == np.int8 and set(np.unique(label)) == {0, 1}
    assert 0.1 < label.mean() < 0.3
    world = S.build_world(cfg)
    user, item, query = (t[c].to_numpy() for c in ("user_id", "item_id", "query_id"))
    cat = t["category_id"].to_numpy()
    match = cat == world.query_category[query]
    assert 0.6 < match.mean() < 0.85
    assert label[match].mean() > 1.5 * label[~match].mean()
    # The user's taste in the current context (mode) predicts clicks; the other mode's
    # taste much less, so context matters; popularity alone is weaker.
    mode = S.context_mode(t["ts"].to_numpy(), t["client"].to_numpy())
    z = world.item_latent[item]
    right = auc(label, np.einsum("nd,nd->n", world.taste(user, cat, mode), z))
    wrong = auc(label, np.einsum("nd,nd->n", world.taste(user, cat, 1 - mode), z))
    pop = auc(label, world.item_popz[item])
    assert right > 0.7 and right > wrong + 0.1 and right > pop + 0.1


def test_context_columns_come_from_config(tmp_path):
    cfg = small_config(context_features={"page": 5, "slot": 3}, scene_features={"os": 2})
    cfg.data.samples_per_day = 2_000
    cfg.data.train_days, cfg.data.test_days = 1, 1
    files = S.generate_dataset(cfg, tmp_path)
    assert len(files) == 2
    t = read_day(tmp_path, 1)
    assert t.schema.equals(table_schema(cfg.features), check_metadata=False)
    assert "hour" not in t.column_names
    for col, vocab in {"page": 5, "slot": 3, "os": 2}.items():
        v = t[col].to_numpy()
        assert v.min() >= 0 and v.max() < vocab


def test_regenerating_replaces_stale_files_and_spec(tmp_path):
    cfg = small_config()
    cfg.data.samples_per_day = 1_000
    cfg.data.rows_per_file = 300
    S.generate_dataset(cfg, tmp_path, days=[0])
    assert len(list((tmp_path / day_dir_name(0)).glob("part-*"))) == 4
    cfg.data.rows_per_file = 600  # a different spec: previous days are no longer listed
    S.generate_dataset(cfg, tmp_path, days=[0])
    assert len(list((tmp_path / day_dir_name(0)).glob("part-*"))) == 2
    spec = json.loads((tmp_path / S.DATASET_SPEC_FILE).read_text())
    assert spec["data"]["rows_per_file"] == 600 and spec["days"] == [0]
    assert not S.dataset_is_complete(cfg, tmp_path)
    assert S.dataset_is_complete(cfg, tmp_path, days=[0])
    S.generate_dataset(cfg, tmp_path, days=[1, 2])  # same spec: the day list grows
    assert json.loads((tmp_path / S.DATASET_SPEC_FILE).read_text())["days"] == [0, 1, 2]
    assert S.dataset_is_complete(cfg, tmp_path)
    cfg.data.seed = 5
    assert not S.dataset_is_complete(cfg, tmp_path)


def test_default_config_is_fast(tmp_path):
    cfg = JobConfig()
    start = time.perf_counter()
    files = S.generate_dataset(cfg, tmp_path)
    elapsed = time.perf_counter() - start
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 3 * cfg.data.samples_per_day
    assert elapsed < 20, f"default config took {elapsed:.1f}s"


# --------------------------------------------------------------------------- context signal


def _digest(table: pa.Table) -> str:
    """sha256 prefix of every column's values (list columns: offsets and values)."""
    import hashlib

    h = hashlib.sha256()
    for name in table.column_names:
        col = table[name].combine_chunks()
        if pa.types.is_list(col.type):
            h.update(col.offsets.to_numpy().astype(np.int64).tobytes())
            h.update(col.values.to_numpy().astype(np.int64).tobytes())
        else:
            h.update(col.to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def test_context_signal_default_is_the_old_data_bit_for_bit():
    # Pinned from the generator before data.context_signal existed: the default (0) must
    # not change a single value (data sets written before stay valid).
    cfg = small_config()
    assert cfg.data.context_signal == 0.0
    ((day, table),) = list(S.generate_days(cfg, [1]))
    assert _digest(table) == "50b46c7ba2059230"
    assert "context_signal" not in S.dataset_spec(cfg)["data"]
    cfg.data.context_signal = 1.0
    assert S.dataset_spec(cfg)["data"]["context_signal"] == 1.0  # another data set: another spec


def test_context_signal_plants_a_context_dependent_behaviour_term():
    def day2(signal: float) -> pa.Table:
        cfg = small_config()
        cfg.data.samples_per_day = 20_000
        cfg.data.context_signal = signal
        return next(iter(S.generate_days(cfg, [2])))[1]

    base, strong = day2(0.0), day2(1.0)
    # No random draw is added: every column but the label is identical, and labels move.
    for name in base.column_names:
        if name != "label":
            assert base[name].equals(strong[name]), name
    assert not base["label"].equals(strong["label"])

    cfg = small_config()
    world = S.build_world(cfg)
    t = strong
    item, cat = t["item_id"].to_numpy(), t["category_id"].to_numpy()
    hist = t[HIST_ITEMS].combine_chunks()
    offsets, hist_items = hist.offsets.to_numpy().astype(np.int64), hist.values.to_numpy()
    slot = S.impression_context_slot(t["ts"].to_numpy(), t["client"].to_numpy())
    matched = S.context_term(world, item, cat, slot, offsets, hist_items)
    blind = S.context_term(world, item, cat, slot, offsets, hist_items, match_slot=False)
    # Slots: 4 values, behaviours' from the item id alone (deterministic), impressions' from context + scene.
    assert set(np.unique(S.behaviour_context_slot(np.arange(5000)))) == {0, 1, 2, 3}
    assert set(np.unique(slot)) == {0, 1, 2, 3}
    assert np.array_equal(S.behaviour_context_slot(hist_items), S.behaviour_context_slot(hist_items.copy()))
    # The slot-matched term predicts the strong data's clicks, and better than on the default data...
    y_base, y_strong = base["label"].to_numpy(), strong["label"].to_numpy()
    assert auc(y_strong, matched) > auc(y_base, matched) + 0.05
    # ... and better than the context-blind mean over every in-category behaviour.
    assert auc(y_strong, matched) > auc(y_strong, blind) + 0.01
