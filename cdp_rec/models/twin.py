"""``twin`` — TWo-stage Interest Network (Chang et al., KDD 2023), CDP §2.1 / §4.1.4 baseline.

TWIN's point is *consistency*: the GSU ranks behaviours with exactly the relevance
metric the ESU attends with. Here the ESU is multi-head target attention
(:class:`cdp_rec.models.sequence.MultiHeadTargetAttention`, linear projections, no bias),
so its head-averaged logit is a linear function of the behaviour embedding,
``mean_h <W_q,h t, W_k,h e_j> / sqrt(D) = <r(t), e_j>`` with
``r(t) = mean_h W_k,h^T W_q,h t / sqrt(D)``. Then

1. GSU (TWIN's consistency-preserved GSU): score *every* behaviour of the full sequence with
   ``<r(t), e_j>`` — rows looked up chunk by chunk without gradient, never a
   ``[B, L, D]`` tensor — and keep the ``model.top_k`` best (chronological order kept);
2. ESU: the same attention, with gradient, over the ``top_k`` retrieved behaviours.

The ESU's projections and the item table therefore shape the retrieval too, and the
GSU's scores equal the ESU's head-averaged logits on the retrieved behaviours
(``tests/test_zoo.py`` checks it).

Simplifications to fit here:

* a behaviour is the sum of its item and category embeddings: no split into inherent /
  cross features, no cached pre-computed inherent-feature projection (TWIN's
  efficiency trick for 10^4-10^5 behaviours), no behaviour-target cross features
  (timestamps, play time);
* the GSU ranks by the *head-averaged* logit (TWIN uses the ESU's relevance score; with
  several heads some reduction is needed);
* single-process only for now (one EBC + an EmbeddingCollection for the item and
  category tables, which the sharding code does not plan yet).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch
from cdp_rec.models.base import ModelOutput
from cdp_rec.models.sequence import (
    TARGET_CATEGORY,
    TARGET_ITEM,
    MultiHeadTargetAttention,
    SequenceCTRModel,
    jagged_dot_scores,
    kjt_behaviours,
    topk_jagged,
)


class TWINModel(SequenceCTRModel):
    """``forward(batch) -> (loss, {"loss", "logits", "bce", "attention"})``; GSU inside ``forward``.

    Subclasses change the attention query (:meth:`attention_query`): QIN adds the
    search query to it.
    """

    query_features: int = 1  # embeddings concatenated into the attention query
    # The GSU looks the whole history up itself: with hash / managed tables these keys are
    # mapped to rows too (embeddings.id_mapping.attach_id_mapping).
    raw_id_features = {HIST_ITEMS: "item", HIST_CATEGORIES: "category"}

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        dim = cfg.model.embedding_dim
        super().__init__(cfg, device, seq_len=cfg.model.top_k, interest_dim=dim)
        self.esu = MultiHeadTargetAttention(dim, cfg.model.num_heads, query_dim=self.query_features * dim)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Nothing on the data side: the GSU needs the model's own metric (see :meth:`retrieve`)."""
        return batch

    def attention_query(self, emb: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The vector the GSU and ESU score behaviours against: the target item ``[B, D]``."""
        return target

    @torch.no_grad()
    def retrieve(
        self, batch: Batch, emb: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """GSU over the full sequence: ``(items [M], categories [M], lengths [B], scores [M])`` of the top-K."""
        item_w, cat_w = self.tables()
        jt = batch.sparse.to_dict()
        target = F.embedding(jt[TARGET_ITEM].values(), item_w) + F.embedding(jt[TARGET_CATEGORY].values(), cat_w)
        r = self.esu.relevance_query(self.attention_query({k: v.detach() for k, v in emb.items()}, target))
        hist, hist_cat = jt[HIST_ITEMS], jt[HIST_CATEGORIES]
        scores = jagged_dot_scores([(item_w, hist.values()), (cat_w, hist_cat.values())], hist.lengths(), r)
        positions, lengths = topk_jagged(scores, hist.lengths(), self.seq_len)
        return hist.values()[positions], hist_cat.values()[positions], lengths, scores[positions]

    def forward(self, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:
        emb = self.ebc(batch.sparse).to_dict()
        items, categories, lengths, _ = self.retrieve(batch, emb)
        jt = batch.sparse.to_dict()
        look = self.lookup(kjt_behaviours(jt[TARGET_ITEM].values(), jt[TARGET_CATEGORY].values(), items, categories,
                                          lengths))
        interest, weights = self.esu(self.attention_query(emb, look.target), look.keys, look.mask)
        return self.head(emb, look, interest, batch.labels, attention=weights)
