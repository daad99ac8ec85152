"""The ranking MLP shared by every model: features in, one click logit out (paper eq. 1, 10)."""

from __future__ import annotations

import torch
from torch import nn

from cdp_rec.models.layers import mlp


class RankingHead(nn.Module):
    """``[B, F] -> [B]`` logits; ``σ(logit)`` is the predicted CTR."""

    def __init__(self, in_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)
