"""``din`` — Deep Interest Network (Zhou et al., KDD 2018), the attention baseline of CDP §1 / §2.1.

Target attention over the user's most recent ``model.attention_len`` behaviours: DIN's
local activation unit scores every behaviour against the target item,
``w_j = MLP([e_j, t, e_j - t, e_j ⊙ t])``, and the interest is ``Σ_j w_j e_j``
(unnormalised, as in DIN). The ranker is the shared one
(:class:`cdp_rec.models.sequence.SequenceCTRModel`).

Simplifications to fit here:

* only the last ``attention_len`` behaviours are attended (DIN has no retrieval stage;
  a ``[B, 2000, D]`` tensor is never built) — selected on ids in :meth:`prepare_batch`;
* ReLU in the activation unit instead of Dice / PReLU; no mini-batch-aware
  regularisation — the optimiser is the project's Adam;
* a behaviour (and the target) is the *sum* of its item and category embeddings (DIN
  concatenates goods / category / shop embeddings); no shop-like side feature exists;
* the target and the behaviours share the unpooled ``item`` / ``category`` tables of a
  TorchRec EmbeddingCollection, the other features the pooled EBC; both are sharded
  (:mod:`embeddings.sharding`).
"""

from __future__ import annotations

import torch
from torchrec import JaggedTensor, KeyedTensor

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import Batch
from cdp_rec.models.base import ModelOutput
from cdp_rec.models.sequence import DINAttention, SequenceCTRModel, recent_behaviours, with_behaviours


class DINModel(SequenceCTRModel):
    """``forward(batch) -> (loss, {"loss", "logits", "bce", "attention"})``; ``attention`` is ``[B, L]``.

    Example::

        model = DINModel(cfg)
        loss, out = model(model.prepare_batch(batch))
    """

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        dim = cfg.model.embedding_dim
        super().__init__(cfg, device, seq_len=cfg.model.attention_len, interest_dim=dim)
        self.attention = DINAttention(dim, [4 * dim])

    def prepare_batch(self, batch: Batch) -> Batch:
        """Append the last ``attention_len`` behaviours as ``seq_item_ids`` / ``seq_category_ids``."""
        return with_behaviours(batch, *recent_behaviours(batch, self.seq_len))

    def interact(
        self, pooled: KeyedTensor, jts: dict[str, JaggedTensor], batch: Batch
    ) -> tuple[torch.Tensor, ModelOutput]:
        """After the lookups of :meth:`SequenceCTRModel.forward` (``batch`` from :meth:`prepare_batch`)."""
        emb = pooled.to_dict()
        look = self.behaviours(jts)
        interest, weights = self.attention(look.target, look.keys, look.mask)
        return self.head(emb, look, interest, batch.labels, attention=weights)
