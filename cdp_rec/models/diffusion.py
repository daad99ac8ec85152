"""Gaussian diffusion schedule, forward noising and the deterministic reverse samplers.

Indices are 0-based: step ``t`` in ``[0, T)`` has ``ᾱ_t = Π_{s<=t} (1 - β_s)``, so
"noise to step 20" is ``t = 19``. The denoiser predicts the noise ε (paper eq. 11);
``x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)``.
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
        the full schedule.
        """
        if self.cfg.sampler == "posterior":
            steps = list(range(self.cfg.inference_steps - 1, -1, -1))
        else:
            steps = torch.linspace(self.num_steps - 1, 0, self.cfg.inference_steps).round().long().tolist()
        x = x_start
        batch = x.shape[0]
        x0_hat = x
        for i, step in enumerate(steps):
            t = torch.full((batch,), step, dtype=torch.long, device=x.device)
            eps = denoise_fn(x, t)
            x0_hat = self.predict_x0(x, t, eps)
            if i == len(steps) - 1:
                break
            if self.cfg.sampler == "posterior":
                x = self.posterior_mean(x0_hat, x, t)
            else:
                t_prev = torch.full_like(t, steps[i + 1])
                x = self._at(self.sqrt_ab, t_prev) * x0_hat + self._at(self.sqrt_one_minus_ab, t_prev) * eps
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
