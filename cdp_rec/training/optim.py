"""Separate optimizers for sparse (embedding) and dense parameters (paper §4.1.3).

The paper uses Adam for both, with lr 5e-4 for sparse and 2.5e-4 for dense. Here,
unsharded, the tables are ordinary parameters and get :class:`RowLazyAdam` (Adam applied
only to the rows a step touched, like fbgemm's fused Adam for sharded tables); under
DistributedModelParallel the sparse side becomes TorchRec's fused optimizer instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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


class RowLazyAdam(torch.optim.Optimizer):
    """Adam on the rows of ``[V, D]`` tables that received a gradient this step.

    A dense torch Adam walks every row of every table each step (7 passes over ~10M
    values on the small config: 60% of a base-model step on CPU), although a batch
    touches a few thousand rows. Like fbgemm's fused Adam for sharded tables (and TF's
    LazyAdam), rows without gradient keep their moments and weights untouched; the bias
    correction uses the table-wide step count. Rows are found from a sparse gradient's
    indices or, for a dense gradient, from its non-zero rows — so an embedding row whose
    gradient is exactly zero is skipped, where plain Adam would still move it by momentum.

    For a row updated every step this is exactly torch Adam (tested).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("RowLazyAdam does not take a closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse and grad.sparse_dim() != 1:  # not row-sparse (embedding grads are)
                    grad = grad.to_dense()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    flat = grad.reshape(grad.shape[0], -1)
                    rows = flat.ne(0).any(1).nonzero().squeeze(1)
                    values = grad.index_select(0, rows)
                if rows.numel() == 0:
                    continue
                m = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                bias1 = 1 - beta1**step
                bias2_sqrt = math.sqrt(1 - beta2**step)
                denom = (v.sqrt() / bias2_sqrt).add_(group["eps"])
                p.index_add_(0, rows, m / denom, alpha=-group["lr"] / bias1)


def use_sparse_gradients(model: nn.Module, lookups_per_batch: Callable[[str], int] | None = None) -> list[str]:
    """Make the unsharded tables produce sparse (COO) gradients; returns their names.

    A dense ``[V, D]`` gradient per table per step is zero-filled and scanned although a
    batch usually touches a few thousand rows - the largest cost of an unsharded CPU
    step on the small config. But a sparse gradient stores one ``[D]`` row per lookup,
    not per table row: at batch 4096 x 2000 behaviours the item table's would be 8M rows
    (1 GiB) for a 200k-row table, and coalescing it costs more than the dense gradient.
    So a table goes sparse unless a batch can look up more than twice its rows
    (``lookups_per_batch(feature)``, an upper bound from ``max_seq_len``, summed over the
    table's features; None: every table). The factor 2 is because the bound is loose -
    logged histories average below ``max_seq_len`` and CDP's category-filtered sequence
    is a fraction of it - while the sparse path only loses once lookups clearly exceed
    the rows (measured, small config, CDP: 31k samples/s with every table sparse vs 8.7k
    with dense gradients and Adam; base at batch 4096 x L=2000: 8M sparse rows for the
    200k-row item table, 7.8 s per step).
    Only for the single-process path: DMP replaces these modules by fused kernels.
    """
    chosen: list[str] = []
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            configs, tables = module.embedding_bag_configs(), module.embedding_bags
        elif isinstance(module, EmbeddingCollection):
            configs, tables = module.embedding_configs(), module.embeddings
        else:
            continue
        for config in configs:
            lookups = None if lookups_per_batch is None else sum(lookups_per_batch(f) for f in config.feature_names)
            if lookups is None or lookups <= 2 * config.num_embeddings:
                tables[config.name].sparse = True
                chosen.append(config.name)
    return chosen


def dense_optimizer(cfg: TrainConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """Factory of the dense layers' optimizer: torch Adam at ``dense_lr``; with
    ``weight_decay`` > 0, AdamW-style decoupled decay of the weight matrices (parameters
    of 2 or more dimensions; biases and norm scales are not decayed)."""
    if not cfg.weight_decay:
        return lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr)

    def make(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        decay = [p for p in ps if p.dim() >= 2]
        rest = [p for p in ps if p.dim() < 2]
        groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, cfg.weight_decay), (rest, 0.0)) if g]
        return torch.optim.Adam(groups, lr=cfg.dense_lr, decoupled_weight_decay=True)

    return make


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> CombinedOptimizer:
    """Unsharded: row-lazy Adam for the tables (sparse lr), torch Adam for the dense layers
    (dense lr; decoupled weight decay with ``train.weight_decay``, :func:`dense_optimizer`).

    Keyed by parameter name (TorchRec's KeyedOptimizer), so the optimizer state has the
    same layout as the sharded path's and checkpoints address it by name.
    """
    sparse, dense = split_parameters(model)
    if not sparse or not dense:
        raise ValueError(f"model has {len(sparse)} sparse and {len(dense)} dense parameters; expected both")
    return CombinedOptimizer(
        [
            KeyedOptimizerWrapper(sparse, lambda ps: RowLazyAdam(ps, lr=cfg.sparse_lr)),
            KeyedOptimizerWrapper(dense, dense_optimizer(cfg)),
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
    optimizers.append(KeyedOptimizerWrapper(dense, dense_optimizer(cfg)))
    if tables:
        optimizers.append(KeyedOptimizerWrapper(tables, lambda ps: torch.optim.Adam(ps, lr=cfg.sparse_lr)))
    return CombinedOptimizer(optimizers)
