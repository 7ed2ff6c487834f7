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
        """One update of every parameter that has a gradient, with multi-tensor (foreach) kernels and no host
        synchronisation: the per-tensor clip factor stays on the device (the loop version read it with float()
        once per tensor, hundreds of GPU syncs per step). Parameters are grouped by their own step count
        (a sparse expert skips the steps it got no gradient in, so bias corrections differ between tensors)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if group["amsgrad"]:
                        st["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                by_step.setdefault(st["step"], []).append(p)
            for t, params in by_step.items():
                self._update(group, params, t)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], t: int) -> None:
        b1, b2 = group["betas"]
        eps, clip, lr, wd = group["eps"], group["clip_threshold"], group["lr"], group["weight_decay"]
        states = [self.state[p] for p in params]
        grads = [p.grad.float() for p in params]
        m = [st["exp_avg"] for st in states]
        v = [st["exp_avg_sq"] for st in states]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        if group["amsgrad"]:
            v_hat = [st["max_exp_avg_sq"] for st in states]
            torch._foreach_maximum_(v_hat, v)
        else:
            v_hat = v
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        v_bc = torch._foreach_div(v_hat, bc2)
        # RMS of g^2 / v per tensor (StableAdamW's update clip), as a device vector
        ratio = torch._foreach_div(torch._foreach_mul(grads, grads), torch._foreach_clamp_min(v_bc, eps**2))
        numel = torch.tensor([g.numel() for g in grads], dtype=torch.float32, device=grads[0].device)
        rms = (torch.stack(torch._foreach_norm(ratio, 1)) / numel).sqrt()
        lr_t = lr / torch.clamp_min(rms / clip, 1.0)
        torch._foreach_mul_(params, list((1 - lr_t * wd).unbind()))
        denom = torch._foreach_sqrt(v_bc)
        torch._foreach_add_(denom, eps)
        upd = torch._foreach_div(m, bc1)
        torch._foreach_div_(upd, denom)
        torch._foreach_mul_(upd, list((-lr_t).unbind()))
        if any(p.dtype != torch.float32 for p in params):
            upd = [u.to(p.dtype) for u, p in zip(upd, params, strict=True)]
        torch._foreach_add_(params, upd)


def warm_cosine_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int = 100,
                   final_ratio: float = 0.01) -> float:
    """Linear warm-up 0 -> base_lr, then cosine down to base_lr * final_ratio (reference: 5e-4 -> 5e-6)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    final = base_lr * final_ratio
    return final + 0.5 * (base_lr - final) * (1 + math.cos(math.pi * progress))
