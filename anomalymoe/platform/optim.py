"""Optimiser and schedule of the reference (METHOD.md §1.7): StableAdamW with a warm-up cosine LR."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class StableAdamW(Optimizer):
    """AdamW (decoupled weight decay) with AMSGrad and a per-tensor update clip: the step is divided by
    max(1, RMS(g^2 / v) / clip_threshold), as in StableAdamW (Wortsman et al., 2023), which keeps
    rarely-used experts from taking huge steps when their second moments are stale."""

    def __init__(self, params, lr: float = 5e-4, betas=(0.9, 0.999), eps: float = 1e-10,
                 weight_decay: float = 1e-4, amsgrad: bool = True, clip_threshold: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      clip_threshold=clip_threshold))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if group["amsgrad"]:
                        st["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if group["amsgrad"]:
                    torch.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
                    v_hat = st["max_exp_avg_sq"]
                else:
                    v_hat = v
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                rms = (g.pow(2) / v_hat.div(bc2).clamp_min(group["eps"] ** 2)).mean().sqrt()
                lr = group["lr"] / max(1.0, float(rms) / group["clip_threshold"])
                p.mul_(1 - lr * group["weight_decay"])
                denom = (v_hat / bc2).sqrt().add_(group["eps"])
                p.add_((m / bc1 / denom).to(p.dtype), alpha=-lr)
        return loss


def warm_cosine_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int = 100,
                   final_ratio: float = 0.01) -> float:
    """Linear warm-up 0 -> base_lr, then cosine down to base_lr * final_ratio (reference: 5e-4 -> 5e-6)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    final = base_lr * final_ratio
    return final + 0.5 * (base_lr - final) * (1 + math.cos(math.pi * progress))
