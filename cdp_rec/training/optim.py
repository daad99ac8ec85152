"""Separate optimizers for sparse (embedding) and dense parameters (paper §4.1.3).

The paper uses Adam for both, with lr 5e-4 for sparse and 2.5e-4 for dense. Here,
unsharded, the tables are ordinary parameters and get a torch Adam; under
DistributedModelParallel the sparse side becomes TorchRec's fused optimizer instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from cdp_rec.config import TrainConfig


@dataclass
class Optimizers:
    sparse: torch.optim.Optimizer
    dense: torch.optim.Optimizer

    def zero_grad(self) -> None:
        self.sparse.zero_grad(set_to_none=True)
        self.dense.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.sparse.step()
        self.dense.step()

    def state_dict(self) -> dict:
        return {"sparse": self.sparse.state_dict(), "dense": self.dense.state_dict()}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(sparse, dense)``: parameters of embedding collections vs everything else."""
    sparse_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            sparse_ids.update(id(p) for p in module.parameters())
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return sparse, dense


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> Optimizers:
    sparse, dense = split_parameters(model)
    if not sparse or not dense:
        raise ValueError(f"model has {len(sparse)} sparse and {len(dense)} dense parameters; expected both")
    return Optimizers(
        sparse=torch.optim.Adam(sparse, lr=cfg.sparse_lr),
        dense=torch.optim.Adam(dense, lr=cfg.dense_lr),
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
