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
backward pass from the gradient of the lookup output, and no other gradient can reach a
row. For a sharded collection the term is therefore ``λ / 2 * Σ ||e||²`` over the
batch's lookup outputs: the pooled embeddings of an EmbeddingBagCollection (one per
sample and feature) and every looked-up row of an EmbeddingCollection (one per id, the
sequence models' target and behaviours). That is the row term for single-id features
(user, query, item, category, context, scene) except that a row used by k lookups of the
batch is counted k times; for the pooled history it pulls the pooled vector, not each
row, towards 0.

Over N ranks, each rank adds ``N x`` the term of its own lookups. DDP averages the
ranks' dense gradients (and data-parallel tables'), so the objective every parameter
follows is the mean of the ranks' losses: the global batch's BCE plus ``λ / 2 * Σ`` over
*all* ranks' lookups — exactly one process's objective on the concatenated batches.
(Model-parallel tables receive the sum, not the mean, of the ranks' gradients: N x that
objective's gradient, BCE and L2 alike, as without the term.) ``out["embedding_l2"]``
is this rank's N-times share; its mean over the ranks is the global term.

The term is computed by hooks (forward pre-hooks on the unsharded
EmbeddingBagCollection / EmbeddingCollection modules, forward hooks on sharded
EmbeddingBagCollections / EmbeddingCollections, and a forward hook on the model that
adds the sum to its loss), so the models need not know about it; it applies in training
mode with gradients on only, never in evaluation. ``out["loss"]`` then includes it and
``out["embedding_l2"]`` holds it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection, KeyedTensor
from torchrec.distributed.types import LazyAwaitable


class EmbeddingL2:
    """Installs the hooks on ``model`` (the unwrapped model, sharded or not)."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        self.weight = weight
        # Sharded lookups' terms are scaled by the world size (module docstring).
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.terms: list[torch.Tensor] = []
        self.handles: list[Any] = []
        for module in model.modules():
            if isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)):
                self.handles.append(module.register_forward_hook(self._looked_up))
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

    def _looked_up(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """A sharded module's output: an EBC's KeyedTensor ``[B, Σ D]``, an EC's ``{feature: JaggedTensor [N, D]}``."""
        if not self._active(module):
            return
        out = LazyAwaitable._wait_async(output) if isinstance(output, LazyAwaitable) else output
        values = [out.values()] if isinstance(out, KeyedTensor) else [jt.values() for jt in out.values()]
        self.terms.append(self.world * sum(v.pow(2).sum() for v in values))

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
