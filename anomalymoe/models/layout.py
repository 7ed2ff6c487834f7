"""Part layout: where each part slot of a category normally is, and how far an image's parts are from it.

The component experts reconstruct what a part *looks like* (its mean feature); a part that is missing, extra, moved
or swapped with another can look perfectly normal. What changes is *where* the slot's pixels are. Calibration fits,
per category and slot, the slot's occupancy prior on a coarse grid (the mean of its masks over normal images,
blurred by one cell so jitter and small shifts stay "expected"), then scores every normal image's slot by its
**unexpected occupancy**: per cell, how far the slot's coverage is from the prior beyond a tolerance (TOL: the
disagreement jitter gives at a part's edge), summed, as a share of the slot's normal area. The normal range of
that share (median, high quantile) puts it on the component level's slot scale (0 = a median normal image, 1 = the
high quantile), and the unexpected cells are where the layout score is painted: an extra or moved part lights up
where it is, a missing one where it should be.

Nothing here knows a dataset's parts: the slots are the segmentation's clusters, the statistics are fitted on normal
images only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomalymoe.models.precision import fp32

GRID = 32  # the prior's side (7 px cells at 224 px)
TOL = 0.25  # |coverage - prior| up to this is normal variation (a part's edge under jitter)
NO_LAYOUT = 1e9  # the normal "median" of a row without a layout: its layout score is always 0
MIN_SPREAD = 0.05  # a normal range narrower than 5% of the slot's area is widened to it
MIN_COLOUR = 0.02  # a slot's normal colour range is at least 2% of the RGB scale


def coverage(masks: Tensor, grid: int = GRID) -> Tensor:
    """[K, H, W] bool masks -> [K, grid, grid] float32 share of each cell covered."""
    if masks.shape[0] == 0:
        return masks.new_zeros(0, grid, grid, dtype=torch.float32)
    return F.adaptive_avg_pool2d(masks.float()[:, None], (grid, grid))[:, 0]


def blur(x: Tensor, sigma: float = 1.0) -> Tensor:
    """Gaussian blur of [K, G, G] maps (replicate padding), in cells."""
    r = max(1, int(round(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    y = F.pad(x[:, None], (r, r, r, r), mode="replicate")
    y = F.conv2d(y, g.view(1, 1, 1, -1))
    return F.conv2d(y, g.view(1, 1, -1, 1))[:, 0]


def unexpected(cov: Tensor, prior: Tensor) -> Tensor:
    """[K, G, G]: per cell, the slot's coverage's distance from its prior beyond TOL (a part where the slot is
    never seen, or no part where it always is, counts up to 1 - TOL)."""
    return ((cov - prior).abs() - TOL).clamp_min(0)


def raw_scores(cov: Tensor, prior: Tensor) -> Tensor:
    """[K] unexpected occupancy as a share of the slot's normal area (the prior's mass)."""
    return unexpected(cov, prior).flatten(1).sum(1) / prior.flatten(1).sum(1).clamp_min(1.0)


@dataclass(eq=False)
class SlotLayout:
    prior: Tensor  # [G, G] float32
    low: float  # median normal raw score
    high: float  # its high quantile (low + spread)
    # the slot's colour: median of its normal mean RGB, and the normal range of the distance to it (median, high)
    colour: list[float] | None = None
    colour_low: float = NO_LAYOUT
    colour_high: float = NO_LAYOUT + 1.0

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SlotLayout) and torch.equal(self.prior, other.prior)
                and (self.low, self.high, self.colour, self.colour_low, self.colour_high)
                == (other.low, other.high, other.colour, other.colour_low, other.colour_high))

    def to_dict(self) -> dict:
        return {"prior": self.prior.tolist(), "low": self.low, "high": self.high, "colour": self.colour,
                "colour_low": self.colour_low, "colour_high": self.colour_high}

    @classmethod
    def from_dict(cls, d: dict) -> SlotLayout:
        return cls(torch.tensor(d["prior"], dtype=torch.float32), float(d["low"]), float(d["high"]),
                   None if d.get("colour") is None else [float(x) for x in d["colour"]],
                   float(d.get("colour_low", NO_LAYOUT)), float(d.get("colour_high", NO_LAYOUT + 1.0)))


def slot_colours(images: Tensor, masks: list[Tensor | None]) -> list[Tensor]:
    """Per image [K, 3]: the mean RGB inside each slot's mask (NaN for an empty slot), in float32 with autocast off
    (a score is decided on it: bf16's 3 digits moved a slot's colour score by 0.2 on its normal scale)."""
    with fp32(images.device):
        return _slot_colours(images, masks)


def _slot_colours(images: Tensor, masks: list[Tensor | None]) -> list[Tensor]:
    out = []
    for img, m in zip(images, masks, strict=True):
        if m is None or m.shape[0] == 0:
            out.append(img.new_zeros(0, 3, dtype=torch.float32))
            continue
        w = m.float().flatten(1)  # [K, HW]
        px = img.float().flatten(1)  # [3, HW]
        n = w.sum(1, keepdim=True)
        out.append(torch.where(n > 0, (w @ px.T) / n.clamp_min(1), torch.full_like(n.expand(-1, 3), math.nan)))
    return out


def fit_layouts(covs: dict[str, list[Tensor]], quantile: float, colours: dict[str, list[Tensor]] | None = None
                ) -> dict[str, list[SlotLayout]]:
    """covs: per category, each normal image's [K, G, G] slot coverage (K = the category's slots); colours: the same
    images' [K, 3] slot colours (slot_colours). Returns per category one SlotLayout per slot."""
    out = {}
    for cat, rows in covs.items():
        if not rows or rows[0].shape[0] == 0:
            continue
        stack = torch.stack(rows)  # [N, K, G, G]
        prior = blur(stack.mean(0))
        raw = torch.stack([raw_scores(c, prior) for c in stack]).numpy()  # [N, K]
        cols = torch.stack(colours[cat]).numpy() if colours and cat in colours else None  # [N, K, 3]
        slots = []
        for k in range(stack.shape[1]):
            lo = float(np.median(raw[:, k]))
            hi = float(np.quantile(raw[:, k], quantile))
            sl = SlotLayout(prior[k], lo, lo + max(hi - lo, MIN_SPREAD))
            ck = cols[:, k][~np.isnan(cols[:, k]).any(1)] if cols is not None else np.zeros((0, 3))
            if len(ck) >= 2:
                centre = np.median(ck, 0)
                d = np.linalg.norm(ck - centre, axis=1)
                clo = float(np.median(d))
                sl.colour = [float(x) for x in centre]
                sl.colour_low, sl.colour_high = clo, clo + max(float(np.quantile(d, quantile)) - clo, MIN_COLOUR)
            slots.append(sl)
        out[cat] = slots
    return out


def layout_rows(layouts: dict[str, list[SlotLayout]], categories: list[str | None], counts: list[int]
                ) -> tuple[Tensor, Tensor] | None:
    """(priors [sum counts, G, G], norms [sum counts, 8] = (low, high, colour_low, colour_high, r, g, b, has_colour))
    for every component row of a batch. Rows of a category or slot without a layout get an all-0.5 prior
    (no expected region) and normal ranges no raw score reaches (no layout score)."""
    if not layouts:
        return None
    priors, norms = [], []
    for c, n in zip(categories, counts, strict=True):
        slots = layouts.get(c or "", [])
        for i in range(n):
            if i < len(slots):
                sl = slots[i]
                priors.append(sl.prior)
                norms.append((sl.low, sl.high, sl.colour_low, sl.colour_high, *(sl.colour or (0.0, 0.0, 0.0)),
                              float(sl.colour is not None)))
            else:
                priors.append(torch.full((GRID, GRID), 0.5))
                norms.append((NO_LAYOUT, NO_LAYOUT + 1.0, NO_LAYOUT, NO_LAYOUT + 1.0, 0.0, 0.0, 0.0, 0.0))
    if not priors:
        return None
    return torch.stack(priors), torch.tensor(norms, dtype=torch.float32).reshape(-1, 8)


def expected_region(priors: Tensor, size: int) -> Tensor:
    """[K, size, size] bool: where each row's slot is in most normal images (prior > 0.5), upsampled."""
    return F.interpolate((priors > 0.5).float()[:, None], size=(size, size), mode="nearest")[:, 0] > 0


def score_and_region(masks: Tensor, priors: Tensor, norms: Tensor, size: int, colours: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """For [K, H, W] masks with their rows' priors and norms (layout_rows): the slot-normalised layout score [K]
    (clamped at 0) and the region it is painted on, [K, size, size] bool. Where the slot is: the unexpected cells,
    upsampled, dilated by a cell. What colour it is (colours: [K, 3] mean RGB of each row's mask, NaN when empty):
    the distance to the slot's normal colour on the same scale, painted on the slot's own mask; the score is the
    larger of the two."""
    priors, norms = priors.to(masks.device), norms.to(masks.device)
    u = unexpected(coverage(masks, priors.shape[-1]), priors)
    raw = u.flatten(1).sum(1) / priors.flatten(1).sum(1).clamp_min(1.0)
    z = ((raw - norms[:, 0]) / (norms[:, 1] - norms[:, 0]).clamp_min(1e-6)).clamp_min(0)
    cells = F.max_pool2d((u > 0.5 - TOL).float()[:, None], 3, stride=1, padding=1)  # |coverage - prior| > 0.5
    region = F.interpolate(cells, size=(size, size), mode="nearest")[:, 0] > 0
    if colours is not None and colours.numel():
        d = (colours.to(norms.device) - norms[:, 4:7]).norm(dim=1)
        zc = ((d - norms[:, 2]) / (norms[:, 3] - norms[:, 2]).clamp_min(1e-6)).clamp_min(0)
        zc = torch.where(torch.isnan(zc) | (norms[:, 7] == 0), torch.zeros_like(zc), zc)
        own = F.interpolate(masks.float()[:, None], size=(size, size), mode="nearest")[:, 0] > 0
        region = torch.where((zc > z)[:, None, None], own, region)
        z = torch.maximum(z, zc)
    return z, region
