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


def average_gradients(params: Sequence[nn.Parameter], bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Mean of each parameter's gradient over ranks (see the module doc for parameters without one)."""
    world = world_size()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    live = [p for p, u in zip(params, used.tolist(), strict=True) if u > 0]
    for p, u in zip(params, used.tolist(), strict=True):
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
