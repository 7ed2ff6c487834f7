"""From level maps to one anomaly map and an image score, with normalisation fitted on normal images.

The reference min-max normalises each level over the whole *test set* of a class (METHOD.md §5 #5):
scores then depend on the other test images and cannot be streamed. Here every statistic comes from
normal (validation) images and is frozen into ``calibration.json``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
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
    # defects made from them (fit_level_weights); a category without an entry uses ScoringConfig.level_weights
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


class QuantileSketch:
    """Bounded reservoir of values for quantile estimates over many images (seeded, deterministic)."""

    def __init__(self, capacity: int = 200_000, seed: int = 0):
        self.capacity, self.rng = capacity, np.random.default_rng(seed)
        self.values: list[np.ndarray] = []
        self.count = 0

    def add(self, x: Tensor | np.ndarray, per_item: int = 4096) -> None:
        a = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, np.float32)
        a = a.reshape(-1)
        if a.size > per_item:
            a = self.rng.choice(a, per_item, replace=False)
        self.values.append(a.astype(np.float32))
        self.count += a.size
        if self.count > 2 * self.capacity:
            allv = np.concatenate(self.values)
            self.values = [self.rng.choice(allv, self.capacity, replace=False)]
            self.count = self.capacity

    def quantile(self, q: float) -> float:
        return float(np.quantile(np.concatenate(self.values), q)) if self.values else float("nan")


def fit_level_norms(level_batches: Iterable[tuple[dict[str, Tensor], Tensor]], cfg: ScoringConfig
                    ) -> dict[str, LevelNorm]:
    """Quantiles q_low / q_high of each level's pixel values on normal images, over the images that
    level was used on. A level never used keeps the identity."""
    sketches = {lv: QuantileSketch(seed=i) for i, lv in enumerate(LEVELS)}
    for maps, present in level_batches:
        for i, lv in enumerate(LEVELS):
            rows = present[:, i]
            if rows.any():
                sketches[lv].add(maps[lv][rows])
    out = {}
    for lv, sk in sketches.items():
        if sk.count:
            lo, hi = sk.quantile(cfg.q_low), sk.quantile(cfg.q_high)
            # A near-degenerate normal distribution (e.g. component maps that are 0 almost everywhere)
            # must not blow a level up by 1/(hi-lo): the spread is at least 5% of the level's scale.
            spread = max(hi - lo, 0.05 * max(abs(hi), abs(lo)), 1e-8)
            out[lv] = LevelNorm(lo, lo + spread)
    return out


def fit_score_norms(scores_by_category: dict[str, list[float]], cfg: ScoringConfig) -> dict[str, ScoreNorm]:
    """Per-category median and threshold (a high quantile) of normal-image scores, plus a pooled
    `_default` for categories the calibration never saw."""
    out = {}
    pooled = [s for v in scores_by_category.values() for s in v]
    for key, vals in [*scores_by_category.items(), (DEFAULT_KEY, pooled)]:
        if not vals:
            continue
        a = np.asarray(vals, dtype=np.float64)
        out[key] = ScoreNorm(float(np.median(a)), float(np.quantile(a, cfg.threshold_quantile)), int(a.size))
    return out


@dataclass
class SlotStats:
    """What calibration collects per category and slot: scores of the present slot, and in how many
    images the slot was looked at (routed) and present."""

    scores: list[float] = field(default_factory=list)
    seen: int = 0
    present: int = 0
    bank: list[float] = field(default_factory=list)  # part-bank scores of the present slot (where there is a bank)


def fit_slot_norms(stats: dict[str, list[SlotStats]], cfg: ScoringConfig) -> dict[str, list[SlotNorm]]:
    """Per category and component slot: low = median of normal scores, high = their threshold quantile,
    presence = share of normal images that have the slot. The spread is at least 10% of the median, so a
    slot seen on few images cannot blow up. A slot with no normal score keeps the identity."""
    out = {}
    for key, slots in stats.items():
        norms = []
        for st in slots:
            presence = st.present / st.seen if st.seen else 0.0
            if not st.scores:
                norms.append(SlotNorm(presence=presence))
                continue
            lo, hi = _range(st.scores, cfg.threshold_quantile)
            norms.append(SlotNorm(lo, hi, presence, *(_range(st.bank, cfg.threshold_quantile) if st.bank
                                                      else (math.inf, math.inf))))
        out[key] = norms
    return out


def _range(values: list[float], quantile: float) -> tuple[float, float]:
    """(median, high quantile) of normal scores; the spread is at least 10% of the median."""
    a = np.asarray(values, dtype=np.float64)
    lo = float(np.median(a))
    return lo, lo + max(float(np.quantile(a, quantile)) - lo, 0.1 * abs(lo), 1e-6)


def fit_prototypes(embeddings: Iterable[tuple[Tensor, list[str | None]]]) -> dict[str, dict]:
    """Per category: the normalised mean of its images' unit embeddings and the lowest cosine similarity one of
    them has to it (images without a category are left out)."""
    by_cat: dict[str, list[Tensor]] = {}
    for emb, cats in embeddings:
        for e, c in zip(F.normalize(emb.float(), dim=1), cats, strict=True):
            if c is not None:
                by_cat.setdefault(c, []).append(e)
    out = {}
    for c, rows in sorted(by_cat.items()):
        x = torch.stack(rows)
        v = F.normalize(x.mean(0), dim=0)
        out[c] = {"vector": v.tolist(), "floor": float((x @ v).min())}
    return out


WEIGHT_GRID = (0.0, 0.5, 1.0, 2.0)


def fit_level_weights(normal: list[tuple[dict[str, Tensor], Tensor, str]], defective: list[tuple[dict[str, Tensor],
                      Tensor, str]], cal: Calibration, cfg: ScoringConfig, min_images: int = 4
                      ) -> dict[str, list[float]]:
    """Per category: the fusion weights (patch, global, component) from WEIGHT_GRID that best separate its normal
    images from their synthetic defects: the highest image AUROC of the fused, smoothed top-ratio score (to 3
    decimals), then the widest gap (mean defective minus mean normal score, in normal standard deviations: AUROC
    saturates on easy synthetic defects, the gap does not), then the weights nearest equal ones. Inputs are (raw
    level maps of one image [3 x (H, W)], present [3], category) on normal and defective copies. A category with
    fewer than `min_images` of either keeps the config's weights."""
    from itertools import product

    from sklearn.metrics import roc_auc_score

    out = {}
    cats = sorted({c for _, _, c in normal})
    combos = [w for w in product(WEIGHT_GRID, repeat=len(LEVELS)) if sum(w) > 0]
    for cat in cats:
        rows = [(m, p, 0) for m, p, c in normal if c == cat] + [(m, p, 1) for m, p, c in defective if c == cat]
        if sum(lab == 0 for *_, lab in rows) < min_images or sum(lab == 1 for *_, lab in rows) < min_images:
            continue
        maps = {lv: torch.stack([m[lv] for m, _, _ in rows]).float() for lv in LEVELS}
        present = torch.stack([p for _, p, _ in rows])
        labels = [lab for *_, lab in rows]
        best, best_key = None, None
        for w in combos:
            fused = smooth(fuse(maps, present, present.float(), cal, cfg, torch.tensor([w]).expand(len(rows), -1)),
                           cfg.smooth_kernel, cfg.smooth_sigma)
            scores = top_ratio_score(fused, cfg.top_ratio)
            auc = roc_auc_score(labels, scores.numpy())
            lab = torch.tensor(labels, dtype=torch.bool)
            gap = float((scores[lab].mean() - scores[~lab].mean()) / scores[~lab].std().clamp_min(1e-6))
            key = (round(auc, 3), round(gap, 3), -sum((x - 1.0) ** 2 for x in w))
            if best_key is None or key > best_key:
                best, best_key = list(w), key
        out[cat] = best
    return out
