"""Component experts: MLP autoencoders over one feature vector per part (the backbone map averaged
inside a component mask). A part that looks unlike any normal part reconstructs badly.

Masks are per-category cluster *slots* (slot i = kept cluster i), so an image keeps every slot even
when it is empty: an empty slot is a part that is missing, which is itself an anomaly (scored by the model,
never trained on)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ComponentExpertConfig


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


def component_features(feature_map: Tensor, masks: list[Tensor | None], dilation: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Mean feature inside each (dilated) component mask.

    feature_map: [B, C, h, w]; masks[b]: [K_b, H, W] (any K_b, 0 or None allowed, any H x W).
    Returns (features [sum K_b, C], owner [sum K_b] = image index of each component, valid [sum K_b] =
    the mask covers at least one token; an invalid row's feature is zero)."""
    if len(masks) != feature_map.shape[0]:
        raise ValueError(f"{len(masks)} mask tensors for a batch of {feature_map.shape[0]} images")
    feats, owner, valid = [], [], []
    h, w = feature_map.shape[-2:]
    for b, m in enumerate(masks):
        if m is None or m.numel() == 0:
            continue
        if m.dim() != 3:
            raise ValueError(f"component masks of image {b} must be [K, H, W], got {tuple(m.shape)}")
        # Coverage of each token (area pooling; the reference samples the nearest pixel, which loses a
        # small part that falls between token centres and then reads it as missing)
        m = F.adaptive_avg_pool2d(m[:, None].to(feature_map.dtype), (h, w))
        if dilation > 1:
            m = F.max_pool2d(m, dilation, stride=1, padding=(dilation - 1) // 2)
        m = m[:, 0]  # [K, h, w]
        area = m.sum((1, 2))[:, None]
        f = torch.einsum("khw,chw->kc", m, feature_map[b]) / (area + 1e-8)
        feats.append(f)
        valid.append(area[:, 0] > 0)
        owner.append(torch.full((m.shape[0],), b, dtype=torch.long, device=feature_map.device))
    if not feats:
        dev = feature_map.device
        return (feature_map.new_zeros(0, feature_map.shape[1]), torch.zeros(0, dtype=torch.long, device=dev),
                torch.zeros(0, dtype=torch.bool, device=dev))
    return torch.cat(feats), torch.cat(owner), torch.cat(valid)
