"""Patch experts: Dinomaly's noisy bottleneck + linear-attention decoder reconstructing the fused
backbone tokens (local and structural defects)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalymoe.models.config import PatchExpertConfig


class NoisyBottleneck(nn.Module):
    """MLP with dropout on input, hidden and output: the noise keeps the decoder from learning identity."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.drop_in = nn.Dropout(drop)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop_hidden = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop_out = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_out(self.fc2(self.drop_hidden(self.act(self.fc1(self.drop_in(x))))))


class LinearAttention(nn.Module):
    """Kernel attention with phi(x) = elu(x) + 1: O(N d^2), no softmax. `eps` guards the normaliser
    (the reference has none; Dinomaly's README warns of NaN)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        kv = k.transpose(-2, -1) @ v  # [b, h, d, d]
        z = 1.0 / (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1) + self.eps)  # [b, h, n, 1]
        out = (q @ kv) * z
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_eps: float, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = LinearAttention(dim, num_heads, attn_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchExpert(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_groups: int, cfg: PatchExpertConfig):
        super().__init__()
        if cfg.decoder_depth < num_groups:
            raise ValueError(f"decoder_depth {cfg.decoder_depth} < {num_groups} fuse groups")
        self.bottleneck = NoisyBottleneck(dim, int(dim * cfg.bottleneck_ratio), cfg.dropout)
        self.decoder = nn.ModuleList(
            DecoderBlock(dim, num_heads, cfg.mlp_ratio, cfg.attn_eps, cfg.norm_eps) for _ in range(cfg.decoder_depth)
        )
        # Reversed decoder outputs split into contiguous groups: the last block reconstructs the shallowest
        # encoder group (Dinomaly). With depth 8 and 2 groups this is the reference's [[0-3],[4-7]].
        rev = list(range(cfg.decoder_depth))
        size = cfg.decoder_depth / num_groups
        self.groups = [rev[round(g * size) : round((g + 1) * size)] for g in range(num_groups)]

    def forward(self, fused_tokens: Tensor) -> list[Tensor]:
        """fused_tokens [B, N, C] (mean of the target layers, prefix tokens included) ->
        per-group reconstructions [B, N, C]."""
        x = self.bottleneck(fused_tokens)
        outs = []
        for blk in self.decoder:
            x = blk(x)
            outs.append(x)
        outs = outs[::-1]
        return [torch.stack([outs[i] for i in g], 0).mean(0) for g in self.groups]
