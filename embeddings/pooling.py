"""Category-gated mean pooling of the behaviour sequence (CDP paper eq. 2-3).

x0[b] = mean{ E[item_j] : category_j == target_category[b] } over the behaviours of
sample ``b``; no match gives the zero vector and count 0.

Two implementations behind one contract:

* :func:`category_filtered_mean_reference` — the plain PyTorch definition on a padded
  ``[B, L]`` history: gather ``[B, L, D]``, mask, mean. Tests use it as ground truth.
* :func:`filter_history_by_category` + MEAN pooling in the item table — the production
  path. The filter works on the *jagged* values (``[N]``, one entry per behaviour) and
  compacts them to the matching ids, so the embedding lookup reads only ~N/C rows and
  never builds ``[B, L, D]`` or a dense ``[B, L]`` mask. Because the result is a plain
  jagged feature, a sharded TorchRec table pools it like any other feature.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


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
        order and how many matched per sample.
    """
    if hist_items.shape != hist_categories.shape:
        raise ValueError(
            f"hist_items {tuple(hist_items.shape)} and hist_categories "
            f"{tuple(hist_categories.shape)} must have the same shape"
        )
    batch = lengths.numel()
    lengths = lengths.to(torch.int64)
    segment = torch.repeat_interleave(torch.arange(batch, device=lengths.device), lengths)
    keep = hist_categories == target_categories.to(hist_categories.dtype)[segment]
    if recency_window is not None:
        offsets = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(hist_items.numel(), device=lengths.device) - offsets[segment]
        keep &= position >= (lengths - recency_window)[segment]
    values = hist_items[keep]
    match_lengths = torch.bincount(segment[keep], minlength=batch)
    return values, match_lengths


def category_filtered_mean_reference(
    table: torch.Tensor,
    hist_items: torch.Tensor,
    hist_categories: torch.Tensor,
    lengths: torch.Tensor,
    target_categories: torch.Tensor,
    recency_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: pad to ``[B, L]``, gather ``[B, L, D]``, mask, mean.

    Args:
        table: ``[V, D]`` item embedding table.
        hist_items, hist_categories: ``[N]`` jagged behaviours (see
            :func:`filter_history_by_category`).
        lengths: ``[B]``.
        target_categories: ``[B]``.

    Returns:
        ``(pooled [B, D], counts [B])``; rows with no match are zero.
    """
    batch = lengths.numel()
    max_len = int(lengths.max()) if batch else 0
    pos = torch.arange(max_len)
    valid = pos[None, :] < lengths[:, None]  # [B, L]
    if recency_window is not None:
        valid &= pos[None, :] >= (lengths - recency_window)[:, None]
    items = torch.zeros(batch, max_len, dtype=torch.int64)
    cats = torch.full((batch, max_len), -1, dtype=torch.int64)
    dense_valid = pos[None, :] < lengths[:, None]
    items[dense_valid] = hist_items
    cats[dense_valid] = hist_categories
    mask = valid & (cats == target_categories[:, None])
    gathered = table[items]  # [B, L, D]
    counts = mask.sum(1)
    summed = (gathered * mask[..., None]).sum(1)
    pooled = summed / counts.clamp(min=1)[:, None].to(table.dtype)
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
