#!/usr/bin/env bash
# GPU readiness in one command: install the CUDA lock, run the CUDA-only tests and benchmarks,
# train sharded on CUDA and compare peak HBM with the plan; one JSON report.
#
#   scripts/gpu_check.sh                 # on a GPU machine: make setup DEVICE=cuda, then every check
#   scripts/gpu_check.sh --no-install    # use an existing CUDA Python (PYTHON=..., default python3)
#   scripts/gpu_check.sh --dry-run       # any machine: list the checks, verify the CUDA lock resolves
#   options: --out FILE (default gpu_check.json), --quick (small benchmark sizes), --checks a,b (a subset),
#            --allow-skipped nccl_2rank (a 1-GPU machine cannot run the 2-rank check)
#
# Exit 0 only when every check passed (scripts/gpu_check.py): a missing package, a CUDA test that
# skipped or a parity failure fails the run. --dry-run exits 0 (lock resolves), 1 (it does not)
# or 3 (PyPI unreachable from here: nothing was checked).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0; INSTALL=1; ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-install) INSTALL=0 ;;
    --out|--allow-skipped|--checks) ARGS+=("$1" "$2"); shift ;;
    --quick) ARGS+=("$1") ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$DRY" = 1 ]; then
  cat <<'PLAN'
[gpu-check] would run:
  1. DEVICE=cuda scripts/setup.sh     -> .venv-cuda from requirements/cuda.txt (pip, hash-checking mode)
  2. scripts/gpu_check.py checks, with .venv-cuda/bin/python:
     env            torch/CUDA/device/Triton/fbgemm-gpu/TorchRec versions
     stack          CUDA visible, fbgemm-gpu CUDA op, TorchRec import
     pooling_tests  pytest tests/test_pooling_cuda.py (Triton parity, torch.compile, HBM); skip = fail
     gpu_tests      pytest tests/test_sharding_cuda.py (TorchRec on CUDA vs CPU, fused Adam, plan HBM); skip = fail
     pooling_bench  fused Triton vs [B,L,D] reference vs unfiltered embedding_bag, B=4096, L=200/2000
     train_step_bench  bench/train_step.py --device cuda: base/CDP/SIM 1-GPU sharded step, L=200/2000, B=4096
     inference_bench   bench/inference.py --device cuda: base vs CDP scoring latency, L=200/2000, B=512
     train_cuda     torchrun -m cdp_rec.cli train (tiny, sharding.compute_device=cuda, nccl, fused
                    sparse optimizer) + cdp-rec plan --json: peak HBM against the plan; its DCP
                    checkpoint exported by a process that sees no GPU
     nccl_2rank     the same on 2 GPUs, AUC equal to 1 GPU (skipped, and failing unless allowed, with 1 GPU)
  3. one JSON report (--out)
[gpu-check] checking that the CUDA lock resolves (PyPI, Linux x86-64, CPython 3.11)...
PLAN
  PY=.venv/bin/python; [ -x "$PY" ] || PY=${PYTHON:-python3}
  exec "$PY" scripts/cuda_lock.py check
fi

if [ "$INSTALL" = 1 ]; then
  DEVICE=cuda bash scripts/setup.sh
  PY=.venv-cuda/bin/python
else
  PY=${PYTHON:-python3}
fi
echo "[gpu-check] python: $PY"
exec "$PY" scripts/gpu_check.py "${ARGS[@]}"
