"""Mixed precision, one rule for every path (training, validation, calibration, evaluation, serving).

On CUDA the experts run under bf16 autocast; on a CPU everything stays float32 (bf16 autocast is ~5x slower on
CPUs without bf16 units, DESIGN.md §3). What decides a score always runs in float32 with autocast off: the router's
logits and routing weights (a top-k choice must not flip on bf16 rounding), the component features and scores,
the accumulation of level maps, fusion, smoothing and the image score, and every calibration statistic. CUDA's
autocast returns float32 from some ops (softmax, sum, cosine_similarity, upsampling …) where a CPU's returns bf16,
so code that mixes the two must cast explicitly, never rely on what autocast happened to produce."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_of(device: str | torch.device | None = None) -> torch.device:
    """'auto' / None: the first GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but this process sees no CUDA device "
                           f"(torch {torch.__version__}, cuda build {torch.version.cuda})")
    return dev


def default_precision(device: str | torch.device) -> str:
    """The device's rule: bf16 on CUDA, fp32 on a CPU."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device: str | torch.device, dtype: str | torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """The mixed-precision context of `device`: bf16 autocast on CUDA (unless dtype says fp32), nothing on a CPU
    unless a dtype is asked for explicitly (tests emulate CUDA's promotion on CPUs that way)."""
    dev = torch.device(device)
    dtype = dtype or default_precision(dev)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dt)


def fp32(device: str | torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the code inside computes in the dtypes it is given (cast to float32 first)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def describe(device: str | torch.device, precision: str | None = None) -> str:
    """"cuda/bf16", "cpu/fp32": where and in what precision a model scored (recorded with its calibration)."""
    return f"{torch.device(device).type}/{precision or default_precision(device)}"
