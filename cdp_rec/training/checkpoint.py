"""Sharded, crash-safe checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<dir>/step-000001234/``::

    .metadata, __0_0.distcp, ...   DCP: model state (ShardedTensors of every table,
                                   dense weights) and optimizer state (fused sparse +
                                   dense Adam), each rank writing its own shards
    rng-rank<r>.pt                 each rank's torch RNG state (CDP's diffusion noise)
    meta.json                      written last by rank 0: training position, world
                                   size, batch size, table shapes, the resolved config

Crash safety: everything is written into ``.step-....tmp`` and renamed into place by
rank 0 after every rank has finished, so a checkpoint directory either is complete or
does not exist; a crash mid-save leaves the previous checkpoint the latest. Only the
newest ``keep_last`` checkpoints are kept.

Resharding: DCP stores global offsets, so a checkpoint written by N ranks loads into M
ranks, another sharding plan, or an unsharded model (``cdp-rec evaluate`` / ``export``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from cdp_rec.config import JobConfig, config_from_dict

log = logging.getLogger(__name__)

META = "meta.json"
PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match the model; says what differs."""


@dataclass
class Position:
    """Where training stands: ``global_step`` steps done, ``samples`` global samples seen."""

    global_step: int = 0
    samples: int = 0
    final: bool = False


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def table_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Embedding table name -> [rows, dim] of the model's EmbeddingBagCollection."""
    from embeddings.sharding import find_ebc

    _, ebc = find_ebc(model)
    return {t.name: [t.num_embeddings, t.embedding_dim] for t in ebc.embedding_bag_configs()}


def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under ``root``, oldest first (staging dirs are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file())


def read_meta(path: Path) -> dict[str, Any]:
    meta = path / META
    if not meta.is_file():
        raise CheckpointError(f"{path}: not a committed checkpoint (no {META}; an interrupted save leaves none)")
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta}: unreadable: {e}") from e


def check_compatible(path: Path, meta: dict[str, Any], cfg: JobConfig, tables: dict[str, list[int]]) -> None:
    """Refuse a checkpoint of another model or other table sizes, naming the difference."""
    if meta.get("model") != cfg.model.name:
        raise CheckpointError(f"{path}: checkpoint is of model {meta.get('model')!r}, the config asks for {cfg.model.name!r}")
    saved, want = meta.get("tables", {}), tables
    for name in sorted(set(saved) | set(want)):
        if saved.get(name) != want.get(name):
            raise CheckpointError(
                f"{path}: table {name!r} is {saved.get(name)} (rows, dim) in the checkpoint but "
                f"{want.get(name)} in the config"
            )


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    try:
        dcp.load(state, checkpoint_id=str(path))
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first[-1] if first else e})") from e


class Checkpointer:
    """Saves and restores a :class:`~cdp_rec.training.trainer.Trainer`'s state under ``root``."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def save(self, trainer: Any, position: Position, extra: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step."""
        name = f"{PREFIX}{position.global_step:09d}"
        final, staging = self.root / name, self.root / f".{name}.tmp"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # debris of a crashed save
            shutil.rmtree(final, ignore_errors=True)
        _barrier()
        dcp.save({"model": trainer.module.state_dict(), "optim": trainer.optimizer.state_dict()},
                 checkpoint_id=str(staging))
        torch.save({"torch": torch.get_rng_state()}, staging / f"rng-rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            meta = {
                "global_step": position.global_step,
                "samples": position.samples,
                "final": position.final,
                "model": trainer.cfg.model.name,
                "tables": trainer.table_shapes,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "config": trainer.cfg.to_dict(),
                "config_hash": trainer.cfg.hash(),
                **extra,
            }
            (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(staging, final)  # atomic: the checkpoint appears complete or not at all
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, trainer: Any, path: Path) -> tuple[Position, dict[str, Any]]:
        """Restore model, optimizer and this rank's RNG from ``path`` (any world size)."""
        meta = read_meta(path)
        check_compatible(path, meta, trainer.cfg, trainer.table_shapes)
        # Optimizer state is lazy: one zero-gradient step creates the tensors DCP loads into
        # (Adam's update is exactly 0 there, so the weights do not move).
        trainer.optimizer.init_state()
        trainer.optimizer.zero_grad(set_to_none=True)
        state = {"model": trainer.module.state_dict(), "optim": trainer.optimizer.state_dict()}
        _dcp_load(state, path)
        trainer.module.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optim"])
        rng = path / f"rng-rank{_rank()}.pt"
        if rng.is_file() and meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1):
            torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
        pos = Position(meta["global_step"], meta["samples"], meta.get("final", False))
        return pos, meta


# ----------------------------------------------------------------------------- offline use


def config_of(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """The resolved config a checkpoint was trained with, plus ``--set`` overrides."""
    from cdp_rec.config import _apply_override  # the same parser as the CLI's --set

    data = read_meta(path)["config"]
    for ov in overrides:
        data = _apply_override(data, ov)
    return config_from_dict(data, where=str(path / META))


def load_unsharded(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[nn.Module, JobConfig]:
    """An unsharded model with the checkpoint's weights, whatever world size wrote it."""
    from cdp_rec.models import build_model

    cfg = config_of(path, overrides)
    model = build_model(cfg)
    check_compatible(path, read_meta(path), cfg, table_shapes(model))
    state = {"model": model.state_dict()}
    _dcp_load(state, path)
    model.load_state_dict(state["model"])
    return model, cfg


def export(path: Path, out: Path) -> dict[str, Any]:
    """Write an unsharded serving artifact: one ``.npy`` per table, ``dense.pt``, config, manifest.

    Each table's ``.npy`` is created on disk first and memory-mapped; DCP then reads the
    table's saved shards one by one straight into that mapping (it loads only the
    requested key, one saved shard per read). The process therefore holds at most one
    saved shard in its own memory plus file-backed pages the OS can write back - never a
    whole table, and never the whole model - so a table larger than the export box's RAM
    still exports. Dense weights are small and go to ``dense.pt``.
    """
    from cdp_rec.models import build_model

    cfg = config_of(path)
    meta = read_meta(path)
    model = build_model(cfg, device="meta")
    check_compatible(path, meta, cfg, table_shapes(model))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(exist_ok=True)
    manifest: dict[str, Any] = {"checkpoint": str(path), "global_step": meta["global_step"], "tables": {}}
    dense: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if ".embedding_bags." in key:
            table = key.split(".embedding_bags.")[1].rsplit(".", 1)[0]
            target = np.lib.format.open_memmap(
                out / "tables" / f"{table}.npy", mode="w+", dtype=torch.empty((), dtype=t.dtype).numpy().dtype,
                shape=tuple(t.shape),
            )
            _dcp_load({"model": {key: torch.from_numpy(target)}}, path)
            target.flush()
            del target
            manifest["tables"][table] = {"key": key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        else:
            dense[key] = torch.empty(t.shape, dtype=t.dtype) if t.is_meta else t.detach().clone()
    if dense:
        buf = {"model": dense}
        _dcp_load(buf, path)
        torch.save(buf["model"], out / "dense.pt")
    (out / "config.json").write_text(json.dumps(meta["config"], indent=2) + "\n")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
