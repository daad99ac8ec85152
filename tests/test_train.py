"""End-to-end: generate the tiny data set, train both models, check they learn.

AUC >= 0.6 on the held-out day is a learning check (a constant or random scorer gets
0.5), not a timing. The tiny data set is generated once per session.
"""

import json

import pytest

from cdp_rec.cli import main
from cdp_rec.config import load_config
from cdp_rec.training.trainer import train


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from cdp_rec.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(load_config(None), root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cdp", "base"])
def test_tiny_training_learns(model, tiny_root, tmp_path):
    # One epoch: a learning check of the mechanics (the default is up to 10, early-stopped).
    cfg = load_config(None, [f"model.name={model}", f"train.run_dir={tmp_path}", "train.progress=false",
                             "train.epochs=1"])
    result = train(cfg, tiny_root)
    m = json.loads((result.run_dir / "metrics.json").read_text())
    assert m["model"] == model and m["config_hash"] == cfg.hash()
    # The default holds the last 5% of day 1 out for validation (scored once, after the one epoch).
    (valid,) = m["validation"]
    assert m["num_train_samples"] + valid["num_samples"] == 2 * cfg.data.samples_per_day
    assert 0.05 * cfg.data.samples_per_day <= valid["num_samples"] < 0.06 * cfg.data.samples_per_day
    assert m["restored"]["step"] == m["train_steps"] and not m["restored"]["from_checkpoint"]
    assert m["num_eval_samples"] == cfg.data.samples_per_day
    assert m["auc"] >= 0.6, m
    assert m["uauc"] > 0.55 and m["gauc"] > 0.55, m
    assert m["num_users_used"] > 0 and m["num_requests_used"] > 0


def test_cli_train_reports_errors_naming_the_key(capsys, tmp_path):
    assert main(["train", "--set", "model.nmae=cdp"]) == 2
    assert "model.nmae" in capsys.readouterr().err
    assert main(["train", "--set", f"data.root={tmp_path}/nope", "--set", "data.generate_if_missing=false"]) == 2
    assert "data root not found" in capsys.readouterr().err


def test_ctrl_c_is_one_line_saying_how_to_resume(monkeypatch, capsys):
    import cdp_rec.training.trainer as trainer

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    assert main(["train"]) == 130
    err = capsys.readouterr().err
    assert err == "cdp-rec train: interrupted; the same command resumes from the newest checkpoint\n", err


def test_existing_data_for_another_spec_is_refused(tiny_root, tmp_path):
    cfg = load_config(None, ["features.num_items=100", f"train.run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="features.num_items"):
        train(cfg, tiny_root)
