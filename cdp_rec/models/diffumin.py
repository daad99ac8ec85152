"""``diffumin`` — Diffusion-driven Multi-Interest Network (DiffuMIN, arXiv Aug 2025; only the abstract is at hand).

The abstract's three parts, as built here over the most recent ``model.attention_len``
behaviours (``K = model.num_interests`` channels, embedding width ``D``):

1. *Target-oriented multi-interest extraction.* The target item embedding ``t`` is
   projected into ``K`` directions and orthonormalised by Gram-Schmidt: the *interest
   channels* ``c_1..c_K`` (``[B, K, D]``, pairwise orthogonal unit vectors, an orthogonal
   decomposition of the target's neighbourhood). Every behaviour is assigned to the
   channels by ``softmax_k(s · <e_j, c_k>)`` (``s`` learned) and the genuine interest
   of channel ``k`` is the assignment-weighted mean of the behaviours, ``i_k [B, K, D]``.
2. *Diffusion guided by contextual interests and the channels.* The contextual interest
   ``g = MLP(user ⊕ query ⊕ context ⊕ scene ⊕ mean behaviour)`` ``[B, C]`` and the channel
   ``c_k`` condition an :class:`cdp_rec.models.denoiser.MLPDenoiser` that denoises
   ``i_k``: ε-MSE at a random t in training (ranker sees the one-step x̂0), the project's
   reverse sampler from the noised observation in eval -> augmented interests ``ĩ_k``.
3. *Contrastive alignment.* InfoNCE per channel between the generated ``ĩ_k`` and the
   genuine ``i_k`` of the same sample, the other samples of the batch as negatives
   (cosine similarity / ``model.contrastive_temperature``), weight
   ``model.contrastive_weight``.

Ranker: single-valued embeddings ⊕ target ⊕ ``i_1..i_K`` ⊕ ``ĩ_1..ĩ_K`` ⊕ log1p(count).
Loss = BCE + ``diffusion.loss_weight`` · MSE + ``contrastive_weight`` · InfoNCE.

Simplifications to fit here (the full paper and its code were not available):

* the extraction runs over the last ``attention_len`` behaviours, not the full lifelong
  sequence (the ``[B, L, D]`` tensor stays bounded); a behaviour (and the target) is the
  sum of its item and category embeddings;
* the channel construction (linear projections + Gram-Schmidt), the soft assignment and
  the contextual-interest MLP are our reading of the abstract, not the paper's equations;
* the diffusion uses the project's schedule, sampler and MLP denoiser (shared with CDP);
  the noise MSE and the InfoNCE skip samples with an empty history.

Sharded like every model (:mod:`embeddings.sharding` plans the EBC and the item /
category EmbeddingCollection); like CDP, each rank draws its own diffusion noise, so a
2-rank run is a different random draw from a 1-rank run.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchrec import JaggedTensor, KeyedTensor

from cdp_rec.config import ConfigError, JobConfig
from cdp_rec.data.schema import Batch
from cdp_rec.models.base import ModelOutput
from cdp_rec.models.conditions import FeatureCondition
from cdp_rec.models.denoiser import MLPDenoiser
from cdp_rec.models.diffusion import GaussianDiffusion
from cdp_rec.models.sequence import SequenceCTRModel, recent_behaviours, with_behaviours


def gram_schmidt(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Orthonormalise ``K`` vectors per sample: ``[B, K, D] -> [B, K, D]`` (differentiable)."""
    basis: list[torch.Tensor] = []
    for k in range(v.shape[1]):
        u = v[:, k]
        for b in basis:
            u = u - (u * b).sum(-1, keepdim=True) * b
        basis.append(u / u.norm(dim=-1, keepdim=True).clamp(min=eps))
    return torch.stack(basis, dim=1)


def info_nce(generated: torch.Tensor, genuine: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over channels of InfoNCE(generated_k -> genuine_k), in-batch negatives. ``[M, K, D]`` each."""
    g = F.normalize(generated, dim=-1)
    r = F.normalize(genuine, dim=-1)
    logits = torch.einsum("mkd,nkd->kmn", g, r) / temperature  # [K, M, M]
    k, m, _ = logits.shape
    labels = torch.arange(m, device=logits.device).repeat(k)
    return F.cross_entropy(logits.reshape(k * m, m), labels)


class DiffuMINModel(SequenceCTRModel):
    """``forward(batch) -> (loss, {"loss", "logits", "bce", "diffusion_mse", "contrastive", "assignment"})``."""

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        m = cfg.model
        dim, k = m.embedding_dim, m.num_interests
        if k > dim:
            raise ConfigError(f"model.num_interests={k} orthogonal channels need model.embedding_dim >= {k}, got {dim}")
        super().__init__(cfg, device, seq_len=m.attention_len, interest_dim=2 * k * dim)
        self.num_interests = k
        self.channel_proj = nn.Linear(dim, k * dim)
        self.assign_log_scale = nn.Parameter(torch.tensor(math.log(math.sqrt(dim))))
        n_side = len(cfg.features.context_features) + len(cfg.features.scene_features) + 3  # + user, query, mean
        self.context_interest = FeatureCondition(n_side * dim, m.condition_hidden, m.condition_dim)
        self.diffusion = GaussianDiffusion(m.diffusion)
        d = m.diffusion
        self.denoiser = MLPDenoiser(dim, m.condition_dim + dim, m.denoiser_hidden, m.time_embedding_dim,
                                    d.num_steps, d.time_embedding)
        self.loss_weight = d.loss_weight
        self.contrastive_weight = m.contrastive_weight
        self.temperature = m.contrastive_temperature

    def prepare_batch(self, batch: Batch) -> Batch:
        """Append the last ``attention_len`` behaviours as ``seq_item_ids`` / ``seq_category_ids``."""
        return with_behaviours(batch, *recent_behaviours(batch, self.seq_len))

    def channels(self, target: torch.Tensor) -> torch.Tensor:
        """Interest channels ``[B, K, D]``: orthonormal directions derived from the target."""
        return gram_schmidt(self.channel_proj(target).view(target.shape[0], self.num_interests, -1))

    def extract(
        self, behaviours: torch.Tensor, mask: torch.Tensor, channels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(interests [B, K, D], assignment [B, L, K])``; assignment is 0 at padding."""
        logits = torch.einsum("bld,bkd->blk", behaviours, channels) * self.assign_log_scale.exp()
        assign = torch.softmax(logits, dim=-1) * mask[..., None].to(behaviours.dtype)
        weight = assign.sum(1).clamp(min=1e-6)  # [B, K]
        interests = torch.einsum("blk,bld->bkd", assign, behaviours) / weight[..., None]
        return interests, assign

    def interact(
        self, pooled: KeyedTensor, jts: dict[str, JaggedTensor], batch: Batch
    ) -> tuple[torch.Tensor, ModelOutput]:
        """After the lookups of :meth:`SequenceCTRModel.forward` (``batch`` from :meth:`prepare_batch`)."""
        emb = pooled.to_dict()
        look = self.behaviours(jts)
        target, behaviours, mask, counts = look.target, look.keys, look.mask, look.counts
        b, k = target.shape[0], self.num_interests
        channels = self.channels(target)
        interests, assign = self.extract(behaviours, mask, channels)

        mean = behaviours.sum(1) / counts.clamp(min=1).to(target.dtype)[:, None]
        side = [emb["user_id"], emb["query_id"]]
        side += [emb[c] for c in (*self.features.context_features, *self.features.scene_features)]
        g = self.context_interest(torch.cat([*side, mean], dim=-1))  # [B, C]
        cond = torch.cat([g[:, None, :].expand(b, k, g.shape[-1]), channels], dim=-1).flatten(0, 1)
        has_obs = counts > 0
        x0 = interests.flatten(0, 1)
        augmented, mse = self.diffusion.denoise_pass(
            x0, self.denoiser.bind(cond), has_obs.repeat_interleave(k), self.training
        )
        augmented = augmented.view(b, k, -1)

        nce = torch.zeros((), device=target.device)
        if self.training and int(has_obs.sum()) > 1:
            nce = info_nce(augmented[has_obs], interests[has_obs], self.temperature)
        aux = self.loss_weight * mse + self.contrastive_weight * nce
        interest = torch.cat([interests.flatten(1), augmented.flatten(1)], dim=-1)
        return self.head(
            emb, look, interest, batch.labels, aux_loss=aux,
            diffusion_mse=mse, contrastive=nce, assignment=assign,
        )
