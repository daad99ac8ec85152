"""Category-gated mean pooling of the behaviour sequence (CDP paper eq. 2-3).

x0[b] = mean{ E[item_j] : category_j == target_category[b] } over the behaviours of
sample ``b`` (optionally only the last ``recency_window`` behaviours, optionally a
weighted mean ``sum(w_j E[item_j]) / sum(w_j)``); no match gives the zero vector and
count 0.

One contract, three implementations (generative-recommenders style: a PyTorch
reference and optimized versions behind one dispatching function):

* :func:`category_filtered_mean_reference` -- the plain definition on a padded
  ``[B, L]`` history: gather ``[B, L, D]``, mask, mean. Ground truth for the tests.
* :func:`category_filtered_mean` -- the dispatcher. On CPU (and on CUDA without
  Triton): the *compact-then-pool* path below. On CUDA with Triton: the one-pass
  kernel of :mod:`embeddings.pooling_triton`, a ``torch.library`` custom op.
* :func:`filter_history_by_category` / :func:`with_filtered_history` -- the same
  compaction, returned as a jagged feature, for a sharded TorchRec table: the filter
  travels inside the KJT and DistributedModelParallel's lookup does the MEAN pooling.

CPU path: compact, then pool (chosen by measurement)
----------------------------------------------------
The category test needs every behaviour's category and the sample's target category;
the embedding rows are needed only for the ~N/C matches. So the CPU path is

1. per chunk of whole bags (about ``2**20`` behaviours): expand the target category
   over the chunk's behaviours, compare with the behaviour categories, ``nonzero`` ->
   positions of the matches;
2. ``index_select`` the matching ids (and weights); the window test and the bag index
   of each match (``searchsorted`` on the offsets) run on the ``M ~ N / C`` matches only;
3. one ``torch.nn.functional.embedding_bag`` over the compacted ids: ``mode="mean"``,
   or ``mode="sum"`` with ``per_sample_weights = w / sum(w)`` for the weighted mean.
   Empty bags pool to zero in ATen, which is the "no match" case without 0/0.

Neither ``[B, L, D]`` nor a dense ``[B, L]`` mask is built; the temporaries are one
chunk's int64 target buffer and bool mask (~9 MiB) plus O(M).

Why, measured on the 2-core dev box (B=4096, L=2000 -> N=8.2M, C=100, 1M x 64 table;
min of repeated runs; the box was shared with other jobs, so single numbers vary by
~1.5x, the orderings held in every run):

* the pooling itself is cheap: ``embedding_bag`` over the M=82k matches takes ~1 ms;
  ``mode="sum"`` with ``per_sample_weights`` costs the same, so the unweighted path
  uses ``mode="mean"`` (no weight tensor) and the weighted one ``sum``. Pooling all
  8.2M ids unfiltered (what TorchRec's EBC does) takes 240-310 ms. Everything else
  is the filter.
* a weighted EBC over all N ids with ``weights = mask / count`` (the other obvious
  ATen/fbgemm formulation) reads all N rows: at B=512, 43-61 ms forward versus 23-39
  ms, and 179-517 ms forward+backward versus 15-36 ms for compaction
  (``/work/shared/torchrec-on-cpu.md``); compaction wins.
* the filter is bounded by *fresh* N-sized allocations, not arithmetic: a new 66 MB
  int64 buffer costs ~35 ms of page faults (glibc returns such blocks to the kernel
  on free), while ``eq`` over 8.2M int64 takes ~5 ms, ``nonzero`` ~5 ms and an
  in-place ``cumsum`` ~3 ms. ``repeat_interleave(target, lengths)`` (two N-sized
  buffers) took 60-160 ms; one buffer of per-bag deltas + in-place ``cumsum`` 58-90
  ms; the same in chunks (buffers reused from the heap, never faulted in again)
  20-49 ms for the whole filter. Chunks of ``2**16``..``2**20`` tie when the box is
  quiet; on a contended box every extra small OpenMP region costs a scheduler slice
  (``2**16``: 0.8-1.7 s, ``2**18``: 0.07-0.3 s, ``2**20``: 0.04-0.1 s with 2 threads),
  so ``2**20`` -- fewest regions for ~9 MiB of scratch.

End to end (``bench/pooling.py``, forward, B=4096, L=2000, 10M x 64 table, C=100, one
thread, two runs): 27-59 ms and +18-27 MiB peak RSS, versus 18-19 s and +4.1 GiB for
gather + mask + mean, and 420-740 ms for TorchRec's EBC pooling the unfiltered
sequence. With 2 threads on a quiet box (B=512, 1M rows): 1.8 ms vs 305 ms vs 20 ms.
With 2 threads on a box whose cores other jobs keep busy, the fused path's ~36 small
parallel regions per call each wait for a descheduled OpenMP thread: B=4096 took
240-270 ms (still 20x under naive, 1.3x under the EBC's single big region); use one
intra-op thread on such a box.

Backward of the CPU path is ATen's ``embedding_bag`` backward over the compacted ids,
so only matching rows receive gradient (dense ``[V, D]`` by default, ``sparse=True``
for a sparse COO gradient, which for a 10M-row table saves the 2.5 GB dense gradient);
with per-behaviour weights that require grad, the weights get their gradient through
the same graph.

Example::

    pooled, counts = category_filtered_mean(ebc, hist_items, hist_categories, lengths, target_cats,
                                            recency_window=200, weights=decay)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # torchrec is imported lazily: the pooling itself needs only torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Behaviours per chunk of the CPU filter (see the module docstring for the measurement).
_CPU_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------
# Filter: positions of the matching behaviours, on the jagged values.
# ---------------------------------------------------------------------------------------


def _bag_offsets(lengths: torch.Tensor | None, offsets: torch.Tensor | None, num_values: int) -> torch.Tensor:
    """``[B + 1]`` int64 offsets from lengths or offsets (exactly one of them)."""
    if (lengths is None) == (offsets is None):
        raise ValueError("pass exactly one of lengths and offsets")
    if offsets is None:
        assert lengths is not None
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths.to(torch.int64), 0, out=offsets[1:])
    else:
        offsets = offsets.to(torch.int64)
        if offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"offsets must be [B + 1], got shape {tuple(offsets.shape)}")
    if offsets.device.type == "cpu" and int(offsets[-1]) != num_values:
        raise ValueError(f"lengths/offsets cover {int(offsets[-1])} behaviours, the jagged values have {num_values}")
    return offsets


def _expanded_target_chunk(
    target: torch.Tensor, offsets: torch.Tensor, b0: int, b1: int, start: int, n: int
) -> torch.Tensor:
    """Target category of every behaviour of bags ``b0:b1`` (``n`` values from ``start``).

    A scatter of per-bag deltas plus an in-place prefix sum: one buffer, versus the two
    that ``repeat_interleave`` allocates. Empty bags share a start with the next bag and
    their deltas telescope away.
    """
    buf = torch.zeros(n + 1, dtype=target.dtype, device=target.device)
    t = target[b0:b1]
    delta = torch.diff(t, prepend=t.new_zeros(1))
    buf.index_add_(0, offsets[b0:b1] - start, delta)
    out = buf[:n]
    return out.cumsum_(0)


def _match_positions(
    hist_categories: torch.Tensor,
    offsets: torch.Tensor,
    target_categories: torch.Tensor,
    recency_window: int | None = None,
    chunk: int = _CPU_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (in the jagged values) and bag index of the matching behaviours.

    Returns:
        ``(pos [M], seg [M])`` int64, ``pos`` ascending.
    """
    pos = _matching_positions(hist_categories, offsets, target_categories, chunk)
    seg = torch.searchsorted(offsets[1:], pos, right=True)
    if recency_window is not None:
        keep = pos >= offsets[1:][seg] - recency_window
        pos, seg = pos[keep], seg[keep]
    return pos, seg


def _matching_positions(
    hist_categories: torch.Tensor, offsets: torch.Tensor, target_categories: torch.Tensor, chunk: int = _CPU_CHUNK
) -> torch.Tensor:
    """Ascending positions ``[M]`` (int64, in the jagged values) of the behaviours in their bag's target category."""
    batch = target_categories.numel()
    n = hist_categories.numel()
    device = hist_categories.device
    if target_categories.shape != (batch,) or offsets.numel() != batch + 1:
        raise ValueError(
            f"target_categories must be [B] and lengths [B] (offsets [B + 1]); got target "
            f"{tuple(target_categories.shape)}, offsets {tuple(offsets.shape)}"
        )
    target = target_categories.to(device=device, dtype=hist_categories.dtype)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    if n == 0 or batch == 0:
        return empty
    if device.type != "cpu":
        # Accelerators: no page-fault cost to avoid and no host sync wanted for chunking.
        tr = torch.repeat_interleave(target, offsets.diff(), output_size=n)
        pos = torch.nonzero(hist_categories == tr).squeeze(1)
    else:
        offs = offsets.tolist()
        cuts = torch.searchsorted(offsets, torch.arange(chunk, n, chunk)).tolist() if n > chunk else []
        bounds = sorted({0, *cuts, batch})
        parts = []
        for b0, b1 in zip(bounds[:-1], bounds[1:]):
            start, end = offs[b0], offs[b1]
            if end == start:
                continue
            tr = _expanded_target_chunk(target, offsets, b0, b1, start, end - start)
            parts.append(torch.nonzero(torch.eq(hist_categories[start:end], tr)).squeeze(1).add_(start))
        pos = torch.cat(parts) if parts else empty
    return pos


def filter_history_by_category(
    hist_items: torch.Tensor,
    hist_categories: torch.Tensor,
    lengths: torch.Tensor,
    target_categories: torch.Tensor,
    recency_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the behaviours whose category equals the sample's target category.

    Args:
        hist_items: ``[N]`` int64 jagged item ids, samples back to back, most recent last.
        hist_categories: ``[N]`` int64 category of each behaviour.
        lengths: ``[B]`` behaviours per sample, ``sum(lengths) == N``.
        target_categories: ``[B]`` category of each sample's target item.
        recency_window: if set, only the last ``recency_window`` behaviours of each
            sample are considered (before filtering).

    Returns:
        ``(values [M], match_lengths [B])``: the matching item ids in their original
        order and how many matched per sample (int64).
    """
    if hist_items.shape != hist_categories.shape:
        raise ValueError(
            f"hist_items {tuple(hist_items.shape)} and hist_categories "
            f"{tuple(hist_categories.shape)} must have the same shape"
        )
    offsets = _bag_offsets(lengths, None, hist_items.numel())
    if recency_window is not None:
        pos, seg = _match_positions(hist_categories, offsets, target_categories, recency_window)
        return hist_items.index_select(0, pos), torch.bincount(seg, minlength=lengths.numel())
    # No window, so no bag index per match is needed: the matches per bag are where the
    # bag offsets fall among the ascending positions (B + 1 binary searches instead of M,
    # ~3 of 8 ms at B = 512, L = 2000 on one core).
    pos = _matching_positions(hist_categories, offsets, target_categories)
    match_lengths = torch.searchsorted(pos, offsets.to(pos.device)).diff()
    return hist_items.index_select(0, pos), match_lengths


# ---------------------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------------------


def category_filtered_mean_reference(
    table: torch.Tensor,
    hist_items: torch.Tensor,
    hist_categories: torch.Tensor,
    lengths: torch.Tensor,
    target_categories: torch.Tensor,
    recency_window: int | None = None,
    *,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: pad to ``[B, L]``, gather ``[B, L, D]``, mask, mean.

    Args:
        table: ``[V, D]`` item embedding table.
        hist_items, hist_categories: ``[N]`` jagged behaviours (see
            :func:`filter_history_by_category`).
        lengths: ``[B]``.
        target_categories: ``[B]``.
        recency_window: only the last ``recency_window`` behaviours count.
        weights: optional ``[N]`` per-behaviour weights: pooled = sum(w e) / sum(w)
            over the matches (zero where that sum is zero).

    Returns:
        ``(pooled [B, D], counts [B])``; rows with no match are zero.
    """
    device = table.device
    lengths = lengths.to(device=device, dtype=torch.int64)
    batch = lengths.numel()
    max_len = int(lengths.max()) if batch else 0
    pos = torch.arange(max_len, device=device)
    valid = pos[None, :] < lengths[:, None]  # [B, L]
    if recency_window is not None:
        valid &= pos[None, :] >= (lengths - recency_window)[:, None]
    items = torch.zeros(batch, max_len, dtype=torch.int64, device=device)
    cats = torch.full((batch, max_len), -1, dtype=torch.int64, device=device)
    dense_valid = pos[None, :] < lengths[:, None]
    items[dense_valid] = hist_items.to(device)
    cats[dense_valid] = hist_categories.to(device=device, dtype=torch.int64)
    mask = valid & dense_valid & (cats == target_categories.to(device)[:, None])
    gathered = table[items]  # [B, L, D]
    counts = mask.sum(1)
    if weights is None:
        summed = (gathered * mask[..., None]).sum(1)
        pooled = summed / counts.clamp(min=1)[:, None].to(table.dtype)
        return pooled, counts
    w = torch.zeros(batch, max_len, dtype=weights.dtype, device=device)
    w = w.masked_scatter(dense_valid, weights.to(device)) * mask
    summed = (gathered * w[..., None]).sum(1)
    den = w.sum(1)
    safe = torch.where(den != 0, den, torch.ones_like(den))
    pooled = torch.where((den != 0)[:, None], summed / safe[:, None], torch.zeros_like(summed))
    return pooled, counts


# ---------------------------------------------------------------------------------------
# The dispatching function.
# ---------------------------------------------------------------------------------------


def _resolve_weight(table: torch.Tensor | nn.Module, table_name: str | None) -> torch.Tensor:
    """The ``[V, D]`` weight of a tensor, nn.Embedding(Bag), or unsharded TorchRec EBC."""
    if isinstance(table, torch.Tensor):
        weight = table
    elif isinstance(table, (nn.EmbeddingBag, nn.Embedding)):
        weight = table.weight
    elif hasattr(table, "embedding_bags") and isinstance(getattr(table, "embedding_bags"), nn.ModuleDict):
        bags = table.embedding_bags
        names = list(bags.keys())
        if table_name is None:
            if len(names) == 1:
                table_name = names[0]
            elif "item" in names:
                table_name = "item"
            else:
                raise ValueError(f"the collection has tables {names}: pass table_name")
        if table_name not in bags:
            raise ValueError(f"table {table_name!r} not in the collection; tables are {names}")
        weight = bags[table_name].weight
    else:
        raise TypeError(
            f"cannot pool from {type(table).__name__}: pass a [V, D] tensor, an nn.Embedding(Bag) or an "
            f"unsharded EmbeddingBagCollection. For a DistributedModelParallel-sharded table, put the filter "
            f"into the KJT with with_filtered_history(), let the sharded lookup SUM-pool it and divide (bag_mean)."
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(getattr(weight, "shape", ()))
        raise ValueError(f"the item table must be a [V, D] tensor, got {type(weight).__name__} {shape}")
    return weight


def _pool_compacted(
    weight: torch.Tensor,
    hist_items: torch.Tensor,
    hist_categories: torch.Tensor,
    offsets: torch.Tensor,
    target_categories: torch.Tensor,
    recency_window: int | None,
    weights: torch.Tensor | None,
    sparse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact-then-pool. Returns ``(pooled [B, D], counts [B], denominators [B])``.

    ``denominators`` is ``sum(w)`` over the matches (the count when unweighted); the
    custom op's backward uses it.
    """
    batch = target_categories.numel()
    pos, seg = _match_positions(hist_categories, offsets, target_categories, recency_window)
    values = hist_items.index_select(0, pos).to(torch.int64)
    counts = torch.bincount(seg, minlength=batch)
    bag_offsets = torch.zeros(batch + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(counts, 0, out=bag_offsets[1:])
    if weights is None:
        pooled = F.embedding_bag(values, weight, bag_offsets, mode="mean", sparse=sparse, include_last_offset=True)
        return pooled, counts, counts.to(weight.dtype)
    w = weights.index_select(0, pos).to(weight.dtype)
    den = torch.zeros(batch, dtype=weight.dtype, device=weight.device).index_add(0, seg, w)
    nonzero = den != 0
    scale = torch.where(nonzero, 1.0 / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(den))
    pooled = F.embedding_bag(
        values, weight, bag_offsets, mode="sum", per_sample_weights=w * scale[seg], sparse=sparse,
        include_last_offset=True,
    )
    return pooled, counts, den


def category_filtered_mean(
    table: torch.Tensor | nn.Module,
    hist_items: torch.Tensor,
    hist_categories: torch.Tensor,
    lengths: torch.Tensor | None,
    target_categories: torch.Tensor,
    recency_window: int | None = None,
    *,
    offsets: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    table_name: str | None = None,
    sparse: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the item embeddings of the behaviours in the target's category.

    Args:
        table: the item table: a ``[V, D]`` weight tensor (usually a Parameter), an
            ``nn.Embedding``/``nn.EmbeddingBag``, or an unsharded TorchRec
            ``EmbeddingBagCollection`` (its ``table_name`` table; default the only
            table, else ``"item"``). Gradients go to that weight.
        hist_items: ``[N]`` jagged behaviour item ids, samples back to back, most recent last.
        hist_categories: ``[N]`` category of each behaviour.
        lengths: ``[B]`` behaviours per sample (or ``None`` and pass ``offsets``).
        target_categories: ``[B]`` the target item's category per sample.
        recency_window: only the last ``recency_window`` behaviours of a sample count.
        offsets: ``[B + 1]`` jagged offsets, instead of ``lengths``.
        weights: optional ``[N]`` per-behaviour weights (e.g. time decay): the result is
            ``sum(w e) / sum(w)`` over the matches, zero where that sum is zero. May
            require grad.
        sparse: CPU path only: produce a sparse COO gradient for the table.
        backend: ``"auto"`` (Triton on CUDA when importable, else compact-then-pool),
            ``"torch"`` (compact-then-pool; any device), ``"op"`` (the
            ``cdp_rec::category_filtered_pool`` custom op: Triton kernel on CUDA, its
            PyTorch implementation elsewhere), ``"reference"`` (gather + mask + mean).

    Returns:
        ``(pooled [B, D], counts [B] int64)``: no match gives the zero vector, count 0.

    Example::

        pooled, counts = category_filtered_mean(table, items, cats, lengths, target)
        pooled, counts = category_filtered_mean(ebc, items, cats, lengths, target, 100, weights=decay)
    """
    weight = _resolve_weight(table, table_name)
    if hist_items.shape != hist_categories.shape or hist_items.dim() != 1:
        raise ValueError(
            f"hist_items {tuple(hist_items.shape)} and hist_categories {tuple(hist_categories.shape)} "
            f"must be the same [N] shape"
        )
    if weights is not None and weights.shape != hist_items.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match hist_items {tuple(hist_items.shape)}")
    inputs = (hist_items, hist_categories, target_categories) + ((weights,) if weights is not None else ())
    devices = {t.device for t in inputs}
    if devices != {weight.device}:
        raise ValueError(
            f"the table is on {weight.device} but the behaviour tensors are on {sorted(map(str, devices))}"
        )
    bag_offsets = _bag_offsets(lengths, offsets, hist_items.numel()).to(weight.device)
    if backend == "auto":
        from embeddings import pooling_triton

        backend = "op" if weight.is_cuda and pooling_triton.HAS_TRITON else "torch"
    if backend == "reference":
        return category_filtered_mean_reference(
            weight, hist_items, hist_categories, bag_offsets.diff(), target_categories, recency_window, weights=weights
        )
    if backend == "op":
        from embeddings import pooling_triton

        pooled, counts, _ = pooling_triton.category_filtered_pool(
            weight, hist_items, hist_categories, bag_offsets, target_categories.to(hist_categories.dtype),
            weights, recency_window,
        )
        return pooled, counts
    if backend != "torch":
        raise ValueError(f"backend must be auto, torch, op or reference, got {backend!r}")
    pooled, counts, _ = _pool_compacted(
        weight, hist_items, hist_categories, bag_offsets, target_categories, recency_window, weights, sparse
    )
    return pooled, counts


def with_filtered_history(
    features: KeyedJaggedTensor,
    keep_keys: list[str],
    items_key: str,
    categories_key: str,
    target_key: str,
    out_key: str,
    recency_window: int | None = None,
) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Build the lookup KJT: ``keep_keys`` unchanged plus ``out_key`` = matching behaviours.

    The filter travels *inside* the KJT as compacted ids, so whichever module pools
    ``out_key`` (a local EBC or a DistributedModelParallel-sharded one, table-wise or
    row-wise) computes the category-gated mean with its ordinary MEAN pooling.

    Returns:
        ``(kjt, match_counts [B])``.
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    jt = features.to_dict()
    target = jt[target_key].values()
    if target.numel() != features.stride():
        raise ValueError(f"feature {target_key!r} must have exactly one value per sample")
    hist = jt[items_key]
    values, match_lengths = filter_history_by_category(
        hist.values(), jt[categories_key].values(), hist.lengths(), target, recency_window
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[*keep_keys, out_key],
        values=torch.cat([*(jt[k].values() for k in keep_keys), values]),
        lengths=torch.cat([*(jt[k].lengths().to(torch.int64) for k in keep_keys), match_lengths]),
    )
    return kjt, match_lengths
