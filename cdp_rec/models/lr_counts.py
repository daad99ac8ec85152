"""``lr_counts`` — logistic regression on streaming click-rate counts: the floor of ``compare``.

Not a model of the paper: the classic count-feature CTR baseline (smoothed target
encoding, as in CatBoost's *ordered target statistics*) that every behaviour model must
beat before its sequence machinery means anything. It looks at no behaviour history.

Features of an impression, for each key k in user, item, query, category and the
(user, category) pair:

* ``logit(r_k)`` with the smoothed click rate ``r_k = (clicks_k + a * prior) / (impressions_k + a)``
  (``a`` = ``model.counts_smoothing``; ``prior`` = the running global CTR, Laplace
  smoothed), and
* ``log1p(impressions_k)`` (how much evidence the rate rests on),

plus one learned weight per context and scene value (a dim-1 EmbeddingBagCollection:
the one-hot part of a logistic regression). Logit = linear(10 count features) + the
context / scene weights.

Streaming and leak-free: the count tables are buffers, updated in ``forward`` *after* the
step is scored and only in training mode, so the features of a training impression
come from strictly earlier steps of the training stream (never from its own step,
its own label or anything later); in eval mode (validation, test) they use the counts
of every training step seen and nothing is updated. Being buffers, the counts are in
the checkpoints, so a resumed run continues with the same tables.

Distributed: the counts are global, the same on every rank. A training step first
all-gathers every rank's ids and labels (rank 0's rows first), scores this rank's
impressions from the counts of the earlier *global* steps, then adds the whole global
step to the counts. "Earlier" therefore means an earlier step, never another rank's half
of the same step: N ranks compute exactly what one process computes when fed each
step's N batches concatenated in rank order (with one process, a step is its batch,
as before). The data-dependent code (count lookups, the pass check, the update and its
collective) runs in :meth:`LRCountsModel.interact` behind a parameter-free leaf module
(:class:`~cdp_rec.models.sequence.EagerStage`), which TorchRec's TrainPipelineSparseDist
does not trace; ``forward`` only calls the EmbeddingBagCollection, which is sharded like
every model's.

Several epochs: a second pass over the same stream would see its own labels in the
counts. The model recognises the start of a new pass when the first training step it
counted comes again (a fingerprint of the global step's request ids, item ids and
labels, kept in a buffer) and then restarts the counts, so every pass computes exactly
the first pass's features (ordered target statistics) and the final counts are one pass
over the training data. A reader that reshuffled batches between epochs would defeat
the fingerprint; the trainer reads the days in the same order every epoch.

Simplifications to fit here:

* count tables are bucketed by ``id % vocabulary size``: dense ids get a bucket each;
  raw ids (``data.raw_ids``; ``features.id_mapping`` maps only the model's embedding
  tables, and this model's count keys are not among them) share buckets by that
  modulus, a hashing count table with collisions; the (user, category) pair table has
  ``min(num_users * num_categories, 2**22)`` buckets, indexed by
  ``(user * num_categories + category) % buckets``;
* no time decay of the counts (a 60-day stream would want one);
* every rank holds the full count tables (replicated buffers, not sharded: 10 float64
  values per bucket) and gathers 6 int64 per impression of the global batch per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torchrec import KeyedTensor

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import Batch
from cdp_rec.models.base import ModelOutput
from cdp_rec.models.sequence import EagerStage
from embeddings.tables import build_embedding_bag_collection, table_specs

PAIR_BUCKETS_MAX = 1 << 22
# Count keys in feature order: name -> KJT feature(s).
COUNT_KEYS = ("user", "item", "query", "category", "user_category")
ID_KEYS = ("user", "item", "query", "category")  # KJT ``<key>_id`` features the counts read
_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)  # fingerprint multipliers (odd 32-bit)


class StepRows(NamedTuple):
    """The impressions of one training step: ``[N]`` each (all ranks' rows when gathered)."""

    ids: dict[str, torch.Tensor]  # ID_KEYS -> int64 ids as in the batch
    request_ids: torch.Tensor  # int64
    labels: torch.Tensor  # float64


def step_rows(batch: Batch) -> StepRows:
    """This rank's batch as :class:`StepRows`."""
    ids = {k: batch.sparse[f"{k}_id"].values().to(torch.int64) for k in ID_KEYS}
    return StepRows(ids, batch.request_ids.to(torch.int64), batch.labels.to(torch.float64))


def gather_step(rows: StepRows) -> StepRows:
    """Every rank's rows of the step, rank 0's first (collective; ``rows`` itself without
    a process group of 2 or more). Ranks may hold different numbers of rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    # One int64 matrix [B, 6]: ids, request id, and the label's float64 bits (exact for any label).
    cols = torch.stack([*(rows.ids[k] for k in ID_KEYS), rows.request_ids, rows.labels.view(torch.int64)], dim=1)
    world = dist.get_world_size()
    n = torch.tensor([cols.shape[0]], dtype=torch.int64, device=cols.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(x) for x in sizes]
    padded = cols.new_zeros((max(counts), cols.shape[1]))  # all_gather wants equal shapes
    padded[: cols.shape[0]] = cols
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    full = torch.cat([p[:c] for p, c in zip(parts, counts)])
    ids = {k: full[:, i].contiguous() for i, k in enumerate(ID_KEYS)}
    return StepRows(ids, full[:, len(ID_KEYS)].contiguous(), full[:, len(ID_KEYS) + 1].contiguous().view(torch.float64))


def step_fingerprint(rows: StepRows) -> torch.Tensor:
    """A 64-bit fingerprint ``[]`` int64 of a step's request ids, item ids and labels (in order)."""
    items = rows.ids["item"]
    n = items.numel()
    pos = torch.arange(1, n + 1, dtype=torch.int64, device=items.device)
    h = (rows.request_ids * _MIX[0] + items * _MIX[1] + rows.labels.to(torch.int64) * _MIX[2]) \
        * (pos * _MIX[3] + 1)
    return h.sum() + n  # int64 arithmetic wraps: a hash, not a number


def batch_fingerprint(batch: Batch) -> torch.Tensor:
    """:func:`step_fingerprint` of one batch."""
    return step_fingerprint(step_rows(batch))


class LRCountsModel(nn.Module):
    """``forward(batch) -> (loss, {"loss", "logits", "bce", "count_features"})``; ``count_features`` is ``[B, 10]``."""

    def __init__(self, cfg: JobConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        f = cfg.features
        self.num_categories = f.num_categories
        self.smoothing = cfg.model.counts_smoothing
        self.sizes = {
            "user": f.num_users,
            "item": f.num_items,
            "query": f.num_queries,
            "category": f.num_categories,
            "user_category": min(f.num_users * f.num_categories, PAIR_BUCKETS_MAX),
        }
        dev = torch.device(device)
        for name, size in self.sizes.items():
            # float64: exact counts far beyond float32's 2**24.
            self.register_buffer(f"clicks_{name}", torch.zeros(size, dtype=torch.float64, device=dev))
            self.register_buffer(f"impressions_{name}", torch.zeros(size, dtype=torch.float64, device=dev))
        self.register_buffer("total_clicks", torch.zeros((), dtype=torch.float64, device=dev))
        self.register_buffer("total_impressions", torch.zeros((), dtype=torch.float64, device=dev))
        # Fingerprint of the first step counted since the last restart (valid when stream_started).
        self.register_buffer("stream_start", torch.zeros((), dtype=torch.int64, device=dev))
        self.register_buffer("stream_started", torch.zeros((), dtype=torch.bool, device=dev))
        self.register_buffer("passes", torch.zeros((), dtype=torch.int64, device=dev))

        self.onehot_features = [*f.context_features, *f.scene_features]
        specs = [s for s in table_specs(f) if s.name.startswith(("ctx_", "scene_"))]
        self.ebc = build_embedding_bag_collection(specs, 1, device)  # one weight per value
        self.linear = nn.Linear(2 * len(COUNT_KEYS), 1)
        self.stage = EagerStage(self)

    def prepare_batch(self, batch: Batch) -> Batch:
        """Nothing to prepare: the counts are looked up in ``forward``."""
        return batch

    def buckets(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``[N]`` int64 bucket of every impression in each count table, from its ``ID_KEYS`` ids."""
        out = {k: v % self.sizes[k] for k, v in ids.items()}
        pair = ids["user"] * self.num_categories + ids["category"] % self.num_categories
        out["user_category"] = pair % self.sizes["user_category"]
        return out

    def bucket_ids(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``[B]`` int64 bucket of every impression of ``batch`` in each count table."""
        return self.buckets(step_rows(batch).ids)

    def prior(self) -> torch.Tensor:
        """The running global CTR, Laplace smoothed (0.5 before any data)."""
        return (self.total_clicks + 1.0) / (self.total_impressions + 2.0)

    def count_features(self, buckets: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, 10]``: ``logit(smoothed rate)`` and ``log1p(impressions)`` per count key, from the current tables."""
        a, prior = self.smoothing, self.prior()
        cols = []
        for k in COUNT_KEYS:
            clicks = getattr(self, f"clicks_{k}")[buckets[k]]
            imps = getattr(self, f"impressions_{k}")[buckets[k]]
            rate = (clicks + a * prior) / (imps + a)
            cols += [torch.logit(rate), torch.log1p(imps)]
        return torch.stack(cols, dim=-1).to(torch.float32)

    @torch.no_grad()
    def reset_counts(self) -> None:
        """Forget every count (a new pass over the training stream starts)."""
        for name in self.sizes:
            getattr(self, f"clicks_{name}").zero_()
            getattr(self, f"impressions_{name}").zero_()
        self.total_clicks.zero_()
        self.total_impressions.zero_()
        self.stream_started.fill_(False)

    @torch.no_grad()
    def _update(self, step: StepRows) -> None:
        labels = step.labels
        ones = torch.ones_like(labels)
        for k, b in self.buckets(step.ids).items():
            getattr(self, f"clicks_{k}").index_add_(0, b, labels)
            getattr(self, f"impressions_{k}").index_add_(0, b, ones)
        self.total_clicks += labels.sum()
        self.total_impressions += labels.numel()

    @torch.no_grad()
    def _check_new_pass(self, step: StepRows) -> None:
        fp = step_fingerprint(step)
        if bool(self.stream_started) and bool(fp == self.stream_start):
            self.reset_counts()
            self.passes += 1
        if not bool(self.stream_started):
            self.stream_start.fill_(fp)
            self.stream_started.fill_(True)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:
        """The sharded lookup here (traced by TorchRec's pipeline), the rest in :meth:`interact`."""
        return self.stage(self.ebc(batch.sparse), batch)

    def interact(self, pooled: KeyedTensor, batch: Batch) -> tuple[torch.Tensor, ModelOutput]:
        """Counts, logistic regression and, training, the count update; ``pooled`` is the EBC's output."""
        mine = step_rows(batch)
        step = gather_step(mine) if self.training else mine  # collective when distributed
        if self.training:
            self._check_new_pass(step)
        feats = self.count_features(self.buckets(mine.ids))  # from strictly earlier steps only
        emb = pooled.to_dict()
        onehot = torch.cat([emb[k] for k in self.onehot_features], dim=-1).sum(-1)
        logits = self.linear(feats).squeeze(-1) + onehot
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels)
        if self.training:
            self._update(step)  # after scoring: this step's labels serve later steps
        return bce, {"loss": bce.detach(), "logits": logits.detach(), "bce": bce.detach(),
                     "count_features": feats.detach()}
