"""The three guidance conditions and their Mixture-of-Experts fusion (paper §3.4).

* collaborative: query, user and item embeddings plus their pairwise bilinear
  interactions (FiBiNET-style ``(v_i W_ij) ⊙ v_j`` for (q,u), (q,i), (u,i)) through a
  two-layer MLP (eq. 5);
* context and scene: their embeddings concatenated, each through its own two-layer
  MLP (eq. 6);
* fusion: a softmax gate over the concatenated conditions, c = Σ_k g_k c_k (eq. 7-8),
  or a plain average when MoE is ablated.
"""

from __future__ import annotations

import torch
from torch import nn

from cdp_rec.models.layers import mlp


class CollaborativeCondition(nn.Module):
    """``[B, D] x 3 -> [B, out_dim]`` from query, user and item embeddings."""

    def __init__(self, dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.w_qu = nn.Linear(dim, dim, bias=False)
        self.w_qi = nn.Linear(dim, dim, bias=False)
        self.w_ui = nn.Linear(dim, dim, bias=False)
        self.mlp = mlp(6 * dim, [hidden], out_dim)

    def forward(self, q: torch.Tensor, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        bilinear = [self.w_qu(q) * u, self.w_qi(q) * i, self.w_ui(u) * i]
        return self.mlp(torch.cat([q, u, i, *bilinear], dim=-1))


class FeatureCondition(nn.Module):
    """Context or scene condition: ``[B, n * D] -> [B, out_dim]`` by a two-layer MLP."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, [hidden], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MoEFusion(nn.Module):
    """Fuse K conditions ``[B, C]`` into one ``[B, C]``.

    With ``gated`` a linear gate over their concatenation gives softmax weights
    ``[B, K]`` (personalised per sample); without it the conditions are averaged —
    the paper's "no MoE fusion" ablation.
    """

    def __init__(self, num_conditions: int, dim: int, gated: bool = True) -> None:
        super().__init__()
        self.num_conditions = num_conditions
        self.gate = nn.Linear(num_conditions * dim, num_conditions) if gated and num_conditions > 1 else None

    def forward(self, conditions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(c [B, C], gate weights [B, K])``."""
        stacked = torch.stack(conditions, dim=1)  # [B, K, C]
        if self.gate is None:
            weights = torch.full(stacked.shape[:2], 1.0 / self.num_conditions, device=stacked.device)
        else:
            weights = torch.softmax(self.gate(stacked.flatten(1)), dim=-1)
        return (weights.unsqueeze(-1) * stacked).sum(1), weights
