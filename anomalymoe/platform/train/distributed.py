"""Data-parallel training with sparse experts.

PyTorch DDP assumes every rank uses the same parameters each step; with routing, an expert may get samples on
one rank and none on another (or none anywhere). Instead of DDP's unused-parameter search, gradients are
averaged explicitly after backward: a parameter without a gradient on a rank contributes zeros, and one
without a gradient on *every* rank keeps ``grad = None``, so the optimiser skips it exactly as single-process
training does (no weight decay or momentum step for an expert nobody routed to). Ranks then take identical
optimiser steps from identical weights and stay in sync without broadcasting parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

BUCKET_ELEMENTS = 16 * 1024 * 1024  # at most 64 MiB of fp32 per all-reduce


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(values: dict[str, float], device: str | torch.device = "cpu") -> dict[str, float]:
    """The mean of each scalar over all ranks (metrics a rank logs); one all-reduce, on `device` (the training
    device: NCCL reduces CUDA tensors only)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return dict(values)
    world = world_size()
    t = torch.tensor(list(values.values()), dtype=torch.float64).to(device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(values, t.tolist(), strict=True)}


def average_gradients(params: Sequence[nn.Parameter], bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Mean of each parameter's gradient over ranks (see the module doc for parameters without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = world_size()  # world 1 still runs the collectives: the one-GPU NCCL check goes through them
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    # every collective on the parameters' device: NCCL has no CPU tensors ("No backend type associated with device
    # type cpu" on the first step with --gpu), gloo takes either
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32).to(params[0].device)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    flags = used.tolist()
    live = [p for p, u in zip(params, flags, strict=True) if u > 0]
    for p, u in zip(params, flags, strict=True):
        if u == 0:
            p.grad = None
    bucket: list[nn.Parameter] = []
    size = 0
    for p in live:
        if bucket and size + p.numel() > bucket_elements:
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        _reduce_bucket(bucket, world)


def _reduce_bucket(params: list[nn.Parameter], world: int) -> None:
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n
