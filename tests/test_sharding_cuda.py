"""TorchRec on CUDA: the sharded paths a GPU cluster runs, checked against the CPU ones.

One rank (nccl on one GPU; gloo for the CPU side, both world size 1) trains the same
batches through DistributedModelParallel with fbgemm's fused sparse optimizer:

* every sharding type a 1-GPU run can place (table / row / column / table-row-wise and
  data-parallel) for the base model (EmbeddingBagCollection), SIM (EmbeddingCollection)
  and CDP's category-filtered path without diffusion noise (CDP draws its noise on the
  device, so with noise the CUDA and CPU runs are different random draws): the gathered
  tables, dense weights and eval logits equal the CPU run's (exact adagrad, and SGD, on
  both);
* fbgemm's fused Adam, which exists only on CUDA, equals the single-process CPU trainer's
  row-lazy Adam (same formula, touched rows only) after several steps;
* the planner's HBM estimate for each table's shard + optimizer state against the bytes
  the GPU holds (the CUDA twin of tests/test_plan_memory.py);
* fbgemm's fused optimizers on two small tables sharing one kernel against the textbook
  update, for both pooling roads TorchRec takes (bottom of the file).

Runs only where CUDA and the CUDA TorchRec stack are present (``scripts/gpu_check.sh``
runs it as part of ``gpu_tests``); the same workers are exercised on CPU by
``test_worker_runs_on_cpu`` and ``test_fused_adagrad_on_cpu_matches_the_textbook_update``
so their plumbing is checked in CI. Last GPU run, what passed and what did not:
docs/performance.md, "On a GPU".
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torchrec import KeyedJaggedTensor

from bench._common import free_port
from cdp_rec.config import JobConfig, load_config
from sharded_helpers import measure_shards, random_batch, tbe_kernels

HAS_CUDA = torch.cuda.is_available()
STEPS = 4
BS = 128
MIB = 2**20
BIG = ("item", "user", "query")

# (name, model, sharding of the big tables, sparse optimizer, embedding dim)
CASES = (
    ("base-table_wise", "base", "table_wise", "adagrad", 16),
    ("base-row_wise", "base", "row_wise", "adagrad", 16),
    ("base-column_wise", "base", "column_wise", "adagrad", 256),
    ("base-table_row_wise", "base", "table_row_wise", "adagrad", 16),
    ("base-data_parallel", "base", "data_parallel", "adagrad", 16),
    ("sim-row_wise", "sim", "row_wise", "adagrad", 16),
    ("sim-table_wise", "sim", "table_wise", "adagrad", 16),
    ("cdp_no_diffusion-row_wise", "cdp_no_diffusion", "row_wise", "adagrad", 16),
    ("base-adam", "base", "table_wise", "adam", 16),
    # SGD is linear in the gradient: rounding differences stay rounding-sized, where adagrad's
    # first step turns any near-zero gradient into +-lr. These separate "a different road"
    # from "amplified rounding" for the table-wise / data-parallel cases.
    ("base-table_wise-sgd", "base", "table_wise", "sgd", 16),
    ("base-row_wise-sgd", "base", "row_wise", "sgd", 16),
    ("base-data_parallel-sgd", "base", "data_parallel", "sgd", 16),
    ("sim-table_wise-sgd", "sim", "table_wise", "sgd", 16),
)
ROWS = 20_000


def _config(model: str, sharding: str, optimizer: str, dim: int) -> JobConfig:
    constraints = "{" + ", ".join(f"{t}: {sharding}" for t in BIG) + "}"
    return load_config(None, [
        f"model.name={model}", f"model.embedding_dim={dim}", f"features.num_items={ROWS}",
        f"features.num_users={ROWS}", f"features.num_queries={ROWS}", "features.max_seq_len=50",
        f"sharding.constraints={constraints}", f"sharding.sparse_optimizer={optimizer}",
        "sharding.pipeline=false", f"train.batch_size={BS}", "train.progress=false",
    ])


def _tbe_iters(dmp: torch.nn.Module) -> list[int]:
    """fbgemm's step counter (Adam's bias correction) of every TBE kernel under ``dmp``."""
    return [int(k.iter_cpu) for k in tbe_kernels(dmp) if hasattr(k, "iter_cpu")]


def _batch(cfg: JobConfig, n: int, seed: int):
    # Few categories, so the category filter keeps a real share of the history.
    return random_batch(cfg, n, seed, categories=min(4, cfg.features.num_categories))


def _held_bytes(trainer) -> dict[str, int]:
    """Bytes this rank's shards + optimizer state of each table hold on the device."""
    m = measure_shards(trainer)
    return {t: m["weights"].get(t, 0) + m["state"].get(t, 0) for t in {*m["weights"], *m["state"]}}


def _plan_bytes(cfg: JobConfig, device: str) -> dict[str, int]:
    """The planner's per-table storage estimate (HBM on CUDA, DDR on CPU) for 1 rank."""
    from cdp_rec.models import build_model
    from embeddings.capacity import quiet_planner, shard_estimates
    from embeddings.sharding import plan_with_estimates

    model = build_model(cfg, "meta")
    with quiet_planner():
        planned = plan_with_estimates(cfg, model, 1, 1, device)
    out: dict[str, int] = {}
    for table, _rank, _shape, storage in shard_estimates(planned, model):
        out[table] = out.get(table, 0) + (storage.hbm if device == "cuda" else storage.ddr)
    return out


def _worker(rank: int, device: str, port: int, out_dir: str, names: list[str]) -> None:
    from cdp_rec.training.distributed import init_from_env
    from cdp_rec.training.trainer import Trainer
    from embeddings.state import gather_full_state
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cudnn.allow_tf32 = False
    ctx = init_from_env(device)
    try:
        for name, model, sharding, optimizer, dim in CASES:
            if name not in names:
                continue
            cfg = _config(model, sharding, optimizer, dim)
            trainer = Trainer(cfg, ctx)
            losses: list[float] = []
            iters: list[list[int]] = []  # fbgemm's per-TBE step counter (Adam's bias correction) after each step

            module = trainer.module

            def on_step(out: dict) -> None:
                losses.append(float(out["loss"]))
                iters.append(_tbe_iters(module))

            steps = trainer.train_steps([_batch(cfg, BS, seed=s) for s in range(STEPS)], on_step)
            if device == "cuda":
                torch.cuda.synchronize()
            held = _held_bytes(trainer)
            trainer.module.eval()
            with torch.no_grad():
                _, out = trainer.module(trainer.model.prepare_batch(_batch(cfg, BS, seed=99)).to(trainer.device))
            torch.save({"steps": steps, "losses": losses, "iters": iters, "state": gather_full_state(trainer.module),
                        "logits": out["logits"].detach().cpu(), "plan": trainer.plan_rows, "held": held,
                        "estimate": _plan_bytes(cfg, device)},
                       Path(out_dir) / f"{name}-{device}.pt")
            del trainer
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _unsharded(name: str) -> dict:
    """The single-process CPU trainer (row-lazy Adam on the touched rows) on the same batches."""
    from cdp_rec.training.trainer import Trainer

    _, model, sharding, optimizer, dim = next(c for c in CASES if c[0] == name)
    cfg = _config(model, sharding, optimizer, dim)
    trainer = Trainer(cfg, None)
    losses: list[float] = []
    steps = trainer.train_steps([_batch(cfg, BS, seed=s) for s in range(STEPS)],
                                lambda out: losses.append(float(out["loss"])))
    trainer.module.eval()
    with torch.no_grad():
        _, out = trainer.module(trainer.model.prepare_batch(_batch(cfg, BS, seed=99)))
    return {"steps": steps, "losses": losses, "state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "logits": out["logits"].detach()}


def _run(device: str, names: list[str], tmp: Path) -> dict[str, dict]:
    mp.spawn(_worker, args=(device, free_port(), str(tmp), names), nprocs=1, join=True)
    return {n: torch.load(tmp / f"{n}-{device}.pt", weights_only=False) for n in names}


def _where_rows_occur(name: str, key: str, rows: list[int]) -> str:
    """Per training batch, how often each of ``rows`` is looked up in table ``key`` (failure messages)."""
    from cdp_rec.models import build_model
    from embeddings.sharding import find_embedding_modules, module_table_configs

    _, model, sharding, optimizer, dim = next(c for c in CASES if c[0] == name)
    cfg = _config(model, sharding, optimizer, dim)
    table = key.split(".")[-2]
    features = {f for _, m in find_embedding_modules(build_model(cfg, "meta"))
                for t in module_table_configs(m) if t.name == table for f in t.feature_names}
    prepare = build_model(cfg, "meta").prepare_batch  # CDP looks up the category-filtered history
    seen = []
    for s in range(STEPS):
        jt = prepare(_batch(cfg, BS, seed=s)).sparse.to_dict()
        seen.append({r: {k: int((v.values() == r).sum()) for k, v in jt.items()
                         if k in features and int((v.values() == r).sum())} for r in rows})
    return "; ".join(f"row {r}: " + ", ".join(f"step {s + 1} {seen[s][r]}" for s in range(STEPS) if seen[s][r])
                     for r in rows)


def _assert_same(a: dict, b: dict, what: str, name: str, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    assert a["steps"] == b["steps"] == STEPS, what
    problems = []
    assert a["state"].keys() == b["state"].keys(), what
    for key, x in a["state"].items():
        y = b["state"][key]
        bad = ~torch.isclose(y, x, atol=atol, rtol=rtol)
        if bad.any():
            d = (y - x).abs()[bad]
            line = (f"{key}: {int(bad.sum())}/{bad.numel()} elements, |diff| max {float(d.max()):.3g} "
                    f"median {float(d.median()):.3g}")
            if x.dim() == 2:  # an embedding table: which rows, and where those ids occur
                rows = bad.any(1).nonzero().squeeze(1).tolist()
                line += f", {len(rows)} rows; first: {_where_rows_occur(name, key, rows[:6])}"
            problems.append(line)
    losses = torch.tensor(a["losses"]), torch.tensor(b["losses"])
    if not torch.allclose(*losses, atol=atol, rtol=rtol):
        problems.append(f"losses {a['losses']} vs {b['losses']}")
    if not torch.allclose(b["logits"], a["logits"], atol=10 * atol, rtol=10 * rtol):
        problems.append(f"eval logits: max |diff| {float((b['logits'] - a['logits']).abs().max()):.3g}")
    if problems and "iters" in b:
        problems.append(f"fbgemm iter after each step: {b['iters']}")
    assert not problems, f"{what}:\n  " + "\n  ".join(problems)


COMPARED = [c[0] for c in CASES if c[3] != "adam"]


@pytest.fixture(scope="module")
def cuda_and_cpu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding-cuda")
    return _run("cuda", [c[0] for c in CASES], tmp), _run("cpu", COMPARED, tmp)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA TorchRec stack")
@pytest.mark.parametrize("name", COMPARED)
def test_cuda_sharded_training_equals_cpu(cuda_and_cpu, name):
    cuda, cpu = cuda_and_cpu
    # The constrained tables are placed alike; the planner may place the small unconstrained
    # ones differently per device (CUDA picked row_wise for them, CPU table_wise): one shard
    # either way on one rank.
    kinds = [{r["table"]: r["sharding_type"] for r in run[name]["plan"]} for run in (cuda, cpu)]
    sharding = next(c[2] for c in CASES if c[0] == name)
    assert all(k[t] == sharding for k in kinds for t in BIG), kinds
    _assert_same(cpu[name], cuda[name], f"{name} cuda vs cpu", name)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA TorchRec stack")
def test_fused_adam_on_cuda_equals_row_lazy_adam(cuda_and_cpu):
    cuda, _ = cuda_and_cpu
    _assert_same(_unsharded("base-adam"), cuda["base-adam"], "fbgemm fused Adam (cuda) vs row-lazy Adam (cpu)",
                 "base-adam")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA TorchRec stack")
@pytest.mark.parametrize("name", [c[0] for c in CASES if c[1] == "base"])
def test_cuda_plan_estimate_matches_held_bytes(cuda_and_cpu, name):
    cuda, _ = cuda_and_cpu
    r = cuda[name]
    ratios = {t: (r["held"].get(t, 0), r["estimate"].get(t, 0)) for t in BIG}
    assert all(got >= MIB for got, _ in ratios.values()), ratios
    # The excess is TorchRec's I/O buffers for the planner's default batch (test_plan_memory).
    assert all(got <= est <= 1.05 * got for got, est in ratios.values()), (
        name, {t: (got, est, round(est / got, 4)) for t, (got, est) in ratios.items()})


@pytest.mark.slow
def test_worker_runs_on_cpu(tmp_path):
    """The CUDA tests' worker, on CPU (gloo): plumbing and the CPU side's own sanity."""
    names = ["base-row_wise", "cdp_no_diffusion-row_wise"]
    out = _run("cpu", names, tmp_path)
    for name in names:
        r = out[name]
        assert r["steps"] == STEPS and all(torch.isfinite(torch.tensor(r["losses"])))
        for table in BIG:
            got, est = r["held"][table], r["estimate"][table]
            assert got <= est <= 1.05 * got, (name, table, got, est)


# ------------------------------------------------------------------ fbgemm's fused optimizer, alone
# One table (50 x 8) in an EmbeddingBagCollection sharded by DMP with a fused optimizer;
# loss = sum_b pooled_b . C_t[b] with fixed C_t, so a row's gradient at step t is the sum of
# C_t[b] (divided by the bag's length for mean pooling) over the bags that hold it. The bags
# cover first touches at every step, repeated touches, duplicates in a bag and across bags,
# and empty bags. The reference is the textbook optimizer on the touched rows (global step
# count for Adam's bias correction). Sum and mean pooling, table-wise and row-wise: TorchRec
# pools table-wise shards inside fbgemm (its MEAN mode) but row-wise ones as SUM, dividing
# by the lengths afterwards - the two roads to a mean.

# Table "t" (feature "f") gets bags of 0-3 ids; table "u" (feature "g") one id per sample, like
# the zoo's context features - the two share one fbgemm kernel when placed alike.
FUSED_BAGS = {
    "t": ([[1, 2], [2], [3, 3, 4], []], [[3], [4, 5, 9], [], [1]], [[1, 6], [6], [6, 6], [2]],
          [[7, 7], [3], [8], [9, 1]]),
    "u": ([[5], [5], [0], [7]], [[0], [1], [1], [1]], [[2], [5], [0], [9]], [[9], [9], [9], [4]]),
}
FEATURE = {"t": "f", "u": "g"}
FUSED_LR = 0.05
FUSED_ROWS = 50
# fbgemm specialises its CUDA kernels by embedding width; the H200 failures were all at
# width 16 (table_wise, data_parallel) while column_wise at 256 passed: both sizes here.
FUSED_DIMS = (8, 128)
FUSED_STEPS = 4


def _fused_inputs(dim: int) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(3)
    w0 = {t: torch.randn(FUSED_ROWS, dim, generator=g) * 0.1 for t in FUSED_BAGS}
    coefs = {t: [torch.randn(len(bags), dim, generator=g) for bags in steps] for t, steps in FUSED_BAGS.items()}
    return w0, coefs


def _fused_reference(optimizer: str, pooling: str, dim: int) -> dict[str, list[torch.Tensor]]:
    """Each table's weights after each step under the textbook optimizer."""
    w0, coefs = _fused_inputs(dim)
    b1, b2, eps = 0.9, 0.999, 1e-8
    out: dict[str, list[torch.Tensor]] = {}
    for name, steps in FUSED_BAGS.items():
        w = w0[name].clone()
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        out[name] = []
        for t, (bags, c) in enumerate(zip(steps, coefs[name]), start=1):
            grad = torch.zeros_like(w)
            for b, bag in enumerate(bags):
                for r in bag:
                    grad[r] += c[b] / (len(bag) if pooling == "mean" else 1)
            rows = torch.tensor(sorted({r for bag in bags for r in bag}))
            gr = grad[rows]
            if optimizer == "adam":
                m[rows] = b1 * m[rows] + (1 - b1) * gr
                v[rows] = b2 * v[rows] + (1 - b2) * gr * gr
                w[rows] -= FUSED_LR * (m[rows] / (1 - b1**t)) / ((v[rows] / (1 - b2**t)).sqrt() + eps)
            elif optimizer == "adagrad":  # fbgemm's exact (element-wise) adagrad
                v[rows] += gr * gr
                w[rows] -= FUSED_LR * gr / (v[rows].sqrt() + eps)
            else:  # sgd
                w[rows] -= FUSED_LR * gr
            out[name].append(w.clone())
    return out


def _fused_worker(rank: int, device: str, case: tuple[str, str, str, int], port: int, out_path: str) -> None:
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from embeddings.state import gather_full_state

    optimizer, pooling, sharding, dim = case
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=t, embedding_dim=dim, num_embeddings=FUSED_ROWS, feature_names=[FEATURE[t]],
            pooling={"sum": PoolingType.SUM, "mean": PoolingType.MEAN}[pooling]) for t in FUSED_BAGS],
            device=torch.device("meta"))
        opt = {"adam": EmbOptimType.ADAM, "adagrad": EmbOptimType.EXACT_ADAGRAD, "sgd": EmbOptimType.EXACT_SGD}
        sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": opt[optimizer], "learning_rate": FUSED_LR})
        constraint = ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"])
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device=device),
                                           constraints={t: constraint for t in FUSED_BAGS})
        plan = planner.collective_plan(ebc, [sharder], dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(ebc, device=dev, plan=plan, sharders=[sharder])
        w0, coefs = _fused_inputs(dim)
        for key, tensor in dmp.state_dict().items():
            table = key.split(".")[-2]
            for shard in tensor.local_shards():
                o, n = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(w0[table][o[0]:o[0] + n[0], o[1]:o[1] + n[1]])
        weights, pooled_all, iters = [], [], []
        for step in range(FUSED_STEPS):
            bags = {t: FUSED_BAGS[t][step] for t in FUSED_BAGS}
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=[FEATURE[t] for t in FUSED_BAGS],
                values=torch.tensor([r for t in FUSED_BAGS for bag in bags[t] for r in bag]),
                lengths=torch.tensor([len(bag) for t in FUSED_BAGS for bag in bags[t]])).to(dev)
            pooled = dmp(kjt).to_dict()  # {feature: [B, D]}
            pooled_all.append({t: pooled[FEATURE[t]].detach().cpu() for t in FUSED_BAGS})
            loss = sum((pooled[FEATURE[t]] * coefs[t][step].to(dev)).sum() for t in FUSED_BAGS)
            loss.backward()  # the fused optimizer updates the rows in backward
            state = gather_full_state(dmp)
            weights.append({t: state[f"embedding_bags.{t}.weight"] for t in FUSED_BAGS})
            iters.append(_tbe_iters(dmp))
        torch.save({"weights": weights, "pooled": pooled_all, "iters": iters}, out_path)
    finally:
        dist.destroy_process_group()


def _fused_run(device: str, case: tuple[str, str, str, int], tmp: Path) -> dict:
    out = tmp / f"fused-{device}-{'-'.join(map(str, case))}.pt"
    mp.spawn(_fused_worker, args=(device, case, free_port(), str(out)), nprocs=1, join=True)
    return torch.load(out, weights_only=False)


def _assert_matches_reference(run: dict, case: tuple[str, str, str, int]) -> None:
    optimizer, pooling, _, dim = case
    w0, _ = _fused_inputs(dim)
    ref = _fused_reference(optimizer, pooling, dim)
    problems = []
    for t in FUSED_BAGS:
        before = [w0[t]] + ref[t][:-1]
        for step, (bags, w) in enumerate(zip(FUSED_BAGS[t], before)):
            want = torch.stack([w[bag].sum(0) / (len(bag) if pooling == "mean" else 1) if bag
                                else torch.zeros(dim) for bag in bags])
            if not torch.allclose(run["pooled"][step][t], want, atol=1e-6, rtol=1e-5):
                problems.append(f"table {t}: pooled output at step {step + 1} differs "
                                f"(max |diff| {float((run['pooled'][step][t] - want).abs().max()):.3g})")
        for step, want in enumerate(ref[t]):
            got = run["weights"][step][t]
            bad = (~torch.isclose(got, want, atol=1e-6, rtol=1e-5)).any(1).nonzero().squeeze(1).tolist()
            if bad:
                problems.append(f"table {t}: after step {step + 1} rows {bad} differ from the textbook update "
                                f"(max |diff| {float((got - want).abs().max()):.3g})")
    assert not problems, f"{case}:\n  " + "\n  ".join(problems + [f"fbgemm iter per step {run['iters']}"])


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_fused_adagrad_on_cpu_matches_the_textbook_update(tmp_path, pooling):
    case = ("adagrad", pooling, "table_wise", FUSED_DIMS[0])
    _assert_matches_reference(_fused_run("cpu", case, tmp_path), case)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA TorchRec stack")
@pytest.mark.parametrize("case", [
    *[(o, "sum", s, FUSED_DIMS[0]) for o in ("adam", "adagrad", "sgd") for s in ("table_wise", "row_wise")],
    ("sgd", "sum", "table_wise", FUSED_DIMS[1]),
], ids=lambda c: "-".join(map(str, c)))
def test_fused_optimizer_on_cuda_matches_the_textbook_update(tmp_path, case):
    _assert_matches_reference(_fused_run("cuda", case, tmp_path), case)


# The models SUM-pool every table and divide the history bag themselves
# (embeddings.tables.bag_mean) since the H200 run where both failing cases were on fbgemm's
# MEAN road. These record whether that road itself is what differed (XFAIL: it is; XPASS: it
# is not, and the cause of that run's difference lies elsewhere - docs/performance.md) without
# failing the GPU check over a kernel the project no longer calls.
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA TorchRec stack")
@pytest.mark.xfail(strict=False, reason="diagnostic of fbgemm's CUDA MEAN pooling, which the models do not use")
@pytest.mark.parametrize("case", [
    *[(o, "mean", s, FUSED_DIMS[0]) for o in ("adam", "adagrad", "sgd") for s in ("table_wise", "row_wise")],
    ("sgd", "mean", "table_wise", FUSED_DIMS[1]),
], ids=lambda c: "-".join(map(str, c)))
def test_fbgemm_mean_pooling_on_cuda_matches_the_textbook_update(tmp_path, case):
    _assert_matches_reference(_fused_run("cuda", case, tmp_path), case)
