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
  several heads some reduction is needed).

Sharded like every model (:mod:`embeddings.sharding` plans the EBC and the item /
category EmbeddingCollection). Sharded, the GSU's rows live on other ranks: it looks the
full history up through the EC's collective forward, chunk by chunk, without gradient
(:meth:`TWINModel._sharded_scores`); the EC is not pipelined (its input is computed in
``forward``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torchrec import EmbeddingCollection, JaggedTensor, KeyedJaggedTensor, KeyedTensor

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch
from cdp_rec.models.base import ModelOutput
from cdp_rec.models.sequence import (
    SEQ_CATEGORIES,
    SEQ_ITEMS,
    TARGET_CATEGORY,
    TARGET_ITEM,
    MultiHeadTargetAttention,
    SequenceCTRModel,
    _segments,
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
    gsu_chunk: int = 1 << 16  # behaviours the GSU looks up at a time ([chunk, D] temporaries)

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
        jt = batch.sparse.to_dict()
        hist, hist_cat = jt[HIST_ITEMS], jt[HIST_CATEGORIES]
        emb = {k: v.detach() for k, v in emb.items()}
        if isinstance(self.ec, EmbeddingCollection):
            item_w, cat_w = self.tables()
            target = F.embedding(jt[TARGET_ITEM].values(), item_w) + F.embedding(jt[TARGET_CATEGORY].values(), cat_w)
            r = self.esu.relevance_query(self.attention_query(emb, target))
            scores = jagged_dot_scores([(item_w, hist.values()), (cat_w, hist_cat.values())], hist.lengths(), r,
                                       chunk=self.gsu_chunk)
        else:
            scores = self._sharded_scores(jt, emb)
        positions, lengths = topk_jagged(scores, hist.lengths(), self.seq_len)
        return hist.values()[positions], hist_cat.values()[positions], lengths, scores[positions]

    def _sharded_scores(self, jt: dict[str, JaggedTensor], emb: dict[str, torch.Tensor]) -> torch.Tensor:
        """:func:`jagged_dot_scores` through the sharded EC (DistributedModelParallel).

        The rows live on other ranks, so the history is looked up by the EC's collective
        forward, :attr:`gsu_chunk` behaviours at a time (largest temporary ``[chunk, D]``,
        as unsharded). Every chunk keeps the batch's stride (behaviours outside the chunk
        get length 0) and every rank runs the same number of chunks (the maximum over
        ranks; a rank with fewer looks up empty ones): the lookups are collectives.
        """
        hist, hist_cat = jt[HIST_ITEMS], jt[HIST_CATEGORIES]
        chunk = self.gsu_chunk
        lengths = hist.lengths().to(torch.int64)
        ends = torch.cumsum(lengths, 0)
        starts = ends - lengths
        n = int(ends[-1]) if lengths.numel() else 0
        chunks = torch.tensor([max(1, math.ceil(n / chunk))], dtype=torch.int64, device=lengths.device)
        if dist.is_initialized():
            dist.all_reduce(chunks, op=dist.ReduceOp.MAX)
        t_item, t_cat = jt[TARGET_ITEM].values(), jt[TARGET_CATEGORY].values()
        out = r = None
        _, seg, _ = _segments(lengths)
        for c in range(int(chunks)):
            lo, hi = c * chunk, min((c + 1) * chunk, n)
            lo = min(lo, n)
            per_sample = (ends.clamp(max=hi) - starts.clamp(min=lo)).clamp(min=0)  # [B] behaviours in [lo, hi)
            targets = t_item if c == 0 else t_item[:0]
            target_lengths = torch.ones_like(lengths) if c == 0 else torch.zeros_like(lengths)
            jts = self.ec(KeyedJaggedTensor.from_lengths_sync(
                keys=[TARGET_ITEM, SEQ_ITEMS, TARGET_CATEGORY, SEQ_CATEGORIES],
                values=torch.cat([targets, hist.values()[lo:hi], t_cat if c == 0 else t_cat[:0],
                                  hist_cat.values()[lo:hi]]),
                lengths=torch.cat([target_lengths, per_sample, target_lengths, per_sample]),
            ))
            if c == 0:
                target = jts[TARGET_ITEM].values() + jts[TARGET_CATEGORY].values()
                r = self.esu.relevance_query(self.attention_query(emb, target))
                out = torch.empty(n, dtype=target.dtype, device=target.device)
            rows = jts[SEQ_ITEMS].values() + jts[SEQ_CATEGORIES].values()  # [hi - lo, D]
            if hi > lo:
                assert r is not None and out is not None
                out[lo:hi] = (rows * r[seg[lo:hi]]).sum(-1)
        assert out is not None
        return out

    def forward(self, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:
        """The GSU picks the behaviours with the model's own metric, so the EC lookup is in :meth:`interact`."""
        return self.stage(self.ebc(batch.sparse), batch)

    def interact(self, pooled: KeyedTensor, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:  # type: ignore[override]
        emb = pooled.to_dict()
        items, categories, lengths, _ = self.retrieve(batch, emb)
        jt = batch.sparse.to_dict()
        look = self.lookup(kjt_behaviours(jt[TARGET_ITEM].values(), jt[TARGET_CATEGORY].values(), items, categories,
                                          lengths))
        interest, weights = self.esu(self.attention_query(emb, look.target), look.keys, look.mask)
        return self.head(emb, look, interest, batch.labels, attention=weights)
