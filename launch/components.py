"""torchx components for cdp-rec: the same AppDef runs under local_cwd, Slurm and Kubernetes.

(No ``from __future__ import annotations`` here: torchx decodes the real type hints.)

Example (2 processes on this machine, gloo)::

    .venv/bin/torchx run -s local_cwd launch/components.py:train \\
        --nnodes 1 --nproc_per_node 2 --config configs/tiny.yaml

The job runs torchrun as ``<python> -m torch.distributed.run`` with the interpreter that
ran torchx (``sys.executable``, e.g. this venv's python) when that interpreter exists on
the host and has torch, whatever ``PATH`` is there; otherwise the ``torchrun`` on the
host's ``PATH`` (a container image's); with neither it fails saying so (on stderr and in
the torchelastic error file, which ``torchx status`` shows).

On a GPU cluster, one process per GPU (nccl; ``gpu > 0`` also sets
``sharding.compute_device=cuda``)::

    torchx run -s slurm launch/components.py:train --nnodes 4 --nproc_per_node 8 --gpu 8 \\
        --config configs/industrial.yaml --image /shared/cdp-rec --mounts type=bind,src=/mnt/search_logs,dst=/mnt/search_logs
"""


import shlex
import sys
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

DEFAULT_IMAGE = "ghcr.io/pytorch/torchx:0.7.0"


def _cli_args(command: str, config: str, overrides: Optional[List[str]], gpu: int,
              args_file: Optional[str] = None) -> List[str]:
    args = [command, "--config", config]
    if gpu > 0:
        args += ["--set", "sharding.compute_device=cuda"]
    if args_file:  # cdp-rec reads the file's --set words itself (torchx would split JSON values at commas)
        args.append(f"@{args_file}")
    for ov in overrides or []:
        args += ["--set", ov]
    return args


def train(
    config: str = "configs/tiny.yaml",
    overrides: Optional[List[str]] = None,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = DEFAULT_IMAGE,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    name: str = "cdp-rec-train",
    args_file: Optional[str] = None,
) -> specs.AppDef:
    """Distributed ``cdp-rec train``: DMP-sharded tables over nnodes × nproc_per_node ranks.

    Args:
        config: job config YAML (path inside the image / working directory)
        overrides: config overrides, e.g. model.name=base,train.batch_size=512
        nnodes: number of hosts
        nproc_per_node: ranks per host (one per GPU on a GPU cluster)
        cpu: CPUs per host
        gpu: GPUs per host (0 = CPU training with gloo)
        memMB: host memory in MB
        image: container image (Kubernetes), or directory (Slurm, local)
        env: extra environment variables
        max_retries: times a failed rank restarts the job (torchrun --max-restarts; also the
            scheduler's retry count where it has one); training resumes from the last checkpoint
        mounts: bind/volume mounts, e.g. type=bind,src=/data,dst=/data
        name: job name
        args_file: a file of ``--set`` flags applied after the config and before overrides,
            e.g. the ``train_args`` that ``cdp-rec import`` writes (path inside the image / working directory)
    """
    app = ddp(
        *_cli_args("train", config, overrides, gpu, args_file),
        m="cdp_rec.cli",
        image=image,
        name=f"/{name}",  # torchx: "{experiment}/{run}"
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=env,
        max_retries=max_retries,
        mounts=mounts,
    )
    if max_retries > 0:
        _restart_in_job(app.roles[0], max_retries)
    _torchrun_of_this_python(app.roles[0])
    return app


def _torchrun_of_this_python(role: specs.Role, python: str = sys.executable) -> None:
    """Prefix dist.ddp's ``bash -c "torchrun ..."`` with a shell function ``torchrun`` that
    execs ``<python> -m torch.distributed.run`` when ``python`` exists there with torch, so
    the job does not depend on the venv's bin being on PATH (without it, local_cwd ended
    in ``state: FAILED`` and no message). Otherwise the host's own ``torchrun`` runs; with
    no torchrun at all the job fails with a message naming both.

    (``$$`` is a literal ``$`` after torchx's macro substitution, as in dist.ddp.)
    """
    cmd = role.args[-1]
    if not cmd.startswith("torchrun "):
        raise ValueError(f"unexpected dist.ddp command, cannot pin its python: {cmd[:80]!r}")
    msg = ("cdp-rec launch: torchrun is not on PATH here and $$_cdp_py (the python that ran torchx) "
           "is missing or lacks torch: put the environment's bin directory on PATH")
    prelude = (
        f"_cdp_py={shlex.quote(python)}; "
        "if [ -x \"$$_cdp_py\" ] && \"$$_cdp_py\" -c 'import importlib.util as u, sys; "
        "sys.exit(u.find_spec(\"torch\") is None)' 2>/dev/null; then "
        "torchrun() { exec \"$$_cdp_py\" -m torch.distributed.run \"$$@\"; }; "
        "elif ! command -v torchrun >/dev/null 2>&1; then "
        f"_cdp_msg=\"{msg}\"; echo \"$$_cdp_msg\" >&2; "
        "if [ -n \"$${TORCHELASTIC_ERROR_FILE:-}\" ]; then "
        "printf '{\"message\": \"%s\"}\\n' \"$$_cdp_msg\" > \"$$TORCHELASTIC_ERROR_FILE\"; fi; "
        "exit 127; fi; "
    )
    role.args[-1] = prelude + cmd


def _restart_in_job(role: specs.Role, max_restarts: int) -> None:
    """Let torchrun restart all ranks of the job when one fails (they resume from the last checkpoint).

    ``max_retries`` on a Role is a scheduler-level retry: Kubernetes (Volcano) and Slurm
    honour it by resubmitting, but local_cwd ignores it. torchrun's elastic agent works
    under every scheduler: when a rank dies it stops the others, re-rendezvouses and
    starts them again; ``cdp-rec train`` then resumes from the newest committed
    checkpoint (``checkpoint.resume=auto``). Scheduler retries still apply on top, for
    failures of a whole node.
    """
    cmd = role.args[-1]
    if not cmd.startswith("torchrun "):
        raise ValueError(f"unexpected dist.ddp command, cannot add --max-restarts: {cmd[:80]!r}")
    role.args[-1] = f"torchrun --max-restarts {max_restarts} --monitor-interval 1 " + cmd[len("torchrun "):]


def evaluate(
    checkpoint: str,
    data: Optional[str] = None,
    overrides: Optional[List[str]] = None,
    cpu: int = 2,
    memMB: int = 8192,
    image: str = DEFAULT_IMAGE,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    name: str = "cdp-rec-evaluate",
) -> specs.AppDef:
    """``cdp-rec evaluate``: score the test days with a checkpoint (any world size wrote it).

    Args:
        checkpoint: a committed checkpoint directory (.../checkpoints/step-N)
        data: data root (default: the checkpoint config's data.root)
        overrides: config overrides applied on top of the checkpoint's config
        cpu: CPUs
        memMB: memory in MB
        image: container image (Kubernetes), or directory (Slurm, local)
        env: extra environment variables
        max_retries: times the scheduler restarts the job after a failure
        mounts: bind/volume mounts, e.g. type=bind,src=/data,dst=/data
        name: job name
    """
    args = ["evaluate", "--checkpoint", checkpoint]
    if data:
        args += ["--data", data]
    for ov in overrides or []:
        args += ["--set", ov]
    app = ddp(*args, m="cdp_rec.cli", image=image, name=f"/{name}", cpu=cpu, gpu=0, memMB=memMB, j="1x1",
              env=env, max_retries=max_retries, mounts=mounts)
    _torchrun_of_this_python(app.roles[0])
    return app
