"""``diffrec`` — Diffusion Recommender Model (Wang et al., SIGIR 2023), CDP §2.2 / §4.1.4 baseline.

DiffRec corrupts the user's interaction representation with Gaussian noise and learns
to recover it, *unconditionally*: the user's own (noisy) interactions are the only
input. Here the interaction representation is the mean embedding of the whole behaviour
sequence (no category filter, unlike CDP), from the shared pooled ``item`` table:

* training: ``t ~ U{0..T-1}``, ``x_t = q(x_t | x0)``, ε-MSE of an unconditional
  :class:`cdp_rec.models.denoiser.MLPDenoiser` (``condition_dim=0``); the ranker sees the
  one-step estimate x̂0 (``model.diffusion.train_x0``, as CDP);
* inference: the project's reverse sampler from the noised observation
  (:class:`cdp_rec.models.diffusion.GaussianDiffusion`, ``inference_steps`` steps);
* ranker: single-valued embeddings ⊕ x0 ⊕ denoised ⊕ log1p(count) -> MLP -> BCE;
  loss = BCE + ``diffusion.loss_weight`` · MSE. The same schedule, denoiser, sampler
  and head as CDP, so the CDP-vs-DiffRec gap is the category filter plus the condition.

Simplifications to fit here:

* latent diffusion on a ``D``-dim pooled embedding (like L-DiffRec's latent space, but
  without its item clustering / VAE encoder) instead of the ``|I|``-dim interaction
  vector; ε-prediction (DiffRec also supports it) instead of x0-prediction; no
  importance sampling of t and no T-DiffRec time reweighting;
* the noise MSE averages over samples with a non-empty history (as CDP), because an
  empty history pools to the zero vector.
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


class DiffRecModel(nn.Module):
    """``forward(batch) -> (loss, {"loss", "logits", "bce", "diffusion_mse", "denoised"})``."""

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        m = cfg.model
        dim = m.embedding_dim
        self.single_features = single_value_features(cfg.features)
        self.ebc = build_embedding_bag_collection(table_specs(cfg.features, (HIST_ITEMS,)), dim, device)
        self.diffusion = GaussianDiffusion(m.diffusion)
        self.denoiser = MLPDenoiser(
            dim, 0, m.denoiser_hidden, m.time_embedding_dim, m.diffusion.num_steps, m.diffusion.time_embedding
        )
        self.loss_weight = m.diffusion.loss_weight
        self.ranker = RankingHead(dim * (len(self.single_features) + 2) + 1, m.ranker_hidden)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Nothing on the data side: the EBC sums the whole history, forward divides it (bag_mean)."""
        return batch

    def forward(self, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:
        emb = self.ebc(batch.sparse).to_dict()
        counts = batch.sparse[HIST_ITEMS].lengths()
        x0 = bag_mean(emb[HIST_ITEMS], counts)
        denoised, mse = self.diffusion.denoise_pass(
            x0, self.denoiser.bind(None), counts > 0, self.training
        )
        x = torch.cat(
            [emb[k] for k in self.single_features] + [x0, denoised, torch.log1p(counts.to(x0.dtype)).unsqueeze(-1)],
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
            "denoised": denoised.detach(),
        }
