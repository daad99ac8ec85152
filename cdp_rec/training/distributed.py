"""Process-group set-up from the launcher's environment, and the few collectives training needs.

``cdp-rec train`` is distributed exactly when it was started by a launcher that sets
``WORLD_SIZE`` (torchrun, ``torchx run ... dist.ddp``); then every rank runs the same
command. Backend: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(compute_device: str) -> DistContext:
    """Join the process group described by torchrun's environment variables."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if compute_device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("sharding.compute_device is cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        store = _attempt_store(rank, world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, local_world, device, backend)


def _attempt_store(rank: int, world: int) -> dist.Store | None:
    """The rendezvous store, namespaced by torchrun's restart attempt (None: not under torchrun).

    torchrun (``--max-restarts``, which the torchx component's ``max_retries`` turns on)
    keeps one agent-hosted TCPStore across restarts. The process group's keys - gloo's
    peer addresses among them - are not namespaced per attempt, so the restarted ranks
    read the dead ranks' addresses and fail with "connectFullMesh ... Connection
    refused". A per-attempt prefix gives every attempt a clean namespace.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    from datetime import timedelta

    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=not agent_hosts and rank == 0, timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"cdp-rec/attempt-{attempt}", store)


def all_reduce_int(value: int, op: dist.ReduceOp.RedOpType) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return int(t.item())


def gather_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each named array over ranks, in rank order, on every rank.

    Object all-gather is fine for evaluation-sized arrays (a day of predictions is a
    few bytes per impression); it is not used on the training path.
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    return {k: np.concatenate([g[k] for g in gathered]) for k in arrays}
