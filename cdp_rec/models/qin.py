"""``qin`` — Query-dominant user Interest Network (Guo et al., CIKM 2023), CDP §2.1 / §4.1.4 baseline.

QIN makes both stages of the two-stage pipeline *query-aware*: the search query joins
the retrieval key of the relevance search unit and the query of the fused attention
unit. Here that is TWIN's consistent two-stage pipeline (:class:`cdp_rec.models.twin.TWINModel`)
with the attention query ``[t; q]`` (target item ⊕ search query) instead of ``t``:

1. relevance search (GSU): every behaviour of the full sequence is scored with the
   head-averaged attention logit ``<r([t; q]), e_j>`` (chunked lookups, no gradient),
   the ``model.top_k`` best are kept;
2. fused attention (ESU): multi-head target attention with the query ``[t; q]`` over the
   retrieved behaviours.

Simplifications to fit here:

* one fused key ``[t; q]`` for retrieval instead of QIN's separate query-relevance and
  target-relevance searches, and the retrieval shares the attention's metric (TWIN
  style) rather than having its own relevance model;
* no query-behaviour text / category relevance features (queries are ids only here).

Sharded like TWIN (its GSU looks the history up through the sharded EC).
"""

from __future__ import annotations

import torch

from cdp_rec.models.twin import TWINModel


class QINModel(TWINModel):
    """TWIN with the search query in the retrieval key and the attention query."""

    query_features = 2

    def attention_query(self, emb: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """``[t; q]`` ``[B, 2D]``: target item and search query."""
        return torch.cat([target, emb["query_id"]], dim=-1)
