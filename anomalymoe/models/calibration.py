"""What is fitted on normal images after training, outside the nn.Module: the part bank (`fit_part_bank`, on training
images) and the calibration (`fit_calibration`, on held-out images: component-slot statistics, where parts normally
are, level and score normalisation, category prototypes, fusion weights per category). Both run the model in eval
mode and store their result on it (`model.parts`'s banks, `model.calibration`). The statistics themselves are fitted
from what the model produced by the functions below them (fit_level_norms, fit_slot_norms, fit_score_norms,
fit_prototypes, fit_level_weights; layouts: layout.fit_layouts). What the fitted statistics are and how scoring uses
them at inference is scoring.py (Calibration), layout.py and parts.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomalymoe.models import layout
from anomalymoe.models.config import LEVELS, ScoringConfig
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.precision import autocast
from anomalymoe.models.scoring import (
    DEFAULT_KEY,
    Calibration,
    LevelNorm,
    ScoreNorm,
    SlotNorm,
    fuse,
    smooth,
    top_ratio_score,
)


@torch.no_grad()
def fit_part_bank(model: AnomalyMoE, batches: Iterable[tuple[Tensor, list | None, list[str | None]]],
                  max_images: int = 256) -> dict[str, int]:
    """Store, per category the part segmentation covers, every slot's unit feature on up to `max_images` normal
    *training* images (parts.CategoryParts.bank): what bank_scores compares a part with. Fitted after training,
    before calibration (whose held-out images must not be in it). Returns the images kept per category."""
    was_training = model.training
    model.eval()
    rows: dict[str, list[Tensor]] = {}
    try:
        for images, masks, cats in batches:
            with autocast(images.device, model.inference_precision):
                out = model(images, masks, compute_targets=False, categories=cats)
            feats = model.bank_features(out) * out.comp_valid[:, None]
            counts = [0 if m is None else m.shape[0] for m in out.masks]
            for f, c in zip(feats.split(counts), cats or [None] * images.shape[0], strict=True):
                if f.shape[0] and model.parts.covers(c) and len(rows.setdefault(c, [])) < max_images:
                    rows[c].append(f.cpu().half())
    finally:
        model.train(was_training)
    for c, fs in rows.items():
        n = len(model.parts.categories[c].kept)
        fs = [f for f in fs if f.shape[0] == n]
        model.parts.categories[c].bank = torch.stack(fs) if fs else None
    return {c: len(fs) for c, fs in rows.items()}


@torch.no_grad()
def fit_calibration(model: AnomalyMoE, batches: Iterable[tuple[Tensor, list | None, list[str | None]]]
                    | Callable[[], Iterable[tuple[Tensor, list | None, list[str | None]]]],
                    defects: Callable[[Tensor, list, int], Tensor] | None = None) -> Calibration:
    """Fit component-slot, level and score normalisation on *normal* images (never the test split), set it as
    `model.calibration` and return it. batches yield (images, masks, categories); pass a zero-argument callable to
    stream them (slot statistics first), else they are held in memory. Level maps are kept in float16 between the
    level and score fits, so memory grows with the calibration set, not with the data.

    defects(images, masks, first_index) -> defective copies: synthetic defects made from each normal image and
    its part masks (platform/validation.synthetic_defects). With it, and ScoringConfig.fit_level_weights, each
    category's fusion weights are chosen to separate its calibration images from their defective copies
    (fit_level_weights) before the thresholds are fitted with them."""
    sc = model.cfg.scoring
    if not callable(batches):
        batches = (lambda held: (lambda: held))(list(batches))
    slots = Calibration()
    if (sc.component_slot_norm or sc.part_layout) and model.cfg.component.num:
        stats, (covs, cols) = _slot_scores(model, batches())
        if sc.component_slot_norm:
            slots.components = fit_slot_norms(stats, sc)
        if sc.part_layout:
            slots.layouts = layout.fit_layouts(covs, sc.threshold_quantile, cols)
    kept, embeddings = [], []
    for images, masks, cats in batches():
        p = model.predict(images, masks, cats, slots)
        cats = list(cats) if cats else [None] * images.shape[0]
        kept.append((p.level_maps, p.present, p.level_mass, cats, p.masks))
        embeddings.append((p.embedding, cats))
    levels = fit_level_norms(((({k: v.float() for k, v in m.items()}), pr) for m, pr, *_ in kept), sc)
    cal = Calibration(levels=levels, components=slots.components, prototypes=fit_prototypes(embeddings),
                      layouts=slots.layouts)
    if defects is not None and sc.fit_level_weights and sc.fusion == "mean":
        cal.weights = _fit_weights(model, batches, kept, cal, defects)
    by_cat: dict[str, list[float]] = {}
    for m, pr, mass, cats, _ in kept:
        fused = smooth(fuse({k: v.float() for k, v in m.items()}, pr, mass, cal, sc, cal.level_weights(cats, sc)),
                       sc.smooth_kernel, sc.smooth_sigma)
        for c, s in zip(cats, top_ratio_score(fused, sc.top_ratio).tolist(), strict=True):
            by_cat.setdefault(c or DEFAULT_KEY, []).append(s)
    cal.scores = fit_score_norms(by_cat, sc)
    model.calibration = cal
    return cal


def _fit_weights(model: AnomalyMoE, batches: Callable[[], Iterable], kept: list, cal: Calibration,
                 defects: Callable[[Tensor, list, int], Tensor], variants: int = 4) -> dict[str, list[float]]:
    """Level maps of `variants` defective copies of every calibration image (stream indices i + v * 10007, so
    the maker's local / logical alternation gives each image both kinds), then fit_level_weights."""
    normal, bad, first = [], [], 0
    for (images, _, _), (m, pr, _, kcats, masks) in zip(batches(), kept, strict=True):
        dev_masks = [None if x is None else x.to(images.device) for x in masks]
        for i, c in enumerate(kcats):
            if c is not None:
                normal.append(({lv: m[lv][i] for lv in LEVELS}, pr[i], c))
        for v in range(variants):
            q = model.predict(defects(images, dev_masks, first + v * 10007), None, kcats, cal)
            bad += [({lv: q.level_maps[lv][i] for lv in LEVELS}, q.present[i], c) for i, c in enumerate(kcats)
                    if c is not None]
        first += images.shape[0]
    return fit_level_weights(normal, bad, cal, model.cfg.scoring)


@torch.no_grad()
def _slot_scores(model: AnomalyMoE, batches: Iterable[tuple[Tensor, list | None, list[str | None]]]
                 ) -> tuple[dict[str, list[SlotStats]], tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]]:
    """Per category and slot index: raw scores of the routed, present slots, and how often the slot
    was routed and present; and per category every image's slot coverage on the layout grid and slot colours."""
    was_training = model.training
    model.eval()
    by_cat: dict[str, list[SlotStats]] = {}
    covs: dict[str, list[Tensor]] = {}
    cols: dict[str, list[Tensor]] = {}
    try:
        for images, masks, cats in batches:
            with autocast(images.device, model.inference_precision):
                out = model(images, masks, compute_targets=False, categories=cats)
            s, used = model.component_scores(out)
            bank = model.part_bank_scores(out).tolist()
            s, used, valid = s.tolist(), used.tolist(), out.comp_valid.tolist()
            colour = out.comp_colour.cpu() if out.comp_colour is not None else None
            start = 0
            for m, c in zip(out.masks, cats or [None] * images.shape[0], strict=True):
                n = 0 if m is None else m.shape[0]
                if n and c is not None:
                    covs.setdefault(c, []).append(layout.coverage(m).cpu())
                    cols.setdefault(c, []).append(colour[start : start + n])
                per = by_cat.setdefault(c or DEFAULT_KEY, [])
                per.extend(SlotStats() for _ in range(n - len(per)))
                for i in range(n):
                    r = start + i
                    if used[r]:
                        per[i].seen += 1
                        per[i].present += valid[r]
                        if valid[r]:
                            per[i].scores.append(s[r])
                            if not math.isnan(bank[r]):
                                per[i].bank.append(bank[r])
                start += n
    finally:
        model.train(was_training)
    # a category's images can differ in slot count only if they came with their own label maps: keep the most
    # common count
    for c, rows in covs.items():
        n = max({r.shape[0] for r in rows}, key=[r.shape[0] for r in rows].count)
        covs[c] = [r for r in rows if r.shape[0] == n]
        cols[c] = [r for r in cols[c] if r.shape[0] == n]
    return by_cat, (covs, cols)


# ------------------------------------------------------------------- statistics from what the model produced
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
