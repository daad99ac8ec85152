"""``hstu`` — Hierarchical Sequential Transduction Units (Zhai et al., ICML 2024), CDP §2.1 / §4.1.4 baseline.

A tiny HSTU encoder over the user's most recent ``model.attention_len`` behaviours with
the target item appended as the last token; the target token's output is the interest
the ranker sees. Each of the ``model.num_layers`` blocks is HSTU's pointwise
aggregated attention:

* ``U, V, Q, K = split(SiLU(f1(LayerNorm(X))))``, ``model.num_heads`` heads of width
  ``D / num_heads``;
* ``A = SiLU(Q Kᵀ + rab) / n`` — no softmax; ``rab`` is a learned relative-position bias
  per head, ``n`` the padded sequence length (``attention_len + 1``);
* ``Y = f2(LayerNorm(A V) ⊙ U)``, residual ``X + Y``.

Attention is causal in behaviour order (a behaviour sees itself and older behaviours;
the target token sees every behaviour and itself), padding is masked out.

Simplifications to fit here:

* ranking-only use: one target token appended, no interleaved action tokens, no
  generative next-item loss, no M-FALCON batched candidate scoring;
* ``rab`` has no time component (the logs carry no per-behaviour timestamp), only the
  relative position ``pos_i - pos_j`` clipped to ``attention_len``;
* a token is the sum of its item and category embeddings;
* tiny size (``num_layers`` blocks of width ``embedding_dim``), dense attention over
  the padded ``[B, L+1]`` window instead of HSTU's jagged kernels.

Sharded like every model (:mod:`embeddings.sharding` plans the EBC and the item /
category EmbeddingCollection).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchrec import JaggedTensor, KeyedTensor

from cdp_rec.config import ConfigError, JobConfig
from cdp_rec.data.schema import Batch
from cdp_rec.models.base import ModelOutput
from cdp_rec.models.sequence import SequenceCTRModel, recent_behaviours, with_behaviours


class HSTULayer(nn.Module):
    """One HSTU block: ``x [B, n, D] -> [B, n, D]``, ``H`` heads of width ``D / H``.

    ``f1`` is split in two linear maps, ``(V, K)`` and ``(U, Q)``, so the last block can
    compute ``U, Q`` for the target token only.
    """

    def __init__(self, dim: int, num_heads: int, max_distance: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hstu: model.embedding_dim={dim} must be divisible by model.num_heads={num_heads}")
        self.num_heads, self.head_dim, self.max_distance = num_heads, dim // num_heads, max_distance
        self.norm = nn.LayerNorm(dim)
        self.f1_vk = nn.Linear(dim, 2 * dim)
        self.f1_uq = nn.Linear(dim, 2 * dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.f2 = nn.Linear(dim, dim)
        self.rel_bias = nn.Embedding(max_distance + 1, num_heads)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, counts: torch.Tensor, target_only: bool = False
    ) -> torch.Tensor:
        """x ``[B, n, D]`` (``n - 1`` behaviours, then the target token), allowed ``[B, n, n]`` float.

        Returns ``[B, n, D]``, or only the target token's ``[B, 1, D]`` when
        ``target_only`` (the last block: nothing reads the behaviour rows after it).
        ``allowed`` already carries HSTU's ``1 / n`` normalisation.

        The relative-position bias of the behaviour rows depends on ``i - j`` only (one
        ``[H, n-1, n]`` gather shared by the batch) and the target row's on
        ``count - j``, so no ``[B, H, n, n]`` bias is built and the table's backward
        stays small.
        """
        b, n, dim = x.shape
        h, d = self.num_heads, self.head_dim
        xn = self.norm(x)
        v, k = F.silu(self.f1_vk(xn)).view(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, n, d]
        rows = 1 if target_only else n
        u, q = F.silu(self.f1_uq(xn[:, n - rows :])).view(b, rows, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        kt = k.transpose(-1, -2)
        idx = torch.arange(n, device=x.device)
        target_bias = self.rel_bias((counts.to(torch.int64)[:, None] - idx).clamp(0, self.max_distance))  # [B, n, H]
        target_logits = q[:, :, -1:] @ kt + target_bias.transpose(1, 2)[:, :, None, :]  # [B, H, 1, n]
        y = F.silu(target_logits).mul_(allowed[:, None, -1:]) @ v  # [B, H, 1, d]
        if not target_only:
            shared = self.rel_bias((idx[:-1, None] - idx).clamp(0, self.max_distance)).permute(2, 0, 1)  # [H, n-1, n]
            attn = F.silu(q[:, :, :-1] @ kt + shared).mul_(allowed[:, None, :-1])
            y = torch.cat([attn @ v, y], dim=2)  # [B, H, n, d]
        y = y.transpose(1, 2).reshape(b, rows, dim)
        return x[:, n - rows :] + self.f2(self.attn_norm(y) * u.transpose(1, 2).reshape(b, rows, dim))


class HSTUModel(SequenceCTRModel):
    """``forward(batch) -> (loss, {"loss", "logits", "bce"})``."""

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        m = cfg.model
        dim = m.embedding_dim
        super().__init__(cfg, device, seq_len=m.attention_len, interest_dim=dim)
        self.layers = nn.ModuleList(HSTULayer(dim, m.num_heads, m.attention_len) for _ in range(m.num_layers))
        self.out_norm = nn.LayerNorm(dim)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Append the last ``attention_len`` behaviours as ``seq_item_ids`` / ``seq_category_ids``."""
        return with_behaviours(batch, *recent_behaviours(batch, self.seq_len))

    @staticmethod
    def token_layout(mask: torch.Tensor) -> torch.Tensor:
        """``allowed [B, L+1, L+1]`` for behaviours ``[B, L]`` (right-padded) + the target token.

        Token positions: behaviour ``j`` is at ``j``, the target at ``count`` (after every
        behaviour); ``allowed[i, j]`` iff both tokens are real and ``pos_j <= pos_i``
        (causal). The relative position ``pos_i - pos_j`` indexes the bias.
        """
        b, length = mask.shape
        valid = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=mask.device)], dim=1)
        causal = torch.ones(length + 1, length + 1, dtype=torch.bool, device=mask.device).tril()
        return valid[:, :, None] & valid[:, None, :] & causal

    def interact(
        self, pooled: KeyedTensor, jts: dict[str, JaggedTensor], batch: Batch
    ) -> tuple[torch.Tensor, ModelOutput]:
        """After the lookups of :meth:`SequenceCTRModel.forward` (``batch`` from :meth:`prepare_batch`)."""
        emb = pooled.to_dict()
        look = self.behaviours(jts)
        n = self.seq_len + 1
        allowed = self.token_layout(look.mask).to(look.target.dtype) / n  # HSTU's 1/n
        x = torch.cat([look.keys, look.target[:, None, :]], dim=1)
        for i, layer in enumerate(self.layers):
            x = layer(x, allowed, look.counts, target_only=i == len(self.layers) - 1)
        return self.head(emb, look, self.out_norm(x[:, -1]), batch.labels)
