"""Category-filtered pooling through a DistributedModelParallel-sharded item table.

Two real processes (gloo, ``torch.multiprocessing.spawn``). The filter travels inside
the KJT as compacted ids (:func:`embeddings.pooling.with_filtered_history`), so the
sharded lookup -- table-wise and row-wise -- does the category-gated MEAN pooling. Each
rank compares the pooled output of its local batch with
:func:`category_filtered_mean_reference` on the full table, and after one backward
step with fused SGD the table equals ``W - lr * mean of both ranks' reference
gradients`` (TorchRec divides embedding gradients by the world size, like DDP):
gradients reach the matching rows only, through the sharded backward.

DMP on CPU does not copy the unsharded module's weights into the fbgemm shards, so the
known table is written into each rank's local shards after sharding
(:func:`embeddings.state.load_full_state`, which uses the ``ShardedTensor`` shard
offsets), and read back with :func:`embeddings.state.gather_full_state`.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from bench._common import free_port

ROOT = Path(__file__).resolve().parents[1]

WORLD = 2
NUM_ITEMS, DIM, NUM_CATS = 60, 8, 4
GLOBAL_BATCH = 16
WINDOW = 12
LR = 0.5
HIST = "hist_match_item_ids"
WEIGHT_KEY = "ebc.embedding_bags.item.weight"


class HistoryPooling(nn.Module):
    """A tiny model: one EBC with one item table, looked up by the target item and the filtered history."""

    def __init__(self) -> None:
        super().__init__()
        from embeddings.tables import TableSpec, build_embedding_bag_collection

        self.ebc = build_embedding_bag_collection([TableSpec("item", NUM_ITEMS, ("item_id", HIST))], DIM)

    def forward(self, kjt) -> dict[str, torch.Tensor]:
        """The models' road to a mean: the EBC sums, :func:`embeddings.tables.bag_mean` divides."""
        from embeddings.tables import bag_mean

        out = self.ebc(kjt).to_dict()  # keys come in plan order: read by name
        return {"item_id": out["item_id"], HIST: bag_mean(out[HIST], kjt[HIST].lengths())}


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(0, 40, (GLOBAL_BATCH,), generator=g)
    lengths[0], lengths[GLOBAL_BATCH // 2] = 0, 0  # an empty history on each rank
    n = int(lengths.sum())
    target = torch.randint(0, NUM_CATS + 1, (GLOBAL_BATCH,), generator=g)  # NUM_CATS never occurs: no match
    return {
        "item_id": torch.randint(0, NUM_ITEMS, (GLOBAL_BATCH,), generator=g),
        "category_id": target,
        "hist_item_ids": torch.randint(0, NUM_ITEMS // 2, (n,), generator=g),  # duplicates across samples
        "hist_category_ids": torch.randint(0, NUM_CATS, (n,), generator=g),
        "lengths": lengths,
        "table": torch.randn(NUM_ITEMS, DIM, generator=g),
        "upstream": torch.randn(GLOBAL_BATCH, DIM, generator=g),
    }


def _local(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    per = GLOBAL_BATCH // WORLD
    lo, hi = rank * per, (rank + 1) * per
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), batch["lengths"].cumsum(0)])
    s, e = int(offsets[lo]), int(offsets[hi])
    return {
        "item_id": batch["item_id"][lo:hi],
        "category_id": batch["category_id"][lo:hi],
        "hist_item_ids": batch["hist_item_ids"][s:e],
        "hist_category_ids": batch["hist_category_ids"][s:e],
        "lengths": batch["lengths"][lo:hi],
        "upstream": batch["upstream"][lo:hi],
    }


def _lookup_kjt(local: dict[str, torch.Tensor], window: int | None):
    from torchrec import KeyedJaggedTensor

    from embeddings.pooling import with_filtered_history

    b = local["lengths"].numel()
    ones = torch.ones(b, dtype=torch.long)
    raw = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "category_id", "hist_item_ids", "hist_category_ids"],
        values=torch.cat([local["item_id"], local["category_id"], local["hist_item_ids"], local["hist_category_ids"]]),
        lengths=torch.cat([ones, ones, local["lengths"], local["lengths"]]),
    )
    return with_filtered_history(raw, ["item_id"], "hist_item_ids", "hist_category_ids", "category_id", HIST, window)


def _reference(table: torch.Tensor, local: dict[str, torch.Tensor], window: int | None):
    from embeddings.pooling import category_filtered_mean_reference

    t = table.clone().requires_grad_(True)
    pooled, counts = category_filtered_mean_reference(
        t, local["hist_item_ids"], local["hist_category_ids"], local["lengths"], local["category_id"], window
    )
    (pooled * local["upstream"]).sum().backward()
    return pooled.detach(), counts, t.grad


def _check(rank: int, sharding_type: str) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from cdp_rec.config import JobConfig
    from embeddings.sharding import build_sharder, plan_sharding
    from embeddings.state import gather_full_state, load_full_state

    cfg = JobConfig()
    cfg.sharding.constraints = {"item": sharding_type}
    cfg.sharding.sparse_optimizer = "sgd"  # fused EXACT_SGD: the update is exactly -lr * grad
    cfg.train.sparse_lr = LR
    torch.manual_seed(0)
    model = HistoryPooling()
    plan = plan_sharding(cfg, model, WORLD, WORLD, "cpu", pg=dist.group.WORLD)
    ps = plan.plan["ebc"]["item"]  # type: ignore[index]
    assert ps.sharding_type == sharding_type, ps
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[build_sharder(cfg, "cpu")])

    batch = _global_batch()
    table = batch["table"]
    # the table really is split as planned: row-wise gives each rank half of the rows
    weight = next(v for k, v in dmp.state_dict().items() if k.endswith(WEIGHT_KEY))
    assert isinstance(weight, ShardedTensor)
    local_rows = sum(s.metadata.shard_sizes[0] for s in weight.local_shards())
    if sharding_type == "row_wise":
        assert local_rows == NUM_ITEMS // WORLD, local_rows

    local = _local(batch, rank)
    for window in (None, WINDOW):
        load_full_state(dmp, {WEIGHT_KEY: table})  # (re)start from the known table
        kjt, counts = _lookup_kjt(local, window)
        out = dmp(kjt)
        ref, ref_counts, _ = _reference(table, local, window)
        assert torch.equal(counts, ref_counts)
        torch.testing.assert_close(out[HIST], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["item_id"], table[local["item_id"]], atol=1e-6, rtol=1e-6)

        (out[HIST] * local["upstream"]).sum().backward()
        grads = [_reference(table, _local(batch, r), window)[2] for r in range(WORLD)]
        # TorchRec's collectives divide embedding gradients by the world size (comm_ops
        # gradient division, on by default), matching DDP's averaging of dense gradients.
        expected = table - LR * sum(grads) / WORLD
        updated = gather_full_state(dmp)[WEIGHT_KEY]
        torch.testing.assert_close(updated, expected, atol=1e-5, rtol=1e-5)
        touched = torch.stack(grads).abs().sum((0, 2)) > 0
        assert torch.equal(updated[~touched], table[~touched])  # non-matching rows untouched


def _worker(rank: int, port: int, result_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    status = "ok"
    try:
        for sharding_type in ("table_wise", "row_wise"):
            _check(rank, sharding_type)
    except BaseException:  # report every failure, DCP-style BaseExceptions included
        status = traceback.format_exc()
    finally:
        Path(result_dir, f"rank{rank}.txt").write_text(status)
        if status == "ok":
            # Both ranks leave their last collective before either tears gloo down: a rank
            # destroying the group while its peer's work threads still ran aborted once
            # ("terminate called without an active exception") on a loaded machine.
            dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_lookup_pools_the_filtered_history(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        status = (tmp_path / f"rank{rank}.txt").read_text()
        assert status == "ok", f"rank {rank}:\n{status}"
