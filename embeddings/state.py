"""Moving embedding state between a sharded model and full (unsharded) tensors.

Used to start every world size from the same seeded weights (``sharding.init:
replicated``), to compare a sharded run with a one-process run in tests, and to
export. Both directions work on the ``ShardedTensor`` local shards of
``DistributedModelParallel.state_dict()``, whose tensors are views of the fbgemm
weights, so an in-place copy updates the live table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor


def _strip(key: str) -> str:
    # DMP / DDP wrappers prefix keys; full state dicts from the unsharded model do not.
    for prefix in ("_dmp_wrapped_module.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _slices(offsets: list[int], sizes: list[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


@torch.no_grad()
def load_full_state(sharded: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (an unsharded model's ``state_dict()``) into ``sharded``'s shards."""
    missing = []
    for key, dst in sharded.state_dict().items():
        name = _strip(key)
        if name not in full:
            missing.append(name)
            continue
        src = full[name]
        if isinstance(dst, ShardedTensor):
            for shard in dst.local_shards():
                md = shard.metadata
                shard.tensor.copy_(src[_slices(list(md.shard_offsets), list(md.shard_sizes))])
        elif isinstance(dst, torch.Tensor):
            dst.copy_(src)
        else:  # pragma: no cover - other sharded formats are not produced by our plans
            raise TypeError(f"{key}: cannot load into {type(dst).__name__}")
    if missing:
        raise KeyError(f"full state lacks {len(missing)} keys of the sharded model, e.g. {missing[:3]}")


@torch.no_grad()
def gather_full_state(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors of every state entry, on every rank (collective: all ranks must call).

    Object all-gather of the local shards: meant for tests and small tables, not for
    exporting industrial tables (that streams shard by shard).
    """
    local: dict[str, Any] = {}
    sizes: dict[str, list[int]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, t in sharded.state_dict().items():
        name = _strip(key)
        if isinstance(t, ShardedTensor):
            sizes[name] = list(t.size())
            local[name] = [
                (list(s.metadata.shard_offsets), list(s.metadata.shard_sizes), s.tensor.detach().cpu().clone())
                for s in t.local_shards()
            ]
        elif isinstance(t, torch.Tensor):
            plain[name] = t.detach().cpu().clone()
    world = dist.get_world_size() if dist.is_initialized() else 1
    parts: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    out = dict(plain)
    for name, size in sizes.items():
        full = torch.zeros(size)
        for rank_parts in parts:
            for offsets, shard_sizes, tensor in rank_parts.get(name, []):
                full[_slices(offsets, shard_sizes)] = tensor
        out[name] = full
    return out
