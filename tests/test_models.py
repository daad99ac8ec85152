"""Model contracts: shapes, ablation switches, eval determinism, gradient flow."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

from cdp_rec.config import ABLATIONS, JobConfig
from cdp_rec.data.schema import Batch, sparse_keys
from cdp_rec.models import build_model
from cdp_rec.models.cdp import CDPModel


def random_batch(cfg: JobConfig, batch: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    f = cfg.features
    sizes = {"query_id": f.num_queries, "user_id": f.num_users, "item_id": f.num_items,
             "category_id": f.num_categories, **f.context_features, **f.scene_features}
    keys = sparse_keys(f)
    values, lengths = [], []
    for k in keys[:-2]:
        values.append(torch.randint(0, sizes[k], (batch,), generator=g))
        lengths.append(torch.ones(batch, dtype=torch.long))
    hist_len = torch.randint(0, f.max_seq_len + 1, (batch,), generator=g)
    hist_len[0] = 0  # an empty history must not produce NaN
    n = int(hist_len.sum())
    values += [torch.randint(0, f.num_items, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)]
    lengths += [hist_len, hist_len]
    values[keys.index("category_id")] = torch.randint(0, 3, (batch,), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    return Batch(kjt, torch.randint(0, 2, (batch,), generator=g).float(), torch.arange(batch), torch.arange(batch) // 4)


@pytest.mark.parametrize("name, ablation", [("base", "none")] + [("cdp", a) for a in ABLATIONS])
def test_forward_backward_and_eval_determinism(name, ablation):
    cfg = JobConfig()
    cfg.model.name, cfg.model.ablation = name, ablation
    torch.manual_seed(0)
    model = build_model(cfg)
    assert_forward_contract(model, model.prepare_batch(random_batch(cfg)))


def assert_forward_contract(model: torch.nn.Module, batch: Batch) -> None:
    """Every zoo model: finite loss, detached ``[B]`` logits, finite grads, deterministic eval."""
    loss, out = model(batch)
    assert out["logits"].shape == (len(batch),) and torch.isfinite(loss)
    assert all(not out[k].requires_grad for k in ("loss", "logits", "bce"))
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        _, a = model(batch)
        _, b = model(batch)
    assert torch.equal(a["logits"], b["logits"]), "inference must be deterministic in eval mode"


def test_ablations_change_the_architecture():
    def gate_width(ablation):
        cfg = JobConfig()
        cfg.model.ablation = ablation
        m = CDPModel(cfg)
        return (m.collaborative is not None, m.context is not None,
                m.fusion.gate.out_features if m.fusion is not None and m.fusion.gate is not None else None,
                m.denoiser.condition_dim if m.denoiser is not None else None)

    assert gate_width("none") == (True, True, 3, 32)
    assert gate_width("no_collaborative") == (False, True, 2, 32)
    assert gate_width("no_context_scene") == (True, False, None, 32)
    assert gate_width("no_moe") == (True, True, None, 32)
    assert gate_width("no_condition") == (False, False, None, 0)
    assert gate_width("no_diffusion") == (False, False, None, None)  # the filtered mean alone


def test_inference_runs_the_configured_number_of_denoiser_steps():
    cfg = JobConfig()
    model = CDPModel(cfg).eval()
    calls = []
    # The output layer runs once per denoiser call (forward or the bound fast path).
    model.denoiser.net[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(model.prepare_batch(random_batch(cfg)))
    assert len(calls) == cfg.model.diffusion.sample_steps == 4  # the skip-step default (tests/test_sampler.py)
    model.train()
    calls.clear()
    model(model.prepare_batch(random_batch(cfg)))
    assert len(calls) == 1  # one-step x̂0 while training


def test_purified_interest_depends_on_the_condition():
    cfg = JobConfig()
    torch.manual_seed(0)
    model = CDPModel(cfg).eval()
    batch = random_batch(cfg)
    with torch.no_grad():
        _, out = model(model.prepare_batch(batch))
        # Same observations, other contexts -> other purified interests.
        jt = batch.sparse.to_dict()
        hour = jt["hour"].values()
        values = batch.sparse.values().clone()
        offset = sparse_keys(cfg.features).index("hour") * 16
        values[offset:offset + 16] = (hour + 5) % 24
        other = Batch(KeyedJaggedTensor(keys=batch.sparse.keys(), values=values, lengths=batch.sparse.lengths()),
                      batch.labels, batch.user_ids, batch.request_ids)
        _, out2 = model(model.prepare_batch(other))
    assert not torch.allclose(out["purified"], out2["purified"])
    assert out["gate"].shape == (16, 3) and torch.allclose(out["gate"].sum(-1), torch.ones(16))


@pytest.mark.parametrize("wiring", ["both", "purified"])
def test_cdp_ranker_input_purified_excludes_x0(wiring):
    """``purified`` (paper eq. 1): x0 reaches the ranker only through the purifier."""
    cfg = JobConfig()
    cfg.model.cdp_ranker_input = wiring
    torch.manual_seed(0)
    model = CDPModel(cfg)
    dim, n_single = cfg.model.embedding_dim, len(model.single_features)
    interests = 2 if wiring == "both" else 1
    assert model.ranker.mlp[0].in_features == dim * (n_single + interests) + 1
    batch = model.prepare_batch(random_batch(cfg, batch=16))

    def run(purifier):
        """Backward through the model with ``denoise_pass`` replaced; returns x0's gradient."""
        seen = {}
        original = model.diffusion.denoise_pass

        def spy(x0, fn, mask, training):
            x0.retain_grad()
            seen["x0"] = x0
            return purifier(original, x0, fn, mask, training)

        model.diffusion.denoise_pass = spy
        try:
            model.zero_grad()
            loss, _ = model(batch)
            loss.backward()
        finally:
            del model.diffusion.denoise_pass
        return seen["x0"].grad

    # A purifier that ignores x0: under "purified" no gradient can reach x0 at all.
    cut = run(lambda orig, x0, fn, mask, training: (torch.zeros_like(x0), torch.zeros(())))
    if wiring == "purified":
        assert cut is None or torch.all(cut == 0)
    else:
        assert cut is not None and cut.abs().sum() > 0
    # The real purifier: x0 does reach the ranker (through the purified interest).
    real = run(lambda orig, *args: orig(*args))
    assert real is not None and real.abs().sum() > 0


@pytest.mark.parametrize("name", ["base", "cdp", "diffrec", "ddrm"])
def test_history_bag_is_the_mean_torchrec_mean_pooling_gives(name):
    """The tables SUM-pool and the model divides the history bag (embeddings.tables.bag_mean):
    logits and every table gradient equal the same model whose tables MEAN-pool in fbgemm
    with the division dropped - the road the models took before (empty bags included)."""
    import copy

    from torchrec import EmbeddingBagCollection, PoolingType

    import embeddings.tables as tables

    cfg = JobConfig()
    cfg.features.max_seq_len = 12
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert {c.pooling for c in model.ebc.embedding_bag_configs()} == {PoolingType.SUM}
    mean_model = copy.deepcopy(model)
    configs = [copy.copy(c) for c in model.ebc.embedding_bag_configs()]
    for c in configs:
        c.pooling = PoolingType.MEAN
    mean_model.ebc = EmbeddingBagCollection(tables=configs)
    mean_model.ebc.load_state_dict(model.ebc.state_dict())
    batch = model.prepare_batch(random_batch(cfg, batch=32, seed=3))
    assert int((batch.sparse.lengths() == 0).sum()) > 0 and int(batch.sparse.lengths().max()) > 1

    def run(m, divide):
        with pytest.MonkeyPatch.context() as mp:
            if not divide:  # the MEAN tables already divided
                for mod in ("base", "cdp", "diffrec", "ddrm"):
                    mp.setattr(f"cdp_rec.models.{mod}.bag_mean", lambda pooled, lengths: pooled)
            torch.manual_seed(1)
            loss, out = m(batch)
        loss.backward()
        return out["logits"], {k: p.grad for k, p in m.ebc.named_parameters()}

    logits, grads = run(model, divide=True)
    ref_logits, ref_grads = run(mean_model, divide=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    assert tables.bag_mean(torch.zeros(2, 3), torch.tensor([0, 0])).eq(0).all()  # no 0/0
