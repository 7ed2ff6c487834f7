#!/usr/bin/env bash
# The GPU check of issue 12, sized for a short device lease: run from a copy of the repository on a machine with one
# CUDA GPU and the packages of its image (torch, timm, numpy, pandas, …) plus what infra/gpu/wheels.sh prepared here
# (pydantic wheels, float16 DINOv2-S weights). No Ray, no MLflow, no registry: the library's own functions and
# torch.distributed directly.
#
#   infra/gpu/check.sh            # GPU tests (pytest -m gpu) + the model benchmark at the reference shape: <= 5 min
#   infra/gpu/check.sh quality    # + the quality run: train on the demo data for QUALITY_MINUTES (default 6)
#
# Writes $OUT (default outputs/gpu-check): tests.txt, model.json, model.txt, [quality.json, quality.txt], env.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ANOMALYMOE_CACHE=${ANOMALYMOE_CACHE:-/tmp/anomalymoe-cache}
rc=0

if ! "$PY" -c 'import pydantic' 2>/dev/null; then
  ls infra/gpu/wheels/*.whl >/dev/null 2>&1 || { echo "check: pydantic missing and no infra/gpu/wheels (run infra/gpu/wheels.sh where PyPI is reachable)" >&2; exit 2; }
  "$PY" -m pip install --no-index --no-deps -q infra/gpu/wheels/*.whl || exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c 'import torch, timm, sys; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__, "gpu", torch.cuda.is_available())'
} | tee "$OUT/env.txt"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "check: no CUDA device" >&2; exit 2; }

step() { echo; echo "== $1 ($(date +%T))"; }

step "GPU tests"
# the repository's pytest configuration (markers) without its addopts; tests/conftest.py still applies
timeout 180 "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider -o addopts="" --rootdir . 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

step "model benchmark (reference shape, bf16)"
timeout 240 "$PY" jobs/benchmark.py model --device cuda --preset reference --dtype bf16 --json --out "$OUT/model.json" \
  2>&1 | tee "$OUT/model.txt" | grep -v '^{'
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

if [ "${1:-}" = "quality" ]; then
  step "quality run (demo data, both domains, ${QUALITY_MINUTES:-6} min of training)"
  weights=()
  [ -f infra/gpu/wheels/dinov2_vits14_fp16.safetensors ] && weights=(--weights infra/gpu/wheels/dinov2_vits14_fp16.safetensors)
  timeout 900 "$PY" jobs/benchmark.py quality --device cuda --minutes "${QUALITY_MINUTES:-6}" --batch-size 32 \
    --threads 12 "${weights[@]}" --out "$OUT" --json 2>&1 | tee "$OUT/quality.txt" | grep -v '^{'
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
echo; echo "check: $([ $rc -eq 0 ] && echo passed || echo FAILED); results in $OUT"
exit $rc
