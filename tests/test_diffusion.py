import math

import pytest
import torch

from cdp_rec.config import DiffusionConfig
from cdp_rec.models.diffusion import GaussianDiffusion


def test_schedule_matches_closed_form():
    d = GaussianDiffusion(DiffusionConfig())
    betas = [0.005 + (0.01 - 0.005) * i / 99 for i in range(100)]
    ab = math.prod(1 - b for b in betas[:20])
    assert torch.isclose(d.alphas_cumprod[19], torch.tensor(ab), rtol=1e-6)
    assert abs(float(d.alphas_cumprod[19]) - 0.90) < 0.01  # "observation never drowned"
    assert abs(float(d.alphas_cumprod[99]) - math.prod(1 - b for b in betas)) < 1e-6
    assert abs(float(d.alphas_cumprod[99]) - 0.47) < 0.01
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])


def test_q_sample_statistics():
    torch.manual_seed(0)
    d = GaussianDiffusion(DiffusionConfig())
    x0 = torch.full((200_000, 1), 2.0)
    for step in (0, 19, 99):
        t = torch.full((x0.shape[0],), step)
        xt = d.q_sample(x0, t, torch.randn_like(x0))
        ab = float(d.alphas_cumprod[step])
        assert abs(xt.mean().item() - 2.0 * math.sqrt(ab)) < 0.01
        assert abs(xt.var().item() - (1 - ab)) < 0.01 * max(1 - ab, 0.05) + 1e-3


def test_predict_x0_inverts_q_sample_and_posterior_is_consistent():
    d = GaussianDiffusion(DiffusionConfig())
    x0, eps = torch.randn(64, 8), torch.randn(64, 8)
    t = torch.randint(0, 100, (64,))
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_x0(xt, t, eps), x0, atol=1e-4, rtol=1e-4)
    # With the true noise, one posterior step from x_t has mean at the right marginal scale.
    tt = torch.full((64,), 50)
    mean = d.posterior_mean(x0, d.q_sample(x0, tt, torch.zeros_like(x0)), tt)
    torch.testing.assert_close(mean, d.alphas_cumprod[49].sqrt() * x0, atol=1e-5, rtol=1e-5)


def test_reverse_with_oracle_denoiser_recovers_x0_and_counts_steps():
    for sampler in ("posterior", "ddim"):
        d = GaussianDiffusion(DiffusionConfig(sampler=sampler, sample_steps=0))  # every step
        x0 = torch.randn(16, 4)
        calls = []

        def oracle(x, t):  # knows x0, so returns the exact noise of x given t
            calls.append(int(t.reshape(-1)[0]))  # the sampler passes t 0-d (one step for the batch)
            return (x - d.sqrt_ab[t].unsqueeze(-1) * x0) / d.sqrt_one_minus_ab[t].unsqueeze(-1)

        out = d.reverse(d.start_state(x0), oracle)
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
        assert len(calls) == 20
        assert calls[0] == (19 if sampler == "posterior" else 99) and calls[-1] == 0


@pytest.mark.parametrize("time_embedding", ["sinusoidal", "learned"])
@pytest.mark.parametrize("condition_dim", [0, 12])
def test_bound_denoiser_equals_the_reference_forward(time_embedding, condition_dim):
    from cdp_rec.models.denoiser import MLPDenoiser

    torch.manual_seed(0)
    net = MLPDenoiser(8, condition_dim, [16, 16], 6, num_steps=100, time_embedding=time_embedding)
    x, t = torch.randn(5, 8, requires_grad=True), torch.tensor([0, 3, 99, 50, 3])
    c = torch.randn(5, condition_dim) if condition_dim else None
    ref = net(x, t, c)
    fast = net.bind(c)(x, t)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    # Same gradients for the weights and the input.
    g_ref = torch.autograd.grad(ref.square().sum(), [x, *net.parameters()], allow_unused=True)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, *net.parameters()], allow_unused=True)
    for a, b in zip(g_ref, g_fast):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if condition_dim:
        with pytest.raises(ValueError, match="condition"):
            net.bind(None)
