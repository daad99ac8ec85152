"""Request-level deduplication (``data.dedup_requests``): same scores, gradients and metrics.

The reader keeps one copy of the history the consecutive impressions of a request share
and points the others at it (``Batch.history_row``); CDP and base pool it once per
request (CDP: per request and target category), other models get it expanded back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec import KeyedJaggedTensor

from bench._common import free_port
from cdp_rec.config import JobConfig, load_config
from cdp_rec.data.loader import (
    ParquetBatchReader,
    expand_histories,
    list_day_files,
    share_histories,
    shared_history_rows,
)
from cdp_rec.data.schema import HIST_CATEGORIES, HIST_ITEMS, Batch, sparse_keys
from cdp_rec.models import build_model

SMALL = ["data.samples_per_day=4000", "data.rows_per_file=2000", "data.row_group_size=500", "train.progress=false"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from cdp_rec.data.synthetic import generate_dataset

    path = tmp_path_factory.mktemp("dedup") / "data"
    generate_dataset(load_config(None, SMALL), path)
    return path


def _batches(cfg: JobConfig, root: Path, dedup: bool, n: int = 3, batch_size: int = 256) -> list[Batch]:
    reader = ParquetBatchReader(list_day_files(root, 0), cfg.features, batch_size, dedup_requests=dedup)
    return [b for b, _ in zip(reader, range(n))]


def _kjt_equal(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> bool:
    return a.keys() == b.keys() and torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())


def _hand_batch() -> Batch:
    """8 rows: request 5 (3 rows, one history), request 6 (2 rows, *different* histories:
    an imported request spans several timestamps), request 7 (3 rows, empty histories),
    so rows 1, 2 and 6, 7 share and 4 does not."""
    cfg = JobConfig()
    hist = [[1, 2, 3]] * 3 + [[4, 5], [4, 6]] + [[]] * 3
    cats = [[0, 1, 0]] * 3 + [[2, 2], [2, 2]] + [[]] * 3
    keys = sparse_keys(cfg.features)
    singles = [torch.arange(8) % 3 for _ in keys[:-2]]
    lengths = torch.tensor([len(h) for h in hist])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat(singles + [torch.tensor(sum(hist, [])), torch.tensor(sum(cats, []))]),
        lengths=torch.cat([torch.ones(8 * (len(keys) - 2), dtype=torch.int64), lengths, lengths]),
    )
    req = torch.tensor([5, 5, 5, 6, 6, 7, 7, 7])
    return Batch(kjt, torch.zeros(8), torch.zeros(8, dtype=torch.int64), req)


def test_rows_share_only_identical_histories_of_one_request():
    b = _hand_batch()
    jt = b.sparse.to_dict()
    offsets = np.r_[0, np.cumsum(jt[HIST_ITEMS].lengths().numpy())]
    rows = shared_history_rows(b.request_ids.numpy(), offsets, jt[HIST_ITEMS].values().numpy(),
                               jt[HIST_CATEGORIES].values().numpy())
    assert rows.tolist() == [0, 0, 0, 3, 4, 5, 5, 5]
    shared = share_histories(b)
    assert shared.history_row.tolist() == rows.tolist()
    assert shared.sparse[HIST_ITEMS].lengths().tolist() == [3, 0, 0, 2, 2, 0, 0, 0]
    assert shared.sparse[HIST_ITEMS].values().tolist() == [1, 2, 3, 4, 5, 4, 6]
    back = expand_histories(shared)
    assert back.history_row is None and _kjt_equal(back.sparse, b.sparse)
    # Another request id with the same history is another request: no sharing across requests.
    other = Batch(b.sparse, b.labels, b.user_ids, torch.arange(8))
    assert share_histories(other) is other


def test_concat_and_device_copy_keep_the_index():
    a, b = share_histories(_hand_batch()), _hand_batch()
    both = Batch.concat([a, b])
    assert both.history_row.tolist() == [0, 0, 0, 3, 4, 5, 5, 5] + list(range(8, 16))
    assert _kjt_equal(expand_histories(both).sparse, Batch.concat([b, b]).sparse)
    assert torch.equal(a.to(torch.device("cpu")).history_row, a.history_row)


def test_reader_emits_each_shared_history_once(root):
    cfg = load_config(None, SMALL)
    plain, dedup = _batches(cfg, root, False, n=100), _batches(cfg, root, True, n=100)
    assert len(plain) == len(dedup) == 16  # day 0: 4000 rows in batches of 256 (the last one short)
    n_plain = n_dedup = 0
    for p, d in zip(plain, dedup):
        assert d.history_row is not None and _kjt_equal(expand_histories(d).sparse, p.sparse)
        assert torch.equal(p.labels, d.labels) and torch.equal(p.request_ids, d.request_ids)
        # The reader's form is what share_histories gives for the plain batch.
        again = share_histories(p)
        assert torch.equal(again.history_row, d.history_row) and _kjt_equal(again.sparse, d.sparse)
        n_plain += int(p.sparse[HIST_ITEMS].lengths().sum())
        n_dedup += int(d.sparse[HIST_ITEMS].lengths().sum())
    # 4-12 impressions per request (8 on average; requests cut by batch edges count twice).
    assert 5 * n_dedup < n_plain, (n_plain, n_dedup)


@pytest.mark.parametrize("name", ["base", "cdp", "cdp_no_diffusion", "din"])
def test_scores_and_gradients_equal_the_per_row_path(name, root):
    """Eval scores bit for bit; training loss bit for bit, gradients up to summation order.
    DIN does not read shared histories: it gets them expanded, so everything is exact."""
    cfg = load_config(None, [*SMALL, f"model.name={name}", "data.dedup_requests=true"])
    torch.manual_seed(0)
    model = build_model(cfg)
    plain, dedup = _batches(cfg, root, False, n=2), _batches(cfg, root, True, n=2)
    for p, d in zip(plain, dedup):
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(model.prepare_batch(p))[1]["logits"], model(model.prepare_batch(d))[1]["logits"])
        model.train()
        grads = []
        for batch in (p, d):
            torch.manual_seed(1)  # the same diffusion noise for both
            model.zero_grad()
            loss, out = model(model.prepare_batch(batch))
            loss.backward()
            grads.append((loss.detach(), out["logits"], {k: q.grad.clone() for k, q in model.named_parameters()
                                                         if q.grad is not None}))
        (la, oa, ga), (lb, ob, gb) = grads
        assert torch.equal(la, lb) and torch.equal(oa, ob)
        assert ga.keys() == gb.keys() and any("ebc" in k for k in ga)
        for k in ga:
            torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-8, msg=lambda m: f"{name} {k}: {m}")


def test_cdp_filters_once_per_request_and_category(root):
    cfg = load_config(None, [*SMALL, "data.dedup_requests=true"])
    model = build_model(cfg)
    (p,), (d,) = _batches(cfg, root, False, n=1), _batches(cfg, root, True, n=1)
    a, b = model.prepare_batch(p), model.prepare_batch(d)
    pairs = {(int(r), int(c)) for r, c in zip(p.request_ids, p.sparse["category_id"].values())}
    holders = torch.nonzero(b.history_row == torch.arange(len(d))).squeeze(1)
    assert len(holders) == len(pairs) < len(d)
    # Every sample's filtered bag is its own per-row bag, moved to the row that holds it.
    bags_a = a.sparse["hist_match_item_ids"].to_dense()
    bags_b = b.sparse["hist_match_item_ids"].to_dense()
    assert all(torch.equal(bags_a[i], bags_b[int(b.history_row[i])]) for i in range(len(d)))
    assert sum(len(x) for x in bags_b) < sum(len(x) for x in bags_a)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cdp", "base"])
def test_training_and_evaluation_metrics_equal(name, root, tmp_path):
    from cdp_rec.training.trainer import train

    metrics = []
    for dedup in (False, True):
        cfg = load_config(None, [*SMALL, f"model.name={name}", f"data.dedup_requests={str(dedup).lower()}",
                                 f"train.run_dir={tmp_path / str(dedup)}", "train.epochs=1",
                                 "checkpoint.at_day_end=false"])
        metrics.append(json.loads((train(cfg, root).run_dir / "metrics.json").read_text()))
    plain, dedup = metrics
    assert plain["num_eval_samples"] == dedup["num_eval_samples"] == 4000
    for key in ("auc", "uauc", "gauc", "logloss"):
        assert abs(plain[key] - dedup[key]) <= 1e-6, (key, plain[key], dedup[key])
    for a, b in zip(plain["validation"], dedup["validation"]):
        assert abs(a["auc"] - b["auc"]) <= 1e-6


# --------------------------------------------------------------------------- sharded (DMP, 2 gloo ranks)


def _dmp_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer
    from embeddings.state import gather_full_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    ctx = init_from_env("cpu")
    try:
        for name in ("cdp", "base"):
            for dedup in (False, True):
                cfg = load_config(None, [*SMALL, f"model.name={name}", f"data.dedup_requests={str(dedup).lower()}",
                                         f"train.run_dir={out_dir}", "sharding.pipeline=true",
                                         "sharding.constraints={item: row_wise, user: table_wise}"])
                reader = ParquetBatchReader(list_day_files(Path(root), 0), cfg.features, 128, rank=rank,
                                            world_size=world, dedup_requests=dedup)
                trainer = Trainer(cfg, ctx)
                steps = trainer.train_steps([b for b, _ in zip(reader, range(4))], lambda out: None)
                state = gather_full_state(trainer.module)
                test = ParquetBatchReader(list_day_files(Path(root), 2), cfg.features, 256, rank=rank,
                                          world_size=world, dedup_requests=dedup)
                metrics = trainer.evaluate(test)
                if rank == 0:
                    torch.save({"steps": steps, "state": state, "metrics": metrics.to_dict()},
                               Path(out_dir) / f"{name}-{dedup}.pt")
                dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_training_with_dedup_equals_without(root, tmp_path):
    mp.spawn(_dmp_worker, args=(2, free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    for name in ("cdp", "base"):
        plain, dedup = (torch.load(tmp_path / f"{name}-{d}.pt", weights_only=False) for d in (False, True))
        assert plain["steps"] == dedup["steps"] == 4
        for key, a in plain["state"].items():
            torch.testing.assert_close(dedup["state"][key], a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")
        for key in ("auc", "uauc", "gauc", "logloss"):
            assert abs(plain["metrics"][key] - dedup["metrics"][key]) <= 1e-6, (name, key)
