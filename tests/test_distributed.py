"""Sharded training equals one process: real gloo processes, no mocks of torch.distributed.

For each sharding type, 2 ranks each train K steps on their half of every global batch
(rank r reads the r-th file of the day, as in training); a 1-process run of the same
sharded code path trains on the concatenated global batches. The gathered tables and
dense weights, and the evaluation metrics over both files, must match.

The base model is used because it is deterministic given the batch; CDP draws diffusion
noise per rank, so its 2-rank run is a different (equally valid) random draw. The sequence
models (an EmbeddingCollection for item / category beside the EBC) are checked the same
way: SIM and HSTU over the sharding types, TWIN for its GSU's collective lookups.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cdp_rec.config import JobConfig
from cdp_rec.data.loader import ParquetBatchReader, list_day_files
from cdp_rec.data.schema import Batch
from bench._common import free_port

SHARDINGS = ("table_wise", "row_wise", "column_wise", "data_parallel")
STEPS = 6
LOCAL_BS = 64


def _assert_same_metrics(one: dict, two: dict) -> None:
    # The states agree to float rounding (~1e-6), so logits near a tie may swap order. Over
    # 4,000 samples one swapped pair moves AUC by ~1e-6, but the AUC of a user / request
    # group of a few samples by up to 1/(pos x neg): one swap in one of ~380 small groups
    # moves UAUC / GAUC by ~4e-4 - those get 2e-3.
    for name, tol in (("auc", 1e-4), ("logloss", 1e-4), ("uauc", 2e-3), ("gauc", 2e-3)):
        assert abs(one["metrics"][name] - two["metrics"][name]) < tol, (name, one["metrics"], two["metrics"])
    assert one["metrics"]["num_samples"] == two["metrics"]["num_samples"] == 4_000


def _config(sharding: str, run_dir: str) -> JobConfig:
    cfg = JobConfig()
    cfg.model.name = "base"
    cfg.data.samples_per_day = 4_000
    cfg.data.rows_per_file = 2_000
    cfg.data.row_group_size = 500
    cfg.train.run_dir = run_dir
    cfg.train.progress = False
    cfg.sharding.constraints = {"item": sharding, "user": sharding, "query": sharding}
    cfg.sharding.pipeline = True
    return cfg


def _rank_batches(cfg: JobConfig, root: Path, rank: int) -> list[Batch]:
    files = list_day_files(root, 0)
    reader = ParquetBatchReader(files, cfg.features, LOCAL_BS, rank=rank, world_size=2)
    out = []
    for b in reader:
        out.append(b)
        if len(out) == STEPS:
            break
    return out


def _worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer
    from embeddings.state import gather_full_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    ctx = init_from_env("cpu")
    try:
        for sharding in SHARDINGS:
            cfg = _config(sharding, out_dir)
            halves = [_rank_batches(cfg, Path(root), r) for r in range(2)]
            if world == 1:
                batches = [Batch.concat([halves[0][k], halves[1][k]]) for k in range(STEPS)]
            else:
                batches = halves[rank]
            trainer = Trainer(cfg, ctx)
            steps = trainer.train_steps(batches, lambda out: None)
            state = gather_full_state(trainer.module)
            files = list_day_files(root, 2)
            metrics = trainer.evaluate(ParquetBatchReader(files, cfg.features, 256, rank=rank, world_size=world))
            if rank == 0:
                torch.save({"steps": steps, "state": state, "metrics": metrics.to_dict(),
                            "plan": trainer.plan_rows}, Path(out_dir) / f"{sharding}-w{world}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from cdp_rec.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("dist-data") / "data"
    generate_dataset(_config("table_wise", str(root.parent)), root)
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("dist")
    for world in (1, 2):
        mp.spawn(_worker, args=(world, free_port(), str(data_root), str(tmp)), nprocs=world, join=True)
    return {(s, w): torch.load(tmp / f"{s}-w{w}.pt", weights_only=False) for s in SHARDINGS for w in (1, 2)}


# (model, sharding of its item / category (EC) and user / query (EBC) tables)
SEQUENCE_CASES = (("sim", "table_wise"), ("sim", "row_wise"), ("sim", "column_wise"), ("hstu", "row_wise"),
                  ("hstu", "column_wise"), ("twin", "row_wise"))


TWIN_CHUNK = 1 << 16


def _sequence_config(model: str, sharding: str, run_dir: str) -> JobConfig:
    cfg = _config(sharding, run_dir)
    cfg.model.name = model
    cfg.model.top_k = 8  # twin: retrieve 8 of the up-to-50 behaviours
    cfg.sharding.constraints = {"item": sharding, "category": sharding, "user": sharding, "query": sharding}
    return cfg


def _sequence_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer
    from embeddings.state import gather_full_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    ctx = init_from_env("cpu")
    try:
        for model, sharding in SEQUENCE_CASES:
            cfg = _sequence_config(model, sharding, out_dir)
            halves = [_rank_batches(cfg, Path(root), r) for r in range(2)]
            batches = [Batch.concat([halves[0][k], halves[1][k]]) for k in range(STEPS)] if world == 1 \
                else halves[rank]
            trainer = Trainer(cfg, ctx)
            steps = trainer.train_steps(batches, lambda out: None)
            state = gather_full_state(trainer.module)
            files = list_day_files(root, 2)
            metrics = trainer.evaluate(ParquetBatchReader(files, cfg.features, 256, rank=rank, world_size=world))
            gsu_error = _sharded_gsu_error(trainer, batches[0], state) if model == "twin" else None
            if rank == 0:
                torch.save({"steps": steps, "state": state, "metrics": metrics.to_dict(), "plan": trainer.plan_rows,
                            "gsu_error": gsu_error}, Path(out_dir) / f"{model}-{sharding}-w{world}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def _sharded_gsu_error(trainer, batch: Batch, state: dict[str, torch.Tensor]) -> float:
    """TWIN's GSU scores through the sharded EC, in chunks of 97 behaviours (several per
    rank, a different number on each), vs the unsharded scores over the gathered tables."""
    from torch.nn import functional as F

    from cdp_rec.models.sequence import jagged_dot_scores

    model = trainer.model
    model.gsu_chunk = 97
    jt = batch.sparse.to_dict()
    emb = model.ebc(batch.sparse).to_dict()  # the sharded EBC (evaluate detached the pipeline)
    sharded = model._sharded_scores(jt, emb)
    item_w, cat_w = state["ec.embeddings.item.weight"], state["ec.embeddings.category.weight"]
    target = F.embedding(jt["item_id"].values(), item_w) + F.embedding(jt["category_id"].values(), cat_w)
    r = model.esu.relevance_query(model.attention_query(emb, target))
    hist, hist_cat = jt["hist_item_ids"], jt["hist_category_ids"]
    want = jagged_dot_scores([(item_w, hist.values()), (cat_w, hist_cat.values())], hist.lengths(), r)
    assert sharded.numel() == want.numel() > 3 * 97
    model.gsu_chunk = TWIN_CHUNK
    return float((sharded - want).abs().max())


@pytest.fixture(scope="module")
def sequence_results(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("dist-seq")
    for world in (1, 2):
        mp.spawn(_sequence_worker, args=(world, free_port(), str(data_root), str(tmp)), nprocs=world, join=True)
    return {(m, s, w): torch.load(tmp / f"{m}-{s}-w{w}.pt", weights_only=False)
            for m, s in SEQUENCE_CASES for w in (1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("model, sharding", SEQUENCE_CASES)
def test_sequence_models_two_ranks_match_one_process(sequence_results, model, sharding):
    one, two = sequence_results[(model, sharding, 1)], sequence_results[(model, sharding, 2)]
    assert one["steps"] == two["steps"] == STEPS
    rows = {r["table"]: r for r in two["plan"]}
    # The EmbeddingCollection's tables are planned and sharded like the EBC's.
    assert rows["item"]["module"] == "ec" and rows["user"]["module"] == "ebc"
    assert {rows[t]["sharding_type"] for t in ("item", "category", "user", "query")} == {sharding}
    assert one["state"].keys() == two["state"].keys()
    for key, a in one["state"].items():
        torch.testing.assert_close(two["state"][key], a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{model} {key}: {m}")
    from cdp_rec.models import build_model

    torch.manual_seed(0)
    init = build_model(_sequence_config(model, sharding, "")).state_dict()
    changed = {k for k in init if not torch.allclose(init[k], one["state"][k])}
    assert {"ec.embeddings.item.weight", "ec.embeddings.category.weight", "ebc.embedding_bags.user.weight",
            "ranker.mlp.0.weight"} <= changed
    _assert_same_metrics(one, two)
    if model == "twin":  # the GSU's chunked collective lookups score like the unsharded GSU
        assert one["gsu_error"] < 1e-5 and two["gsu_error"] < 1e-5, (one["gsu_error"], two["gsu_error"])


@pytest.mark.slow
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_two_ranks_match_one_process(results, sharding):
    one, two = results[(sharding, 1)], results[(sharding, 2)]
    assert one["steps"] == two["steps"] == STEPS
    # The plan really used the requested sharding for the constrained tables.
    kinds = {r["table"]: r["sharding_type"] for r in two["plan"]}
    assert kinds["item"] == kinds["user"] == sharding, kinds
    assert one["state"].keys() == two["state"].keys()
    for key, a in one["state"].items():
        b = two["state"][key]
        # Tolerance: the same math in another summation order (all-to-all / all-reduce).
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{sharding} {key}: {m}")
    # Both runs started from the seeded weights and really moved away from them.
    from cdp_rec.models import build_model

    torch.manual_seed(0)
    init = build_model(_config(sharding, "")).state_dict()
    changed = {k for k in init if not torch.allclose(init[k], one["state"][k])}
    assert {"ebc.embedding_bags.item.weight", "ebc.embedding_bags.user.weight", "ranker.mlp.0.weight"} <= changed
    _assert_same_metrics(one, two)


# ------------------------------------------------------------------ lr_counts, embedding L2, managed EC, export
# One 1-rank and one 2-rank job run every case below (spawning is the slow part):
# * lr_counts: its global click counts (all-gathered per step) over two passes of the stream;
# * sim with train.embedding_l2 > 0: the sharded EC's lookups get the term too; the 2-rank
#   run also writes a checkpoint, exported and compared with the 1-rank tables;
# * sim with a managed (evicting) item table in its EmbeddingCollection.

EXTRA_CASES = ("lr_counts", "sim_l2", "sim_managed")
L2 = 0.05
RESET_ROWS = torch.tensor([0, 7, 150, 298])


def _extra_config(case: str, run_dir: str) -> JobConfig:
    if case == "lr_counts":
        cfg = _config("table_wise", run_dir)
        cfg.model.name = "lr_counts"  # its only tables: one weight per context / scene value
        cfg.sharding.constraints = {}
        return cfg
    cfg = _sequence_config("sim", "row_wise", run_dir)
    if case == "sim_l2":
        cfg.train.embedding_l2 = L2
    else:  # 300 rows for the data's 5000 item ids: the table fills and evicts
        cfg.features.id_mapping = {"item": "managed"}
        cfg.features.num_items = 300
    return cfg


def _extra_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    from cdp_rec.training.checkpoint import Checkpointer, Position
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer
    from embeddings.id_mapping import reset_rows
    from embeddings.state import gather_full_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    ctx = init_from_env("cpu")
    try:
        for case in EXTRA_CASES:
            cfg = _extra_config(case, out_dir)
            halves = [_rank_batches(cfg, Path(root), r) for r in range(2)]
            batches = [Batch.concat([halves[0][k], halves[1][k]]) for k in range(STEPS)] if world == 1 \
                else halves[rank]
            if case == "lr_counts":
                batches = batches + batches  # a second pass: the counts restart on the global first step
            trainer = Trainer(cfg, ctx)
            init = gather_full_state(trainer.module)
            outs: list = []
            steps = trainer.train_steps(batches, outs.append)
            state = gather_full_state(trainer.module)
            files = list_day_files(root, 2)
            metrics = trainer.evaluate(ParquetBatchReader(files, cfg.features, 256, rank=rank, world_size=world))
            # Every rank's first-step L2 term: their mean is the global batch's term.
            l2_terms: list = [None] * world
            dist.all_gather_object(l2_terms, float(outs[0].get("embedding_l2", torch.tensor(0.0))))
            result = {"steps": steps, "state": state, "metrics": metrics.to_dict(), "plan": trainer.plan_rows,
                      "l2_first_step": sum(l2_terms) / world}
            if case == "sim_l2" and world == 1:  # the first global batch and the tables it was scored with
                result["init"] = init
                result["first_batch"] = {k: (v.values(), v.lengths())
                                         for k, v in trainer.model.prepare_batch(batches[0]).sparse.to_dict().items()}
            if case == "sim_l2" and world == 2:
                Checkpointer(Path(out_dir) / "ck", 2).save(trainer, Position(STEPS, STEPS * 2 * LOCAL_BS),
                                                           {"local_batch_size": LOCAL_BS})
            if case == "sim_managed":
                result["stats"] = trainer.model.id_mapper.table_stats()
                key = "ec.embeddings.item.weight"

                def momentum() -> float:  # rowwise Adagrad state of RESET_ROWS over all ranks' shards
                    total = 0.0
                    for t in trainer.module.fused_optimizer.state_dict()["state"].get(key, {}).values():
                        for s in t.local_shards():
                            lo, rows = s.metadata.shard_offsets[0], RESET_ROWS
                            mine = rows[(rows >= lo) & (rows < lo + s.tensor.shape[0])]
                            total += float(s.tensor[mine - lo].abs().sum())
                    totals: list = [None] * world
                    dist.all_gather_object(totals, total)
                    return sum(totals)

                before = momentum()
                reset_rows(trainer.model, "item", RESET_ROWS)  # what an admission does to the rows it hands out
                result["reset"] = gather_full_state(trainer.module)[key][RESET_ROWS]
                result["momentum"] = [before, momentum()]
            if rank == 0:
                torch.save(result, Path(out_dir) / f"{case}-w{world}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def extra_results(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("dist-extra")
    for world in (1, 2):
        mp.spawn(_extra_worker, args=(world, free_port(), str(data_root), str(tmp)), nprocs=world, join=True)
    out = {(c, w): torch.load(tmp / f"{c}-w{w}.pt", weights_only=False) for c in EXTRA_CASES for w in (1, 2)}
    out["checkpoint"] = tmp / "ck" / f"step-{STEPS:09d}"
    return out


def _assert_same_run(one: dict, two: dict, what: str) -> None:
    assert one["state"].keys() == two["state"].keys()
    for key, a in one["state"].items():
        torch.testing.assert_close(two["state"][key], a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what} {key}: {m}")
    _assert_same_metrics(one, two)


@pytest.mark.slow
def test_lr_counts_two_ranks_match_one_process(extra_results):
    one, two = extra_results[("lr_counts", 1)], extra_results[("lr_counts", 2)]
    assert one["steps"] == two["steps"] == 2 * STEPS
    _assert_same_run(one, two, "lr_counts")
    # Global counts, not each rank's half: equal to the last bit (float64 sums of 0/1 labels).
    for key in ("clicks_user", "impressions_item", "clicks_user_category", "total_clicks", "total_impressions"):
        assert torch.equal(one["state"][key], two["state"][key]), key
    # The second pass was recognised from the gathered first step: one pass of 6 x 128 rows.
    assert two["state"]["passes"].item() == 1 and two["state"]["total_impressions"].item() == STEPS * 2 * LOCAL_BS
    # Dim-1 tables: fbgemm's fused kernels need 4k columns per shard, so they are data-parallel.
    assert {r["sharding_type"] for r in two["plan"]} == {"data_parallel"}, two["plan"]


@pytest.mark.slow
def test_sim_embedding_l2_two_ranks_match_one_process(extra_results):
    from cdp_rec.models import build_model

    one, two = extra_results[("sim_l2", 1)], extra_results[("sim_l2", 2)]
    _assert_same_run(one, two, "sim embedding_l2")
    # The first step's term: L2/2 x squared norms of every lookup, the EBC's pooled ones
    # (single-valued: one row each) and the EC's rows (targets and selected behaviours).
    model = build_model(_extra_config("sim_l2", ""))
    batch, init = one["first_batch"], one["init"]
    want = 0.0
    for prefix, configs in (("ebc.embedding_bags", model.ebc.embedding_bag_configs()),
                            ("ec.embeddings", model.ec.embedding_configs())):
        for c in configs:
            for f in c.feature_names:
                want += float(init[f"{prefix}.{c.name}.weight"][batch[f][0]].pow(2).sum())
    want *= L2 / 2
    assert want > 0
    assert one["l2_first_step"] == pytest.approx(want, rel=1e-4)
    assert two["l2_first_step"] == pytest.approx(want, rel=1e-4)  # mean of the ranks' world-scaled shares


@pytest.mark.slow
def test_export_of_a_two_rank_sim_checkpoint_writes_the_ec_tables(extra_results, tmp_path):
    import json

    import numpy as np

    from cdp_rec.cli import main
    from cdp_rec.training.checkpoint import load_unsharded, read_meta

    ckpt, one = extra_results["checkpoint"], extra_results[("sim_l2", 1)]["state"]
    meta = read_meta(ckpt)
    assert meta["world_size"] == 2 and meta["tables"]["item"] == [5_000, 16] and meta["tables"]["category"][1] == 16
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "art")]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert set(manifest["tables"]) == set(meta["tables"]) >= {"item", "category", "user", "query"}
    assert manifest["tables"]["item"]["key"] == "ec.embeddings.item.weight"
    for table, entry in manifest["tables"].items():
        got = torch.from_numpy(np.load(tmp_path / "art" / "tables" / f"{table}.npy"))
        torch.testing.assert_close(got, one[entry["key"]], atol=2e-5, rtol=1e-4, msg=lambda m: f"{table}: {m}")
    dense = torch.load(tmp_path / "art" / "dense.pt", weights_only=True)
    assert not any(".embeddings." in k or ".embedding_bags." in k for k in dense)
    assert "ranker.mlp.0.weight" in dense
    # The same checkpoint loads unsharded (table shapes of both modules checked) with the same tables.
    model, _ = load_unsharded(ckpt)
    torch.testing.assert_close(model.ec.embeddings["item"].weight.detach(),
                               torch.from_numpy(np.load(tmp_path / "art" / "tables" / "item.npy")))


@pytest.mark.slow
def test_managed_ec_table_evicting_two_ranks_match_one_process(extra_results):
    from embeddings.id_mapping import row_init

    one, two = extra_results[("sim_managed", 1)], extra_results[("sim_managed", 2)]
    assert one["stats"] == two["stats"]
    assert two["stats"]["item"]["evicted_total"] > 0  # the 300-row table overflowed
    _assert_same_run(one, two, "sim managed item")
    # reset_rows reaches the sharded EC: weights back to row_init, rowwise Adagrad state zero.
    for r in (one, two):
        assert torch.equal(r["reset"], row_init("item", RESET_ROWS, 16, 300))
        assert r["momentum"][0] > 0 and r["momentum"][1] == 0, r["momentum"]
