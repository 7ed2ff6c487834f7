"""From level maps to one anomaly map and an image score, with normalisation fitted on normal images.

The reference min-max normalises each level over the whole *test set* of a class (METHOD.md §5 #5):
scores then depend on the other test images and cannot be streamed. Here every statistic comes from
normal (validation) images and is frozen into ``calibration.json``: what it holds (``Calibration``) and how scoring
applies it are here; how it is fitted is calibration.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalymoe.models.config import LEVELS, ScoringConfig
from anomalymoe.models.layout import SlotLayout

DEFAULT_KEY = "_default"
# Softmax temperature over cosine similarities of an image embedding to the category prototypes ("how sure").
CATEGORY_TEMPERATURE = 0.05


@dataclass
class LevelNorm:
    low: float = 0.0
    high: float = 1.0

    def apply(self, m: Tensor) -> Tensor:
        return (m - self.low) / max(self.high - self.low, 1e-12)


@dataclass
class SlotNorm(LevelNorm):
    """A component slot's normal score range, and the share of normal images in which the slot is present.
    Only a slot present in enough of them (ScoringConfig.missing_part_min_presence) counts as missing when
    an image lacks it; a slot that normal images sometimes lack is segmentation noise, not a part."""

    presence: float = 1.0
    # the normal range of the slot's part-bank score (nearest normal training part, parts.bank_scores); the
    # defaults never let a raw score reach 0 (no bank)
    bank_low: float = math.inf
    bank_high: float = math.inf


@dataclass
class ScoreNorm:
    """Image-score normalisation per category: 0 = the median normal image, 1 = the threshold."""

    median: float
    threshold: float
    n: int

    def normalize(self, s: float) -> float:
        return (s - self.median) / max(self.threshold - self.median, 1e-12)


@dataclass
class Calibration:
    levels: dict[str, LevelNorm] = field(default_factory=dict)
    scores: dict[str, ScoreNorm] = field(default_factory=dict)
    # per category: one LevelNorm per component slot (kept cluster), low = median, high = a high quantile
    components: dict[str, list[SlotNorm]] = field(default_factory=dict)
    # per category: the mean unit image embedding (BackboneFeatures.embedding) of its normal calibration images
    # ("vector") and the lowest cosine
    # similarity one of them had to it ("floor"): category inference for requests that do not name theirs
    prototypes: dict[str, dict] = field(default_factory=dict)
    # per category: where each component slot normally is (models/layout.py), one SlotLayout per slot
    layouts: dict[str, list[SlotLayout]] = field(default_factory=dict)
    # per category: fusion weights of the levels (patch, global, component), fitted on normal images and synthetic
    # defects made from them (calibration.fit_level_weights); a category without an entry uses
    # ScoringConfig.level_weights
    weights: dict[str, list[float]] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return bool(self.scores)

    def for_category(self, category: str | None) -> ScoreNorm | None:
        return self.scores.get(category or DEFAULT_KEY) or self.scores.get(DEFAULT_KEY)

    def infer_categories(self, emb: Tensor, categories: list[str | None] | None, candidates: list[str] | None = None,
                         temperature: float = CATEGORY_TEMPERATURE) -> tuple[list[str | None], list[dict | None]]:
        """Each image's category: the given one, else the nearest prototype (cosine of the image embedding) among
        `candidates` (default: every category with a prototype). Returns (categories, info) where info[i] is None
        for a given category, else {"inferred": True, "confidence": softmax of the similarities / temperature over
        the candidates, "similarity": to the chosen prototype, "margin": over the runner-up, "in_distribution":
        similarity >= the lowest a normal calibration image of that category had}."""
        b = emb.shape[0]
        cats = list(categories) if categories is not None else [None] * b
        info: list[dict | None] = [None] * b
        keys = [k for k in sorted(self.prototypes) if candidates is None or k in candidates]
        todo = [i for i, c in enumerate(cats) if c is None]
        if not todo or not keys:
            return cats, info
        protos = torch.tensor([self.prototypes[k]["vector"] for k in keys], dtype=torch.float32)
        emb = F.normalize(emb[todo].detach().float().cpu(), dim=1)
        sims = emb @ protos.T  # [n, K]
        conf = (sims / temperature).softmax(1)
        top = sims.topk(min(2, len(keys)), dim=1)
        for r, i in enumerate(todo):
            j = int(top.indices[r, 0])
            sim = float(sims[r, j])
            cats[i] = keys[j]
            info[i] = {"inferred": True, "confidence": float(conf[r, j]), "similarity": sim,
                       "margin": float(top.values[r, 0] - top.values[r, 1]) if len(keys) > 1 else None,
                       "in_distribution": sim >= self.prototypes[keys[j]]["floor"]}
        return cats, info

    def slot_rows(self, categories: list[str | None], counts: list[int]) -> Tensor | None:
        """[sum counts, 5] (low, high, presence, bank_low, bank_high) for every component row of a batch (image b
        has counts[b] slots); identity (and no bank range) for slots the calibration never saw. None when there
        are no slot statistics."""
        if not self.components:
            return None
        rows = []
        for c, n in zip(categories, counts, strict=True):
            norms = self.components.get(c or DEFAULT_KEY, [])
            rows += [(norms[i].low, norms[i].high, norms[i].presence, norms[i].bank_low, norms[i].bank_high)
                     if i < len(norms) else (0.0, 1.0, 1.0, math.inf, math.inf) for i in range(n)]
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)

    def to_dict(self) -> dict:
        return {
            "levels": {k: {"low": v.low, "high": v.high} for k, v in self.levels.items()},
            "scores": {k: {"median": v.median, "threshold": v.threshold, "n": v.n} for k, v in self.scores.items()},
            "components": {k: [{"low": n.low, "high": n.high, "presence": n.presence,
                                **({"bank_low": n.bank_low, "bank_high": n.bank_high}
                                   if math.isfinite(n.bank_low) else {})} for n in v]
                           for k, v in self.components.items()},
            "prototypes": self.prototypes,
            "layouts": {k: [sl.to_dict() for sl in v] for k, v in self.layouts.items()},
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(
            levels={k: LevelNorm(float(v["low"]), float(v["high"])) for k, v in d.get("levels", {}).items()},
            scores={k: ScoreNorm(float(v["median"]), float(v["threshold"]), int(v["n"]))
                    for k, v in d.get("scores", {}).items()},
            components={k: [SlotNorm(float(n["low"]), float(n["high"]), float(n.get("presence", 1.0)),
                                     float(n.get("bank_low", math.inf)), float(n.get("bank_high", math.inf)))
                            for n in v]
                        for k, v in d.get("components", {}).items()},
            prototypes={k: {"vector": [float(x) for x in v["vector"]], "floor": float(v["floor"])}
                        for k, v in d.get("prototypes", {}).items()},
            layouts={k: [SlotLayout.from_dict(x) for x in v] for k, v in d.get("layouts", {}).items()},
            weights={k: [float(x) for x in v] for k, v in d.get("weights", {}).items()},
        )

    def level_weights(self, categories: list[str | None], cfg: ScoringConfig) -> Tensor:
        """[B, 3] fusion weights per image: its category's fitted weights, else the config's."""
        default = [cfg.level_weights.get(lv, 1.0) for lv in LEVELS]
        return torch.tensor([self.weights.get(c or DEFAULT_KEY, default) for c in categories], dtype=torch.float32)


def gaussian_kernel(size: int, sigma: float, device=None, dtype=torch.float32) -> Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def smooth(maps: Tensor, size: int, sigma: float) -> Tensor:
    """Depthwise Gaussian blur of [B, H, W] maps with reflect padding (no dark border)."""
    if size <= 1 or sigma <= 0:
        return maps
    k = gaussian_kernel(size, sigma, maps.device, maps.dtype)[None, None]
    pad = size // 2
    x = F.pad(maps[:, None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, k)[:, 0]


def top_ratio_score(maps: Tensor, ratio: float) -> Tensor:
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * ratio))
    return flat.topk(k, dim=1).values.mean(1)


def fuse(
    level_maps: dict[str, Tensor], present: Tensor, level_mass: Tensor, cal: Calibration, cfg: ScoringConfig,
    weights: Tensor | None = None,
) -> Tensor:
    """One map from the level maps the router used. Each level is first put on a common scale by its
    normal-image quantiles (EfficientAD), then combined by the configured rule:
    mean: sum_l w_l * m_l / sum_l w_l over used levels (w: `weights` [B, 3] per image, e.g. its category's fitted
    ones, else the config's level_weights); max: pixel-wise max over used levels;
    routing: levels weighted by their routing mass (the reference's intent, without test statistics)."""
    normed = torch.stack([cal.levels.get(lv, LevelNorm()).apply(level_maps[lv]) for lv in LEVELS], 1)  # [B,3,H,W]
    used = present.to(normed.dtype)[:, :, None, None]
    if cfg.fusion == "max":
        return torch.where(used.bool(), normed, torch.full_like(normed, -math.inf)).amax(1)
    if cfg.fusion == "mean":
        if weights is None:
            weights = torch.tensor([[cfg.level_weights.get(lv, 1.0) for lv in LEVELS]])
        w = weights.to(normed.device, normed.dtype)[:, :, None, None] * used
        w = torch.where(w.sum(1, keepdim=True) > 0, w, used)  # weight 0 on every used level: their plain mean
    else:
        w = level_mass.to(normed.dtype)[:, :, None, None] * used
    return (normed * w).sum(1) / w.sum(1).clamp_min(1e-12)
