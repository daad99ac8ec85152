"""Model zoo: every model under the one training loop, and the attention models' selection / masks.

The training check is "beats random" (AUC > 0.55 on the held-out day; a constant or
random scorer gets 0.5) after one short run on a reduced synthetic data set
(20k impressions per day, ``compare --quick``'s) generated once for the module.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from cdp_rec.compare import QUICK_OVERRIDES
from cdp_rec.config import ABLATIONS, MODEL_NAMES, ConfigError, JobConfig, load_config
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch, sparse_keys
from cdp_rec.models import ABLATION_PRESETS, MODELS, build_model
from cdp_rec.models.cdp import CDPModel
from cdp_rec.models.diffumin import DiffuMINModel, gram_schmidt, info_nce
from cdp_rec.models.din import DINModel
from cdp_rec.models.hstu import HSTUModel
from cdp_rec.models.qin import QINModel
from cdp_rec.models.sequence import SEQ_CATEGORIES, SEQ_ITEMS, kjt_behaviours, last_n, padded, topk_jagged
from cdp_rec.models.sim import SIMModel
from cdp_rec.models.twin import TWINModel
from cdp_rec.training.trainer import train
from test_models import assert_forward_contract, random_batch

ZOO = [n for n in MODEL_NAMES if n not in ("cdp", "base")]
NEW_MODULES = ("din", "sim", "twin", "qin", "ddrm", "diffrec", "hstu", "diffumin")
# Reduced data set (20k impressions per day) and learning rates that show learning on it:
# the same as ``cdp-rec compare --quick``.
SMALL = [*QUICK_OVERRIDES, "train.progress=false", "checkpoint.at_day_end=false", "train.epochs=1"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    from cdp_rec.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("zoo") / "data"
    generate_dataset(load_config(None, SMALL), root)
    return root


def hand_batch(histories, target_items, target_cats, labels=None) -> Batch:
    """A batch from explicit histories: ``histories[b]`` is a list of ``(item, category)``, oldest first."""
    cfg = JobConfig()
    b = len(histories)
    keys = sparse_keys(cfg.features)
    single = {k: torch.zeros(b, dtype=torch.long) for k in keys[:-2]}
    single["item_id"] = torch.tensor(target_items)
    single["category_id"] = torch.tensor(target_cats)
    single["user_id"] = torch.arange(b)
    lengths = torch.tensor([len(h) for h in histories])
    items = torch.tensor([i for h in histories for i, _ in h], dtype=torch.long)
    cats = torch.tensor([c for h in histories for _, c in h], dtype=torch.long)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([*(single[k] for k in keys[:-2]), items, cats]),
        lengths=torch.cat([torch.ones(b * (len(keys) - 2), dtype=torch.long), lengths, lengths]),
    )
    y = torch.tensor(labels if labels is not None else [i % 2 for i in range(b)], dtype=torch.float32)
    return Batch(kjt, y, torch.arange(b), torch.arange(b))


def jagged_lists(values: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [v.tolist() for v in torch.split(values, lengths.tolist())]


# --------------------------------------------------------------------------- registry / contract


def test_every_config_name_is_registered():
    assert set(MODELS) == set(MODEL_NAMES)
    assert set(ABLATION_PRESETS.values()) == set(ABLATIONS) - {"none"}


@pytest.mark.parametrize("name", NEW_MODULES)
def test_docstring_cites_the_paper_and_lists_simplifications(name):
    import importlib

    doc = importlib.import_module(f"cdp_rec.models.{name}").__doc__
    assert "Simplifications" in doc and ("§" in doc or "arXiv" in doc), name


@pytest.mark.parametrize("name", ZOO)
def test_forward_contract(name):
    cfg = JobConfig()
    cfg.model.name = name
    torch.manual_seed(0)
    model = build_model(cfg)
    assert sum(isinstance(m, EmbeddingBagCollection) for m in model.modules()) == 1
    assert_forward_contract(model, model.prepare_batch(random_batch(cfg, batch=16)))


def test_ablation_presets_are_cdp_with_the_ablation():
    for name, ablation in ABLATION_PRESETS.items():
        cfg = JobConfig()
        cfg.model.name = name
        model = build_model(cfg)
        assert isinstance(model, CDPModel)
        assert cfg.model.ablation == "none", "the caller's config must not be mutated"
    cfg = JobConfig()
    cfg.model.name = "cdp_no_moe"
    assert build_model(cfg).fusion.gate is None
    cfg.model.name = "cdp_no_condition"
    assert build_model(cfg).denoiser.condition_dim == 0
    cfg.model.ablation = "no_moe"
    with pytest.raises(ConfigError, match="presets model.ablation=no_condition"):
        build_model(cfg)


# --------------------------------------------------------------------------- selection on ids


def test_last_n_and_topk_jagged_hand_examples():
    values, lengths = last_n(torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([3, 0, 1, 2]), 2)
    assert jagged_lists(values, lengths) == [[2, 3], [], [4], [5, 6]]
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 3.0])
    pos, lens = topk_jagged(scores, torch.tensor([4, 0, 2]), 2)
    # bag 0: best two are positions 1 (0.9) and 3 (0.7), kept in chronological order
    assert pos.tolist() == [1, 3, 4, 5] and lens.tolist() == [2, 0, 2]


def test_sim_gsu_keeps_exactly_the_same_category_most_recent_top_k():
    cfg = JobConfig()
    cfg.model.top_k = 3
    model = SIMModel(cfg)
    batch = hand_batch(
        [
            [(10, 1), (11, 2), (12, 1), (13, 1), (14, 2), (15, 1)],  # 4 match -> 3 most recent
            [(20, 3), (21, 4), (22, 4)],  # target category 4: 2 match
            [(30, 5)],  # no match
            [],  # empty history
        ],
        target_items=[1, 2, 3, 4],
        target_cats=[1, 4, 6, 1],
    )
    prepared = model.prepare_batch(batch).sparse
    sel, sel_cat = prepared[SEQ_ITEMS], prepared[SEQ_CATEGORIES]
    assert jagged_lists(sel.values(), sel.lengths()) == [[12, 13, 15], [21, 22], [], []]
    assert jagged_lists(sel_cat.values(), sel_cat.lengths()) == [[1, 1, 1], [4, 4], [], []]
    loss, out = model(model.prepare_batch(batch))
    w = out["attention"]  # [B, H, K]
    assert w.shape == (4, cfg.model.num_heads, 3)
    assert torch.allclose(w[0].sum(-1), torch.ones(cfg.model.num_heads))
    assert torch.all(w[1, :, 2] == 0) and torch.all(w[2:] == 0)
    assert torch.isfinite(loss)


def test_din_attends_only_to_valid_positions():
    cfg = JobConfig()
    cfg.model.attention_len = 4
    torch.manual_seed(0)
    model = DINModel(cfg)
    batch = hand_batch([[(i, i % 3) for i in range(10, 16)], [(20, 0), (21, 1)], []], [1, 2, 3], [0, 0, 0])
    prepared = model.prepare_batch(batch)
    sel, sel_cat = prepared.sparse[SEQ_ITEMS], prepared.sparse[SEQ_CATEGORIES]
    assert jagged_lists(sel.values(), sel.lengths()) == [[12, 13, 14, 15], [20, 21], []]
    assert jagged_lists(sel_cat.values(), sel_cat.lengths()) == [[0, 1, 2, 0], [0, 1], []]
    _, out = model(prepared)
    w = out["attention"]
    assert w.shape == (3, 4)
    assert torch.all(w[1, 2:] == 0) and torch.all(w[2] == 0) and torch.all(w[0] != 0)
    # The interest ignores what sits in the padding.
    look = model.lookup(prepared.sparse)
    target, keys, mask = look.target, look.keys, look.mask
    assert keys.shape == (3, 4, cfg.model.embedding_dim) and look.counts.tolist() == [4, 2, 0]
    interest, _ = model.attention(target, keys, mask)
    keys2 = torch.where(mask[..., None], keys, torch.randn_like(keys))
    interest2, _ = model.attention(target, keys2, mask)
    torch.testing.assert_close(interest, interest2)
    assert torch.all(interest[2] == 0)


def test_padded_lookup_shapes():
    jt_values = torch.arange(10.0).view(5, 2)
    from torchrec import JaggedTensor

    x, mask = padded(JaggedTensor(values=jt_values, lengths=torch.tensor([2, 0, 3])), 4)
    assert x.shape == (3, 4, 2) and mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert torch.equal(x[2, :3], jt_values[2:]) and torch.all(x[~mask] == 0)


@pytest.mark.parametrize("cls", [TWINModel, QINModel])
def test_twin_and_qin_gsu_share_the_esu_metric(cls):
    cfg = JobConfig()
    cfg.model.top_k = 5
    torch.manual_seed(0)
    model = cls(cfg)
    batch = random_batch(cfg, batch=8, seed=3)
    emb = model.ebc(batch.sparse).to_dict()
    items, cats, lengths, scores = model.retrieve(batch, emb)
    jt = batch.sparse.to_dict()
    hist_len = jt[HIST_ITEMS].lengths()
    assert lengths.tolist() == hist_len.clamp(max=5).tolist()
    item_w, cat_w = model.tables()
    with torch.no_grad():
        target = item_w[jt["item_id"].values()] + cat_w[jt["category_id"].values()]
        query = model.attention_query(emb, target)
        r = model.esu.relevance_query(query)
        hist = torch.split(jt[HIST_ITEMS].values(), hist_len.tolist())
        hist_cat = torch.split(jt[HIST_CATEGORIES].values(), hist_len.tolist())
        want_items, want_cats = [], []
        for b, (h, c) in enumerate(zip(hist, hist_cat)):
            s = (item_w[h] + cat_w[c]) @ r[b]  # brute force over the padded-free full sequence
            keep = s.topk(min(5, len(s))).indices.sort().values  # top-K, chronological order
            want_items.append(h[keep].tolist())
            want_cats.append(c[keep].tolist())
        assert jagged_lists(items, lengths) == want_items and jagged_lists(cats, lengths) == want_cats
        # ... and its scores are the ESU's head-averaged attention logits on what it kept.
        look = model.lookup(kjt_behaviours(jt["item_id"].values(), jt["category_id"].values(), items, cats, lengths))
        torch.testing.assert_close(look.target, target)
        logits = model.esu.logits(query, look.keys).mean(1)  # [B, K]
        torch.testing.assert_close(logits[look.mask], scores, rtol=1e-5, atol=1e-6)


def test_qin_query_joins_retrieval_and_attention():
    cfg = JobConfig()
    cfg.model.top_k = 3
    torch.manual_seed(0)
    model = QINModel(cfg).eval()
    assert model.esu.w_q.in_features == 2 * cfg.model.embedding_dim
    batch = random_batch(cfg, batch=8, seed=1)
    keys = batch.sparse.keys()
    values = batch.sparse.values().clone()
    q0 = keys.index("query_id") * 8
    values[q0:q0 + 8] = (values[q0:q0 + 8] + 7) % cfg.features.num_queries
    other = Batch(KeyedJaggedTensor(keys=keys, values=values, lengths=batch.sparse.lengths()),
                  batch.labels, batch.user_ids, batch.request_ids)
    with torch.no_grad():
        s1 = model.retrieve(batch, model.ebc(batch.sparse).to_dict())[3]
        s2 = model.retrieve(other, model.ebc(other.sparse).to_dict())[3]
    assert not torch.allclose(s1, s2)


def test_hstu_token_layout_is_causal_and_masks_padding():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    allowed = HSTUModel.token_layout(mask)
    assert allowed.shape == (2, 4, 4)
    # sample 0: tokens b0, b1, pad, target (after every behaviour)
    assert allowed[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]]
    # empty history: the target sees only itself
    assert allowed[1].int().tolist() == [[0] * 4, [0] * 4, [0] * 4, [0, 0, 0, 1]]


def test_hstu_target_output_ignores_padding_content():
    cfg = JobConfig()
    cfg.model.attention_len = 4
    torch.manual_seed(0)
    model = HSTUModel(cfg).eval()
    batch = model.prepare_batch(hand_batch([[(10, 0), (11, 0)], [(i, 0) for i in range(5)]], [1, 2], [0, 0]))
    look = model.lookup(batch.sparse)
    target, keys, mask, counts = look.target, look.keys, look.mask, look.counts
    allowed = model.token_layout(mask).float() / (cfg.model.attention_len + 1)

    def run(k):
        x = torch.cat([k, target[:, None]], 1)
        for i, layer in enumerate(model.layers):
            x = layer(x, allowed, counts, target_only=i == len(model.layers) - 1)
        return x[:, -1]

    noisy = torch.where(mask[..., None], keys, torch.randn_like(keys))
    with torch.no_grad():
        torch.testing.assert_close(run(keys), run(noisy))


def test_diffumin_channels_are_orthonormal_and_assignment_masks_padding():
    cfg = JobConfig()
    torch.manual_seed(0)
    model = DiffuMINModel(cfg)
    c = model.channels(torch.randn(5, cfg.model.embedding_dim))
    gram = torch.einsum("bkd,bjd->bkj", c, c)
    torch.testing.assert_close(gram, torch.eye(cfg.model.num_interests).expand_as(gram), atol=1e-5, rtol=0)
    keys = torch.randn(5, 6, cfg.model.embedding_dim)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 0, 1, 2])[:, None]
    interests, assign = model.extract(keys, mask, c)
    assert interests.shape == (5, cfg.model.num_interests, cfg.model.embedding_dim)
    torch.testing.assert_close(assign.sum(-1), mask.float())
    assert torch.all(interests[2] == 0)
    assert torch.allclose(gram_schmidt(torch.eye(3)[None]), torch.eye(3)[None])
    g = torch.randn(6, 2, 4)
    assert info_nce(g, g, 0.1) < info_nce(g, g.roll(1, 0), 0.1)


def test_diffumin_rejects_more_channels_than_dimensions():
    cfg = JobConfig()
    cfg.model.num_interests = cfg.model.embedding_dim + 1
    with pytest.raises(ConfigError, match="num_interests"):
        DiffuMINModel(cfg)


# --------------------------------------------------------------------------- training


TRAINED = [n for n in ZOO if n not in ABLATION_PRESETS] + ["cdp_no_moe", "cdp_no_diffusion"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_short_run_learns(name, small_root, tmp_path):
    cfg = load_config(None, [*SMALL, f"model.name={name}", f"train.run_dir={tmp_path}"])
    result = train(cfg, small_root)
    m = json.loads((result.run_dir / "metrics.json").read_text())
    # Every training row is trained on once or held out for validation (data.valid_fraction).
    assert m["model"] == name
    assert m["num_train_samples"] + m["validation"][-1]["num_samples"] == 2 * cfg.data.samples_per_day
    assert m["final_train_loss"] is not None and math.isfinite(m["final_train_loss"])
    assert m["auc"] > 0.55, m


# --------------------------------------------------------------------------- compare


@pytest.mark.slow
def test_compare_quick_writes_tables(small_root, tmp_path, capsys):
    from cdp_rec.cli import main

    out = tmp_path / "cmp"
    rc = main(["compare", "--quick", "--models", "sim,base", "--seeds", "1", "--out", str(out),
               "--data", str(small_root), "--set", "train.eval_batch_size=2048", "--set", "train.epochs=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| SIM |" in printed and "| Base (mean pooling) |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["runs"]] == ["base", "sim"]
    assert all(r["metrics"]["auc"] > 0.5 and r["inference_ms_per_batch"] > 0 for r in results["runs"])
    assert (out / "results.md").read_text().startswith("# Model comparison")
    m = results["runs"][0]["metrics"]  # how many groups UAUC / GAUC average is part of the report
    assert f"{m['num_users_used']:,} / {m['num_requests_used']:,}" in (out / "results.md").read_text()
    assert "matplotlib is not installed" in printed or (out / "results.png").exists()
    # Running it again continues an interrupted compare: both finished runs are reused as they are.
    assert main(["compare", "--quick", "--models", "sim,base", "--seeds", "1", "--out", str(out),
                 "--data", str(small_root), "--set", "train.eval_batch_size=2048", "--set", "train.epochs=1"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    again = json.loads((out / "results.json").read_text())
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in results["runs"]]
    # A metrics.json cut short (a run killed while writing it) is trained again, not a traceback.
    (Path(again["runs"][0]["run_dir"]) / "metrics.json").write_text('{"auc": 0.')
    assert main(["compare", "--quick", "--models", "sim,base", "--seeds", "1", "--out", str(out),
                 "--data", str(small_root), "--set", "train.eval_batch_size=2048", "--set", "train.epochs=1"]) == 0
    assert capsys.readouterr().out.count("reusing") == 1


@pytest.mark.slow
def test_compare_jobs_trains_in_workers_and_tabulates_once(small_root, tmp_path, capsys):
    from cdp_rec.cli import main

    out = tmp_path / "cmpj"
    assert main(["compare", "--quick", "--models", "base,cdp_no_diffusion", "--seeds", "1", "--jobs", "2",
                 "--out", str(out), "--data", str(small_root), "--set", "train.eval_batch_size=2048",
                 "--set", "train.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"worker 0 \(\d+ thread\(s\)\): base ->", printed), printed
    assert re.search(r"worker 1 \(\d+ thread\(s\)\): cdp_no_diffusion ->", printed), printed
    assert printed.count("reusing") == 2  # the parent trains nothing itself
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["runs"]] == ["base", "cdp_no_diffusion"]
    assert all(r["metrics"]["auc"] > 0.5 for r in results["runs"])


def test_compare_rejects_unknown_models():
    from cdp_rec.compare import resolve_models

    assert resolve_models("all")[:2] == ["lr_counts", "base"] and "cdp_no_moe" in resolve_models("all")
    assert resolve_models("cdp,sim") == ["sim", "cdp"]
    with pytest.raises(ConfigError, match="sasrec"):
        resolve_models("sim,sasrec")


def test_compare_tables_report_mean_and_std_over_seeds():
    from cdp_rec.compare import markdown, summarize

    def run(model, seed, auc):
        return {"model": model, "seed": seed, "inference_ms_per_batch": 2.0,
                "metrics": {"auc": auc, "uauc": 0.55, "gauc": None, "train_samples_per_s": 1000.0}}

    runs = [run("cdp", 0, 0.61), run("cdp", 1, 0.63), run("cdp_no_moe", 0, 0.60), run("cdp_no_moe", 1, 0.60)]
    summaries = summarize(runs)
    assert summaries[0].mean["auc"] == pytest.approx(0.62) and summaries[0].std["auc"] == pytest.approx(0.0141, abs=1e-4)
    md = markdown(summaries, {"seeds": "0, 1"})
    assert "| CDP | 0.6200 ± 0.0141 | 0.5500 ± 0.0000 | n/a |" in md
    assert "## Table 2: CDP ablations" in md and "| No MoE fusion | 0.6000 ± 0.0000 |" in md


def test_compare_marks_the_count_floor():
    from cdp_rec.compare import markdown, resolve_models, summarize

    def run(model, seed, auc):
        return {"model": model, "seed": seed, "inference_ms_per_batch": 1.0,
                "metrics": {"auc": auc, "uauc": 0.55, "gauc": 0.55, "train_samples_per_s": 1000.0}}

    assert resolve_models("cdp,lr_counts,base") == ["lr_counts", "base", "cdp"]
    runs = [run("lr_counts", 0, 0.60), run("base", 0, 0.59), run("cdp", 0, 0.62)]
    md = markdown(summarize(runs), {"seeds": "0"})
    assert "AUC - floor |" in md
    assert "| LR on click counts (floor) | 0.6000 | 0.5500 | 0.5500 | 1,000 | 1.0 | floor |" in md.splitlines()
    assert "| 1.0 | -0.0100 |" in md and "| 1.0 | +0.0200 |" in md
    # Without the floor the tables keep their columns.
    assert "floor" not in markdown(summarize(runs[1:]), {"seeds": "0"})
