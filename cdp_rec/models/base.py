"""``base``: the online base model the paper compares against.

The same ranking MLP as CDP, but the behaviour sequence is mean-pooled whole, with no
category filter and no diffusion. Everything else (tables, features, loss) is shared,
so a CDP-vs-base difference is the purifier's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import HIST_ITEMS, Batch
from cdp_rec.models.ranker import RankingHead
from embeddings.tables import bag_mean, build_embedding_bag_collection, single_value_features, table_specs

ModelOutput = dict[str, torch.Tensor]


class BaseModel(nn.Module):
    """``forward(batch) -> (loss, {"logits": [B], "bce": []})``.

    Returns ``(loss, output)`` because TorchRec's TrainPipelineSparseDist expects it.
    Takes request-deduplicated batches as they are (``Batch.history_row``): the history is
    looked up and pooled once per request, and each impression takes its request's row.
    """

    reads_shared_histories = True

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        dim = cfg.model.embedding_dim
        self.single_features = single_value_features(cfg.features)
        self.ebc = build_embedding_bag_collection(table_specs(cfg.features, (HIST_ITEMS,)), dim, device)
        self.ranker = RankingHead(dim * (len(self.single_features) + 1), cfg.model.ranker_hidden)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Data-side preparation before ``forward``: nothing for the base model."""
        return batch

    def forward(self, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:
        emb = self.ebc(batch.sparse).to_dict()
        # [B, D]; with history_row only the rows that hold a history are pooled
        history = bag_mean(emb[HIST_ITEMS], batch.sparse[HIST_ITEMS].lengths())
        if batch.history_row is not None:
            history = history.index_select(0, batch.history_row)
        x = torch.cat([emb[k] for k in self.single_features] + [history], dim=-1)
        logits = self.ranker(x)
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return bce, {"loss": bce.detach(), "logits": logits.detach(), "bce": bce.detach()}
