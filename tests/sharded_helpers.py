"""Shared by the tests that train sharded and measure what the ranks hold
(tests/test_plan_memory.py, tests/test_sharding_cuda.py)."""

from __future__ import annotations

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import KeyedJaggedTensor

from cdp_rec.config import JobConfig
from cdp_rec.data.schema import Batch, sparse_keys


def random_batch(cfg: JobConfig, n: int, seed: int, categories: int | None = None) -> Batch:
    """``n`` samples with uniform ids over every vocabulary and 0..max_seq_len behaviours.

    ``categories``: draw target and behaviour categories from the first ``categories``
    only, so CDP's category filter keeps a real share of the history.
    """
    g = torch.Generator().manual_seed(seed)
    f = cfg.features
    sizes = {"query_id": f.num_queries, "user_id": f.num_users, "item_id": f.num_items,
             "category_id": f.num_categories, **f.context_features, **f.scene_features}
    keys = sparse_keys(f)
    values = [torch.randint(0, sizes[k], (n,), generator=g) for k in keys[:-2]]
    lengths = [torch.ones(n, dtype=torch.int64) for _ in keys[:-2]]
    hist = torch.randint(0, f.max_seq_len + 1, (n,), generator=g)
    values += [torch.randint(0, f.num_items, (int(hist.sum()),), generator=g),
               torch.randint(0, categories or f.num_categories, (int(hist.sum()),), generator=g)]
    lengths += [hist, hist]
    if categories is not None:
        values[keys.index("category_id")] = torch.randint(0, categories, (n,), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    return Batch(kjt, torch.randint(0, 2, (n,), generator=g).float(), torch.arange(n), torch.arange(n))


def table_of(key: str) -> str | None:
    """The table a state-dict key of an EBC / EC belongs to (None: not a table)."""
    for part in (".embedding_bags.", ".embeddings."):
        if part in key:
            return key.split(part)[1].split(".")[0]
    return None


def tensor_bytes(t: object) -> int:
    """Bytes this rank holds of ``t`` (its local shards of a ShardedTensor; scalars count 0)."""
    if isinstance(t, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
    assert isinstance(t, torch.Tensor)
    return t.numel() * t.element_size() if t.dim() >= 1 else 0  # scalars: Adam's step count


def tbe_kernels(dmp: torch.nn.Module):
    """fbgemm's kernel modules of the model-parallel lookups under ``dmp`` (TorchRec keeps its
    lookups in plain lists, so they are reached through its attributes; data-parallel
    lookups, wrapped in DDP, are not among them)."""
    for module in dmp.modules():
        for lookup in getattr(module, "_lookups", []):
            for emb in getattr(lookup, "_emb_modules", []):
                kernel = getattr(emb, "_emb_module", None)
                if kernel is not None:
                    yield kernel


def measure_shards(trainer) -> dict[str, dict[str, int]]:
    """{"weights" | "state": {table: bytes on this rank}} and fbgemm's own totals ("tbe")."""
    weights: dict[str, int] = {}
    for key, t in trainer.module.state_dict().items():
        table = table_of(key)
        if table is not None and tensor_bytes(t):
            weights[table] = weights.get(table, 0) + tensor_bytes(t)
    state: dict[str, int] = {}
    for key, st in trainer.optimizer.state_dict()["state"].items():  # fused shards + torch Adam (data-parallel)
        table = table_of(key)
        if table is not None:
            n = sum(tensor_bytes(v) for v in st.values() if isinstance(v, (torch.Tensor, ShardedTensor)))
            if n:
                state[table] = state.get(table, 0) + n
    # fbgemm's storage: the flat weights / momentum buffers of every TBE kernel on this rank.
    tbe = {"weights": 0, "state": 0}
    for kernel in tbe_kernels(trainer.module):
        for name, p in kernel.named_parameters(recurse=False):
            if name.startswith("weights_"):
                tbe["weights"] += p.numel() * p.element_size()
            elif name.startswith("momentum"):
                tbe["state"] += p.numel() * p.element_size()
    return {"weights": weights, "state": state, "tbe": tbe}
