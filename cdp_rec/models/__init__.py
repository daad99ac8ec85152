"""Model zoo: ``build_model(cfg)`` picks the model named by ``cfg.model.name``.

Every model has the same contract: ``__init__(cfg, device)``, ``prepare_batch(batch)``
(data-side work before ``forward``) and ``forward(batch) -> (loss, out)`` with
detached ``out["loss"]``, ``out["logits"]`` ``[B]`` and ``out["bce"]``. The
``cdp_no_*`` names are CDP with ``model.ablation`` preset (paper Table 2).

With hash / managed tables (``features.id_mapping``) ``build_model`` adds ``model.id_mapper``
and makes ``prepare_batch`` end by rewriting raw ids to rows (:mod:`embeddings.id_mapping`);
the model's own ``prepare_batch`` work sees the raw ids.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cdp_rec.config import ConfigError, JobConfig
from cdp_rec.data.loader import expand_histories
from cdp_rec.models.base import BaseModel
from cdp_rec.models.cdp import CDPModel
from cdp_rec.models.ddrm import DDRMModel
from cdp_rec.models.diffrec import DiffRecModel
from cdp_rec.models.diffumin import DiffuMINModel
from cdp_rec.models.din import DINModel
from cdp_rec.models.hstu import HSTUModel
from cdp_rec.models.lr_counts import LRCountsModel
from cdp_rec.models.qin import QINModel
from cdp_rec.models.sim import SIMModel
from cdp_rec.models.twin import TWINModel
from embeddings.id_mapping import attach_id_mapping

ModelFactory = Callable[[JobConfig, "torch.device | str"], nn.Module]

# model name -> model.ablation of CDPModel.
ABLATION_PRESETS: dict[str, str] = {
    "cdp_no_condition": "no_condition",
    "cdp_no_collab": "no_collaborative",
    "cdp_no_context": "no_context_scene",
    "cdp_no_moe": "no_moe",
    "cdp_no_diffusion": "no_diffusion",
}


def _cdp_ablation(ablation: str) -> ModelFactory:
    def build(cfg: JobConfig, device: torch.device | str = "cpu") -> nn.Module:
        if cfg.model.ablation not in ("none", ablation):
            raise ConfigError(
                f"model.name={cfg.model.name} presets model.ablation={ablation}; "
                f"got model.ablation={cfg.model.ablation}"
            )
        cfg = copy.deepcopy(cfg)
        cfg.model.ablation = ablation
        return CDPModel(cfg, device)

    build.__name__ = f"cdp_{ablation}"
    return build


MODELS: dict[str, ModelFactory] = {
    "cdp": CDPModel,
    "base": BaseModel,
    "din": DINModel,
    "sim": SIMModel,
    "twin": TWINModel,
    "qin": QINModel,
    "ddrm": DDRMModel,
    "diffrec": DiffRecModel,
    "hstu": HSTUModel,
    "diffumin": DiffuMINModel,
    "lr_counts": LRCountsModel,
    **{name: _cdp_ablation(ablation) for name, ablation in ABLATION_PRESETS.items()},
}


def build_model(cfg: JobConfig, device: torch.device | str = "cpu") -> nn.Module:
    try:
        cls = MODELS[cfg.model.name]
    except KeyError:
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; known: {sorted(MODELS)}") from None
    if cfg.model.ablation != "none" and cfg.model.name != "cdp" and cfg.model.name not in ABLATION_PRESETS:
        # Only CDP has the switches; another model would train unchanged under the ablation's label.
        raise ConfigError(
            f"model.ablation={cfg.model.ablation} switches a part of CDP off; model.name={cfg.model.name} has no "
            f"such part: use model.name=cdp (or a cdp_no_* preset), or model.ablation=none"
        )
    model = cls(cfg, device)
    if cfg.data.dedup_requests:
        expand_shared_histories(model)
    # Hash / managed tables (features.id_mapping): raw ids -> rows at the end of prepare_batch.
    return attach_id_mapping(model, cfg, device)


def expand_shared_histories(model: nn.Module) -> nn.Module:
    """Let ``model`` take request-deduplicated batches (``data.dedup_requests``).

    Models that use the shared history as it is say so (``reads_shared_histories``: CDP
    and base); every other model's ``prepare_batch`` first gets each row's own history
    back (:func:`cdp_rec.data.loader.expand_histories`), so it sees what it always saw.
    """
    if getattr(model, "reads_shared_histories", False):
        return model
    inner = model.prepare_batch

    def prepare_batch(batch: Any) -> Any:
        return inner(expand_histories(batch))

    prepare_batch.__doc__ = f"Request-deduplicated histories expanded per row, then:\n\n{inner.__doc__ or ''}"
    model.prepare_batch = prepare_batch  # type: ignore[method-assign]
    return model
