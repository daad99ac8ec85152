"""Model zoo: ``build_model(cfg)`` picks the model named by ``cfg.model.name``."""

from __future__ import annotations

import torch
from torch import nn

from cdp_rec.config import ConfigError, JobConfig
from cdp_rec.models.base import BaseModel
from cdp_rec.models.cdp import CDPModel

MODELS: dict[str, type[nn.Module]] = {"cdp": CDPModel, "base": BaseModel}


def build_model(cfg: JobConfig, device: torch.device | str = "cpu") -> nn.Module:
    try:
        cls = MODELS[cfg.model.name]
    except KeyError:
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; known: {sorted(MODELS)}") from None
    return cls(cfg, device)
