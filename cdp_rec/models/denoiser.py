"""The conditional noise-prediction network ε_θ(x_t, t, c) (paper §3.5, eq. 9)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cdp_rec.models.layers import mlp


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style timestep embedding: ``[B] -> [B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class MLPDenoiser(nn.Module):
    """MLP over ``concat(x_t, time_embedding(t), c)`` predicting the noise ``[B, D]``.

    Input layout follows DiffRec/DDRM (concatenate state, time and guidance). With
    ``condition_dim=0`` the network is unconditional: the "no condition" ablation.
    """

    def __init__(
        self,
        dim: int,
        condition_dim: int,
        hidden: list[int],
        time_dim: int,
        num_steps: int,
        time_embedding: str = "sinusoidal",
    ) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.condition_dim = condition_dim
        if time_embedding == "learned":
            self.time_table: nn.Embedding | None = nn.Embedding(num_steps, time_dim)
            self.time_proj = nn.Identity()
        else:
            self.time_table = None
            self.time_proj = nn.Linear(time_dim, time_dim)
        self.net = mlp(dim + time_dim + condition_dim, hidden, dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """x_t ``[B, D]``, t ``[B]`` int64, c ``[B, C]`` or None -> ε̂ ``[B, D]``."""
        if self.time_table is not None:
            t_emb = self.time_table(t)
        else:
            t_emb = self.time_proj(sinusoidal_embedding(t, self.time_dim))
        parts = [x_t, t_emb]
        if self.condition_dim:
            if c is None:
                raise ValueError("this denoiser was built with a condition; got c=None")
            parts.append(c)
        return self.net(torch.cat(parts, dim=-1))
