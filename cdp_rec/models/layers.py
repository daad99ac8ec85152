"""Small building blocks shared by the models."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden: list[int], out_dim: int | None = None) -> nn.Sequential:
    """``Linear -> ReLU`` for each hidden width, then an optional linear output layer."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)
