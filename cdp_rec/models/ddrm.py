"""``ddrm`` — Denoising Diffusion Recommender Model (Zhao et al., SIGIR 2024), CDP §2.2 / §4.1.4 baseline.

DDRM makes the *user and item embeddings* robust to noisy feedback: each is noised by
the forward process and denoised by a network guided by the collaborative signal of the
other side. Here, for a (user, target item) impression:

* user side: x0 = user embedding, denoised by ε_u(x_t, t, c = target item embedding);
* item side: x0 = target item embedding, denoised by ε_i(x_t, t, c = user embedding);
* both use the project's schedule, :class:`cdp_rec.models.denoiser.MLPDenoiser` and
  sampler (:class:`cdp_rec.models.diffusion.GaussianDiffusion`): ε-MSE at a random t and
  the one-step x̂0 in training, ``inference_steps`` reverse steps from the noised
  observation in eval (as CDP);
* ranker: single-valued embeddings ⊕ mean of the whole history ⊕ denoised user ⊕
  denoised item ⊕ log1p(count) -> MLP -> BCE; loss = BCE + ``diffusion.loss_weight`` ·
  (MSE_user + MSE_item) / 2.

Simplifications to fit here:

* DDRM starts the inference-time user denoising from the average embedding of the
  user's interacted items; here both sides start from their own noised observation
  (the project's sampler), and the history mean enters the ranker directly instead;
* DDRM trains with a BPR ranking loss plus reconstruction on implicit feedback; here
  the CTR BCE replaces BPR and the denoisers predict ε (the design notes' default), not x0;
* the history is pooled whole (no category filter), from the same pooled ``item`` table.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import HIST_ITEMS, Batch
from cdp_rec.models.base import ModelOutput
from cdp_rec.models.denoiser import MLPDenoiser
from cdp_rec.models.diffusion import GaussianDiffusion
from cdp_rec.models.ranker import RankingHead
from embeddings.tables import bag_mean, build_embedding_bag_collection, single_value_features, table_specs


class DDRMModel(nn.Module):
    """``forward(batch) -> (loss, {"loss", "logits", "bce", "diffusion_mse", "user_denoised", "item_denoised"})``."""

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        m = cfg.model
        dim = m.embedding_dim
        self.single_features = single_value_features(cfg.features)
        self.ebc = build_embedding_bag_collection(table_specs(cfg.features, (HIST_ITEMS,)), dim, device)
        self.diffusion = GaussianDiffusion(m.diffusion)

        def denoiser() -> MLPDenoiser:
            d = m.diffusion
            return MLPDenoiser(dim, dim, m.denoiser_hidden, m.time_embedding_dim, d.num_steps, d.time_embedding)

        self.user_denoiser = denoiser()
        self.item_denoiser = denoiser()
        self.loss_weight = m.diffusion.loss_weight
        self.ranker = RankingHead(dim * (len(self.single_features) + 3) + 1, m.ranker_hidden)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Nothing on the data side."""
        return batch

    def forward(self, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:
        emb = self.ebc(batch.sparse).to_dict()
        counts = batch.sparse[HIST_ITEMS].lengths()
        user, item = emb["user_id"], emb["item_id"]
        every = torch.ones_like(counts, dtype=torch.bool)
        user_dn, mse_u = self.diffusion.denoise_pass(
            user, self.user_denoiser.bind(item), every, self.training
        )
        item_dn, mse_i = self.diffusion.denoise_pass(
            item, self.item_denoiser.bind(user), every, self.training
        )
        mse = 0.5 * (mse_u + mse_i)
        x = torch.cat(
            [emb[k] for k in self.single_features]
            + [bag_mean(emb[HIST_ITEMS], counts), user_dn, item_dn, torch.log1p(counts.to(user.dtype)).unsqueeze(-1)],
            dim=-1,
        )
        logits = self.ranker(x)
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels)
        loss = bce + self.loss_weight * mse
        return loss, {
            "loss": loss.detach(),
            "logits": logits.detach(),
            "bce": bce.detach(),
            "diffusion_mse": mse.detach(),
            "user_denoised": user_dn.detach(),
            "item_denoised": item_dn.detach(),
        }
