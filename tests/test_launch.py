"""torchx components: real local_cwd launch with 2 processes, and Slurm / Kubernetes dry-runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _torchx(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")  # torchrun from this venv
    return subprocess.run(
        [str(BIN / "torchx"), "run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_slurm_dryrun_prints_sbatch_script():
    r = _torchx("--workspace", "", "--dryrun", "-s", "slurm", "launch/components.py:train",
                "--nnodes", "2", "--nproc_per_node", "4", "--gpu", "4", "--max_retries", "3",
                "--config", "configs/industrial.yaml")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "#SBATCH" in r.stdout and "--gpus-per-task=4" in r.stdout
    assert "--nnodes 2 --nproc_per_node 4" in r.stdout
    assert "-m cdp_rec.cli train --config configs/industrial.yaml --set sharding.compute_device=cuda" in r.stdout
    assert "TORCHX_MAX_RETRIES=3" in r.stdout
    assert "torchrun --max-restarts 3 --monitor-interval 1 --rdzv_backend" in r.stdout


def test_kubernetes_dryrun_prints_volcano_job():
    r = _torchx("--workspace", "", "--dryrun", "-s", "kubernetes", "-cfg", "queue=default",
                "launch/components.py:train", "--nnodes", "2", "--nproc_per_node", "8", "--gpu", "8",
                "--memMB", "200000", "--image", "registry.example/cdp-rec:1", "--config", "configs/industrial.yaml",
                "--mounts", "type=bind,src=/mnt/logs,dst=/mnt/search_logs")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "kind: Job" in out and "batch.volcano.sh" in out
    assert "nvidia.com/gpu: '8'" in out and "image: registry.example/cdp-rec:1" in out
    assert "mountPath: /mnt/search_logs" in out
    assert "cdp_rec.cli train --config configs/industrial.yaml" in out


def test_train_component_passes_an_args_file_for_cdp_rec_to_read():
    r = _torchx("--workspace", "", "--dryrun", "-s", "slurm", "launch/components.py:train", "--config",
                "configs/public-small.yaml", "--args_file", "data/mine/train_args", "--overrides", "model.name=sim")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train --config configs/public-small.yaml @data/mine/train_args --set model.name=sim" in r.stdout


@pytest.mark.slow
def test_local_cwd_two_processes_train_and_write_metrics(tmp_path):
    overrides = ",".join([
        f"train.run_dir={tmp_path}/runs", "train.run_name=tx", "train.progress=false", "model.name=base",
        "train.epochs=1",
    ])
    # The data settings come as an import's train_args would: --set words, one a JSON value
    # with commas (which torchx's --overrides would split), read by cdp-rec itself.
    args_file = tmp_path / "train_args"
    args_file.write_text(f"--set data.root={tmp_path}/data --set data.samples_per_day=20000 "
                         "--set data.rows_per_file=10000 --set data.row_group_size=5000 "
                         """--set 'features.context_features={"hour": 24, "page": 8}'\n""")
    r = _torchx("-s", "local_cwd", "launch/components.py:train", "--nnodes", "1", "--nproc_per_node", "2",
                "--config", "configs/tiny.yaml", "--args_file", str(args_file), "--overrides", overrides)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    metrics = json.loads((tmp_path / "runs" / "tx" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["model"] == "base"
    held_out = metrics["validation"][-1]["num_samples"]  # data.valid_fraction of day 1, each rank its own
    assert metrics["num_eval_samples"] == 20000 and metrics["num_train_samples"] + held_out == 40000
    assert 0.5 < metrics["auc"] < 1.0
    plan = json.loads((tmp_path / "runs" / "tx" / "plan.json").read_text())
    assert {row["table"] for row in plan} >= {"query", "user", "item", "category"}


def test_evaluate_component_dryrun():
    r = _torchx("--workspace", "", "--dryrun", "-s", "slurm", "launch/components.py:evaluate",
                "--checkpoint", "runs/x/checkpoints/step-000000010", "--data", "/mnt/search_logs")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "-m cdp_rec.cli evaluate --checkpoint runs/x/checkpoints/step-000000010 --data /mnt/search_logs" in r.stdout


@pytest.mark.slow
def test_local_cwd_killed_rank_restarts_and_resumes(tmp_path):
    """max_retries: a rank killed after the first checkpoint restarts the job, which resumes and finishes."""
    run = tmp_path / "runs" / "ft"
    overrides = ",".join([
        f"data.root={tmp_path}/data", f"train.run_dir={tmp_path}/runs", "train.run_name=ft",
        "data.samples_per_day=20000", "data.rows_per_file=10000", "data.row_group_size=5000",
        "train.progress=false", "model.name=base", "train.epochs=2", "checkpoint.every_steps=5",
    ])
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(
        [str(BIN / "torchx"), "run", "-s", "local_cwd", "launch/components.py:train", "--nnodes", "1",
         "--nproc_per_node", "2", "--max_retries", "1", "--config", "configs/tiny.yaml", "--overrides", overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list((run / "checkpoints").glob("step-*")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        killed = int((run / "pids" / "rank1.pid").read_text())
        os.kill(killed, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert int((run / "pids" / "rank1.pid").read_text()) != killed, "rank 1 was not restarted"
    metrics = json.loads((run / "metrics.json").read_text())
    held_out = metrics["validation"][-1]["num_samples"]  # validated after each of the 2 epochs
    assert metrics["world_size"] == 2 and metrics["num_train_samples"] + 2 * held_out == 2 * 40000
    assert metrics["resumed_from_step"] > 0, "the restarted job must resume from a checkpoint"


# Every zoo model through the real launcher, 2 processes: tiny data, 3 steps. base is the
# test above; the cdp_no_* names are CDP with an ablation preset (same code path as cdp).
ZOO_LAUNCHED = ("cdp", "din", "sim", "twin", "qin", "hstu", "diffumin", "ddrm", "diffrec", "lr_counts")
ZOO_NOT_DISTRIBUTED: tuple[str, ...] = ()  # lr_counts' counts are all-gathered per step now (its module docstring)
ZOO_DATA = ["data.samples_per_day=2000", "data.rows_per_file=1000", "data.row_group_size=500", "data.train_days=1"]


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory):
    from cdp_rec.config import load_config
    from cdp_rec.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("zoo") / "data"
    generate_dataset(load_config("configs/tiny.yaml", ZOO_DATA), root)
    return root


def test_zoo_launch_list_covers_every_model():
    from cdp_rec.models import ABLATION_PRESETS, MODELS

    assert set(MODELS) == {"base", *ZOO_LAUNCHED, *ZOO_NOT_DISTRIBUTED, *ABLATION_PRESETS}


@pytest.mark.slow
@pytest.mark.parametrize("model", ZOO_LAUNCHED)
def test_local_cwd_two_processes_train_every_zoo_model(tmp_path, zoo_data, model):
    overrides = ",".join([
        *ZOO_DATA, f"data.root={zoo_data}", f"train.run_dir={tmp_path}/runs", "train.run_name=zoo",
        "train.progress=false", f"model.name={model}", "train.epochs=1", "train.max_steps=3",
        "model.top_k=8", "model.attention_len=8",
    ])
    r = _torchx("-s", "local_cwd", "launch/components.py:train", "--nnodes", "1", "--nproc_per_node", "2",
                "--config", "configs/tiny.yaml", "--overrides", overrides)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    metrics = json.loads((tmp_path / "runs" / "zoo" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["model"] == model
    assert metrics["num_eval_samples"] == 2000 and 0.0 <= metrics["auc"] <= 1.0
    plan = {row["table"]: row for row in json.loads((tmp_path / "runs" / "zoo" / "plan.json").read_text())}
    if model == "lr_counts":  # its only tables: dim-1 context / scene weights, data-parallel (no fused kernel)
        assert {"ctx_hour", "ctx_page"} <= set(plan)
        assert {row["sharding_type"] for row in plan.values()} == {"data_parallel"}
        return
    # Every embedding table of the model is sharded, the sequence models' EmbeddingCollection too.
    assert {"query", "user"} <= set(plan)
    if model in ("din", "sim", "twin", "qin", "hstu", "diffumin"):
        assert plan["item"]["module"] == "ec" and plan["category"]["module"] == "ec"
