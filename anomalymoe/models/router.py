"""The router: one routing decision per image from the backbone's CLS token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from anomalymoe.models.config import LEVELS, RouterConfig
from anomalymoe.models.precision import fp32


@dataclass
class Routing:
    logits: Tensor  # [B, E] raw gate logits
    weights: Tensor  # [B, E] float32 routing weights, zero for unselected experts
    mask: Tensor  # [B, E] bool, the selected experts
    level_slices: dict[str, slice]  # expert index range of each level, in LEVELS order

    def level(self, name: str) -> tuple[Tensor, Tensor]:
        s = self.level_slices[name]
        return self.weights[:, s], self.mask[:, s]

    def select(self, idx: Tensor) -> Routing:
        return Routing(self.logits[idx], self.weights[idx], self.mask[idx], self.level_slices)


class Router(nn.Module):
    """Linear -> ReLU -> Linear over the CLS token; expert order is patch, global, component.

    joint: softmax over the global top-k logits (reference: an image may get no expert of some level).
    per_level: top-k_level inside each level, softmax inside each level, so every level with experts
    is used and each level's weights sum to 1."""

    def __init__(self, dim: int, num_experts: dict[str, int], cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.total = sum(num_experts.values())
        self.gate = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, self.total))
        start, self.level_slices = 0, {}
        for lv in LEVELS:
            self.level_slices[lv] = slice(start, start + num_experts[lv])
            start += num_experts[lv]

    def forward(self, cls: Tensor, available: Tensor | None = None) -> Routing:
        """available [B, E] bool: experts that have an input for that image (component experts need
        component masks). Unavailable experts are never selected; the reference would route to them
        anyway and waste the slot (its top-3 may even pick only experts that do nothing)."""
        with fp32(cls.device):  # routing decides which experts run: never on bf16 rounding (precision.py)
            logits = self.gate(cls.float())
        sel = logits if available is None else logits.masked_fill(~available, -torch.inf)
        if self.cfg.mode == "joint":
            weights, mask = _topk_softmax(sel, self.cfg.top_k)
        else:
            weights, mask = torch.zeros_like(logits), torch.zeros_like(logits, dtype=torch.bool)
            for s in self.level_slices.values():
                if s.stop > s.start:
                    k = min(self.cfg.top_k_per_level, s.stop - s.start)
                    weights[:, s], mask[:, s] = _topk_softmax(sel[:, s], k)
        if available is not None:
            mask = mask & available
            weights = torch.where(mask, weights, torch.zeros_like(weights))  # also clears NaN of empty levels
        return Routing(logits, weights, mask, self.level_slices)


def _topk_softmax(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    top, idx = logits.topk(k, dim=1)
    # explicit float32 on both sides: CUDA autocast returns softmax in float32 whatever its input (issue 12)
    weights = torch.zeros_like(logits, dtype=torch.float32).scatter(1, idx, top.float().softmax(1))
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
    return weights, mask
