"""Validation, early stopping, best-weight restore, LR schedules and regularisation (issue 15).

End-to-end runs use the base model on a tiny data set built to overfit: 2000 rows a day,
two training days, one validation day (``data.valid_days=1``). Monitoring the validation
logloss, the planted best is epoch 2 (it rises every epoch after: 0.485, 0.486, 0.518,
...), so ``patience=2`` stops after epoch 4 and restores epoch 2.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cdp_rec.config import ConfigError, JobConfig, LRScheduleConfig, load_config
from cdp_rec.data.joined import open_reader
from cdp_rec.training.checkpoint import list_checkpoints, load_unsharded
from cdp_rec.training.lr_schedule import Improvement, LRSchedule
from cdp_rec.training.trainer import Trainer, train

DATA = ["data.samples_per_day=2000", "data.rows_per_file=1000", "data.row_group_size=500", "data.train_days=3"]
STEPS_PER_EPOCH = 32  # 2 days x 2000 rows / batch 128


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from cdp_rec.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("es") / "data"
    generate_dataset(load_config(None, DATA), root)
    return root


def _cfg(root: Path, run_dir: Path, name: str, *extra: str):
    return load_config(None, [
        *DATA, f"data.root={root}", "data.valid_days=1", "data.valid_fraction=0", "model.name=base",
        "train.batch_size=128", f"train.run_dir={run_dir}", f"train.run_name={name}", "train.progress=false",
        "train.early_stop.monitor=logloss", *extra])


def _run(root: Path, run_dir: Path, name: str, *extra: str) -> dict:
    return train(_cfg(root, run_dir, name, *extra)).metrics


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    model, _ = load_unsharded(ckpt)
    return model.state_dict()


def _test_metrics(ckpt: Path, root: Path) -> dict:
    model, cfg = load_unsharded(ckpt)
    days = list(range(cfg.data.train_days, cfg.data.train_days + cfg.data.test_days))
    return Trainer(cfg, None, model=model).evaluate(open_reader(cfg, root, days, cfg.train.eval_batch_size)).to_dict()


# --------------------------------------------------------------------------- schedule formulas


def test_lr_schedule_matches_its_formula():
    better = Improvement("max")
    const = LRSchedule(LRScheduleConfig(kind="constant", warmup_steps=4), 100, better)
    assert [const.factor(s) for s in (0, 1, 3, 4, 50)] == [0.25, 0.5, 1.0, 1.0, 1.0]

    cos = LRSchedule(LRScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1), 110, better)
    assert cos.factor(0) == pytest.approx(0.1 * 1.0)  # warm-up 1/10 x cosine at t=0 (1)
    assert cos.factor(10) == pytest.approx(1.0)
    assert cos.factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # = 0.55
    assert cos.factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert cos.factor(110) == pytest.approx(0.1) and cos.factor(500) == pytest.approx(0.1)

    plat = LRSchedule(LRScheduleConfig(kind="plateau", plateau_factor=0.5, plateau_patience=2, min_lr_ratio=0.2),
                      100, Improvement("min", 0.01))
    reduced = [plat.on_validation(v) for v in (0.50, 0.495, 0.49, 0.48, 0.485, 0.484, 0.46, 0.475, 0.48, 0.49,
                                               0.50, 0.51, 0.52)]
    # 0.495 and 0.49 are not better than 0.50 by more than min_delta 0.01: the 2nd of them reduces
    # (and restarts the count); 0.48 best; 0.485, 0.484 reduce; 0.46 best; 0.475, 0.48 reduce; then
    # 0.125 would be below min_lr_ratio 0.2: no more reductions.
    assert reduced == [False, False, True, False, False, True, False, False, True, False, False, False, False]
    assert plat.reductions == 3  # 0.5**3 = 0.125 would be below the floor: the 4th plateau does not reduce
    assert plat.factor(0) == pytest.approx(max(0.2, 0.5**plat.reductions)) == pytest.approx(0.2)


def test_set_lr_factor_reaches_dense_and_row_lazy_sparse_updates():
    from tests.test_models import random_batch

    deltas = {}
    for factor in (1.0, 0.25):
        cfg = JobConfig()
        cfg.model.name = "base"
        trainer = Trainer(cfg)
        before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        torch.manual_seed(1)
        batch = random_batch(cfg)
        trainer.train_steps([batch], lambda out: None, before_step=lambda s: trainer.set_lr_factor(factor))
        after = trainer.model.state_dict()
        deltas[factor] = {k: (after[k] - before[k]) for k in before if after[k].is_floating_point()}
        lrs = [g["lr"] for g in trainer.optimizer.param_groups]
        assert lrs == [cfg.train.sparse_lr * factor, cfg.train.dense_lr * factor]
    user = next(k for k in deltas[1.0] if k.endswith("user.weight"))
    dense = next(k for k in deltas[1.0] if "ranker" in k and k.endswith("weight"))
    for k in (user, dense):  # first Adam step: the update is lr x g / |g| (up to eps), linear in lr
        torch.testing.assert_close(deltas[0.25][k], 0.25 * deltas[1.0][k], rtol=1e-4, atol=1e-9)
        assert deltas[1.0][k].abs().sum() > 0


# --------------------------------------------------------------------------- early stopping


@pytest.mark.slow
def test_early_stop_stops_at_the_planted_best_epoch_and_restores_its_weights(root, tmp_path):
    m = _run(root, tmp_path, "full", "train.epochs=8", "train.early_stop.patience=2", "checkpoint.keep_last=20")
    hist = m["validation"]
    assert [p["epoch"] for p in hist] == [1, 2, 3, 4] and all(p["epoch_end"] for p in hist)
    assert [p["step"] for p in hist] == [STEPS_PER_EPOCH * e for e in (1, 2, 3, 4)]
    assert [p["best"] for p in hist] == [True, True, False, False]
    assert m["stopped_early"] and m["epochs_run"] == 4 and m["train_steps"] == 4 * STEPS_PER_EPOCH
    assert m["scheduled_steps"] == 8 * STEPS_PER_EPOCH
    r = m["restored"]
    assert (r["epoch"], r["step"], r["monitor"], r["mode"]) == (2, 2 * STEPS_PER_EPOCH, "logloss", "min")
    assert r["value"] == hist[1]["logloss"] == min(p["logloss"] for p in hist) and r["from_checkpoint"]
    # The best checkpoint holds exactly the weights of the regular checkpoint of the same step...
    regular = tmp_path / "full" / "checkpoints" / f"step-{2 * STEPS_PER_EPOCH:09d}"
    best = [p.name for p in list_checkpoints(tmp_path / "full" / "checkpoints" / "best")]
    assert best == [regular.name]
    sb, sr = _state(tmp_path / "full" / "checkpoints" / "best" / regular.name), _state(regular)
    assert all(torch.equal(sb[k], sr[k]) for k in sr)
    last = _state(tmp_path / "full" / "checkpoints" / f"step-{4 * STEPS_PER_EPOCH:09d}")
    assert any(not torch.equal(last[k], sr[k]) for k in sr)
    # ... and the test days were scored with them (equal to scoring that checkpoint offline).
    offline = _test_metrics(regular, root)
    assert (m["auc"], m["logloss"], m["gauc"]) == (offline["auc"], offline["logloss"], offline["gauc"])
    saved = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert saved["restored"]["epoch"] == 2 and saved["validation"] == hist


def test_the_default_upper_bound_stops_one_epoch_after_the_best(root, tmp_path):
    # The shipped defaults (train.epochs an upper bound, patience 1, restore_best): the planted
    # best epoch 2 is followed by one worse epoch, then the run stops and tests epoch 2.
    defaults = JobConfig().train
    assert defaults.epochs > 3 and defaults.early_stop.patience == 1 and defaults.early_stop.restore_best
    m = _run(root, tmp_path, "defaults")
    assert [(p["epoch"], p["best"]) for p in m["validation"]] == [(1, True), (2, True), (3, False)]
    assert m["stopped_early"] and m["epochs_run"] == 3 and m["scheduled_steps"] == defaults.epochs * STEPS_PER_EPOCH
    assert (m["restored"]["epoch"], m["restored"]["from_checkpoint"]) == (2, True)


@pytest.mark.slow
def test_resume_mid_patience_equals_the_uninterrupted_run(root, tmp_path):
    # Validation every 20 steps and at epoch ends, plateau LR with warm-up, L2 and weight
    # decay, checkpoints every 10 steps: cut at step 98 (1 validation without a new best so
    # far), resume, and the run must stop, restore and score exactly as the uninterrupted one.
    # Uninterrupted: best logloss at step 80, none better at 96 (the rate halves), 100, 120: stop.
    extra = ["train.epochs=8", "train.eval_every=20", "train.early_stop.patience=3", "checkpoint.every_steps=10",
             "train.lr_schedule.kind=plateau", "train.lr_schedule.warmup_steps=8",
             "train.lr_schedule.plateau_patience=1",
             "train.embedding_l2=1e-4", "train.weight_decay=0.01"]
    full = _run(root, tmp_path, "full", *extra)
    assert full["stopped_early"] and full["restored"]["from_checkpoint"]
    assert any(p["lr_factor"] < 1 for p in full["validation"])  # the plateau schedule reduced the rate
    assert full["train_steps"] == 120 and full["restored"]["step"] == 80
    cut = _run(root, tmp_path, "cut", *extra, "train.max_steps=98")
    assert cut["train_steps"] == 98 and not cut["stopped_early"]
    bad_at_cut = 0
    for p in cut["validation"]:
        bad_at_cut = 0 if p["best"] else bad_at_cut + 1
    assert bad_at_cut >= 1, cut["validation"]  # patience is mid-way at the cut
    resumed = _run(root, tmp_path, "cut", *extra)
    assert resumed["resumed_from_step"] == 98
    for k in ("validation", "restored", "train_steps", "auc", "logloss", "gauc", "num_train_samples", "epochs_run"):
        assert resumed[k] == full[k], (k, resumed[k], full[k])
    a = _state(list_checkpoints(tmp_path / "full" / "checkpoints")[-1])
    b = _state(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_rows_never_appear_in_training_batches(root, tmp_path, monkeypatch):
    # The generator writes some identical rows, so rows are compared as multisets: every row
    # occurrence of the training days is trained on (once per epoch) or validated, never both.
    def rows(batch) -> Counter:
        items = batch.sparse["item_id"].values().tolist()
        return Counter(zip(batch.request_ids.tolist(), batch.user_ids.tolist(), items, batch.labels.tolist()))

    seen: dict[str, list[Counter]] = {"train": [], "eval": []}
    orig_train, orig_eval = Trainer.train_steps, Trainer.evaluate

    def train_steps(self, batches, on_step, first_step=0, before_step=None):
        def spy(it):
            for b in it:
                seen["train"].append(rows(b))
                yield b
        return orig_train(self, spy(batches), on_step, first_step, before_step)

    def evaluate(self, reader):
        seen["eval"].append(sum((rows(b) for b in reader), Counter()))
        return orig_eval(self, reader)

    monkeypatch.setattr(Trainer, "train_steps", train_steps)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)

    def day_rows(cfg, *days: int) -> Counter:
        return sum((rows(b) for b in open_reader(cfg, root, list(days), 1000)), Counter())

    for name, mode in (("days", ["data.valid_days=1", "data.valid_fraction=0"]),
                       ("tail", ["data.valid_days=0", "data.valid_fraction=0.1"]),
                       ("per_user", ["data.valid_days=0", "data.valid_fraction=0.2", "data.valid_split=per_user"])):
        seen["train"].clear(), seen["eval"].clear()
        cfg = _cfg(root, tmp_path, name, "train.epochs=2", "train.eval_every=7", "train.early_stop.enabled=false",
                   *mode)
        m = train(cfg).metrics
        trained = sum(seen["train"], Counter())
        assert all(n % 2 == 0 for n in trained.values())  # two epochs over the same rows
        once = Counter({k: n // 2 for k, n in trained.items()})
        valid_sets, test_set = seen["eval"][:-1], seen["eval"][-1]
        assert len(valid_sets) == len(m["validation"]) >= 3
        valid = valid_sets[0]
        assert all(v == valid for v in valid_sets) and valid  # the same held-out rows every time
        if name == "days":
            assert valid == day_rows(cfg, 2) and once == day_rows(cfg, 0, 1)
        else:  # part of the last training day (day 2: 3 training days, none held out whole)
            assert once + valid == day_rows(cfg, 0, 1, 2)
            assert not (valid - day_rows(cfg, 2))  # all from day 2
            share = valid.total() / day_rows(cfg, 2).total()
            assert m["valid_tail"] == {"day": 2, "fraction": cfg.data.valid_fraction, "split": name}
            if name == "tail":
                assert 0.1 <= share < 0.2
            else:  # each user's last floor(0.2 n) rows: below 0.2 overall (users with < 5 rows keep all)
                assert 0.05 < share <= 0.2
                users = Counter(u for _, u, _, _ in valid)
                assert set(users) < {u for _, u, _, _ in day_rows(cfg, 2)}  # many users, not a block of them
                assert len(users) > 20
        assert test_set == day_rows(cfg, 3)


# --------------------------------------------------------------------------- regularisation


def test_embedding_l2_adds_half_lambda_times_the_touched_rows_squared_norms():
    from tests.test_models import random_batch

    cfg = JobConfig()
    cfg.model.name = "base"
    cfg.train.embedding_l2 = 0.01
    torch.manual_seed(0)
    batch = random_batch(cfg)
    reg = Trainer(cfg)
    cfg0 = JobConfig()
    cfg0.model.name = "base"
    plain = Trainer(cfg0)
    plain.model.load_state_dict(reg.model.state_dict())
    loss_reg, out = reg.module(batch)
    loss_plain, _ = plain.module(batch)
    ebc = next(m for m in reg.model.modules() if hasattr(m, "embedding_bag_configs"))
    jt = batch.sparse.to_dict()
    expected = 0.0
    for t in ebc.embedding_bag_configs():
        ids = torch.cat([jt[f].values() for f in t.feature_names if f in jt]).unique()
        expected += ebc.embedding_bags[t.name].weight.detach()[ids].pow(2).sum().item()
    assert (loss_reg - loss_plain).item() == pytest.approx(0.005 * expected, rel=1e-4)
    assert out["embedding_l2"].item() == pytest.approx(0.005 * expected, rel=1e-4)
    loss_reg.backward()
    user = ebc.embedding_bags["user"].weight
    assert user.grad.is_sparse  # the term keeps the table's sparse gradient
    reg.module.eval()
    with torch.no_grad():
        assert torch.equal(reg.module(batch)[0], plain.module.eval()(batch)[0])  # never in evaluation


def test_weight_decay_is_decoupled_and_spares_biases():
    from cdp_rec.training.optim import build_optimizers, split_parameters

    from cdp_rec.models import build_model

    cfg = JobConfig()
    cfg.model.name = "base"
    cfg.train.weight_decay = 0.1
    model = build_model(cfg)
    opt = build_optimizers(model, cfg.train)
    _, dense = split_parameters(model)
    before = {n: p.detach().clone() for n, p in dense.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's part of the update is exactly 0
    opt.step()
    for n, p in dense.items():
        want = before[n] * (1 - cfg.train.dense_lr * 0.1) if p.dim() >= 2 else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-9), n


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, match", [
    ("train.early_stop.monitor=ndcg", "train.early_stop.monitor must be one of"),
    ("train.early_stop.patience=0", "train.early_stop.patience must be > 0"),
    ("train.early_stop.mode=up", "train.early_stop.mode must be one of"),
    ("train.lr_schedule.kind=step", "train.lr_schedule.kind must be one of"),
    ("train.lr_schedule.plateau_factor=1", r"plateau_factor must be in \(0, 1\)"),
    ("train.lr_schedule.min_lr_ratio=2", r"min_lr_ratio must be in \[0, 1\]"),
    ("train.embedding_l2=-1", "train.embedding_l2 must be a finite number >= 0"),
    ("train.weight_decay=.nan", "train.weight_decay must be a finite number"),
    ("train.eval_every=-1", "train.eval_every must be >= 0"),
    ("data.valid_days=2", "data.valid_days must be < data.train_days=2"),
    ("data.valid_fraction=1", r"data.valid_fraction must be in \[0, 1\)"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="set one of them to 0"):
        load_config(None, ["data.valid_days=1", "data.train_days=3", "data.valid_fraction=0.1"])
    for ov in ("train.eval_every=5", "train.lr_schedule.kind=plateau"):
        with pytest.raises(ConfigError, match="needs validation data"):
            load_config(None, [ov, "data.valid_fraction=0"])
    assert load_config(None, ["train.early_stop.monitor=logloss"]).train.early_stop.resolved_mode() == "min"
    assert load_config(None, ["train.early_stop.monitor=gauc"]).train.early_stop.resolved_mode() == "max"


def test_user_tail_mask_holds_out_each_users_last_rows():
    from cdp_rec.data.hashing import fmix64
    from cdp_rec.training.schedule import user_tail_mask

    class Users:  # a reader of one batch; only user_ids are read
        def __init__(self, ids):
            self.ids = torch.tensor(ids)

        def num_batches(self):
            return 1

        def __iter__(self):
            from types import SimpleNamespace
            yield SimpleNamespace(user_ids=self.ids)

    ids = [1, 2, 1, 1, 2, 3, 1]
    offset = {u: float(fmix64(np.array([u]))[0]) / 2.0**64 for u in (1, 2, 3)}
    keep = {u: math.floor(0.5 * ids.count(u) + offset[u]) for u in (1, 2, 3)}  # each user's held rows
    want = [pos >= ids.count(u) - keep[u] for pos, u in
            ((sum(1 for v in ids[:i] if v == u), u) for i, u in enumerate(ids))]
    assert user_tail_mask(Users(ids), 0.5).tolist() == want

    # Light users (3 rows each, as on real logs): 10% held out in expectation, not floor(0.3) = 0,
    # and always a user's last row.
    many = np.repeat(np.arange(20_000), 3)
    held = user_tail_mask(Users(many.tolist()), 0.1)
    assert abs(int(held.sum()) - 6_000) < 400, int(held.sum())  # binomial sd ~65
    assert not held[0::3].any() and not held[1::3].any()
    assert np.array_equal(held, user_tail_mask(Users(many.tolist()), 0.1))  # the same users every time
    assert user_tail_mask(Users([]), 0.1).shape == (0,)  # a rank's empty share of a day: nothing held


# --------------------------------------------------------------------------- sharded: fused optimizers


def _fused_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from cdp_rec.training.distributed import init_from_env
    from embeddings.state import gather_full_state
    from tests.test_models import random_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    ctx = init_from_env("cpu")
    try:
        results = {}
        for name, factor, l2 in (("full", 1.0, 0.0), ("quarter", 0.25, 0.0), ("l2", 1.0, 0.01)):
            cfg = JobConfig()
            cfg.model.name = "base"
            cfg.train.embedding_l2 = l2
            torch.manual_seed(3)
            batch = random_batch(cfg)
            trainer = Trainer(cfg, ctx)  # pipeline on; CPU: fused row-wise Adagrad for the sharded tables
            before = gather_full_state(trainer.module)
            outs = []
            trainer.train_steps([batch], outs.append, before_step=lambda s: trainer.set_lr_factor(factor))
            after = gather_full_state(trainer.module)
            results[name] = {"delta": {k: after[k] - before[k] for k in before if after[k].is_floating_point()},
                             "lrs": [g["lr"] for g in trainer.optimizer.param_groups],
                             "out": {k: v.detach().clone() for k, v in outs[0].items()}}
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lr_factor_reaches_torchrec_fused_optimizers_and_l2_applies_sharded(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fused_worker, args=(port, str(tmp_path / "r.pt")), nprocs=1, join=True)
    r = torch.load(tmp_path / "r.pt")
    cfg = JobConfig()
    assert r["quarter"]["lrs"][0] == pytest.approx(0.25 * cfg.train.sparse_lr)  # the fused group's rate
    user = next(k for k in r["full"]["delta"] if k.endswith("embedding_bags.user.weight"))
    full, quarter = r["full"]["delta"][user], r["quarter"]["delta"][user]
    assert full.abs().sum() > 0
    # Row-wise Adagrad's first update is lr x g / sqrt(mean g^2): linear in the rate the kernel got.
    torch.testing.assert_close(quarter, 0.25 * full, rtol=1e-4, atol=1e-8)
    l2 = r["l2"]["out"]
    assert l2["embedding_l2"] > 0 and "embedding_l2" not in r["full"]["out"]
    torch.testing.assert_close(l2["loss"], l2["bce"] + l2["embedding_l2"])
    assert not torch.equal(r["l2"]["delta"][user], full)  # the pooled-output term moved the rows


@pytest.mark.parametrize("name", sorted(__import__("cdp_rec.models", fromlist=["MODELS"]).MODELS))
def test_every_model_trains_with_embedding_l2(name):
    from tests.test_models import random_batch

    cfg = JobConfig()
    cfg.model.name = name
    cfg.train.embedding_l2 = 1e-3
    trainer = Trainer(cfg)
    outs = []
    torch.manual_seed(0)
    trainer.train_steps([random_batch(cfg)], outs.append)
    if trainer.regularizer.handles[:-1]:  # the model has embedding collections
        assert outs[0]["embedding_l2"] > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_schedule_segments_batches_and_checkpoint_policy():
    from cdp_rec.config import CheckpointConfig
    from cdp_rec.training.schedule import CheckpointPolicy, TrainSchedule

    class Day:
        def __init__(self, day, n):
            self.day, self.n = day, n

        def num_batches(self):
            return self.n

        def __iter__(self):
            return iter((self.day, i) for i in range(self.n))

    steps = {0: 3, 1: 2}
    s = TrainSchedule(2, [0, 1], steps, max_steps=0)
    assert (s.length, s.stop, s.day_ends, s.epoch_ends) == (10, 10, {3, 5, 8, 10}, {5, 10})
    assert s.segment_ends(0, [4], {5}) == [4, 5, 8, 10] and s.segment_ends(5, [0, 3], set()) == [6, 9, 10]
    days = []
    assert list(s.batches(2, 7, lambda d: Day(d, steps[d]), days.append)) == [(0, 2), (1, 0), (1, 1), (0, 0), (0, 1)]
    assert days == [0, 1, 0]
    assert [s.epoch_of(k) for k in (1, 5, 6, 10)] == [1, 1, 2, 2]
    assert [s.day_start(k) for k in (0, 2, 3, 4, 9)] == [0, 0, 3, 3, 8]
    cut = TrainSchedule(2, [0, 1], steps, max_steps=7)
    policy = CheckpointPolicy(CheckpointConfig(every_steps=4, at_day_end=True), cut)
    assert [k for k in range(1, 11) if policy.due(k)] == [3, 4, 5, 7, 8, 10]  # 7: where max_steps stops
    assert policy.due(6, stopping=True)
    off = CheckpointPolicy(CheckpointConfig(every_steps=0, at_day_end=False), cut)
    assert not any(off.due(k, stopping=True) for k in range(1, 11))


def test_auc_standard_error_matches_the_spread_of_resampled_aucs():
    """Hanley-McNeil's error against the spread of AUCs over 400 samples: close under the
    exponential score model it is derived for, on the conservative side for binormal scores."""
    from cdp_rec.metrics import auc, auc_standard_error

    rng = np.random.default_rng(0)
    cases = [(60, 140, "exp", 2.0, 0.1), (30, 600, "exp", 4.0, 0.1), (400, 400, "exp", 1.3, 0.1),
             (60, 140, "normal", 1.0, None), (30, 600, "normal", 1.8, None)]
    for n_pos, n_neg, kind, shift, rel in cases:
        labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]

        def draw(n: int, s: float) -> np.ndarray:
            return rng.exponential(s, n) if kind == "exp" else rng.normal(s - 1.0, 1.0, n)

        aucs = [auc(np.r_[draw(n_pos, shift), draw(n_neg, 1.0)], labels) for _ in range(400)]
        se, spread = auc_standard_error(float(np.mean(aucs)), n_pos, n_neg), float(np.std(aucs))
        if rel is not None:
            assert se == pytest.approx(spread, rel=rel), (n_pos, n_neg, kind, shift)
        else:
            assert 0.9 * spread < se < 1.5 * spread, (n_pos, n_neg, kind, shift, se, spread)
    assert math.isnan(auc_standard_error(0.7, 0, 5)) and math.isnan(auc_standard_error(float("nan"), 5, 5))


@pytest.mark.parametrize("rows, clicks, warned", [
    (263, 180, "standard error of about 0.03"),  # a review log's per-user validation: 83 non-clicks, yet AUC ± 0.03
    (200, 12, "under 30 of either"),
    (20000, 4000, None),
])
def test_a_validation_too_small_to_rank_epochs_is_warned_about_once(tmp_path, caplog, rows, clicks, warned):
    import logging
    from types import SimpleNamespace

    from cdp_rec.config import EarlyStopConfig
    from cdp_rec.training.early_stop import BestCheckpoint, EarlyStopping, Validation

    metrics = SimpleNamespace(auc=0.74, logloss=0.5, uauc=0.7, gauc=0.7, num_samples=rows, ctr=clicks / rows)
    trainer = SimpleNamespace(evaluate=lambda reader: metrics)
    stopper = EarlyStopping(EarlyStopConfig())
    lr = LRSchedule(LRScheduleConfig(), 10, stopper.improvement)
    v = Validation(None, stopper, lr, BestCheckpoint(tmp_path), epoch_ends={5, 10}, every=0, last_step=10,
                   restore_best=False, is_main=True)
    with caplog.at_level(logging.WARNING, logger="cdp_rec.training.early_stop"):
        v.run(trainer, 5, 1, rows, {})
        v.run(trainer, 10, 2, 2 * rows, {})
    messages = [r.getMessage() for r in caplog.records]
    if warned is None:
        assert not messages
    else:
        assert len(messages) == 1 and warned in messages[0] and "hold out more" in messages[0], messages
