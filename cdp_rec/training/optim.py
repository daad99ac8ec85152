"""Separate optimizers for sparse (embedding) and dense parameters (paper §4.1.3).

The paper uses Adam for both, with lr 5e-4 for sparse and 2.5e-4 for dense. Here,
unsharded, the tables are ordinary parameters and get a torch Adam; under
DistributedModelParallel the sparse side becomes TorchRec's fused optimizer instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from cdp_rec.config import TrainConfig


def split_parameters(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """``(sparse, dense)`` named parameters: embedding (bag) collections vs everything else."""
    sparse_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            sparse_ids.update(id(p) for p in module.parameters())
    named = dict(model.named_parameters())
    sparse = {n: p for n, p in named.items() if id(p) in sparse_ids}
    dense = {n: p for n, p in named.items() if id(p) not in sparse_ids}
    return sparse, dense


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> CombinedOptimizer:
    """Unsharded: torch Adam for the tables (sparse lr) and for the dense layers (dense lr).

    Keyed by parameter name (TorchRec's KeyedOptimizer), so the optimizer state has the
    same layout as the sharded path's and checkpoints address it by name.
    """
    sparse, dense = split_parameters(model)
    if not sparse or not dense:
        raise ValueError(f"model has {len(sparse)} sparse and {len(dense)} dense parameters; expected both")
    return CombinedOptimizer(
        [
            KeyedOptimizerWrapper(sparse, lambda ps: torch.optim.Adam(ps, lr=cfg.sparse_lr)),
            KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr)),
        ]
    )


def build_sharded_optimizer(dmp: nn.Module, cfg: TrainConfig) -> KeyedOptimizer:
    """Fused sparse optimizer (already applied in backward) + Adam for everything else.

    Tables the plan made data-parallel are ordinary (dense-kernel) parameters; they keep
    the sparse learning rate.
    """
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    tables = {n: p for n, p in params.items() if ".embedding_bags." in n}
    dense = {n: p for n, p in params.items() if n not in tables}
    optimizers: list[KeyedOptimizer] = [dmp.fused_optimizer]  # type: ignore[list-item]
    optimizers.append(KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr)))
    if tables:
        optimizers.append(KeyedOptimizerWrapper(tables, lambda ps: torch.optim.Adam(ps, lr=cfg.sparse_lr)))
    return CombinedOptimizer(optimizers)
