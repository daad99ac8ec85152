from pathlib import Path

import pytest

from cdp_rec.config import ConfigError, JobConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_tiny_yaml_is_the_embedded_default():
    assert load_config(CONFIGS / "tiny.yaml") == JobConfig()
    assert load_config(None) == JobConfig()


@pytest.mark.parametrize("name", ["tiny", "small", "industrial", "public-small"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.diffusion.num_steps == 100
    assert cfg.model.diffusion.inference_steps == 20


def test_industrial_is_the_paper_setting():
    cfg = load_config(CONFIGS / "industrial.yaml")
    assert (cfg.data.train_days, cfg.data.test_days, cfg.data.samples_per_day) == (60, 1, 300_000_000)
    assert cfg.features.max_seq_len == 2000 and cfg.train.batch_size == 4096
    assert (cfg.train.dense_lr, cfg.train.sparse_lr) == (2.5e-4, 5e-4)
    d = cfg.model.diffusion
    assert (d.beta_start, d.beta_end) == (0.005, 0.01)
    assert cfg.features.num_users >= 100_000_000 and cfg.features.num_items >= 100_000_000
    assert cfg.features.num_queries >= 10_000_000 and cfg.features.num_categories >= 1000


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.name=base", "train.batch_size=512", "train.dense_lr=1e-3",
                                              "features.context_features.hour=12", "model.denoiser_hidden=[8, 8]"])
    assert cfg.model.name == "base" and cfg.train.batch_size == 512 and cfg.train.dense_lr == 1e-3
    assert cfg.features.context_features == {"hour": 12, "page": 8}
    assert cfg.model.denoiser_hidden == [8, 8]
    assert cfg.hash() != JobConfig().hash()


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.nme=cdp", "unknown key model.nme"),
        ("train.batch_size=abc", "train.batch_size must be an integer"),
        ("train.batch_size=0", "train.batch_size must be > 0"),
        ("model.name=sasrec", "model.name must be one of"),
        ("model.diffusion.inference_steps=200", "inference_steps"),
        ("train.progress=maybe", "train.progress must be true or false"),
        ("model", "expected key=value"),
        ("=x", "the key '' has an empty part"),
        ("train..seed=1", "the key 'train..seed' has an empty part"),
    ],
)
def test_bad_override_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_bad_yaml_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embeding_dim: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key model\.embeding_dim"):
        load_config(bad)
    bad.write_text("train:\n  dense_lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.dense_lr must be a number"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_context_columns_are_declared_not_hardcoded(tmp_path):
    p = tmp_path / "ctx.yaml"
    p.write_text("features:\n  context_features: {hour: 24, weekday: 7}\n")
    assert load_config(p).features.context_features == {"hour": 24, "weekday": 7}
    p.write_text("features:\n  context_features: {label: 2}\n")
    with pytest.raises(ConfigError, match="context_features.label clashes"):
        load_config(p)


def test_cli_reads_set_flags_from_an_at_file(tmp_path, capsys):
    """``@FILE`` is an import's train_args (shell words, quoted JSON, comments) on any command line."""
    from cdp_rec.cli import build_parser

    args_file = tmp_path / "train_args"
    args_file.write_text("--set data.train_days=3 --set 'features.id_mapping={\"user\": \"managed\", "
                         "\"item\": \"hash\"}'  # written by cdp-rec import\n--set train.epochs=2\n")
    a = build_parser().parse_args(["train", "--config", "configs/tiny.yaml", f"@{args_file}", "--set", "train.seed=3"])
    assert a.set == ["data.train_days=3", 'features.id_mapping={"user": "managed", "item": "hash"}',
                     "train.epochs=2", "train.seed=3"]
    cfg = load_config(CONFIGS / "tiny.yaml", a.set)
    assert cfg.features.id_mapping == {"user": "managed", "item": "hash"} and cfg.train.epochs == 2
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", f"@{tmp_path / 'missing'}"])
    assert e.value.code == 2 and "missing" in capsys.readouterr().err
    args_file.write_text("--set 'train.seed=1\n")  # an unclosed quote: one line, exit 2
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", f"@{args_file}"])
    assert e.value.code == 2 and "an @FILE line cannot be split into words (No closing quotation)" in \
        capsys.readouterr().err
