"""Component experts: MLP autoencoders over one feature vector per part (the backbone map averaged
inside a component mask). A part that looks unlike any normal part reconstructs badly.

Masks are per-category cluster *slots* (slot i = kept cluster i), so an image keeps every slot even
when it is empty: an empty slot is a part that is missing, which is itself an anomaly (scored by the model,
never trained on)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalymoe.models.config import ComponentExpertConfig
from anomalymoe.models.precision import fp32


class ComponentExpert(nn.Module):
    def __init__(self, dim: int, cfg: ComponentExpertConfig):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(dim, cfg.hidden), nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden, cfg.mid), nn.ReLU(inplace=True),
            nn.Linear(cfg.mid, cfg.bottleneck),
        )
        self.decoder = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(cfg.bottleneck, cfg.mid), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.mid, cfg.hidden), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, dim),
        )

    def forward(self, feats: Tensor) -> Tensor:
        return self.decoder(self.encoder(feats))


def stack_masks(masks: list[Tensor], resize: Callable[[Tensor], Tensor]) -> Tensor:
    """[sum K, h, w] float32: `resize` ([K, 1, H, W] -> [K, 1, h, w]) applied to every image's masks, in one call
    when all share a shape (they do when they come from one loader), else per image."""
    if len({tuple(m.shape[1:]) for m in masks}) == 1:
        return resize(torch.cat(masks)[:, None].float())[:, 0]
    return torch.cat([resize(m[:, None].float()) for m in masks])[:, 0]


def component_features(feature_map: Tensor, masks: list[Tensor | None], dilation: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Mean feature inside each (dilated) component mask, in float32.

    feature_map: [B, C, h, w]; masks[b]: [K_b, H, W] (any K_b, 0 or None allowed, any H x W).
    Returns (features [sum K_b, C], owner [sum K_b] = image index of each component, valid [sum K_b] =
    the mask covers at least one token; an invalid row's feature is zero).

    All masks of a batch are pooled together and the features come from one batched matmul (no per-image
    kernels and no host synchronisation: on a GPU a batch of 64 images was 64 x 4 small launches)."""
    if len(masks) != feature_map.shape[0]:
        raise ValueError(f"{len(masks)} mask tensors for a batch of {feature_map.shape[0]} images")
    dev = feature_map.device
    h, w = feature_map.shape[-2:]
    present = [(b, m) for b, m in enumerate(masks) if m is not None and m.numel() > 0]
    for b, m in present:
        if m.dim() != 3:
            raise ValueError(f"component masks of image {b} must be [K, H, W], got {tuple(m.shape)}")
    if not present:
        return (feature_map.new_zeros(0, feature_map.shape[1], dtype=torch.float32),
                torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.bool, device=dev))
    with fp32(dev):
        # Coverage of each token (area pooling; the reference samples the nearest pixel, which loses a small part
        # that falls between token centres and then reads it as missing). Masks of one shape pool in one call.
        pooled = stack_masks([m for _, m in present], lambda x: F.adaptive_avg_pool2d(x, (h, w)))[:, None]
        if dilation > 1:
            pooled = F.max_pool2d(pooled, dilation, stride=1, padding=(dilation - 1) // 2)
        pooled = pooled[:, 0].flatten(1)  # [K, h*w]
        counts = [m.shape[0] for _, m in present]
        owner_h = torch.cat([torch.full((n,), b, dtype=torch.long) for (b, _), n in zip(present, counts, strict=True)])
        slot_h = torch.cat([torch.arange(n) for n in counts])
        owner, slot = owner_h.to(dev, non_blocking=True), slot_h.to(dev, non_blocking=True)
        # one bmm over the images that have masks: [n, Kmax, hw] @ [n, hw, C]
        rows = torch.tensor([b for b, _ in present], device=dev)
        which = torch.repeat_interleave(torch.arange(len(present)), torch.tensor(counts)).to(dev, non_blocking=True)
        padded = pooled.new_zeros(len(present), max(counts), h * w)
        padded[which, slot] = pooled
        fm = feature_map[rows].float().flatten(2).transpose(1, 2)  # [n, hw, C]
        sums = torch.bmm(padded, fm)[which, slot]  # [K, C]
        area = pooled.sum(1, keepdim=True)
        feats = sums / (area + 1e-8)
    return feats, owner, area[:, 0] > 0
