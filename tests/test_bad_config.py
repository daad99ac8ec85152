"""Bad configs fail at load with exit 2 and one line naming the key and where it came from.

Through ``cdp_rec.cli.main`` in-process: ``cdp-rec train`` must refuse these before it
reads data or writes a run directory. Issue 12: silent wrong results (5a), the origin of
a bad ``--set`` (9a), duplicate YAML keys (9b), unknown sharding tables (9d).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_rec.cli import main
from cdp_rec.config import ConfigError, FeatureConfig, JobConfig, embedding_table_names, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_train(capsys, *args: str) -> str:
    """``cdp-rec train ARGS``: assert exit 2 and exactly one stderr line; return that line."""
    assert main(["train", *args]) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("cdp-rec train: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------- 5a: ranges at load


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=-1", "train.max_steps must be >= 0, got -1"),
        ("train.sparse_lr=inf", "train.sparse_lr must be a finite number, got inf"),
        ("train.dense_lr=.nan", "train.dense_lr must be a finite number, got nan"),
        ("train.dense_lr=1e999", "train.dense_lr must be a finite number"),
        ("train.dense_lr=0", "train.dense_lr must be a finite number > 0, got 0.0"),
        ("train.sparse_lr=-1e-3", "train.sparse_lr must be a finite number > 0"),
        ("model.diffusion.noise_scale=-0.5", "model.diffusion.noise_scale must be a finite number > 0, got -0.5"),
        ("model.diffusion.beta_start=0.02", "model.diffusion.beta_start must be <= beta_end"),
        ("model.diffusion.beta_end=2.0", "model.diffusion.noise_scale * beta_end must be < 1"),
        ("model.diffusion.loss_weight=-1", "model.diffusion.loss_weight must be a finite number >= 0"),
        ("model.contrastive_weight=-0.1", "model.contrastive_weight must be a finite number >= 0"),
        ("model.contrastive_temperature=0", "model.contrastive_temperature must be a finite number > 0"),
        ("model.embedding_dim=0", "model.embedding_dim must be > 0, got 0"),
        ("model.ranker_hidden=[64, -1]", "model.ranker_hidden must be a non-empty list of positive ints"),
        ("train.epochs=0", "train.epochs must be > 0, got 0"),
        ("train.log_every=0", "train.log_every must be > 0"),
        ("train.eval_batch_size=-8", "train.eval_batch_size must be > 0"),
        ("train.seed=-1", "train.seed must be >= 0"),
        ("data.seed=-1", "data.seed must be >= 0"),
        ("data.test_days=0", "data.test_days must be > 0"),
        ("data.root=", "data.root must be a non-empty path"),
        ("train.run_dir=", "train.run_dir must be a non-empty path"),
        ("train.batch_size=99999999999999999999999", "train.batch_size must be < 2**31"),
        ("features.num_items=0", "features.num_items must be > 0"),
        ("features.scene_features.client=0", "features.scene_features.client must be a positive int, got 0"),
        ("sharding.hbm_gb=.inf", "sharding.hbm_gb must be a finite number"),
        ("sharding.ddr_gb=-1", "sharding.ddr_gb must be a finite number >= 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last must be > 0"),
        ("checkpoint.every_steps=-5", "checkpoint.every_steps must be >= 0"),
        # a run name that leaves run_dir rewrote that directory's config.yaml / metrics.json
        ("train.run_name=/tmp/elsewhere", "train.run_name must be a relative name inside train.run_dir"),
        ("train.run_name=../up", "train.run_name must be a relative name inside train.run_dir"),
        ("train.run_name=a/../../b", "train.run_name must be a relative name inside train.run_dir"),
        ("train.run_name=..", "train.run_name must be a relative name inside train.run_dir"),
    ],
)
def test_out_of_range_set_is_one_line_naming_the_set(capsys, override, message):
    line = run_train(capsys, "--set", override)
    assert f"--set {override}: {message}" in line


def test_edge_values_that_mean_something_still_load():
    cfg = load_config(None, ["train.max_steps=0", "checkpoint.every_steps=0", "sharding.ddr_gb=0",
                             "model.diffusion.loss_weight=0", "model.contrastive_weight=0", "train.seed=0",
                             "model.diffusion.inference_steps=100"])
    assert cfg.train.max_steps == 0  # 0: no step limit
    assert not cfg.data.allow_empty_days
    assert load_config(None, ["data.allow_empty_days=true"]).data.allow_empty_days


@pytest.mark.parametrize("name", ["tiny", "small", "industrial", "public-small"])
def test_shipped_configs_pass_the_tightened_checks(name):
    load_config(CONFIGS / f"{name}.yaml")


def test_out_of_range_yaml_names_file_and_line(capsys, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("train:\n  batch_size: 64\n  max_steps: -1\n")
    before = cfg.read_bytes()
    line = run_train(capsys, "--config", str(cfg))
    assert f"{cfg}:3: train.max_steps must be >= 0, got -1" in line
    cfg.write_text("model:\n  diffusion:\n    noise_scale: .nan\n")
    line = run_train(capsys, "--config", str(cfg))
    assert f"{cfg}:3: model.diffusion.noise_scale must be a finite number, got nan" in line
    cfg.write_bytes(before)
    assert cfg.read_bytes() == before


# ----------------------------------------------------------------------- 9a: origin of the value


def test_bad_set_over_good_yaml_is_reported_as_the_set(capsys, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("train:\n  max_steps: 10\n")
    line = run_train(capsys, "--config", str(cfg), "--set", "train.max_steps=-1")
    assert "--set train.max_steps=-1: train.max_steps must be >= 0, got -1" in line
    assert "job.yaml" not in line


def test_bad_yaml_value_fixed_by_set_loads_and_other_bad_keys_keep_their_file(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("train:\n  max_steps: -1\n  epochs: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, ["train.max_steps=5"])  # max_steps fixed on the command line, epochs still bad
    assert str(e.value) == f"{cfg}:3: train.epochs must be > 0, got 0"
    assert load_config(cfg, ["train.max_steps=5", "train.epochs=2"]).train.max_steps == 5


def test_cross_field_error_names_the_set_that_caused_it(tmp_path):
    # inference_steps (20, default) > num_steps (10, from --set): the --set is the cause.
    with pytest.raises(ConfigError, match=r"^--set model\.diffusion\.num_steps=10: model\.diffusion\.inference_steps"):
        load_config(None, ["model.diffusion.num_steps=10"])
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model:\n  diffusion:\n    num_steps: 10\n")
    with pytest.raises(ConfigError,
                       match=rf"^{cfg}:3: model\.diffusion\.inference_steps must be in \[1, num_steps=10\]"):
        load_config(cfg)


def test_type_errors_in_set_name_the_set(capsys):
    line = run_train(capsys, "--set", "train.batch_size=abc")
    assert "--set train.batch_size=abc: train.batch_size must be an integer" in line
    line = run_train(capsys, "--set", "train.batch_size=[1")
    assert "--set train.batch_size=[1: cannot parse value" in line  # one line, not PyYAML's block


# ----------------------------------------------------------------------- 9b: duplicate YAML keys


@pytest.mark.parametrize(
    "text, line_no, key",
    [
        ("train:\n  batch_size: 64\n  dense_lr: 0.001\n  batch_size: 128\n", 4, "train.batch_size"),
        ("train:\n  batch_size: 64\nmodel:\n  name: base\ntrain:\n  epochs: 2\n", 5, "train"),
        ("model:\n  diffusion: {num_steps: 50, num_steps: 60}\n", 2, "model.diffusion.num_steps"),
    ],
)
def test_duplicate_yaml_key_names_file_line_and_key(capsys, tmp_path, text, line_no, key):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(text)
    line = run_train(capsys, "--config", str(cfg))
    assert f"{cfg}:{line_no}: duplicate key {key} " in line
    assert cfg.read_text() == text


def test_yaml_merge_keys_still_override(tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("train:\n  <<: {batch_size: 64, epochs: 2}\n  batch_size: 128\n")
    got = load_config(cfg).train
    assert (got.batch_size, got.epochs) == (128, 2)


def test_invalid_yaml_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("train:\n  batch_size: [64\n")
    line = run_train(capsys, "--config", str(cfg))
    assert f"{cfg}: invalid YAML: line 3" in line


def test_unsafe_yaml_is_still_refused(tmp_path):
    cfg = tmp_path / "unsafe.yaml"
    cfg.write_text("train: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(cfg)


# ----------------------------------------------------------------------- 9d: sharding constraints


def test_unknown_constraint_table_from_set_lists_known_tables(capsys):
    line = run_train(capsys, "--set", "sharding.constraints={itme: row_wise}")
    assert ("--set sharding.constraints={itme: row_wise}: sharding.constraints.itme names an unknown table 'itme'"
            in line)
    assert "known tables: ['query', 'user', 'item', 'category', 'ctx_hour', 'ctx_page', 'scene_client', " \
           "'scene_search_source']" in line


def test_unknown_constraint_table_from_yaml_names_line(capsys, tmp_path):
    cfg = tmp_path / "shard.yaml"
    cfg.write_text("features:\n  context_features: {weekday: 7}\nsharding:\n  constraints:\n"
                   "    item: row_wise\n    ctx_hour: data_parallel\n")
    line = run_train(capsys, "--config", str(cfg))  # ctx_hour is gone: the file's context columns replace the defaults
    assert f"{cfg}:6: sharding.constraints.ctx_hour names an unknown table 'ctx_hour'" in line
    assert "'ctx_weekday'" in line
    cfg.write_text("sharding:\n  constraints:\n    item: row_wise\n    ctx_hour: data_parallel\n")
    assert load_config(cfg).sharding.constraints == {"item": "row_wise", "ctx_hour": "data_parallel"}


def test_table_names_match_the_embedding_tables():
    from embeddings.tables import table_specs

    for features in (FeatureConfig(), FeatureConfig(context_features={"a": 3}, scene_features={"b": 2, "c": 5})):
        assert embedding_table_names(features) == [s.name for s in table_specs(features)]


def test_table_missing_from_a_models_sharded_collection_is_a_config_error():
    # lr_counts embeds only the context / scene columns (its id statistics are count buffers)
    from cdp_rec.models import build_model
    from embeddings.sharding import plan_sharding

    cfg = load_config(None, ["model.name=lr_counts", "sharding.constraints={item: table_wise}"])
    with pytest.raises(ConfigError, match=r"sharding\.constraints\.item: model 'lr_counts' has no table 'item'"):
        plan_sharding(cfg, build_model(cfg), 2, 2, "cpu")


def test_jobconfig_default_is_valid():
    assert JobConfig().validate() == JobConfig()


def test_run_name_may_still_group_runs_in_subdirectories():
    assert load_config(None, ["train.run_name=sweep-3/lr 0.01"]).train.run_name == "sweep-3/lr 0.01"


def test_thread_count_beyond_the_cap_is_refused_at_load():
    # 100000 OpenMP threads segfaulted train at start-up (exit 139, no message); load_config only,
    # so a regression cannot take the test session down with it
    with pytest.raises(ConfigError, match=r"^--set train.threads=100000: train.threads must be <= 1024, got 100000$"):
        load_config(None, ["train.threads=100000"])
    assert load_config(None, ["train.threads=1024"]).train.threads == 1024
