"""Hostile-but-possible inputs at the edges: each is a one-line error naming the field or
file, or documented n/a output, never a traceback or silently wrong numbers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from cdp_rec import compare
from cdp_rec.config import ConfigError, JobConfig, load_config
from cdp_rec.data import synthetic
from cdp_rec.data.joined import open_reader
from cdp_rec.data.loader import DataError, ParquetBatchReader
from cdp_rec.models import MODELS, build_model
from test_loader import FEATURES, good_columns, write

SMALL = ["data.samples_per_day=300", "data.rows_per_file=300", "data.row_group_size=100"]


# --------------------------------------------------------------------------- loader: request ids


def test_request_id_shared_by_two_users_is_refused(tmp_path):
    """A log's per-user request counter (user 1: requests 0, 1; user 2: requests 0, 1) would
    merge different users' impressions into one GAUC group: refused, naming file and column."""
    cols = good_columns(8)
    cols["user_id"] = pa.array(np.repeat([1, 2], 4))
    cols["request_id"] = pa.array([0, 0, 1, 1, 0, 0, 1, 1])
    path = write(tmp_path / "part-00000.parquet", cols, row_group_size=8)
    with pytest.raises(DataError, match=r"part-00000.parquet: row group 0: column 'request_id': 2 request id\(s\) "
                                        r"shared by several users, first 0 \(rows 0 and 4 of the row group, users 1, 2\)"):
        list(ParquetBatchReader([path], FEATURES, batch_size=4))
    # The same ids, one user each: read as they are.
    cols["request_id"] = pa.array([0, 0, 1, 1, 2, 2, 3, 3])
    path = write(tmp_path / "part-00000.parquet", cols, row_group_size=8)
    (batch,) = ParquetBatchReader([path], FEATURES, batch_size=8)
    assert batch.request_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# --------------------------------------------------------------------------- readers: the data set's spec


def test_reader_refuses_a_data_set_of_another_vocabulary(tmp_path):
    """``cdp-rec evaluate --data`` of a data set written for fewer items: its ids fit the
    checkpoint's tables and were scored silently; open_reader now checks _dataset.json."""
    root = tmp_path / "data"
    synthetic.generate_dataset(load_config(None, [*SMALL, "features.num_items=4000"]), root)
    cfg = load_config(None, SMALL)
    with pytest.raises(DataError, match=r"_dataset.json: features.num_items is 4000 in the data set but 5000"):
        open_reader(cfg, root, [2], 64)
    other = load_config(None, [*SMALL, "features.max_seq_len=20"])
    with pytest.raises(DataError, match=r"features.max_seq_len is 50 in the data set but 20"):
        open_reader(other, root, [2], 64)
    ok = load_config(None, [*SMALL, "features.num_items=4000"])
    assert sum(len(b) for b in open_reader(ok, root, [2], 64)) == 300


# --------------------------------------------------------------------------- gen-data: a day that cannot fit


@pytest.mark.parametrize("n", [10**12, 10**20])
def test_gen_data_refuses_a_day_larger_than_memory(tmp_path, n):
    cfg = load_config(None, [f"data.samples_per_day={n}"])
    with pytest.raises(DataError, match=rf"data.samples_per_day={n:,}: the generator builds a day in memory, "
                                        r"about [\d,.]+ GiB at features.max_seq_len=50, more than this machine's"):
        synthetic.generate_dataset(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_gen_data_cli_huge_day_is_one_line(tmp_path, capsys):
    from cdp_rec.cli import main

    rc = main(["gen-data", "--out", str(tmp_path / "out"), "--set", "data.samples_per_day=1000000000000"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.samples_per_day=1,000,000,000,000" in err and "Traceback" not in err


# --------------------------------------------------------------------------- models: ablation of a non-CDP model


@pytest.mark.parametrize("name", ["base", "din", "lr_counts"])
def test_ablation_on_a_model_without_it_is_refused(name):
    """model.ablation on base / din / ... trained the model unchanged and recorded the ablation
    in metrics.json."""
    cfg = JobConfig()
    cfg.model.name, cfg.model.ablation = name, "no_moe"
    with pytest.raises(ConfigError, match=rf"model.ablation=no_moe switches a part of CDP off; model.name={name} "
                                          r"has no such part"):
        build_model(cfg)
    cfg.model.name = "cdp"
    build_model(cfg)  # CDP has it
    cfg.model.name = "cdp_no_moe"
    build_model(cfg)  # and its preset agrees


# --------------------------------------------------------------------------- compare


def test_compare_progress_line_with_undefined_auc(tmp_path, monkeypatch, capsys):
    """A test day of one label has no AUC (metrics.json: null): the progress line printed
    'n/a' for UAUC / GAUC but raised TypeError on AUC after the run had trained."""
    import cdp_rec.training.trainer as trainer

    metrics = {"auc": None, "uauc": None, "gauc": None, "train_samples_per_s": 100.0, "num_train_samples": 10,
               "num_eval_samples": 5, "num_users_used": 0, "num_requests_used": 0,
               "num_samples_users_used": 0, "num_samples_requests_used": 0}
    monkeypatch.setattr(trainer, "train", lambda cfg, root: SimpleNamespace(metrics=metrics, run_dir=tmp_path / "r"))
    monkeypatch.setattr(compare, "measure_inference_ms", lambda cfg, root: 1.0)
    res = compare.run_compare(None, [], models="base", seeds=1, out_dir=tmp_path / "cmp", data_root=str(tmp_path))
    out = capsys.readouterr().out
    assert "[compare] base seed 0: AUC n/a UAUC n/a GAUC n/a" in out
    assert "| Base (mean pooling) | n/a | n/a | n/a |" in res["markdown"]


def test_compare_models_all_with_others_means_all():
    everything = compare.resolve_models("all")
    assert compare.resolve_models("all,base") == everything == compare.resolve_models(" base , all ")
    assert compare.resolve_models("base, base,din") == ["base", "din"]
    with pytest.raises(ConfigError, match="unknown model"):
        compare.resolve_models(" , ")


def test_every_undefined_metric_formats_as_na():
    from cdp_rec.metrics import format_metric

    assert format_metric(None) == format_metric(float("nan")) == "n/a"
    assert format_metric(0.61234) == "0.6123"


def test_models_all_still_lists_the_registry_in_table_order():
    names = compare.resolve_models("all")
    assert names[0] == compare.FLOOR and set(names) == set(MODELS)


def test_scoring_input_may_share_request_ids(tmp_path):
    """Without labels (``cdp-rec predict`` input, the serving reader) nothing is grouped by
    request, so a placeholder request id shared by every user is read as it is."""
    from cdp_rec.serving.predict import arrow_to_batch

    cols = good_columns(8)
    del cols["label"]
    cols["user_id"] = pa.array(np.arange(8))
    cols["request_id"] = pa.array(np.zeros(8, np.int64))
    batch = arrow_to_batch(pa.table(cols), FEATURES)
    assert batch.user_ids.tolist() == list(range(8)) and batch.request_ids.tolist() == [0] * 8


def test_cli_prints_an_undefined_metric_as_n_a_whether_none_or_nan():
    from cdp_rec.cli import _groups
    from cdp_rec.metrics import format_metric

    assert format_metric(None) == format_metric(float("nan")) == "n/a" and format_metric(0.5) == "0.5000"
    m = {"uauc": float("nan"), "gauc": None, "num_users_used": 0, "num_requests_used": 0, "num_samples": 10}
    assert _groups(m) == "UAUC n/a (0 users)  GAUC n/a (0 requests)"
