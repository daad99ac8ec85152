"""Gaussian diffusion schedule, forward noising and the deterministic reverse samplers.

Indices are 0-based: step ``t`` in ``[0, T)`` has ``ᾱ_t = Π_{s<=t} (1 - β_s)``, so
"noise to step 20" is ``t = 19``. The denoiser predicts the noise ε (paper eq. 11);
``x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)``.

Skip-step sampling (``sample_steps = K``): the denoiser runs at K of the sampler's
``inference_steps`` steps, evenly strided with the first and the last kept. Between two
kept steps ``t > s`` the posterior sampler takes the posterior mean of the *respaced*
process (Nichol & Dhariwal's respacing; also DDIM's η = 1 update without its noise):
``q(x_s | x_t, x̂0)`` with ``ᾱ_{t|s} = ᾱ_t / ᾱ_s`` and ``β_{t|s} = 1 - ᾱ_{t|s}``, so

    x_s = β_{t|s} sqrt(ᾱ_s) / (1 - ᾱ_t) · x̂0 + (1 - ᾱ_s) sqrt(ᾱ_{t|s}) / (1 - ᾱ_t) · x_t.

A unit stride uses the schedule's own ``β_t`` and ``1 - β_t``, so K = ``inference_steps``
is the plain posterior sampler bit for bit (tests/test_sampler.py keeps a copy of the
original loop as the reference). The DDIM sampler (η = 0) takes arbitrary strides as is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cdp_rec.config import DiffusionConfig

# denoise_fn(x_t [B, D], t [B] int64) -> ε̂ [B, D]
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GaussianDiffusion(nn.Module):
    """Linear-β schedule (``noise_scale * linspace(beta_start, beta_end, T)``) and samplers.

    With the paper's 0.005 -> 0.01 over 100 steps, ᾱ_20 ≈ 0.90 and ᾱ_100 ≈ 0.47: the
    observation is never drowned, which is what "purify" (rather than generate) needs.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        betas = cfg.noise_scale * torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_steps, dtype=torch.float64)
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        # Buffers are float32 for the math on activations; computed in float64 so the
        # cumulative product over many steps does not drift.
        for name, value in {
            "betas": betas,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_ab": ab.sqrt(),
            "sqrt_one_minus_ab": (1 - ab).sqrt(),
            # q(x_{t-1} | x_t, x0) = N(c0 * x0 + ct * x_t, β̃_t)
            "posterior_coef_x0": betas * ab_prev.sqrt() / (1 - ab),
            "posterior_coef_xt": (1 - ab_prev) * alphas.sqrt() / (1 - ab),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.steps = sampler_steps(cfg)
        # Per transition steps[i] -> steps[i + 1] (float64 math as above, then float32).
        t_now = torch.tensor(self.steps[:-1], dtype=torch.long)
        t_next = torch.tensor(self.steps[1:], dtype=torch.long)
        unit = t_now - t_next == 1
        ab_t, ab_s = ab[t_now], ab[t_next]
        alpha = torch.where(unit, alphas[t_now], ab_t / ab_s)
        beta = torch.where(unit, betas[t_now], 1.0 - ab_t / ab_s)
        # Written exactly like posterior_coef_* above: for unit strides the same float64 ops
        # on the same inputs, hence the same float32 coefficients.
        self.register_buffer("step_coef_x0", (beta * ab_s.sqrt() / (1 - ab_t)).float(), persistent=False)
        self.register_buffer("step_coef_xt", ((1 - ab_s) * alpha.sqrt() / (1 - ab_t)).float(), persistent=False)

    @property
    def num_steps(self) -> int:
        return self.cfg.num_steps

    @staticmethod
    def _at(buf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return buf[t].unsqueeze(-1)  # [B] -> [B, 1], broadcast over D

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε`` (paper eq. 4). x0, noise ``[B, D]``; t ``[B]``."""
        return self._at(self.sqrt_ab, t) * x0 + self._at(self.sqrt_one_minus_ab, t) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x_t - self._at(self.sqrt_one_minus_ab, t) * eps) / self._at(self.sqrt_ab, t)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at(self.posterior_coef_x0, t) * x0 + self._at(self.posterior_coef_xt, t) * x_t

    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (batch,), device=device, generator=generator)

    def start_state(self, x0: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The state the reverse process starts from, at step ``inference_steps`` (or T for DDIM).

        Inference treats the pooled observation as a *noised* sample (DiffuMIN starts
        from the observation, not pure noise): its mean ``sqrt(ᾱ_K) x0`` by default, so
        eval scores are deterministic, or a draw of q(x_K | x0) when
        ``inference_start_noise`` is set.
        """
        k = self.cfg.inference_steps - 1 if self.cfg.sampler == "posterior" else self.num_steps - 1
        t = torch.full((x0.shape[0],), k, dtype=torch.long, device=x0.device)
        if self.cfg.inference_start_noise:
            if noise is None:
                noise = torch.randn_like(x0)
            return self.q_sample(x0, t, noise)
        return self._at(self.sqrt_ab, t) * x0

    def reverse(self, x_start: torch.Tensor, denoise_fn: DenoiseFn) -> torch.Tensor:
        """Run the configured deterministic sampler from ``x_start`` down to x̂0 ``[B, D]``.

        ``posterior``: steps K-1, ..., 0 with posterior means (K = inference_steps,
        one denoiser call per step). ``ddim``: η = 0 DDIM over K steps strided across
        the full schedule. With ``sample_steps`` only those of the steps (:attr:`steps`),
        respaced as in the module docstring.

        ``denoise_fn`` gets ``t`` as a 0-d int64 tensor (one step for the whole batch),
        so a bound denoiser adds its time term as one ``[H]`` row instead of gathering
        ``[B, H]``. The condition is whatever ``denoise_fn`` was bound to: computed once
        per sample, before the loop, never per step.
        """
        x = x_start
        x0_hat = x
        last = len(self.steps) - 1
        for i, step in enumerate(self.steps):
            t = torch.tensor(step, dtype=torch.long, device=x.device)
            eps = denoise_fn(x, t)
            x0_hat = (x - self.sqrt_one_minus_ab[step] * eps) / self.sqrt_ab[step]  # predict_x0 at one step
            if i == last:
                break
            if self.cfg.sampler == "posterior":
                x = self.step_coef_x0[i] * x0_hat + self.step_coef_xt[i] * x
            else:
                s = self.steps[i + 1]
                x = self.sqrt_ab[s] * x0_hat + self.sqrt_one_minus_ab[s] * eps
        return x0_hat

    def denoise_pass(
        self, x0: torch.Tensor, denoise_fn: DenoiseFn, has_obs: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one diffusion pass every diffusion model here makes: ``(denoised [B, D], mse [])``.

        Training: ε-MSE at a random t, averaged over rows where ``has_obs`` (``[B]`` bool),
        and the one-step x̂0 (or the full sampler when ``train_x0 == "full"``). Eval: the
        reverse sampler from the noised observation, MSE 0.
        """
        if not training:
            return self.reverse(self.start_state(x0), denoise_fn), torch.zeros((), device=x0.device)
        t = self.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        eps = denoise_fn(x_t, t)
        w = has_obs.to(x0.dtype)
        mse = (((eps - noise) ** 2).mean(-1) * w).sum() / w.sum().clamp(min=1.0)
        if self.cfg.train_x0 == "one_step":
            return self.predict_x0(x_t, t, eps), mse
        return self.reverse(self.start_state(x0), denoise_fn), mse


def sampler_steps(cfg: DiffusionConfig) -> list[int]:
    """Steps at which the reverse sampler calls the denoiser, descending (ending at 0 unless K = 1).

    The sampler's own steps (``posterior``: ``inference_steps - 1, ..., 0``; ``ddim``:
    ``inference_steps`` steps strided over ``[num_steps - 1, 0]``), then, with
    ``sample_steps = K``, the K of them at evenly rounded positions ``i (n - 1) / (K - 1)``
    (the first and the last always; K = 1 keeps the first alone).
    """
    if cfg.sampler == "posterior":
        steps = list(range(cfg.inference_steps - 1, -1, -1))
    else:
        steps = torch.linspace(cfg.num_steps - 1, 0, cfg.inference_steps).round().long().tolist()
    n, k = len(steps), cfg.sample_steps or len(steps)
    if k >= n:
        return steps
    if k == 1:
        return steps[:1]
    # round(i (n - 1) / (k - 1)) in integers, half up: strictly increasing since the stride is >= 1.
    return [steps[(2 * i * (n - 1) + (k - 1)) // (2 * (k - 1))] for i in range(k)]
