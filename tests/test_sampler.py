"""The skip-step sampler (``model.diffusion.sample_steps``) and CDP's per-sample condition."""

import dataclasses

import pytest
import torch

from cdp_rec.config import ConfigError, DiffusionConfig, JobConfig, load_config
from cdp_rec.models.cdp import CDPModel
from cdp_rec.models.denoiser import MLPDenoiser
from cdp_rec.models.diffusion import GaussianDiffusion, sampler_steps
from tests.test_models import random_batch


def reference_reverse(d: GaussianDiffusion, x_start: torch.Tensor, denoise_fn) -> torch.Tensor:
    """The reverse loop as it was before skip-step sampling (verbatim but for ``d.``): the reference."""
    if d.cfg.sampler == "posterior":
        steps = list(range(d.cfg.inference_steps - 1, -1, -1))
    else:
        steps = torch.linspace(d.num_steps - 1, 0, d.cfg.inference_steps).round().long().tolist()
    x = x_start
    batch = x.shape[0]
    x0_hat = x
    for i, step in enumerate(steps):
        t = torch.full((batch,), step, dtype=torch.long, device=x.device)
        eps = denoise_fn(x, t)
        x0_hat = d.predict_x0(x, t, eps)
        if i == len(steps) - 1:
            break
        if d.cfg.sampler == "posterior":
            x = d.posterior_mean(x0_hat, x, t)
        else:
            t_prev = torch.full_like(t, steps[i + 1])
            x = d._at(d.sqrt_ab, t_prev) * x0_hat + d._at(d.sqrt_one_minus_ab, t_prev) * eps
    return x0_hat


def _bound_denoiser(seed: int = 0, batch: int = 64):
    torch.manual_seed(seed)
    net = MLPDenoiser(16, 12, [32, 32], 8, num_steps=100)
    x0, c = torch.randn(batch, 16), torch.randn(batch, 12)
    return net, x0, c


@pytest.mark.parametrize("sampler", ["posterior", "ddim"])
@pytest.mark.parametrize("inference_steps", [20, 7])
def test_all_steps_is_the_original_sampler_bit_for_bit(sampler, inference_steps):
    net, x0, c = _bound_denoiser()
    for k in (0, inference_steps):  # 0 = every step
        d = GaussianDiffusion(DiffusionConfig(sampler=sampler, inference_steps=inference_steps, sample_steps=k))
        with torch.no_grad():
            ref = reference_reverse(d, d.start_state(x0), net.bind(c))
            got = d.reverse(d.start_state(x0), net.bind(c))
        assert torch.equal(got, ref), float((got - ref).abs().max())
        # The reference forward (t as [B], no bound fast path) gives the same up to the matmul split.
        via_forward = d.reverse(d.start_state(x0), lambda x, t: net(x, t, c))
        torch.testing.assert_close(via_forward, ref, rtol=1e-5, atol=1e-6)


def test_all_steps_cdp_scores_equal_the_original_sampler():
    cfg = JobConfig()
    cfg.model.diffusion.sample_steps = 0  # every step (the default is 4 of them)
    torch.manual_seed(0)
    model = CDPModel(cfg).eval()
    batch = model.prepare_batch(random_batch(cfg, batch=32))
    with torch.no_grad():
        _, out = model(batch)
        model.diffusion.reverse = lambda x, fn: reference_reverse(model.diffusion, x, fn)
        try:
            _, ref = model(batch)
        finally:
            del model.diffusion.reverse
    assert torch.equal(out["logits"], ref["logits"]) and torch.equal(out["purified"], ref["purified"])


def test_visited_steps():
    assert sampler_steps(DiffusionConfig()) == [19, 13, 6, 0]  # the default: 4 of the 20 steps
    cfg = DiffusionConfig(sample_steps=0)
    assert sampler_steps(cfg) == list(range(19, -1, -1))
    expect = {1: [19], 2: [19, 0], 4: [19, 13, 6, 0], 5: [19, 14, 9, 5, 0], 10: [19, 17, 15, 13, 11, 8, 6, 4, 2, 0]}
    for k, steps in expect.items():
        assert sampler_steps(dataclasses.replace(cfg, sample_steps=k)) == steps
    for k in range(1, 21):
        steps = sampler_steps(dataclasses.replace(cfg, sample_steps=k))
        assert len(steps) == k and steps[0] == 19 and (k == 1 or steps[-1] == 0)
        assert all(a > b for a, b in zip(steps, steps[1:]))
    ddim = sampler_steps(DiffusionConfig(sampler="ddim", sample_steps=3))
    assert ddim == [99, 47, 0]  # 3 of the 20 DDIM steps 99, 94, ..., 0


def test_respaced_step_is_the_posterior_of_the_skipped_process():
    """x_s = c0 x0 + ct x_t equals DDIM's eta = 1 mean, sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps."""
    d = GaussianDiffusion(DiffusionConfig(sample_steps=4))
    ab = d.alphas_cumprod.double()
    torch.manual_seed(0)
    x0, eps = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    for i, (t, s) in enumerate(zip(d.steps, d.steps[1:])):
        x_t = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
        ours = d.step_coef_x0[i].double() * x0 + d.step_coef_xt[i].double() * x_t
        sigma2 = (1 - ab[s]) / (1 - ab[t]) * (1 - ab[t] / ab[s])
        ddim_eta1 = ab[s].sqrt() * x0 + (1 - ab[s] - sigma2).sqrt() * eps
        torch.testing.assert_close(ours, ddim_eta1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["posterior", "ddim"])
def test_skip_step_with_oracle_denoiser_recovers_x0(sampler):
    for k in (1, 2, 5, 20):
        d = GaussianDiffusion(DiffusionConfig(sampler=sampler, sample_steps=k))
        x0 = torch.randn(16, 4)
        calls = []

        def oracle(x, t):  # the exact noise of x given t (t is 0-d in the sampler)
            calls.append(int(t))
            return (x - d.sqrt_ab[t] * x0) / d.sqrt_one_minus_ab[t]

        torch.testing.assert_close(d.reverse(d.start_state(x0), oracle), x0, atol=1e-4, rtol=1e-4)
        assert calls == d.steps and len(calls) == k


@pytest.mark.parametrize("k", [1, 4])
def test_cdp_runs_k_denoiser_calls_and_one_condition_per_forward(k):
    cfg = JobConfig()
    cfg.model.diffusion.sample_steps = k
    torch.manual_seed(0)
    model = CDPModel(cfg).eval()
    calls = {"denoiser": 0, "fusion": 0, "collaborative": 0}
    model.denoiser.net[-1].register_forward_hook(lambda *a: calls.__setitem__("denoiser", calls["denoiser"] + 1))
    model.fusion.register_forward_hook(lambda *a: calls.__setitem__("fusion", calls["fusion"] + 1))
    model.collaborative.register_forward_hook(
        lambda *a: calls.__setitem__("collaborative", calls["collaborative"] + 1))
    with torch.no_grad():
        _, out = model(model.prepare_batch(random_batch(cfg)))
    assert calls == {"denoiser": k, "fusion": 1, "collaborative": 1}
    assert torch.isfinite(out["logits"]).all()


def test_sample_steps_range_is_checked_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.diffusion\.sample_steps must be >= 0, got -1"):
        load_config(None, ["model.diffusion.sample_steps=-1"])
    # At most inference_steps: more (or 0) is every step, and lowering inference_steps
    # below the default 4 needs no second override.
    for overrides, steps in ((["model.diffusion.sample_steps=21"], 20), (["model.diffusion.inference_steps=2"], 2),
                             (["model.diffusion.sample_steps=0"], 20), ([], 4)):
        cfg = load_config(None, overrides)
        assert len(sampler_steps(cfg.model.diffusion)) == steps, overrides
