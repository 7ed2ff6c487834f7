"""Validation for model selection (tuning objective, checkpoint choice): held-out *normal* training images and the
same images with synthetic defects, never the test split.

The held-out normals are split in two by a seeded draw: part A calibrates (as the end of a run does), part B is
scored as it is and with one pasted defect per image (a CutPaste-style patch: a flipped, colour-shifted piece of
the same image moved elsewhere; its mask is exact). The metrics are image AUROC (B vs defective B) and pixel
AUROC on the defective copies; `val_score` is their mean. The model's own calibration is restored afterwards.
The synthetic defects are local; logical anomalies (a part missing or swapped) are not simulated, so this
objective favours what patch and component experts see — the README says so where tuning is described."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from ..models.anomalymoe import AnomalyMoE
from .metrics import AnomalyMetrics
from .pipeline import to_device

Batch = tuple[Tensor, list, list[str]]


def paste_defects(images: Tensor, seed: int, first_index: int = 0) -> tuple[Tensor, Tensor]:
    """One synthetic defect per image: a rectangle (8-25 % of the side) copied from elsewhere in the same image,
    flipped and shifted in brightness and colour. Seeded per image by (seed, index): the same image gets the same
    defect in every run. Returns (defective images, masks [B, H, W] bool)."""
    b, _, h, w = images.shape
    out, masks = images.clone(), torch.zeros(b, h, w, dtype=torch.bool)  # masks stay on the CPU (metrics)
    for i in range(b):
        rng = np.random.default_rng([seed, first_index + i])
        ph, pw = (max(2, int(rng.uniform(0.08, 0.25) * n)) for n in (h, w))
        y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        patch = images[i, :, sy : sy + ph, sx : sx + pw].flip(-1).flip(-2)
        shift = torch.from_numpy(rng.uniform(-0.35, 0.35, size=(3, 1, 1)).astype(np.float32)).to(images.device)
        out[i, :, y0 : y0 + ph, x0 : x0 + pw] = (patch + shift).clamp(0, 1)
        masks[i, y0 : y0 + ph, x0 : x0 + pw] = True
    return out, masks


def split_batches(batches: list[Batch], seed: int) -> tuple[list[Batch], list[Batch]]:
    """Seeded half/half split of held-out batches by image (A calibrates, B is scored); both halves non-empty
    when there are two or more images."""
    flat = [(img, m, c) for images, masks, cats in batches
            for img, m, c in zip(images, masks or [None] * len(images), cats, strict=True)]
    if len(flat) < 2:
        raise ValueError(f"validation needs at least 2 held-out normal images, got {len(flat)}")
    perm = np.random.default_rng(seed).permutation(len(flat))
    half = len(flat) // 2

    def rebatch(idx: np.ndarray) -> list[Batch]:
        out = []
        for s in range(0, len(idx), 8):
            part = [flat[j] for j in sorted(idx[s : s + 8])]
            out.append((torch.stack([p[0] for p in part]), [p[1] for p in part], [p[2] for p in part]))
        return out

    return rebatch(perm[:half]), rebatch(perm[half:])


@torch.no_grad()
def validate(model: AnomalyMoE, batches: Iterable[Batch] | Callable[[], Iterable[Batch]], seed: int = 0
             ) -> dict[str, float]:
    """Validation metrics on held-out normal (images, masks, categories) batches; see the module docstring."""
    held = list(batches() if callable(batches) else batches)
    calib, scored = split_batches(held, seed)
    saved = copy.deepcopy(model.calibration)
    device = next(model.parameters()).device

    def on_device(batches: list[Batch]) -> list[Batch]:
        return [to_device(b, device) for b in batches]

    try:
        model.fit_calibration(on_device(calib))
        m = AnomalyMetrics(pixel=True)
        first = 0
        for images, masks, cats in on_device(scored):
            bad, bad_masks = paste_defects(images, seed, first)
            first += images.shape[0]
            for imgs, lab, gt in ((images, 0, None), (bad, 1, bad_masks)):
                p = model.predict(imgs, masks, cats)
                size = p.anomaly_map.shape[-1]
                if gt is None:
                    gt = torch.zeros(imgs.shape[0], size, size, dtype=torch.bool)
                elif gt.shape[-1] != size:
                    gt = torch.nn.functional.interpolate(gt[:, None].float(), size=(size, size))[:, 0] > 0.5
                m.update(p.score.cpu(), torch.full((imgs.shape[0],), lab), p.anomaly_map.float().cpu(), gt)
        r = m.compute()
    finally:
        model.calibration = saved
    out = {"val_image_auroc": float(r["image_auroc"]), "val_pixel_auroc": float(r["pixel_auroc"])}
    out["val_score"] = float(np.nanmean(list(out.values())))
    return out
