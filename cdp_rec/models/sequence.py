"""Shared pieces of the sequence baselines (DIN, SIM, TWIN, QIN, HSTU, DiffuMIN).

The rule these helpers enforce: a ``[B, L, D]`` behaviour tensor is only ever built for
the ``L = attention_len`` or ``top_k`` behaviours a model actually attends to, never for
the whole sequence (2000 behaviours in the paper's setting). Behaviours are *selected on
ids* first — the last N (:func:`last_n`), same category as the target
(:func:`same_category_recent`, SIM's hard search) or the top-K of a score computed
chunk by chunk without gradient (:func:`jagged_dot_scores` + :func:`topk_jagged`,
TWIN / QIN) — and only the selection is looked up.

Embeddings:

* single-valued features (query, user, context, scene) are pooled by the model's one
  TorchRec ``EmbeddingBagCollection`` (:func:`single_feature_specs`: every table of
  :func:`embeddings.tables.table_specs` except ``item`` and ``category``);
* the ``item`` and ``category`` tables live in a TorchRec ``EmbeddingCollection``
  (unpooled, :func:`build_behaviour_collection`) whose features are the target's
  ``item_id`` / ``category_id`` *and* the selected behaviours' (:data:`SEQ_ITEMS`,
  :data:`SEQ_CATEGORIES`), so target and behaviours share one table, as in
  :mod:`embeddings.tables`. A behaviour (and the target) is represented by the sum of
  its item and category embeddings, ``[D]`` — the category is the side feature DIN,
  SIM and TWIN attach to every behaviour. :func:`padded` turns the jagged lookups into
  ``[B, L, D]`` plus a validity mask.

Distributed: :mod:`embeddings.sharding` plans and shards both modules (TorchRec's
EmbeddingBagCollection and EmbeddingCollection sharders, the same planner and fused
optimizer), so these models train on any number of ranks like the others. Unsharded,
:func:`cdp_rec.training.optim.split_parameters` counts both modules' tables as sparse
(row-lazy Adam at ``train.sparse_lr``).

Forward in two stages: :meth:`SequenceCTRModel.forward` only calls the embedding modules
on the batch's features and hands their outputs to :class:`EagerStage`, which runs the
model's :meth:`~SequenceCTRModel.interact` (selection, attention, ranker). TorchRec's
TrainPipelineSparseDist fx-traces ``forward`` to find the sharded modules' inputs and
treats submodules without a sharded module as leaves, so the data-dependent code in
``interact`` (jagged padding, top-K, ``if`` on tensor values) is never traced.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor, KeyedTensor

from cdp_rec.config import FeatureConfig, JobConfig
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch
from cdp_rec.models.layers import mlp
from cdp_rec.models.ranker import RankingHead
from embeddings.pooling import filter_history_by_category
from embeddings.tables import TableSpec, build_embedding_bag_collection, single_value_features, table_specs

# KJT keys of the behaviours a sequence model selected for its unpooled lookup.
SEQ_ITEMS = "seq_item_ids"
SEQ_CATEGORIES = "seq_category_ids"
TARGET_ITEM = "item_id"
TARGET_CATEGORY = "category_id"


# --------------------------------------------------------------------------- embeddings


def single_feature_specs(features: FeatureConfig) -> tuple[list[TableSpec], list[str]]:
    """Tables and feature names of the pooled EBC of a sequence model: all but ``item`` / ``category``."""
    specs = [s for s in table_specs(features) if s.name not in ("item", "category")]
    names = [f for f in single_value_features(features) if f not in (TARGET_ITEM, TARGET_CATEGORY)]
    return specs, names


def build_behaviour_collection(
    features: FeatureConfig, dim: int, device: torch.device | str = "cpu"
) -> EmbeddingCollection:
    """Unpooled ``item`` and ``category`` tables, each looked up by the target and the selected behaviours."""
    tables = [
        EmbeddingConfig(name="item", embedding_dim=dim, num_embeddings=features.num_items,
                        feature_names=[TARGET_ITEM, SEQ_ITEMS]),
        EmbeddingConfig(name="category", embedding_dim=dim, num_embeddings=features.num_categories,
                        feature_names=[TARGET_CATEGORY, SEQ_CATEGORIES]),
    ]
    return EmbeddingCollection(tables=tables, device=torch.device(device))


def padded(jt: JaggedTensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``[N, D]`` embeddings -> ``([B, length, D], mask [B, length] bool)``.

    Bags keep their order (oldest first, most recent at ``lengths - 1``); positions at
    and after ``lengths`` are zero and masked out. Bags must hold at most ``length``.
    """
    lengths = jt.lengths()
    x = jt.to_padded_dense(desired_length=length)
    mask = torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
    return x, mask


def kjt_behaviours(
    target_items: torch.Tensor,
    target_categories: torch.Tensor,
    seq_items: torch.Tensor,
    seq_categories: torch.Tensor,
    seq_lengths: torch.Tensor,
) -> KeyedJaggedTensor:
    """KJT of the target (``[B]`` each) and the selected behaviours for :func:`build_behaviour_collection`."""
    ones = torch.ones_like(target_items)
    seq_lengths = seq_lengths.to(ones.dtype)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[TARGET_ITEM, SEQ_ITEMS, TARGET_CATEGORY, SEQ_CATEGORIES],
        values=torch.cat([target_items, seq_items, target_categories, seq_categories]),
        lengths=torch.cat([ones, seq_lengths, ones, seq_lengths]),
    )


def with_features(batch: Batch, features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    """``batch`` with jagged KJT features ``{key: (values, lengths)}`` appended (data side)."""
    kjt = batch.sparse
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=[*kjt.keys(), *features],
        values=torch.cat([kjt.values(), *(v.to(kjt.values().dtype) for v, _ in features.values())]),
        lengths=torch.cat([kjt.lengths().to(torch.int64), *(n.to(torch.int64) for _, n in features.values())]),
    )
    return Batch(sparse, batch.labels, batch.user_ids, batch.request_ids)


def with_behaviours(batch: Batch, items: torch.Tensor, categories: torch.Tensor, lengths: torch.Tensor) -> Batch:
    """``batch`` with the selected behaviours appended as ``seq_item_ids`` / ``seq_category_ids``."""
    return with_features(batch, {SEQ_ITEMS: (items, lengths), SEQ_CATEGORIES: (categories, lengths)})


# --------------------------------------------------------------------------- selection on ids


def _segments(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(offsets [B + 1], seg [N], pos [N])``: bag of every value and its index in the bag."""
    lengths = lengths.to(torch.int64)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    n = int(offsets[-1])
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=n)
    pos = torch.arange(n, device=lengths.device) - offsets[seg]
    return offsets, seg, pos


def last_n_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``[N]`` bool: which jagged values are among the last ``n`` of their bag."""
    lengths = lengths.to(torch.int64)
    _, seg, pos = _segments(lengths)
    return pos >= (lengths[seg] - n)


def last_n(values: torch.Tensor, lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``n`` values of every bag (the most recent behaviours), order kept.

    Example::

        last_n(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([3, 2]), 2)  # ([2, 3, 4, 5], [2, 2])
    """
    return values[last_n_mask(lengths, n)], lengths.to(torch.int64).clamp(max=n)


def recent_behaviours(batch: Batch, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(items [M], categories [M], lengths [B])``: the last ``n`` behaviours of every sample."""
    jt = batch.sparse.to_dict()
    hist = jt[HIST_ITEMS]
    keep = last_n_mask(hist.lengths(), n)
    return hist.values()[keep], jt[HIST_CATEGORIES].values()[keep], hist.lengths().to(torch.int64).clamp(max=n)


def same_category_recent(
    items: torch.Tensor, categories: torch.Tensor, lengths: torch.Tensor, target_categories: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SIM's hard-search GSU: behaviours of the target's category, the ``k`` most recent.

    Returns jagged ``(values [M], lengths [B])`` in the original (oldest first) order.
    """
    values, counts = filter_history_by_category(items, categories, lengths, target_categories)
    return last_n(values, counts, k)


@torch.no_grad()
def jagged_dot_scores(
    lookups: list[tuple[torch.Tensor, torch.Tensor]], lengths: torch.Tensor, query: torch.Tensor, chunk: int = 1 << 16
) -> torch.Tensor:
    """``score[j] = <query[bag(j)], Σ_t weight_t[ids_t[j]]>`` for every behaviour, without gradient.

    Args:
        lookups: ``(weight [V_t, D], ids [N])`` per table (item, category): a behaviour
            is the sum of its rows.
        lengths: ``[B]`` behaviours per sample.
        query: ``[B, D]``.

    Looks the rows up ``chunk`` behaviours at a time, so the largest temporary is
    ``[chunk, D]`` however long the sequences are (TWIN's GSU over the full sequence).
    """
    _, seg, _ = _segments(lengths)
    n = lookups[0][1].numel()
    out = torch.empty(n, dtype=query.dtype, device=query.device)
    for s in range(0, n, chunk):
        rows = sum(F.embedding(ids[s : s + chunk], w) for w, ids in lookups)
        out[s : s + chunk] = (rows * query[seg[s : s + chunk]]).sum(-1)
    return out


def topk_jagged(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into the jagged values) of the ``k`` best-scored values of every bag.

    Returns ``(positions [M], lengths [B])``; within a bag the kept positions are
    ascending, so the selection keeps the behaviours' chronological order. Builds one
    ``[B, max_len]`` score matrix (no embedding dimension).
    """
    lengths = lengths.to(torch.int64)
    offsets, seg, pos = _segments(lengths)
    batch = lengths.numel()
    width = int(lengths.max()) if batch else 0
    if width == 0 or k <= 0:
        return torch.empty(0, dtype=torch.int64, device=lengths.device), torch.zeros_like(lengths)
    dense = torch.full((batch, width), -math.inf, dtype=scores.dtype, device=scores.device)
    dense[seg, pos] = scores
    top_vals, top_idx = dense.topk(min(k, width), dim=1)
    valid = top_vals > -math.inf
    top_idx = torch.where(valid, top_idx, width).sort(dim=1).values
    keep = top_idx < width
    positions = (offsets[:-1, None] + top_idx)[keep]
    return positions, keep.sum(1)


# --------------------------------------------------------------------------- attention


class MultiHeadTargetAttention(nn.Module):
    """Scaled dot-product attention of one query per sample over its behaviours.

    Every head has its own ``D``-wide projections (no divisibility constraint):
    ``logit_h[j] = <W_q,h q, W_k,h e_j> / sqrt(D)``, softmax over valid positions,
    output ``W_o concat_h(Σ_j a_h[j] W_v,h e_j)`` ``[B, D]``. A sample with no valid
    behaviour gets the zero vector (no NaN).

    Args:
        dim: behaviour embedding width ``D``.
        num_heads: ``H``.
        query_dim: width of the query (default ``D``; QIN's query is ``[target; query]``).
    """

    def __init__(self, dim: int, num_heads: int, query_dim: int | None = None) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.w_q = nn.Linear(query_dim or dim, num_heads * dim, bias=False)
        self.w_k = nn.Linear(dim, num_heads * dim, bias=False)
        self.w_v = nn.Linear(dim, num_heads * dim, bias=False)
        self.w_o = nn.Linear(num_heads * dim, dim)

    def logits(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query ``[B, Dq]``, keys ``[B, L, D]`` -> ``[B, H, L]`` unmasked logits."""
        b, length, _ = keys.shape
        q = self.w_q(query).view(b, self.num_heads, self.dim)
        k = self.w_k(keys).view(b, length, self.num_heads, self.dim)
        return torch.einsum("bhd,blhd->bhl", q, k) / math.sqrt(self.dim)

    def relevance_query(self, query: torch.Tensor) -> torch.Tensor:
        """``r [B, D]`` with ``<r, e_j>`` = the head-averaged :meth:`logits` (TWIN's shared metric)."""
        q = self.w_q(query).view(-1, self.num_heads, self.dim)
        w_k = self.w_k.weight.view(self.num_heads, self.dim, -1)  # [H, d, D]
        return torch.einsum("bhd,hde->be", q, w_k) / (self.num_heads * math.sqrt(self.dim))

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(output [B, D], weights [B, H, L])`` (weights 0 at masked positions)."""
        b, length, _ = keys.shape
        logits = self.logits(query, keys)
        m = mask[:, None, :]
        logits = logits.masked_fill(~m, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1) * m
        v = self.w_v(keys).view(b, length, self.num_heads, self.dim)
        out = torch.einsum("bhl,blhd->bhd", weights, v).reshape(b, self.num_heads * self.dim)
        return self.w_o(out), weights


class DINAttention(nn.Module):
    """DIN's local activation unit (Zhou et al., KDD 2018).

    ``w_j = MLP([e_j, t, e_j - t, e_j ⊙ t])``; the interest is ``Σ_j w_j e_j`` over valid
    positions, *not* softmax-normalised (DIN keeps the intensity of the interest).
    The first layer is computed as ``A e_j + B t + C (e_j ⊙ t) + b``: the same function
    class as a linear layer on the concatenation (``e_j - t`` is linear in ``e_j`` and
    ``t``) without building the ``[B, L, 4D]`` input, and the target's term once per
    sample. ReLU replaces DIN's Dice/PReLU activation.
    """

    def __init__(self, dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.proj_e = nn.Linear(dim, hidden[0])
        self.proj_t = nn.Linear(dim, hidden[0], bias=False)
        self.proj_et = nn.Linear(dim, hidden[0], bias=False)
        self.unit = mlp(hidden[0], hidden[1:], 1)

    def forward(
        self, target: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """target ``[B, D]``, keys ``[B, L, D]``, mask ``[B, L]`` -> ``(interest [B, D], weights [B, L])``."""
        h = self.proj_e(keys) + self.proj_t(target)[:, None, :] + self.proj_et(keys * target[:, None, :])
        w = self.unit(torch.relu(h)).squeeze(-1) * mask
        return (w.unsqueeze(-1) * keys).sum(1), w


# --------------------------------------------------------------------------- model skeleton


class Behaviours(NamedTuple):
    """What :meth:`SequenceCTRModel.lookup` returns.

    Attributes:
        target: ``[B, D]`` target item + category embedding (what attention compares with).
        target_item, target_category: ``[B, D]`` each, for the ranker.
        keys: ``[B, L, D]`` behaviour item + category embeddings, zero at padding.
        mask: ``[B, L]`` bool, True at real behaviours.
        counts: ``[B]`` number of real behaviours.
    """

    target: torch.Tensor
    target_item: torch.Tensor
    target_category: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor


class EagerStage(nn.Module):
    """Runs ``owner.interact(*args)``: a leaf for TorchRec's pipeline tracer (module docstring).

    Holds no parameters; the owner is kept outside ``_modules`` (no cycle in the module
    tree, nothing in the state dict).
    """

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)

    def forward(self, *args: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.owner.interact(*args)  # type: ignore[attr-defined]


class SequenceCTRModel(nn.Module):
    """Skeleton of the sequence baselines: one EBC, one behaviour EC, one ranking MLP.

    Subclasses choose the behaviours (``prepare_batch`` on ids, or in :meth:`interact`),
    take them from the EC's lookup (:meth:`behaviours`) and hand their interest vector(s)
    to :meth:`head`, which scores ``MLP(single-valued embeddings ⊕ interest ⊕ log1p(count))``
    with BCE — the same ranking head and the same single-valued inputs (query, user, item,
    category, context, scene) as :class:`cdp_rec.models.base.BaseModel`, so differences
    between models are their behaviour representations.

    Args:
        cfg: the job config.
        device: where the tables live.
        seq_len: ``L`` of the padded behaviour tensor (``attention_len`` or ``top_k``).
        interest_dim: width of the interest vector(s) given to :meth:`head`.
    """

    def __init__(self, cfg: JobConfig, device: torch.device | str, seq_len: int, interest_dim: int) -> None:
        super().__init__()
        dim = cfg.model.embedding_dim
        self.features = cfg.features
        specs, self.single_features = single_feature_specs(cfg.features)
        self.ebc = build_embedding_bag_collection(specs, dim, device)
        self.ec = build_behaviour_collection(cfg.features, dim, device)
        self.seq_len = seq_len
        self.ranker = RankingHead(dim * (len(self.single_features) + 2) + interest_dim + 1, cfg.model.ranker_hidden)
        self.stage = EagerStage(self)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``batch`` must come from ``prepare_batch``; the lookups here, the rest in :meth:`interact`."""
        return self.stage(self.ebc(batch.sparse), self.ec(batch.sparse), batch)

    def interact(
        self, pooled: KeyedTensor, jts: dict[str, JaggedTensor], batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Everything after the lookups: ``pooled`` is the EBC's output, ``jts`` the EC's."""
        raise NotImplementedError

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(item [V, D], category [C, D])`` weights of the unsharded behaviour EC."""
        return self.ec.embeddings["item"].weight, self.ec.embeddings["category"].weight

    def behaviours(self, jts: dict[str, JaggedTensor]) -> Behaviours:
        """Target and selected behaviours from the EC's output for :func:`kjt_behaviours`' keys."""
        items, mask = padded(jts[SEQ_ITEMS], self.seq_len)
        cats, _ = padded(jts[SEQ_CATEGORIES], self.seq_len)
        t_item, t_cat = jts[TARGET_ITEM].values(), jts[TARGET_CATEGORY].values()
        return Behaviours(t_item + t_cat, t_item, t_cat, items + cats, mask, jts[SEQ_ITEMS].lengths())

    def lookup(self, kjt: KeyedJaggedTensor) -> Behaviours:
        """Look ``kjt`` (:func:`kjt_behaviours`' keys) up in the EC: :meth:`behaviours` of it."""
        return self.behaviours(self.ec(kjt))

    def head(
        self,
        emb: dict[str, torch.Tensor],
        look: Behaviours,
        interest: torch.Tensor,
        labels: torch.Tensor,
        aux_loss: torch.Tensor | None = None,
        **extra: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Ranking MLP + BCE (+ ``aux_loss``); ``extra`` tensors are returned detached."""
        x = torch.cat(
            [emb[k] for k in self.single_features]
            + [look.target_item, look.target_category, interest,
               torch.log1p(look.counts.to(interest.dtype)).unsqueeze(-1)],
            dim=-1,
        )
        logits = self.ranker(x)
        bce = F.binary_cross_entropy_with_logits(logits, labels)
        loss = bce if aux_loss is None else bce + aux_loss
        out = {"loss": loss.detach(), "logits": logits.detach(), "bce": bce.detach()}
        out.update({k: v.detach() for k, v in extra.items()})
        return loss, out
