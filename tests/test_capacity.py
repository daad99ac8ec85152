"""Capacity planning (``cdp-rec plan``): bytes by hand, JSON vs text, failures, min GPUs,
and the planner counting the sparse optimizer's state (the README's example).

Small configs on a CUDA topology (the planner runs without a GPU: tables live on the
meta device), sized so the answers can be worked out on paper: an fp32 row of dim 16
is 64 bytes, so 2**24 rows are exactly 1 GiB.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from cdp_rec.cli import main
from cdp_rec.config import load_config
from embeddings import capacity as cap
from embeddings.sharding import describe_plan, plan_sharding, plan_with_estimates

GIB = 2**30
ROWS_PER_GIB = GIB // 64  # fp32, dim 16 (the tiny config's embedding_dim)


def cuda_cfg(*overrides: str):
    return load_config(None, ["sharding.compute_device=cuda", *overrides])


def table(report: cap.CapacityReport, name: str) -> cap.TableUsage:
    return next(t for t in report.tables if t.name == name)


# --------------------------------------------------------------------------- bytes by hand


@pytest.mark.parametrize(
    "optimizer, state_bytes",
    [
        ("adam", lambda rows, dim: 2 * rows * dim * 4),
        ("adagrad", lambda rows, dim: rows * dim * 4),
        ("rowwise_adagrad", lambda rows, dim: rows * 4),
        ("sgd", lambda rows, dim: 0),
    ],
)
def test_table_bytes_are_rows_times_dim_times_bytes_plus_optimizer_state(optimizer, state_bytes):
    cfg = cuda_cfg(f"sharding.sparse_optimizer={optimizer}", "features.num_items=1000000")
    report = cap.plan_capacity(cfg, world_size=4, local_world_size=2)
    for t in report.tables:
        assert t.param_bytes == t.rows * t.dim * 4
        assert t.optimizer_bytes == state_bytes(t.rows, t.dim)
    item = table(report, "item")
    assert (item.rows, item.dim, item.dtype) == (1_000_000, 16, "fp32")
    assert item.param_bytes == 64_000_000
    # Fused kernel on CUDA: the state sits in HBM next to the weights, shard by shard.
    if optimizer != "rowwise_adagrad":  # rowwise state is per shard row, repeated per column shard
        assert sum(r.optimizer_hbm for r in report.ranks) == sum(t.optimizer_bytes for t in report.tables)
    assert all(r.optimizer_ddr == 0 for r in report.ranks)


def test_row_wise_table_splits_weights_and_adam_state_evenly_over_ranks():
    rows = ROWS_PER_GIB  # 1 GiB of fp32 weights
    cfg = cuda_cfg(f"features.num_items={rows}", "sharding.constraints={item: row_wise}")
    report = cap.plan_capacity(cfg, world_size=4, local_world_size=2, hbm_gb=8, ddr_gb=8)
    item = table(report, "item")
    assert item.sharding_type == "row_wise" and item.ranks == [0, 1, 2, 3]
    assert item.param_bytes == GIB and item.optimizer_bytes == 2 * GIB
    for r in report.ranks:
        # A quarter of the table's Adam state (2 fp32 values per element) on every rank ...
        assert r.optimizer_hbm >= 2 * GIB // 4
        # ... and the planner's estimate holds a quarter of the weights plus small I/O buffers.
        assert GIB // 4 <= r.planner_hbm < GIB // 4 + 64 * 2**20


@pytest.mark.parametrize("dtype, row_bytes", [("fp32", 64), ("fp16", 32), ("int8", 16 + 8)])
def test_dtype_what_if_changes_the_row_size(dtype, row_bytes):
    cfg = cuda_cfg("features.num_items=1000000")
    report = cap.plan_capacity(cfg, 2, 2, what_if=cap.WhatIf(dtype=dtype))
    item = table(report, "item")
    assert item.dtype == dtype and item.param_bytes == 1_000_000 * row_bytes
    assert item.optimizer_bytes == 2 * 1_000_000 * 16 * 4  # fbgemm keeps Adam state in fp32


def test_scale_and_dim_what_ifs_change_only_the_named_table():
    cfg = cuda_cfg("features.num_items=1000000")
    base = cap.plan_capacity(cfg, 2, 2)
    what = cap.plan_capacity(cfg, 2, 2, what_if=cap.WhatIf(scale_rows={"item": 2.0}, dims={"item": 128}))
    item = table(what, "item")
    assert (item.rows, item.dim) == (2_000_000, 128)
    assert item.param_bytes == 2_000_000 * 128 * 4 == 16 * table(base, "item").param_bytes
    # Other tables keep their bytes (the planner may still place them differently).
    for name in ("user", "query"):
        a, b = table(what, name), table(base, name)
        assert (a.rows, a.dim, a.param_bytes, a.optimizer_bytes) == (b.rows, b.dim, b.param_bytes, b.optimizer_bytes)


def test_caching_puts_the_table_in_ddr_and_a_cache_in_hbm():
    rows = ROWS_PER_GIB
    cfg = cuda_cfg(f"features.num_items={rows}", "sharding.constraints={item: row_wise}")
    report = cap.plan_capacity(cfg, 4, 2, hbm_gb=8, ddr_gb=16, what_if=cap.WhatIf(caching=True, cache_load_factor=0.1))
    assert table(report, "item").compute_kernel == "fused_uvm_caching"
    for r in report.ranks:
        assert r.planner_ddr >= GIB // 4  # the whole shard lives in host memory
        assert r.optimizer_ddr >= 2 * GIB // 4  # non-rowwise state of a cached table: UVM
        assert 0.1 * GIB / 4 <= r.planner_hbm < 0.1 * GIB / 4 + 64 * 2**20  # the 10 % cache


# --------------------------------------------------------------------------- same plan as training


@pytest.mark.parametrize(
    "config, overrides, world, local",
    [
        ("configs/industrial.yaml", [], 64, 8),
        (None, ["sharding.constraints={item: row_wise, ctx_hour: data_parallel}"], 4, 2),  # CPU, hand-built
        (None, ["model.name=sim", "sharding.constraints={item: column_wise}"], 4, 2),  # EC + EBC
    ],
)
def test_capacity_plan_is_the_plan_training_gets(config, overrides, world, local):
    from cdp_rec.models import build_model

    cfg = load_config(config, overrides)
    device = cfg.sharding.compute_device
    with cap.quiet_planner():
        trained = describe_plan(plan_sharding(cfg, build_model(cfg, "meta"), world, local, device))
    report = cap.plan_capacity(cfg, world, local)
    assert {r["table"]: (r["sharding_type"], r["compute_kernel"], sorted(r["ranks"])) for r in trained} == {
        t.name: (t.sharding_type, t.compute_kernel, t.ranks) for t in report.tables
    }


def test_industrial_plan_runs_in_seconds_and_fits():
    cfg = load_config("configs/industrial.yaml")
    start = time.perf_counter()
    report = cap.plan_capacity(cfg, 64, 8, hbm_gb=80, ddr_gb=512)
    assert time.perf_counter() - start < 20
    assert report.fits()
    assert table(report, "user").param_bytes == 400_000_000 * 64 * 4
    assert table(report, "user").optimizer_bytes == 2 * 400_000_000 * 64 * 4  # Adam (GPU)
    assert sum(t.rows for t in report.tables) == report.totals()["rows"]


# --------------------------------------------------------------------------- JSON and text


def test_json_parses_and_agrees_with_the_text(capsys):
    args = ["plan", "--set", "sharding.compute_device=cuda", "--set", "features.num_items=3000000",
            "--world-size", "4", "--local-world-size", "2", "--hbm-gb", "2", "--ddr-gb", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    assert data["fits"] is True and "fits: yes" in text
    assert data["topology"]["world_size"] == 4 and "4 x cuda, 2 hosts x 2" in text
    assert data["sparse_optimizer"] == "adam" and data["optimizer_counted_by_planner"] is True
    unit = 2**20  # the largest table is 192 MB: the text reports MiB
    assert "params MiB" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    for t in data["tables"]:
        cols = lines[t["name"]]
        assert int(cols[1].replace(",", "")) == t["rows"] and int(cols[2]) == t["dim"] and cols[3] == t["dtype"]
        assert cols[4] == f"{t['param_bytes'] / unit:.2f}" and cols[5] == f"{t['optimizer_bytes'] / unit:.2f}"
        assert cols[6] == t["sharding_type"] and cols[7] == t["compute_kernel"]
        assert cols[8] == cap.format_ranks(t["ranks"])
    totals = data["totals"]
    assert lines["total"][2:4] == [f"{totals['param_bytes'] / unit:.2f}", f"{totals['optimizer_bytes'] / unit:.2f}"]
    for r in data["ranks"]:
        assert r["hbm_bytes"] == r["planner_hbm"] + r["optimizer_hbm"]
        row = next(line.split() for line in text.splitlines() if line.split()[:1] and _covers(line.split()[0], r["rank"]))
        assert row[1:6:2] == [f"{r[k] / unit:.2f}" for k in ("planner_hbm", "optimizer_hbm", "hbm_bytes")]


def _covers(ranks: str, rank: int) -> bool:
    """Whether a rank-range cell like ``0-3,8`` contains ``rank``."""
    for part in ranks.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and int(lo) <= rank <= int(hi or lo):
            return True
    return False


def test_format_ranks_compacts_runs():
    assert cap.format_ranks([0, 1, 2, 3, 8, 9, 11]) == "0-3,8-9,11"
    assert cap.format_ranks([]) == "-"


# --------------------------------------------------------------------------- failures


def test_table_too_big_for_one_device_is_named():
    rows = 4 * ROWS_PER_GIB  # 4 GiB of weights, table-wise: must sit on one 2 GiB device
    cfg = cuda_cfg(f"features.num_items={rows}", "sharding.constraints={item: table_wise}")
    with pytest.raises(cap.CapacityError, match=r"item needs 12\.00 GiB HBM on one device \(table_wise\)") as e:
        cap.plan_capacity(cfg, 4, 2, hbm_gb=2, ddr_gb=8)
    assert "has 1.7" in str(e.value)  # 2 GiB minus the planner's 15 % reservation


def test_tables_too_big_for_the_cluster_are_named():
    cfg = cuda_cfg(f"features.num_users={8 * ROWS_PER_GIB}", "sharding.sparse_optimizer=sgd")
    with pytest.raises(cap.CapacityError, match=r"user needs 4\.00 GiB HBM split over at most 2 devices"):
        cap.plan_capacity(cfg, 2, 2, hbm_gb=2, ddr_gb=8)


def test_planner_counts_optimizer_state_so_a_plan_without_room_for_it_is_refused():
    # 1 GiB of weights row-wise over 2 devices would fit the weights alone (0.5 GiB each of
    # 0.85); with Adam's 2 GiB of state it needs 1.5 GiB per device, and the planner says so.
    cfg = cuda_cfg(f"features.num_items={ROWS_PER_GIB}", "sharding.constraints={item: row_wise}")
    with pytest.raises(cap.CapacityError, match=r"item needs 1\.50 GiB HBM split over at most 2 devices \(row_wise\)"):
        cap.plan_capacity(cfg, 2, 1, hbm_gb=1, ddr_gb=8)
    # SGD keeps no state: the same table fits.
    report = cap.plan_capacity(load_config(None, [*cfg_overrides(cfg), "sharding.sparse_optimizer=sgd"]), 2, 1,
                               hbm_gb=1, ddr_gb=8)
    assert all(r.optimizer_hbm == 0 and r.hbm <= report.hbm_available for r in report.ranks)


def cfg_overrides(cfg) -> list[str]:
    return ["sharding.compute_device=cuda", f"features.num_items={cfg.features.num_items}",
            "sharding.constraints={item: row_wise}"]


def test_planner_estimate_per_shard_is_weights_buffers_and_fbgemm_state():
    # Rowwise Adagrad keeps one fp32 per row of *each* column shard (fbgemm), which TorchRec's
    # own multiplier (1/dim of the weights) undercounts; the planner's estimate has it exactly.
    from cdp_rec.models import build_model

    common = ["features.num_items=100000", "sharding.constraints={item: column_wise}", "model.embedding_dim=256"]
    estimates = {}
    for optimizer in ("rowwise_adagrad", "sgd"):
        cfg = cuda_cfg(*common, f"sharding.sparse_optimizer={optimizer}")
        with cap.quiet_planner():
            estimates[optimizer] = plan_with_estimates(cfg, build_model(cfg, "meta"), 4, 2, "cuda", hbm_gb=8, ddr_gb=8)
    item = estimates["rowwise_adagrad"].options["item"]
    assert item.sharding_type == "column_wise" and len(item.shards) == 2  # TorchRec's 128-wide column shards
    for with_state, without in zip(item.shards, estimates["sgd"].options["item"].shards):
        assert with_state.size == without.size
        assert with_state.storage.hbm - without.storage.hbm == with_state.size[0] * 4  # rows x fp32


def test_readme_example_the_old_planner_accepted_is_now_placed_to_fit():
    """README "Capacity planning": item rows x2 and dim 128 on 64 x 80 GiB. Blind to Adam's
    state, TorchRec's stock planner keeps item on one host (table_row_wise over 8 GPUs),
    where weights + state need 107 GiB per GPU of 68; counting the state, it spreads item
    row-wise over all 64 GPUs and the plan fits."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints

    from embeddings.sharding import build_sharders, build_topology, model_tables

    cfg = load_config("configs/industrial.yaml")
    what_if = cap.WhatIf(scale_rows={"item": 2.0}, dims={"item": 128})
    model = cap.planning_model(cfg, what_if)
    with cap.quiet_planner():
        stock = EmbeddingShardingPlanner(
            topology=build_topology(64, 8, "cuda", 80, 512),
            constraints={t: ParameterConstraints(compute_kernels=["fused"]) for t in model_tables(model)},
        ).plan(model, build_sharders(cfg, "cuda"))
    old = {r["table"]: r for r in describe_plan(stock)}["item"]
    assert old["sharding_type"] == "table_row_wise" and len(old["ranks"]) == 8
    rows = max(sh["sizes"][0] for sh in old["shards"])
    weights_and_adam = rows * 128 * 4 * 3  # fp32 weights + 2 fp32 Adam moments per element
    report = cap.plan_capacity(cfg, 64, 8, hbm_gb=80, ddr_gb=512, what_if=what_if, model=model)
    assert weights_and_adam > report.hbm_available  # the old plan would run out of memory
    item = table(report, "item")
    assert item.sharding_type == "row_wise" and item.ranks == list(range(64))
    assert report.fits() and max(r.hbm for r in report.ranks) <= report.hbm_available
    # Each GPU holds 1/64 of the weights and of the state, inside the planner's estimate.
    for r in report.ranks:
        assert r.optimizer_hbm >= item.optimizer_bytes // 64


def test_cli_failure_is_one_line_and_exit_2(capsys):
    args = ["plan", "--set", "sharding.compute_device=cuda", "--set", f"features.num_items={4 * ROWS_PER_GIB}",
            "--set", "sharding.constraints={item: table_wise}", "--world-size", "2", "--local-world-size", "2",
            "--hbm-gb", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cdp-rec plan: error: does not fit") and "item" in err[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scale-table", "itme=2"], "unknown tables ['itme']"),
        (["--scale-table", "item"], "expected TABLE=FLOAT"),
        (["--dim", "item=30"], "multiple of 4"),
        (["--caching"], "sharding.compute_device=cuda"),
        (["--dtype", "int8", "--set", "sharding.constraints={ctx_hour: data_parallel}"], "data_parallel"),
        (["--world-size", "3", "--local-world-size", "2"], "multiple of --local-world-size"),
        (["--local-world-size", "2"], "--world-size is required"),
    ],
)
def test_cli_rejects_bad_what_ifs(capsys, flags, message):
    args = ["plan", *flags]
    if "--world-size" not in flags and "--local-world-size" not in flags:
        args += ["--world-size", "2", "--local-world-size", "2"]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hbm-gb", "nan"], "--hbm-gb nan: must be a finite number of GiB > 0 and <= 1,048,576 (1 PiB per device)"),
        (["--hbm-gb", "inf"], "--hbm-gb inf: must be a finite number of GiB > 0 and <= 1,048,576 (1 PiB per device)"),
        (["--hbm-gb", "0"], "--hbm-gb 0.0: must be a finite number of GiB > 0 and <= 1,048,576 (1 PiB per device)"),
        (["--ddr-gb", "-5"],
         "--ddr-gb -5.0: must be a finite number of GiB >= 0 and <= 1,048,576 (1 PiB per device)"),
        (["--set", "sharding.ddr_gb=1e9"],
         "sharding.ddr_gb 1000000000.0: must be a finite number of GiB >= 0 and <= 1,048,576 (1 PiB per device)"),
        (["--find-min-gpus", "--hbm-gb", "nan"],  # refused before the search, not read as "does not fit"
         "--hbm-gb nan: must be a finite number of GiB > 0 and <= 1,048,576 (1 PiB per device)"),
        (["--scale-table", "item=1e30"],
         "table item: 5e+33 rows x dim 16 (features.num_items=5000 x --scale-table item=1e+30) exceeds 5.76e+17 "
         "(2**59) elements, past which its byte counts (weights + optimizer state) overflow int64"),
        (["--set", "features.num_items=1000000000000000000"],
         "table item: 1e+18 rows x dim 16 (features.num_items=1000000000000000000) exceeds 5.76e+17 (2**59) "
         "elements, past which its byte counts (weights + optimizer state) overflow int64"),
        (["--dim", "item=4000000000"],
         "--dim item=4000000000: at most 65,536 (planning time grows with dim / 128 column-wise shards)"),
        (["--set", "model.embedding_dim=4000000000"],
         "model.embedding_dim 4000000000: at most 65,536 (planning time grows with dim / 128 column-wise shards)"),
        (["--world-size", "100000"],
         "--world-size 100000: at most 4096 devices (TorchRec's planner time grows with the world size)"),
        (["--find-min-gpus", "--max-world-size", "8192"],
         "--max-world-size 8192: at most 4096 devices (TorchRec's planner time grows with the world size)"),
    ],
)
def test_cli_refuses_absurd_sizes_in_one_line(capsys, flags, message):
    """Hostile sizes: a one-line refusal naming the flag / field and its bound, exit 2 -
    not a traceback from build_topology or torch's int64 sizes, nor a planner running for hours."""
    args = ["plan", "--local-world-size", "1", *flags]
    if "--world-size" not in flags and "--find-min-gpus" not in flags:
        args += ["--world-size", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"cdp-rec plan: error: {message}"


def test_sizes_at_the_bounds_are_answered():
    """Just inside the bounds the planner answers (here: does not fit, naming the table)."""
    cfg = load_config(None, [f"features.num_items={cap.MAX_TABLE_ELEMENTS // 16}"])  # rows x dim 16 = 2**59
    with pytest.raises(cap.CapacityError, match=r"item needs 2281701376\.00 GiB DDR on one device \(any sharding\)"):
        cap.plan_capacity(cfg, 1, 1, hbm_gb=cap.MAX_MEMORY_GB, ddr_gb=128)


# --------------------------------------------------------------------------- smallest world size


@pytest.mark.parametrize(
    "optimizer, weights_gib, need_gib",
    [
        ("sgd", 2, 2),  # no state: 2 GiB of weights
        ("adam", 1, 3),  # 1 GiB of weights + 2 GiB of Adam state
    ],
)
def test_find_min_gpus_matches_hand_computation(optimizer, weights_gib, need_gib):
    # 1 GiB HBM per device, of which the planner leaves ~0.85 GiB to the tables; the item
    # table is row-wise, so n devices hold need/n each: the answer is ceil(need / 0.85).
    cfg = cuda_cfg(
        f"sharding.sparse_optimizer={optimizer}",
        f"features.num_items={weights_gib * ROWS_PER_GIB}",
        "sharding.constraints={item: row_wise}",
    )
    report, steps = cap.find_min_world_size(cfg, local_world_size=1, hbm_gb=1, ddr_gb=4)
    expected = math.ceil(need_gib * GIB / report.hbm_available)
    assert expected == (3 if optimizer == "sgd" else 4)
    assert report.world_size == expected and report.fits()
    assert {s.world_size: s.fits for s in steps}[expected - 1] is False


def test_find_min_gpus_counts_whole_hosts(capsys):
    args = ["plan", "--set", "sharding.compute_device=cuda", "--set", f"features.num_items={3 * ROWS_PER_GIB}",
            "--set", "sharding.constraints={item: row_wise}", "--set", "sharding.sparse_optimizer=sgd",
            "--local-world-size", "2", "--hbm-gb", "1", "--ddr-gb", "4", "--find-min-gpus", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    # 3 GiB / 0.85 GiB -> 4 devices = 2 hosts of 2.
    assert data["min_world_size"] == data["topology"]["world_size"] == 4
    assert [s["world_size"] for s in data["search"] if not s["fits"]] == [2]


# --------------------------------------------------------------------------- sequence models


def test_sequence_model_plans_its_embedding_collection_tables(capsys):
    # sim keeps item / category in an unpooled EmbeddingCollection beside the pooled EBC.
    args = ["plan", "--set", "model.name=sim", "--world-size", "2", "--local-world-size", "2", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    tables = {t["name"]: t for t in data["tables"]}
    assert {"item", "category", "user", "query"} <= set(tables) and data["fits"] is True
    assert tables["item"]["rows"] == 5000 and tables["item"]["ranks"]
    # What-ifs reach the EmbeddingCollection's tables too.
    assert main([*args, "--scale-table", "item=2", "--dim", "item=32", "--dim", "category=32"]) == 0
    item = next(t for t in json.loads(capsys.readouterr().out)["tables"] if t["name"] == "item")
    assert (item["rows"], item["dim"]) == (10_000, 32)
    # TorchRec's EmbeddingCollection has one dim for all its tables.
    assert main([*args, "--dim", "item=32"]) == 2
    assert "share one EmbeddingCollection" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kind, message",
    [
        ("table_row_wise", "table_row_wise is not available for model 'sim''s table 'item', an unpooled "
                           "EmbeddingCollection table"),
        ("data_parallel", "data_parallel of model 'sim''s unpooled EmbeddingCollection table 'item' is not supported"),
    ],
)
def test_sequence_model_refuses_shardings_its_collection_lacks(capsys, kind, message):
    args = ["plan", "--set", "model.name=sim", "--set", f"sharding.constraints={{item: {kind}}}",
            "--world-size", "2", "--local-world-size", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sharding.constraints.item" in err and message in err


def test_lr_counts_replicated_count_tables_are_reserved_on_every_device_and_shown():
    # lr_counts keeps float64 click / impression counts per bucket of user, item, query,
    # category and (user, category) on every rank: buffers the planner reserves beside the
    # dense layers, not tables it places. The report says how much that reservation is.
    cfg = cuda_cfg("model.name=lr_counts", "features.num_users=20000000", "features.num_items=10000000",
                   "features.num_queries=1000000")
    f = cfg.features
    buckets = f.num_users + f.num_items + f.num_queries + f.num_categories + min(f.num_users * f.num_categories, 2**22)
    counts = 2 * 8 * buckets
    report = cap.plan_capacity(cfg, 8, 8)
    base = cap.plan_capacity(cuda_cfg("features.num_users=20000000", "features.num_items=10000000",
                                      "features.num_queries=1000000", "model.name=base"), 8, 8)
    reserve = cap._replicated_reserve(report)
    assert counts <= reserve <= counts * 1.01 + cap._replicated_reserve(base)
    assert report.hbm_available == pytest.approx(report.hbm_capacity * 0.85 - reserve, abs=1)
    assert f"{reserve / GIB:.2f} GiB for what every rank holds whole" in cap.format_report(report)
