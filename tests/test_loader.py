"""Tests for the streaming Parquet loader (cdp_rec.data.loader)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from cdp_rec.config import FeatureConfig, JobConfig
from cdp_rec.data import synthetic
from cdp_rec.data.loader import (
    DataError,
    ParquetBatchReader,
    check_dataset_spec,
    dataset_files,
    list_day_files,
)
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, ID_FEATURES, Batch, sparse_keys, table_schema

FEATURES = FeatureConfig()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[JobConfig, Path, list[Path]]:
    cfg = JobConfig()
    cfg.data.samples_per_day = 3_000
    cfg.data.rows_per_file = 1_000
    cfg.data.row_group_size = 300
    root = tmp_path_factory.mktemp("loader_data")
    synthetic.generate_dataset(cfg, root)
    return cfg, root, dataset_files(root, [0, 1, 2])


def collect(batches: list[Batch], features: FeatureConfig) -> dict[str, np.ndarray]:
    """Concatenate batches back into columns; hist lists as (lengths, flat values)."""
    out: dict[str, list[np.ndarray]] = {}
    for b in batches:
        d = b.sparse.to_dict()
        assert list(d) == sparse_keys(features)
        for key, jt in d.items():
            if key in (HIST_ITEMS, HIST_CATEGORIES):
                out.setdefault(key + ".lengths", []).append(jt.lengths().numpy())
            else:
                assert torch.all(jt.lengths() == 1), key
            out.setdefault(key, []).append(jt.values().numpy())
        out.setdefault("label", []).append(b.labels.numpy())
        out.setdefault("user_ids", []).append(b.user_ids.numpy())
        out.setdefault("request_ids", []).append(b.request_ids.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_round_trip_with_uneven_batches(dataset):
    cfg, _, files = dataset
    expected = pa.concat_tables(pq.read_table(f) for f in files)
    for batch_size in (333, 1_700):  # neither divides the 300-row groups; 1700 spans files
        batches = list(ParquetBatchReader(files, cfg.features, batch_size))
        sizes = [len(b) for b in batches]
        assert all(s == batch_size for s in sizes[:-1])
        assert sum(sizes) == expected.num_rows == 9_000
        assert sizes[-1] == 9_000 - (len(sizes) - 1) * batch_size
        b0 = batches[0]
        assert b0.labels.dtype == torch.float32 and b0.labels.shape == (batch_size,)
        assert b0.user_ids.dtype == torch.int64 and b0.request_ids.dtype == torch.int64
        assert b0.sparse.values().dtype == torch.int64

        got = collect(batches, cfg.features)
        for col in (*ID_FEATURES, *cfg.features.context_features, *cfg.features.scene_features):
            np.testing.assert_array_equal(got[col], expected[col].to_numpy(), err_msg=col)
        np.testing.assert_array_equal(got["label"], expected["label"].to_numpy().astype(np.float32))
        np.testing.assert_array_equal(got["user_ids"], expected["user_id"].to_numpy())
        np.testing.assert_array_equal(got["request_ids"], expected["request_id"].to_numpy())
        for col in (HIST_ITEMS, HIST_CATEGORIES):
            lists = expected[col].combine_chunks()
            np.testing.assert_array_equal(got[col + ".lengths"], pc.list_value_length(lists).to_numpy())
            np.testing.assert_array_equal(got[col], pc.list_flatten(lists).to_numpy())
        assert (got[HIST_ITEMS + ".lengths"] == 0).any()  # empty histories pass through


def test_reader_is_reiterable_and_counts(dataset):
    cfg, _, files = dataset
    reader = ParquetBatchReader(files, cfg.features, 1_000)
    first = [b.labels.sum().item() for b in reader]
    assert first == [b.labels.sum().item() for b in reader]
    assert reader.num_rows() == 9_000 and reader.num_batches() == len(first) == 9


def test_rank_slices_are_disjoint_and_cover(dataset):
    cfg, _, files = dataset
    assert len(files) == 9
    seen: list[Path] = []
    request_ids: list[np.ndarray] = []
    for rank in range(4):
        reader = ParquetBatchReader(files, cfg.features, 256, rank=rank, world_size=4)
        assert reader.files == files[rank::4]
        seen += reader.files
        request_ids += [b.request_ids.numpy() for b in reader]
    assert sorted(seen) == sorted(files) and len(set(seen)) == len(files)
    all_ids = np.concatenate(request_ids)
    assert len(all_ids) == 9_000
    expected = pa.concat_tables(pq.read_table(f) for f in files)["request_id"].to_numpy()
    np.testing.assert_array_equal(np.sort(all_ids), np.sort(expected))
    with pytest.raises(ValueError):
        ParquetBatchReader(files, cfg.features, 256, rank=4, world_size=4)


def test_drop_last(dataset):
    cfg, _, files = dataset
    kept = list(ParquetBatchReader(files, cfg.features, 700, drop_last=True))
    assert [len(b) for b in kept] == [700] * 12
    assert ParquetBatchReader(files, cfg.features, 700, drop_last=True).num_batches() == 12
    assert len(list(ParquetBatchReader(files, cfg.features, 700))) == 13


def test_list_day_files_errors(dataset, tmp_path):
    _, root, files = dataset
    assert list_day_files(root, 1) == files[3:6]
    with pytest.raises(DataError, match="day=07"):
        list_day_files(root, 7)
    (tmp_path / "day=00").mkdir()
    with pytest.raises(DataError, match=r"day=00.*no part-\*\.parquet"):
        list_day_files(tmp_path, 0)


def test_dataset_spec_check(dataset):
    cfg, root, _ = dataset
    assert check_dataset_spec(root, cfg.features, seed=0)["seed"] == 0
    with pytest.raises(DataError, match="features.num_items"):
        check_dataset_spec(root, FeatureConfig(num_items=7))
    with pytest.raises(DataError, match="seed"):
        check_dataset_spec(root, cfg.features, seed=3)
    assert check_dataset_spec(root / "day=00", cfg.features) is None  # real logs: no spec


def test_dataset_spec_check_lets_raw_id_tables_differ_in_size(dataset):
    cfg, root, _ = dataset
    f = cfg.features
    hour = next(iter(f.context_features))
    bigger = dataclasses.replace(f, num_items=f.num_items * 3,
                                 context_features={**f.context_features, hour: f.context_features[hour] + 5})
    # A hash / managed table's size is its row count, not the data's vocabulary ...
    raw = dataclasses.replace(bigger, id_mapping={"item": "hash", f"ctx_{hour}": "managed"})
    assert check_dataset_spec(root, raw) is not None
    # ... but a dense table's size is the vocabulary, so a mismatch is still named.
    with pytest.raises(DataError, match="features.num_items"):
        check_dataset_spec(root, dataclasses.replace(f, num_items=f.num_items * 3, id_mapping={"item": "dense"}))
    with pytest.raises(DataError, match="features.context_features"):
        check_dataset_spec(root, dataclasses.replace(bigger, id_mapping={"item": "hash"}))


# --------------------------------------------------------------------------- bad files


def good_columns(n: int = 20, features: FeatureConfig = FEATURES) -> dict[str, pa.Array]:
    """A valid ``n``-row data set (row ``r`` has a history of length ``r % 4``; requests of 4
    rows, each one user's)."""
    rng = np.random.default_rng(0)
    request = np.arange(n) // 4
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(request),
        "user_id": pa.array(rng.integers(0, features.num_users, n)[request * 4]),
        "query_id": pa.array(rng.integers(0, features.num_queries, n)),
        "item_id": pa.array(rng.integers(0, features.num_items, n)),
        "category_id": pa.array(rng.integers(0, features.num_categories, n)),
        "ts": pa.array(np.arange(n) * 10),
    }
    for col, vocab in (*features.context_features.items(), *features.scene_features.items()):
        cols[col] = pa.array(rng.integers(0, vocab, n))
    cols["label"] = pa.array(rng.integers(0, 2, n).astype(np.int8))
    lengths = [r % 4 for r in range(n)]
    for name, vocab in ((HIST_ITEMS, features.num_items), (HIST_CATEGORIES, features.num_categories)):
        cols[name] = pa.array([list(rng.integers(0, vocab, k)) for k in lengths], pa.list_(pa.int64()))
    return cols


def write(path: Path, cols: dict[str, pa.Array], row_group_size: int = 5) -> Path:
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def read_all(path: Path, features: FeatureConfig = FEATURES) -> list[Batch]:
    return list(ParquetBatchReader([path], features, batch_size=7))


def test_valid_file_with_extra_columns_and_nullable_schema(tmp_path):
    cols = good_columns()
    cols["debug_note"] = pa.array(["x"] * 20)
    batches = read_all(write(tmp_path / "part-00000.parquet", cols))
    assert sum(len(b) for b in batches) == 20
    got = collect(batches, FEATURES)
    np.testing.assert_array_equal(got[HIST_ITEMS + ".lengths"], [r % 4 for r in range(20)])


def test_schema_errors(tmp_path):
    cases = {
        "missing": (lambda c: c.pop("query_id"), "query_id", "missing"),
        "float_label": (lambda c: c.__setitem__("label", pa.array(np.zeros(20))), "label", "double"),
        "int32_list": (
            lambda c: c.__setitem__(HIST_ITEMS, c[HIST_ITEMS].cast(pa.list_(pa.int32()))),
            HIST_ITEMS,
            "int32",
        ),
        "int32_id": (lambda c: c.__setitem__("user_id", c["user_id"].cast(pa.int32())), "user_id", "int32"),
    }
    for name, (mutate, column, words) in cases.items():
        cols = good_columns()
        mutate(cols)
        path = write(tmp_path / f"part-{name}.parquet", cols)
        with pytest.raises(DataError) as err:
            read_all(path)
        msg = str(err.value)
        assert path.name in msg and f"'{column}'" in msg and words in msg, msg


def _set(cols: dict[str, pa.Array], name: str, row: int, value) -> None:
    values = cols[name].to_pylist()
    values[row] = value
    cols[name] = pa.array(values, cols[name].type)


def _set_hist(cols: dict[str, pa.Array], name: str, row: int, value: list) -> None:
    values = cols[name].to_pylist()
    values[row] = value
    cols[name] = pa.array(values, pa.list_(pa.int64()))


ROW_CASES = {
    # name: (mutation at row 12 = row group 2, row 2 with 5-row groups, column, message part)
    "label_2": (lambda c: _set(c, "label", 12, 2), "label", "not in {0, 1}"),
    "negative_user": (lambda c: _set(c, "user_id", 12, -1), "user_id", "out of range [0, 2000)"),
    "item_too_big": (lambda c: _set(c, "item_id", 12, 5_000), "item_id", "out of range [0, 5000)"),
    "page_too_big": (lambda c: _set(c, "page", 12, 8), "page", "out of range [0, 8)"),
    "null_query": (lambda c: _set(c, "query_id", 12, None), "query_id", "null"),
    "null_hist": (lambda c: _set_hist(c, HIST_ITEMS, 12, None), HIST_ITEMS, "null"),
    "null_in_list": (lambda c: _set_hist(c, HIST_CATEGORIES, 12, [1, None]), HIST_CATEGORIES, "null"),
    "hist_item_range": (lambda c: _set_hist(c, HIST_ITEMS, 12, [5, -3]), HIST_ITEMS, "out of range"),
    "hist_cat_range": (lambda c: _set_hist(c, HIST_CATEGORIES, 12, [5, 20]), HIST_CATEGORIES, "out of range"),
    "length_mismatch": (lambda c: _set_hist(c, HIST_CATEGORIES, 12, [1, 2, 3]), HIST_CATEGORIES, "differs"),
    "too_long": (
        lambda c: (_set_hist(c, HIST_ITEMS, 12, [1] * 51), _set_hist(c, HIST_CATEGORIES, 12, [1] * 51)),
        HIST_ITEMS,
        "longer than max_seq_len=50",
    ),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_row_group_errors(tmp_path, case):
    mutate, column, words = ROW_CASES[case]
    cols = good_columns()
    mutate(cols)
    path = write(tmp_path / f"part-{case}.parquet", cols)
    with pytest.raises(DataError) as err:
        read_all(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: row group 2: column '{column}': "), msg
    assert words in msg and "first at row 2 of the row group" in msg, msg


def test_error_message_format(tmp_path):
    cols = good_columns()
    for row in (12, 14):
        _set(cols, "user_id", row, 2_500)
    path = write(tmp_path / "part-00000.parquet", cols)
    with pytest.raises(DataError) as err:
        read_all(path)
    assert str(err.value) == (
        f"{path}: row group 2: column 'user_id': 2 value(s) out of range [0, 2000), "
        "first at row 2 of the row group: 2500"
    )


def test_bad_rows_are_not_skipped_after_good_batches(tmp_path):
    """Batches before the bad row group are yielded, then the error stops the pass."""
    cols = good_columns()
    _set(cols, "label", 17, 3)
    reader = ParquetBatchReader([write(tmp_path / "part-00000.parquet", cols)], FEATURES, batch_size=5)
    it = iter(reader)
    assert [len(next(it)) for _ in range(3)] == [5, 5, 5]
    with pytest.raises(DataError, match="row group 3"):
        next(it)


def test_unreadable_file(tmp_path):
    path = tmp_path / "part-00000.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="part-00000.parquet"):
        read_all(path)
    with pytest.raises(DataError, match="not found"):
        read_all(tmp_path / "part-99999.parquet")


def test_table_schema_files_are_accepted(tmp_path):
    """Exactly the generator's schema (non-nullable fields) reads back unchanged."""
    table = pa.table(good_columns()).cast(table_schema(FEATURES))
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path, row_group_size=6)
    got = collect(read_all(path), FEATURES)
    np.testing.assert_array_equal(got["item_id"], table["item_id"].to_numpy())


def test_reads_one_row_group_at_a_time(dataset, monkeypatch):
    """Whole-file reads are never used, so memory is bounded by one row group."""
    cfg, _, files = dataset

    def forbidden(*args, **kwargs):
        raise AssertionError("whole-file read")

    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    calls: list[int] = []
    original = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        calls.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    assert sum(len(b) for b in ParquetBatchReader(files, cfg.features, 512)) == 9_000
    assert len(calls) == 9 * 4  # 1000-row files in 300-row groups: 300, 300, 300, 100
