"""Training losses: per-level reconstruction losses, ESB (expert selection balancing) and EIR
(expert information repulsion, a CLUB mutual-information upper bound between two experts)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def hard_mining_p(step: int, p_final: float, warmup_steps: int) -> float:
    """Dinomaly ramps p linearly 0 -> p_final; the reference keeps p fixed (warmup_steps=0)."""
    if warmup_steps <= 0:
        return p_final
    return p_final * min(1.0, step / warmup_steps)


def hard_mining_cosine(en: list[Tensor], de: list[Tensor], p: float, factor: float) -> Tensor:
    """Per-sample point-wise cosine distance, averaged over groups. Points easier than the batch's
    top-(1-p) hardest keep only `factor` of their gradient (value unchanged). en/de: [B, C, h, w]."""
    per_group = []
    for a, b in zip(en, de, strict=True):
        d = 1.0 - F.cosine_similarity(a.detach(), b, dim=1)  # [B, h, w]
        if p > 0 and factor != 1.0:
            flat = d.detach().flatten()
            k = max(1, int(flat.numel() * (1.0 - p) + 1e-6))  # 50 * (1 - 0.9) is 4.999…
            thr = flat.topk(k).values[-1]
            easy = d.detach() < thr
            d = torch.where(easy, d * factor + (d * (1.0 - factor)).detach(), d)
        per_group.append(d.flatten(1).mean(1))
    return torch.stack(per_group).mean(0)


def global_loss(ae: Tensor, student: Tensor, target: Tensor) -> Tensor:
    """EfficientAD's AE loss + student-imitates-AE loss, per sample. The AE is not detached in the
    student term (as in EfficientAD and the reference)."""
    return ((ae - target) ** 2).flatten(1).mean(1) + ((student - ae) ** 2).flatten(1).mean(1)


def component_loss(recon: Tensor, feats: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(recon, feats.detach(), dim=1)


def _all_reduce_mean(x: Tensor, differentiable: bool) -> Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if differentiable:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x) / dist.get_world_size()
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def esb_loss(logits: Tensor, mask: Tensor, w_load: float, w_importance: float, w_z: float) -> dict[str, Tensor]:
    """Expert Selection Balancing.

    load (Switch Transformer): E * sum_j f_j * P_j, with f_j the fraction of routing slots taken by
    expert j (from top-k, no gradient) and P_j the mean router probability (differentiable): the
    gradient pushes probability away from over-used experts. The reference's load term, built from
    one-hot counts only, has no gradient at all (METHOD.md §5 #9).
    importance (reference): E * sum_j P_j^2, minimal (1) at uniform use.
    z (ST-MoE): mean logsumexp(logits)^2 keeps logits small and routing stable.
    f and P are averaged over all ranks, so balance is global, not per GPU."""
    e = logits.shape[1]
    probs = logits.float().softmax(1)
    p_mean = _all_reduce_mean(probs.mean(0), differentiable=True)
    counts = mask.float().sum(0)
    f = _all_reduce_mean(counts / counts.sum().clamp_min(1.0), differentiable=False)
    load = e * (f * p_mean).sum()
    importance = e * (p_mean**2).sum()
    z = torch.logsumexp(logits.float(), 1).pow(2).mean()
    total = w_load * load + w_importance * importance + w_z * z
    return {"esb": total, "esb_load": load.detach(), "esb_importance": importance.detach(), "esb_z": z.detach()}


class CLUBEstimator(nn.Module):
    """Variational q(y|x) = N(mu(x), exp(logvar(x))) for the CLUB upper bound of I(x; y)
    (Cheng et al., ICML 2020). logvar is tanh-bounded to (-1, 1) as in the reference."""

    def __init__(self, dim: int):
        super().__init__()
        self.p_mu = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim))
        self.p_logvar = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim), nn.Tanh())

    def mu_logvar(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.p_mu(x), self.p_logvar(x)

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """Gaussian log-likelihood up to constants, with the -logvar term the reference drops
        (without it the variance head is only pushed to grow, METHOD.md §5 #10)."""
        mu, logvar = self.mu_logvar(x)
        return (-((mu - y) ** 2) / logvar.exp() - logvar).sum(1).mean()

    def upper_bound(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu, logvar = self.mu_logvar(x)
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        positive = -((mu - y) ** 2) / logvar.exp()
        negative = -((mu - y[perm]) ** 2) / logvar.exp()
        return (positive.sum(1) - negative.sum(1)).mean() / 2.0


class MIEstimator(nn.Module):
    """One CLUB estimator per level that has pairwise repulsion (patch, global) and a shared LayerNorm."""

    levels = ("patch", "global")

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.club = nn.ModuleDict({lv: CLUBEstimator(dim) for lv in self.levels})

    def bound(self, pairs: dict[str, tuple[Tensor, Tensor]], generator: torch.Generator | None = None) -> Tensor:
        """EIR loss for the experts: mean CLUB bound over the levels that have a pair this step."""
        vals = [self.club[lv].upper_bound(self.norm(x), self.norm(y), generator) for lv, (x, y) in pairs.items()]
        return torch.stack(vals).mean() if vals else torch.zeros(())

    def learning_loss(self, pairs: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """Negative log-likelihood on *detached* expert features of the same forward: training the
        estimator never re-runs the model (the reference runs a second full forward, METHOD.md §5 #3)."""
        vals = [-self.club[lv].log_likelihood(self.norm(x.detach()), self.norm(y.detach()))
                for lv, (x, y) in pairs.items()]
        return torch.stack(vals).mean() if vals else torch.zeros(())
