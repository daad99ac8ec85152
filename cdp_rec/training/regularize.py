"""L2 on the embedding rows a training step looks up (FuxiCTR's ``embedding_regularizer``).

``train.embedding_l2 = λ`` adds to the training loss, per step::

    λ / 2 * Σ_tables Σ_{r in rows the batch looks up} ||W[r]||²

each distinct row once (whatever how often the batch uses it), so the row's gradient
gains ``λ * W[r]`` — the same per-row pull as FuxiCTR's ``λ/2 ||W||²`` on the whole table,
applied lazily to the rows the step touches (a whole-table term would make every step
update every row, which the row-lazy sparse optimizer exists to avoid; FuxiCTR's
embedding regulariser is likewise only felt by rows with gradients under its sparse
optimizers). The rows are read through ``F.embedding`` with the table's own ``sparse``
setting, so the term's gradient is as sparse as the lookup's.

Sharded tables are different: TorchRec's fused optimizers update the rows inside the
backward pass from the gradient of the pooled lookup output, and no other gradient can
reach a row. For a sharded collection the term is therefore ``λ / 2 * Σ ||pooled||²``
over the batch's pooled embeddings (one per sample and feature): the same as the row
term for single-id features (user, query, item, category, context, scene) except that a
row used by k samples of the batch is counted k times; for the pooled history it pulls
the pooled vector, not each row, towards 0.

The term is computed by hooks (forward pre-hooks on the unsharded
EmbeddingBagCollection / EmbeddingCollection modules, forward hooks on sharded
EmbeddingBagCollections, and a forward hook on the model that adds the sum to its
loss), so the models need not know about it; it applies in training mode with
gradients on only, never in evaluation. ``out["loss"]`` then includes it and
``out["embedding_l2"]`` holds it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.types import LazyAwaitable


class EmbeddingL2:
    """Installs the hooks on ``model`` (the unwrapped model, sharded or not)."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        self.weight = weight
        self.terms: list[torch.Tensor] = []
        self.handles: list[Any] = []
        for module in model.modules():
            if isinstance(module, ShardedEmbeddingBagCollection):
                self.handles.append(module.register_forward_hook(self._pooled))
            elif isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
                self.handles.append(module.register_forward_pre_hook(self._rows))
        self.handles.append(model.register_forward_hook(self._add))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @staticmethod
    def _active(module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _rows(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._active(module):
            return
        if isinstance(module, EmbeddingBagCollection):
            configs, tables = module.embedding_bag_configs(), module.embedding_bags
        else:
            configs, tables = module.embedding_configs(), module.embeddings
        jagged = args[0].to_dict()
        for config in configs:
            ids = [jagged[f].values() for f in config.feature_names if f in jagged]
            if not ids:
                continue
            rows = torch.cat(ids).unique()
            if rows.numel():
                table = tables[config.name]
                self.terms.append(F.embedding(rows, table.weight, sparse=bool(getattr(table, "sparse", False)))
                                  .pow(2).sum())

    def _pooled(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._active(module):
            return
        kt = LazyAwaitable._wait_async(output) if isinstance(output, LazyAwaitable) else output
        self.terms.append(kt.values().pow(2).sum())

    def _add(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self.terms:
            return None
        reg = 0.5 * self.weight * torch.stack(self.terms).sum()
        self.terms.clear()
        loss, out = output
        out = dict(out)
        out["loss"] = out["loss"] + reg.detach()
        out["embedding_l2"] = reg.detach()
        return loss + reg, out
