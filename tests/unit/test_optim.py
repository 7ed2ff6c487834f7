"""StableAdamW's multi-tensor step against the per-tensor formula it replaced (issue 12: no host sync per tensor)."""

from __future__ import annotations

import pytest
import torch

from anomalymoe.platform.train.optim import StableAdamW

pytestmark = pytest.mark.unit


def reference_step(params, state, lr, betas=(0.9, 0.999), eps=1e-10, wd=1e-4, clip=1.0):
    """StableAdamW written out per tensor (AdamW + AMSGrad + update clip by RMS(g^2 / v))."""
    b1, b2 = betas
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.float()
        st = state.setdefault(id(p), {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                                      "vmax": torch.zeros_like(p)})
        st["step"] += 1
        t = st["step"]
        st["m"].mul_(b1).add_(g, alpha=1 - b1)
        st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        torch.maximum(st["vmax"], st["v"], out=st["vmax"])
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        rms = (g.pow(2) / (st["vmax"] / bc2).clamp_min(eps**2)).mean().sqrt()
        lr_t = lr / max(1.0, float(rms) / clip)
        p.mul_(1 - lr_t * wd)
        p.add_(st["m"] / bc1 / ((st["vmax"] / bc2).sqrt() + eps), alpha=-lr_t)


def test_foreach_step_equals_per_tensor_formula_with_sparse_gradients():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 3, 2), (11,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone() for p in ours]
    opt = StableAdamW([{"params": ours[:2]}, {"params": ours[2:]}], lr=1e-2, clip_threshold=0.5)
    state: dict = {}
    clipped = 0
    for step in range(12):
        for i, (p, q) in enumerate(zip(ours, ref, strict=True)):
            # expert-like sparsity: tensor i gets no gradient every (i+2)-th step, so step counts diverge
            if step % (i + 2) == 1:
                p.grad, q.grad = None, None
                continue
            g = torch.randn(p.shape) * (10.0 if step == 5 else 1.0)  # a spike makes the update clip act
            p.grad, q.grad = g.clone(), g.clone()
        if step == 5:
            clipped += 1
        opt.step()
        reference_step(ref, state, lr=1e-2, clip=0.5)
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-7)
    steps = sorted(opt.state[p]["step"] for p in ours)
    assert len(set(steps)) > 1, "the test must exercise tensors with different step counts"
    assert clipped


def test_step_never_reads_a_device_value_on_the_host(monkeypatch):
    """The per-tensor `float(rms)` was a GPU sync per tensor; the step must not convert device scalars."""
    p = torch.randn(4, 4, requires_grad=True)
    p.grad = torch.randn(4, 4)
    opt = StableAdamW([p])

    def refuse(self, *a, **k):
        raise AssertionError("host read of a tensor inside the optimiser step")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    opt.step()
