"""``lr_counts``: streaming, leak-free click-rate counts (the floor of ``cdp-rec compare``)."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from cdp_rec.config import ConfigError, JobConfig, load_config
from cdp_rec.data.schema import Batch
from cdp_rec.models import build_model
from cdp_rec.models.lr_counts import COUNT_KEYS, LRCountsModel
from cdp_rec.training.optim import build_optimizers
from test_models import random_batch


def tiny_cfg() -> JobConfig:
    """Small vocabularies, so the counts of a few batches hit the same ids again."""
    cfg = JobConfig()
    cfg.model.name = "lr_counts"
    f = cfg.features
    f.num_users, f.num_items, f.num_queries, f.num_categories = 12, 20, 6, 3
    return cfg


def stream(cfg: JobConfig, n: int = 6, size: int = 32) -> list[Batch]:
    return [random_batch(cfg, batch=size, seed=100 + i) for i in range(n)]


def with_labels(batch: Batch, labels: torch.Tensor) -> Batch:
    return Batch(batch.sparse, labels, batch.user_ids, batch.request_ids)


def with_items(batch: Batch, cfg: JobConfig) -> Batch:
    """The batch with every item id moved to another item (everything else equal)."""
    kjt = batch.sparse
    values = kjt.values().clone()
    b = len(batch)
    start = kjt.keys().index("item_id") * b  # single-valued keys come first, one id per sample
    values[start:start + b] = (values[start:start + b] + 7) % cfg.features.num_items
    return Batch(KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths()),
                 batch.labels, batch.user_ids, batch.request_ids)


def train_stream(cfg: JobConfig, batches: list[Batch]) -> tuple[LRCountsModel, list[dict[str, torch.Tensor]]]:
    """The trainer's step (forward, backward, optimizer) over ``batches``; the outputs of each step."""
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizers(model, cfg.train)
    outs = []
    model.train()
    for batch in batches:
        loss, out = model(model.prepare_batch(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(out)
    return model, outs


def test_scores_use_only_strictly_earlier_batches():
    cfg = tiny_cfg()
    a = stream(cfg)
    k = 3
    # Stream b: batch k's labels flipped, the batches after it other labels *and* other items.
    b = a[:k] + [with_labels(a[k], 1 - a[k].labels)]
    b += [with_items(with_labels(x, 1 - x.labels), cfg) for x in a[k + 1:]]
    _, out_a = train_stream(cfg, a)
    _, out_b = train_stream(cfg, b)
    for i in range(k + 1):  # batch k too: its own labels never reach its scores
        assert torch.equal(out_a[i]["logits"], out_b[i]["logits"]), i
        assert torch.equal(out_a[i]["count_features"], out_b[i]["count_features"]), i
    # The test can see a difference: batch k's flipped labels change batch k + 1's counts.
    assert not torch.equal(out_a[k + 1]["count_features"], out_b[k + 1]["count_features"])
    # The first batch has seen nothing: prior rate 1/2, zero impressions, for every key.
    first = out_a[0]["count_features"]
    assert torch.all(first[:, 0::2] == 0) and torch.all(first[:, 1::2] == 0)


def test_eval_uses_every_training_batch_and_updates_nothing():
    cfg = tiny_cfg()
    batches = stream(cfg)
    model, _ = train_stream(cfg, batches)
    users = torch.cat([x.sparse["user_id"].values() for x in batches])
    labels = torch.cat([x.labels for x in batches]).double()
    assert torch.equal(model.impressions_user, torch.bincount(users, minlength=cfg.features.num_users).double())
    assert torch.equal(model.clicks_user, torch.bincount(users, weights=labels, minlength=cfg.features.num_users))
    assert model.total_impressions.item() == len(users)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        probe = random_batch(cfg, batch=32, seed=7)
        _, o1 = model(probe)
        _, o2 = model(probe)
    assert torch.equal(o1["logits"], o2["logits"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Smoothed rate of the first probe sample's user, from all the training counts.
    a, prior = cfg.model.counts_smoothing, (labels.sum() + 1) / (len(labels) + 2)
    u = probe.sparse["user_id"].values()[0]
    rate = (model.clicks_user[u] + a * prior) / (model.impressions_user[u] + a)
    assert o1["count_features"][0, 0].item() == pytest.approx(torch.logit(rate).item(), rel=1e-5)


def test_a_second_pass_recomputes_the_first_pass_features():
    cfg = tiny_cfg()
    batches = stream(cfg, n=4)
    model, outs = train_stream(cfg, batches + batches)  # two epochs over the same stream
    assert model.passes.item() == 1
    for i in range(4):  # epoch 2 never sees its own labels: the same ordered statistics
        assert torch.equal(outs[i]["count_features"], outs[4 + i]["count_features"]), i
    one_pass, _ = train_stream(cfg, batches)
    for key in COUNT_KEYS:
        assert torch.equal(getattr(model, f"impressions_{key}"), getattr(one_pass, f"impressions_{key}"))


def test_counts_are_checkpointed():
    cfg = tiny_cfg()
    model, _ = train_stream(cfg, stream(cfg))
    state = model.state_dict()
    assert {f"clicks_{k}" for k in COUNT_KEYS} <= set(state) and "total_impressions" in state
    fresh = build_model(cfg)
    fresh.load_state_dict(state)
    probe = random_batch(cfg, batch=16, seed=9)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(probe)[1]["logits"], fresh(probe)[1]["logits"])


def test_pair_table_is_bucketed():
    cfg = JobConfig()
    cfg.model.name = "lr_counts"
    cfg.features.num_users, cfg.features.num_categories = 5_000_000, 100
    cfg.features.num_items = cfg.features.num_queries = 10
    model = LRCountsModel(cfg, device="meta")
    assert model.clicks_user_category.shape == (1 << 22,)


def test_data_dependent_code_sits_behind_a_parameter_free_leaf():
    """TorchRec's pipeline traces ``forward`` with ``stage`` as a leaf: only the EBC call is traced."""
    from torchrec.distributed.train_pipeline.tracing import Tracer

    model = build_model(tiny_cfg())
    assert not list(model.stage.parameters()) and not list(model.stage.buffers())
    assert not any(k.startswith("stage.") for k in model.state_dict())
    graph = Tracer(leaf_modules=["stage", "ebc"]).trace(model)
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    assert calls == ["ebc", "stage"], calls


def test_one_process_steps_gather_nothing():
    from cdp_rec.models.lr_counts import gather_step, step_rows

    rows = step_rows(random_batch(tiny_cfg(), batch=8, seed=3))
    assert gather_step(rows) is rows  # no process group: the step is this batch


def test_dim_one_tables_plan_data_parallel_and_refuse_model_parallel_constraints():
    """fbgemm's fused EBC kernels need 4k columns per shard: the dim-1 one-hot weights are data-parallel."""
    from embeddings.sharding import plan_with_estimates

    cfg = tiny_cfg()
    planned = plan_with_estimates(cfg, build_model(cfg, device="meta"), 2, 2, "cpu")
    kinds = {t: ps.sharding_type for module in planned.plan.plan.values() for t, ps in module.items()}
    assert kinds and set(kinds) == {f"ctx_{c}" for c in cfg.features.context_features} | \
        {f"scene_{c}" for c in cfg.features.scene_features}
    assert set(kinds.values()) == {"data_parallel"}, kinds
    cfg.sharding.constraints = {"ctx_hour": "row_wise"}
    with pytest.raises(ConfigError, match=r"sharding\.constraints\.ctx_hour: row_wise needs a dim divisible by 4.*"
                                          r"table 'ctx_hour' has dim 1: use data_parallel"):
        plan_with_estimates(cfg, build_model(cfg, device="meta"), 2, 2, "cpu")


def test_learns_on_tiny_data(tmp_path):
    from cdp_rec.data.synthetic import generate_dataset
    from cdp_rec.training.trainer import train

    cfg = load_config(None, [
        "model.name=lr_counts", "data.samples_per_day=10000", "data.rows_per_file=10000",
        "data.row_group_size=5000", "train.batch_size=512", "train.dense_lr=0.003", "train.sparse_lr=0.01",
        "train.progress=false", "checkpoint.at_day_end=false", f"train.run_dir={tmp_path / 'runs'}", "train.epochs=1",
    ])
    generate_dataset(cfg, tmp_path / "data")
    m = train(cfg, tmp_path / "data").metrics
    assert m["auc"] > 0.57, m
