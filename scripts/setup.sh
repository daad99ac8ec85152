#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned CPU stack; idempotent and quick on re-run.
#
# Why not `pip install -e .` with dependencies: torchrec's metadata requires the CUDA
# `fbgemm-gpu` and any unpinned torch requirement makes pip fetch a multi-GB CUDA
# torch. So: one pinned pip call with torch==2.13.0 and fbgemm-gpu-cpu, then torchrec
# with --no-deps, then this project with --no-deps, then a loud check of the result.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCHREC_PIN="torchrec==1.8.0"
STAMP="$VENV/.cdp-rec-installed"
want=$(cat requirements/cpu.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned CPU stack (torch 2.13.0 CPU, fbgemm-gpu-cpu 1.8.0, $TORCHREC_PIN)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/cpu.txt
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
