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

from anomalymoe.models.calibration import fit_calibration, fit_part_bank
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform.data.pipeline import to_device
from anomalymoe.platform.evaluation.metrics import AnomalyMetrics

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


LOGICAL_KINDS = ("remove", "duplicate", "move", "recolour")


def _instances(masks: Tensor | None, lo: float = 0.002, hi: float = 0.12, extent: float = 0.35
               ) -> list[tuple[int, np.ndarray]]:
    """(slot, boolean mask) of every compact part instance: a connected piece of one slot's mask (closed, holes
    filled, grown by 2 px to take the part's rim) whose area is between lo and hi of the image and which fills at
    least `extent` of its bounding box (no thin rims or edges)."""
    from scipy import ndimage

    out = []
    if masks is None:
        return out
    m = masks.cpu().numpy()
    area = m.shape[-1] * m.shape[-2]
    for k in range(m.shape[0]):
        solid = ndimage.binary_fill_holes(ndimage.binary_closing(m[k], iterations=2))
        lab, n = ndimage.label(solid)
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            inst = ndimage.binary_dilation(lab == i, iterations=2)
            box = (sl[0].stop - sl[0].start + 4) * (sl[1].stop - sl[1].start + 4)
            if lo * area <= inst.sum() <= hi * area and inst.sum() >= extent * box:
                out.append((k, inst))
    return out


def logical_defects(images: Tensor, masks: list[Tensor | None], seed: int, first_index: int = 0
                    ) -> tuple[Tensor, Tensor, list[str]]:
    """One synthetic *logical* defect per image, made from its own part masks (no knowledge of any dataset's parts):
    a part instance (a connected piece of one slot's mask, 0.2-12% of the image) is removed (filled with the median
    colour around it), duplicated onto a place where no part is, moved there, or recoloured (its colour channels
    rotated). Seeded per image by (seed, index). An image without a usable instance gets a pasted local defect
    (paste_defects) instead. Returns (defective images, masks [B, H, W] bool, kind per image)."""
    from scipy import ndimage

    b, _, h, w = images.shape
    out, gt, kinds = images.clone(), torch.zeros(b, h, w, dtype=torch.bool), []
    for i in range(b):
        rng = np.random.default_rng([seed, 7, first_index + i])
        inst = _instances(masks[i] if masks else None)
        if not inst:
            bad, bm = paste_defects(images[i : i + 1], seed, first_index + i)
            out[i], gt[i] = bad[0], bm[0]
            kinds.append("local")
            continue
        _, src = inst[int(rng.integers(len(inst)))]
        parts = ndimage.binary_dilation(np.any([m for _, m in inst], 0), iterations=3)
        kind = LOGICAL_KINDS[int(rng.integers(len(LOGICAL_KINDS)))]
        img = images[i].cpu().numpy()
        new = img.copy()
        target = None
        if kind in ("duplicate", "move"):
            ys, xs = np.nonzero(src)
            for _ in range(60):
                dy = int(rng.integers(-ys.min(), h - ys.max()))
                dx = int(rng.integers(-xs.min(), w - xs.max()))
                cand = np.zeros_like(src)
                cand[ys + dy, xs + dx] = True
                if not (ndimage.binary_dilation(cand, iterations=3) & parts).any():
                    target = (dy, dx, cand)
                    break
            if target is None:
                kind = "remove"
        if kind in ("remove", "move"):
            hole = ndimage.binary_dilation(src, iterations=2)
            ring = ndimage.binary_dilation(src, iterations=8) & ~hole & ~parts
            fill = np.median(img[:, ring], axis=1) if ring.any() else img.reshape(3, -1).mean(1)
            new[:, hole] = fill[:, None]
            gt[i] |= torch.from_numpy(hole)
        if target is not None:
            dy, dx, cand = target
            ys, xs = np.nonzero(src)
            new[:, ys + dy, xs + dx] = img[:, ys, xs]
            gt[i] |= torch.from_numpy(cand)
        if kind == "recolour":
            new[:, src] = img[[1, 2, 0]][:, src]
            gt[i] |= torch.from_numpy(src)
        out[i] = torch.from_numpy(new).to(out.device)
        kinds.append(kind)
    return out, gt, kinds


def synthetic_defects(seed: int = 0) -> Callable[[Tensor, list, int], Tensor]:
    """The defect maker calibration fits fusion weights with (models/calibration.fit_calibration(defects=)): image i
    of the stream gets a pasted local defect when i is even, a part-level logical edit (logical_defects) when odd."""

    def make(images: Tensor, masks: list, first_index: int) -> Tensor:
        local = paste_defects(images, seed, first_index)[0]
        logical = logical_defects(images, masks, seed, first_index)[0]
        odd = torch.tensor([(first_index + i) % 2 == 1 for i in range(images.shape[0])], device=images.device)
        return torch.where(odd[:, None, None, None], logical.to(images.device), local)

    return make


def calibrate(model: AnomalyMoE, batches, seed: int = 0, reference=None):
    """The platform's calibration on held-out normal (images, masks, categories) batches (a list, or a callable
    giving a fresh iterator): models/calibration.fit_calibration with the synthetic defects its fusion weights are
    fitted on.
    reference: batches of normal *training* images (an iterable); the model's part bank is fitted on them first
    (calibration.fit_part_bank; bank_batches makes them). Without it an existing bank is kept.
    Every path that calibrates (the training job, tuning, benchmarks, validation) goes through here."""
    if reference is not None:
        fit_part_bank(model, reference)
    return fit_calibration(model, batches, defects=synthetic_defects(seed))


BANK_IMAGES = 256  # training images per category in the part bank (calibration.fit_part_bank)


def bank_batches(train_rows, frame, kept, device, batch_size: int = 8):
    """The part bank's reference batches: up to BANK_IMAGES training rows per category, decoded on `device`."""
    from anomalymoe.platform.data.pipeline import category_batches, per_category_sample, to_device

    rows = per_category_sample(train_rows, BANK_IMAGES)
    return (to_device(b, device) for b in category_batches(rows, frame, kept, batch_size))


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
        calibrate(model, on_device(calib), seed)
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
