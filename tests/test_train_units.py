"""The training loop's units, each alone (no model, no data): the segment loop, model
selection (resume, restore for the test), the step recorder, the metrics.json record.

A fake trainer records which schedule batches it stepped and with which learning-rate
factor, and returns scripted validation AUCs; the end-to-end behaviour of the same units
is covered by tests/test_early_stop.py and tests/test_checkpoint.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cdp_rec.config import CheckpointConfig, JobConfig, load_config
from cdp_rec.training.checkpoint import Position, list_checkpoints
from cdp_rec.training.id_report import IdMappingReport
from cdp_rec.training.loop import LoopEnd, SegmentLoop
from cdp_rec.training.progress import Progress, TrainingError
from cdp_rec.training.run_dirs import run_paths
from cdp_rec.training.run_record import RunContext, run_metrics
from cdp_rec.training.schedule import CheckpointPolicy, DaySplit, TrainSchedule
from cdp_rec.training.selection import ModelSelection

DAY_STEPS = {0: 3, 1: 2}  # 5 steps an epoch; epoch ends at 5, 10, 15, 20
ROWS = 4  # rows per fake batch


class Day:
    """Day ``d``'s batches: the tuples ``(d, i)``."""

    def __init__(self, day: int) -> None:
        self.day = day

    def num_batches(self) -> int:
        return DAY_STEPS[self.day]

    def __iter__(self):
        return iter((self.day, i) for i in range(DAY_STEPS[self.day]))


class FakeTrainer:
    def __init__(self, aucs: list[float]) -> None:
        self.aucs = iter(aucs)
        self.factor = 1.0
        self.stepped: list[tuple] = []  # (batch, lr factor it was stepped with)

    def set_lr_factor(self, factor: float) -> None:
        self.factor = factor

    def train_steps(self, batches, on_step, first_step=0, before_step=None) -> int:
        n = 0
        for batch in batches:
            before_step(first_step + n)
            self.stepped.append((batch, self.factor))
            on_step({"logits": torch.zeros(ROWS), "loss": torch.tensor(0.5), "bce": torch.tensor(0.5)})
            n += 1
        return n

    def evaluate(self, reader):
        return SimpleNamespace(auc=next(self.aucs), logloss=0.5, uauc=math.nan, gauc=math.nan, num_samples=7, ctr=3 / 7)


class Saves:
    def __init__(self) -> None:
        self.saved: list[tuple[int, bool, int]] = []  # step, final, validation points in meta

    def save(self, trainer, position: Position, extra: dict) -> Path:
        assert extra["local_batch_size"] == ROWS
        self.saved.append((position.global_step, position.final, len(extra["training_state"]["history"])))
        return Path(f"step-{position.global_step}")


def _setup(tmp_path: Path, aucs: list[float], *extra: str, epochs: int = 4, every_steps: int = 4):
    cfg = load_config(None, [f"train.epochs={epochs}", "train.progress=false", "train.early_stop.patience=1",
                             "train.early_stop.restore_best=false", f"train.run_dir={tmp_path}", *extra])
    schedule = TrainSchedule(epochs, [0, 1], DAY_STEPS)
    selection = ModelSelection(cfg.train, schedule, valid_reader=object(), best_root=tmp_path / "best", is_main=True)
    trainer, saves = FakeTrainer(aucs), Saves()
    progress = Progress(cfg, schedule, 0, 0, 1, ROWS, True)
    policy = CheckpointPolicy(CheckpointConfig(every_steps=every_steps, at_day_end=False), schedule)
    loop = SegmentLoop(trainer, schedule, Day, selection, policy, saves, progress, IdMappingReport(None, active=False),
                       meta={"local_batch_size": ROWS}, is_main=True)
    return cfg, schedule, selection, trainer, saves, progress, loop


def _batches(schedule: TrainSchedule, first: int, last: int) -> list[tuple[int, int]]:
    """The schedule's batches of global steps first..last, written out by hand from DAY_STEPS."""
    epoch = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    return [epoch[(s - 1) % 5] for s in range(first, last + 1)]


def test_segment_loop_trains_validates_checkpoints_and_stops_in_order(tmp_path):
    # Validation AUC 0.6, 0.7 (best), 0.65 after epochs 1-3: patience 1 stops at step 15 of 20.
    cfg, schedule, selection, trainer, saves, progress, loop = _setup(
        tmp_path, [0.6, 0.7, 0.65], "train.lr_schedule.warmup_steps=4")
    assert loop.segment_ends(0) == [4, 5, 8, 10, 12, 15, 16, 20]
    end = loop.run(0)
    assert (end.step, end.weights_step) == (15, 15) and end.seconds >= 0
    assert [b for b, _ in trainer.stepped] == _batches(schedule, 1, 15)
    # Warm-up: the update after s steps runs at (s + 1) / 4 of the rate, then the full rate.
    assert [f for _, f in trainer.stepped] == [0.25, 0.5, 0.75] + [1.0] * 12
    assert [(p["epoch"], p["step"], p["best"]) for p in selection.history] == [(1, 5, True), (2, 10, True),
                                                                                 (3, 15, False)]
    # Every 4 steps, and at the early stop (final); each save carries the validations so far.
    assert saves.saved == [(4, False, 0), (8, False, 1), (12, False, 2), (15, True, 3)]
    assert selection.stopped and (progress.steps, progress.seen) == (15, 15 * ROWS)


def test_segment_loop_resumes_mid_run_and_skips_a_finished_one(tmp_path):
    _, schedule, selection, trainer, saves, progress, loop = _setup(tmp_path, [0.65])
    # A checkpoint at step 7 with one validation point (epoch 1, best): replayed, then steps 8.. run.
    selection.resume([{"epoch": 1, "step": 5, "auc": 0.7, "logloss": 0.5}], 7, fresh=False)
    progress.steps = 7
    end = loop.run(7)
    assert [b for b, _ in trainer.stepped] == _batches(schedule, 8, 10)
    assert [(p["step"], p["best"]) for p in selection.history] == [(5, True), (10, False)]
    assert end == LoopEnd(10, 10, end.seconds) and selection.stopped  # patience 1: epoch 2 was worse
    assert saves.saved == [(8, False, 1), (10, True, 2)]
    # A checkpoint that says nothing is left: no step, the checkpoint's weights stay.
    _, _, _, trainer2, saves2, _, loop2 = _setup(tmp_path, [])
    end = loop2.run(18, final=Position(20, 80, True))
    assert (end.step, end.weights_step) == (18, 20) and not trainer2.stepped and not saves2.saved


def test_model_selection_restores_the_best_point_only_when_it_is_not_in_memory(tmp_path):
    class Best:
        root = tmp_path / "best"
        restored: list[int] = []

        def drop_after(self, step, is_main):
            pass

        def restore(self, trainer, step):
            self.restored.append(step)
            return self.root / f"step-{step}"

    history = [{"epoch": 1, "step": 5, "auc": 0.7, "logloss": 0.5}, {"epoch": 2, "step": 10, "auc": 0.6}]
    for restore_best, weights_step, want in ((True, 10, (5, True, [5])), (True, 5, (5, False, [])),
                                             (False, 10, (None, False, []))):
        cfg = load_config(None, [f"train.early_stop.restore_best={str(restore_best).lower()}"])
        sel = ModelSelection(cfg.train, TrainSchedule(2, [0, 1], DAY_STEPS), object(), tmp_path / "best", True)
        sel.best = Best()
        Best.restored = []
        sel.resume(history, 10, fresh=False)
        r = sel.restore_for_test(None, weights_step)
        assert (r.step, r.from_checkpoint, Best.restored) == want
        assert r.summary["step"] == 5 and r.summary["value"] == 0.7
        assert r.record() == (None if want[0] is None else {**r.summary, "from_checkpoint": want[1]})
    # Nothing validated: the last weights, nothing to restore.
    none = ModelSelection(load_config(None).train, TrainSchedule(1, [0, 1], DAY_STEPS), None, tmp_path / "b", True)
    assert none.segment_points() == (0, set()) and none.restore_for_test(None, 5).record() is None


def test_fresh_start_moves_an_earlier_runs_best_checkpoint_aside_and_resume_drops_later_ones(tmp_path):
    best = tmp_path / "checkpoints" / "best"
    for step in (5, 10):
        (best / f"step-{step:09d}").mkdir(parents=True)
        (best / f"step-{step:09d}" / "meta.json").write_text("{}")
    cfg = load_config(None)
    sel = ModelSelection(cfg.train, TrainSchedule(2, [0, 1], DAY_STEPS), object(), best, True)
    sel.resume([], 7, fresh=False)  # resumed at 7: the step-10 best point is redone, step 5 stays
    assert [p.name for p in list_checkpoints(best)] == ["step-000000005"]
    sel.resume([], 0, fresh=True)
    assert list_checkpoints(best) == [] and list(tmp_path.glob("checkpoints/best.replaced-*/step-000000005"))


def test_progress_counts_global_samples_smooths_the_loss_and_guards_divergence():
    cfg = load_config(None, ["train.progress=false"])
    p = Progress(cfg, TrainSchedule(1, [0], {0: 100}), start=3, seen=30, world=2, bs=5, is_main=True)
    for loss in (1.0, 0.5):
        p.on_step({"logits": torch.zeros(5), "loss": torch.tensor(loss), "bce": torch.tensor(0.5)})
    assert (p.steps, p.seen, p.seen_at_start) == (5, 50, 30)  # 5 rows on each of 2 ranks per step
    assert p.loss == pytest.approx(0.98 * 1.0 + 0.02 * 0.5)
    with pytest.raises(TrainingError, match="training diverged at step 6"):
        p.on_step({"logits": torch.zeros(5), "loss": torch.tensor(float("inf")), "bce": torch.tensor(0.5)})
    p.close()


def test_run_record_names_the_restored_point_and_the_rates(tmp_path):
    _, schedule, selection, trainer, _, progress, loop = _setup(tmp_path, [0.6, 0.7, 0.65])
    end = loop.run(0)
    restored = selection.restore_for_test(trainer, end.weights_step)
    test = SimpleNamespace(num_samples=11, to_dict=lambda: {"auc": 0.71, "logloss": math.nan})
    split = DaySplit([0, 1], [], [2], tail_day=1, tail_fraction=0.05)
    rec = run_metrics(JobConfig(), RunContext(tmp_path, 1, "note", 0), split, schedule, selection, progress,
                      LoopEnd(end.step, end.weights_step, 2.0), restored, test, 0.5)
    assert (rec["auc"], rec["logloss"], rec["num_eval_samples"]) == (0.71, None, 11)  # NaN -> null
    assert (rec["train_steps"], rec["num_train_samples"], rec["epochs_run"], rec["stopped_early"]) == (15, 60, 3, True)
    assert rec["restored"] is None and rec["best_validation"]["step"] == 10  # restore_best off in _setup
    assert rec["valid_tail"] == {"day": 1, "fraction": 0.05, "split": "tail"}
    assert rec["train_samples_per_s"] == 30.0 and rec["scheduled_steps"] == 20
    assert [p["step"] for p in rec["validation"]] == [5, 10, 15]


def test_run_paths():
    cfg = load_config(None, ["train.run_dir=/r", "train.run_name=x"])
    assert (run_paths(cfg).out, run_paths(cfg).best) == (Path("/r/x"), Path("/r/x/checkpoints/best"))
    cfg = load_config(None, ["train.run_dir=/r", "checkpoint.dir=/c"])
    assert run_paths(cfg).checkpoints == Path("/c") and run_paths(cfg).out.name == f"cdp-{cfg.hash()}"


# --------------------------------------------------------------------------- threads


def test_thread_choice_rules():
    from cdp_rec.config import ConfigError
    from cdp_rec.training.threads import choose_threads

    assert choose_threads(3, "1", 2, 1, 2.0).threads == 3  # train.threads wins over everything
    c = choose_threads(0, "4", 2, 1, 2.0)
    assert (c.threads, c.source) == (4, "OMP_NUM_THREADS")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS must be a positive integer, got 'two'"):
        choose_threads(0, "two", 2, 1, None)
    auto = [choose_threads(0, None, cores, procs, busy).threads
            for cores, procs, busy in ((8, 1, None), (8, 2, None), (8, 16, None), (2, 1, 0.3), (2, 1, 1.0),
                                       (2, 1, 1.6), (8, 2, 5.0), (8, 2, 0.0))]
    # cores / local processes; no more than the idle cores (busy rounded); at least 1
    assert auto == [8, 4, 1, 2, 1, 1, 3, 4]
    c = choose_threads(0, "", 2, 1, 1.0)  # an empty OMP_NUM_THREADS is unset
    assert c.source == "auto" and "1.0 busy" in c.detail and c.to_dict()["count"] == 1


def test_busy_cores_counts_only_this_process_cpus(tmp_path):
    from cdp_rec.training.threads import _cpu_times

    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 80 0 0 0 0 0 0\n"  # the total line is not a core: ignored
                    "cpu0 5 1 2 90 2 0 0 0 0 0\n"
                    "cpu1 50 0 25 25 0 0 0 0 0 0\n"
                    "intr 1 2 3\n")
    assert _cpu_times(str(stat), {0}) == (8, 100)  # user+nice+system busy; idle+iowait not
    assert _cpu_times(str(stat), {0, 1}) == (83, 200)
    assert _cpu_times(str(tmp_path / "missing"), {0}) is None


def test_train_applies_the_thread_setting_and_puts_the_previous_one_back(tmp_path, monkeypatch):
    from cdp_rec.data.synthetic import generate_dataset
    from cdp_rec.training.trainer import Trainer, train

    data = ["data.samples_per_day=2000", "data.rows_per_file=1000", "data.row_group_size=500"]
    generate_dataset(load_config(None, data), tmp_path / "data")
    during = []
    orig = Trainer.train_steps

    def spy(self, *args, **kwargs):
        during.append(torch.get_num_threads())
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_steps", spy)
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    m = train(load_config(None, [*data, "model.name=base", "train.threads=%d" % want, "train.max_steps=2",
                                 "train.batch_size=128", "train.progress=false", f"train.run_dir={tmp_path}"]),
              tmp_path / "data").metrics
    assert during and set(during) == {want}
    assert m["threads"] == {"count": want, "source": "train.threads", "detail": ""}
    assert torch.get_num_threads() == before


def test_a_training_day_with_fewer_files_than_ranks_is_refused_by_name(tmp_path):
    """A probe's 2-process run of a small import (one file per day) died with an IndexError on
    rank 1, which got no file; had it not, the common step count would have been 0."""
    from cdp_rec.data.loader import DataError
    from cdp_rec.data.synthetic import generate_dataset
    from cdp_rec.training.distributed import DistContext
    from cdp_rec.training.schedule import split_days
    from cdp_rec.training.trainer import _plan_data

    sets = ["data.samples_per_day=600", "data.rows_per_file=600", "data.row_group_size=300",
            "data.valid_split=per_user", "data.valid_fraction=0.1"]
    cfg = load_config(None, sets)
    generate_dataset(cfg, tmp_path / "data")
    ctx = DistContext(rank=1, world_size=2, local_rank=1, local_world_size=2, device=torch.device("cpu"),
                      backend="gloo")
    with pytest.raises(DataError, match=r"training day 0 has fewer files than the 2 ranks, so rank 1 reads none "
                                        r"of its rows; write each day in at least 2 files"):
        _plan_data(cfg, tmp_path / "data", split_days(cfg.data), 64, 64, ctx)
    # One rank: the same data plans.
    schedule, *_ = _plan_data(cfg, tmp_path / "data", split_days(cfg.data), 64, 64, None)
    assert schedule.length > 0
