"""``sim`` — Search-based Interest Model (Pi et al., CIKM 2020), CDP §2.1 / §4.1.4 baseline.

Two stages:

1. GSU, SIM's *hard search*: keep the behaviours whose category equals the target
   item's category, over the full sequence; when more than ``model.top_k`` match, keep
   the ``top_k`` most recent. Runs on ids in :meth:`prepare_batch` (the same jagged
   compaction as CDP's category filter), so only ``top_k`` behaviours are looked up.
2. ESU: multi-head scaled dot-product target attention
   (``model.num_heads``) over the retrieved behaviours, output ``[B, D]``.

Simplifications to fit here:

* no time-interval embedding in the ESU (the logs carry no per-behaviour timestamp) and
  no separate short-term DIN branch; the retrieved count enters the ranker as
  ``log1p(count)`` (as in CDP);
* the GSU is the hard (category) search only, not the soft (embedding-MIPS) variant;
* a behaviour (and the target) is the sum of its item and category embeddings.

Sharded like every model (:mod:`embeddings.sharding` plans the EBC and the item /
category EmbeddingCollection); the GSU runs on ids in ``prepare_batch``, so the EC's
lookup is pipelined by TorchRec's TrainPipelineSparseDist.
"""

from __future__ import annotations

import torch
from torchrec import JaggedTensor, KeyedTensor

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch
from cdp_rec.models.base import ModelOutput
from cdp_rec.models.sequence import (
    MultiHeadTargetAttention,
    SequenceCTRModel,
    same_category_recent,
    with_behaviours,
)


class SIMModel(SequenceCTRModel):
    """``forward(batch) -> (loss, {"loss", "logits", "bce", "attention"})``; ``attention`` is ``[B, H, K]``."""

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        dim = cfg.model.embedding_dim
        super().__init__(cfg, device, seq_len=cfg.model.top_k, interest_dim=dim)
        self.esu = MultiHeadTargetAttention(dim, cfg.model.num_heads)

    def prepare_batch(self, batch: Batch) -> Batch:
        """GSU: append the ``top_k`` most recent same-category behaviours as ``seq_item_ids`` / ``seq_category_ids``."""
        jt = batch.sparse.to_dict()
        hist, target_categories = jt[HIST_ITEMS], jt["category_id"].values()
        items, lengths = same_category_recent(
            hist.values(), jt[HIST_CATEGORIES].values(), hist.lengths(), target_categories, self.seq_len
        )
        categories = torch.repeat_interleave(target_categories, lengths, output_size=items.numel())
        return with_behaviours(batch, items, categories, lengths)

    def interact(
        self, pooled: KeyedTensor, jts: dict[str, JaggedTensor], batch: Batch
    ) -> tuple[torch.Tensor, ModelOutput]:
        """After the lookups of :meth:`SequenceCTRModel.forward` (``batch`` from :meth:`prepare_batch`)."""
        emb = pooled.to_dict()
        look = self.behaviours(jts)
        interest, weights = self.esu(look.target, look.keys, look.mask)
        return self.head(emb, look, interest, batch.labels, attention=weights)
