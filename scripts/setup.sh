#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned CPU stack; idempotent and quick on re-run.
# DEVICE=cuda (`make setup DEVICE=cuda`): .venv-cuda from the hashed CUDA lock requirements/cuda.txt
# (torch 2.13.0 CUDA 13.0 build, fbgemm-gpu 1.8.0, torchrec 1.8.0; see scripts/cuda_lock.py).
#
# Why not `pip install -e .` with dependencies: torchrec's metadata requires the CUDA
# `fbgemm-gpu` and any unpinned torch requirement makes pip fetch a multi-GB CUDA
# torch. So: one pinned pip call with torch==2.13.0 and fbgemm-gpu-cpu, then torchrec
# with --no-deps, then this project with --no-deps, then a loud check of the result.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cpu}
TORCHREC_PIN="torchrec==1.8.0"
case "$DEVICE" in
  cpu) VENV=.venv; LOCK=requirements/cpu.txt ;;
  cuda) VENV=.venv-cuda; LOCK=requirements/cuda.txt ;;
  *) echo "[setup] DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;;
esac
STAMP="$VENV/.cdp-rec-installed"
want=$(cat "$LOCK" pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if [ "$DEVICE" = cuda ]; then
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing the CUDA lock ($LOCK, hash-checked) into $VENV"
    # --isolated: a machine-wide pip config (local CPU wheels, constraints) must not swap a build.
    "$VENV/bin/python" -m pip install -q --isolated --disable-pip-version-check --require-hashes -r "$LOCK"
    "$VENV/bin/python" -m pip install -q --isolated --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$want" > "$STAMP"
  fi
  "$VENV/bin/python" - <<'PY'
import sys
import torch
if not torch.__version__.startswith("2.13.0") or torch.version.cuda is None:
    sys.exit(f"[setup] FATAL: expected the CUDA build of torch 2.13.0, found {torch.__version__} (cuda={torch.version.cuda})")
import fbgemm_gpu, torchrec  # noqa: F401
note = "" if torch.cuda.is_available() else " (no GPU visible here: scripts/gpu_check.sh will fail until one is)"
print(f"[setup] ok: torch {torch.__version__} cuda {torch.version.cuda}, torchrec {torchrec.__version__}{note}")
PY
  exit 0
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned CPU stack (torch 2.13.0 CPU, fbgemm-gpu-cpu 1.8.0, $TORCHREC_PIN)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$LOCK"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$TORCHREC_PIN"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
fi

# Fail loudly if anything ever replaced the CPU torch (e.g. a stray dependency).
"$VENV/bin/python" - <<'PY'
import sys
import torch
if torch.__version__ != "2.13.0+cpu" or torch.version.cuda is not None:
    sys.exit(f"[setup] FATAL: expected torch 2.13.0+cpu, found {torch.__version__} (cuda={torch.version.cuda}); "
             "remove .venv and re-run scripts/setup.sh")
import fbgemm_gpu, torchrec  # noqa: F401  (undefined-symbol errors surface here, not mid-training)
print(f"[setup] ok: torch {torch.__version__}, torchrec {torchrec.__version__}")
PY
