"""Reading datasets in the MVTec AD layout (DESIGN.md §5) into tensors.

The manifest-based Ray Data pipeline replaces the directory walk for cluster training; this module is
the single-process reader the demo, tests and benchmarks use, and the decode/resize code both share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    path: Path
    category: str
    split: str  # train | test
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" or the defect type
    mask_path: Path | None = None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []


def _mask_for(root: Path, category: str, defect: str, image: Path) -> Path | None:
    gt = root / category / "ground_truth" / defect
    for name in (f"{image.stem}_mask", image.stem):
        for ext in IMAGE_EXTS:
            p = gt / f"{name}{ext}"
            if p.exists():
                return p
    return None


def scan_mvtec(root: str | Path, split: str, categories: Sequence[str] | None = None) -> list[Sample]:
    """Every image of `split` under <root>/<category>/<split>/<defect>/, sorted, with its GT mask."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    cats = list(categories) if categories else sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    out = []
    for cat in cats:
        split_dir = root / cat / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} does not exist (expected the MVTec AD layout)")
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for img in _images(defect_dir):
                label = int(defect != "good")
                mask = _mask_for(root, cat, defect, img) if label else None
                if label and mask is None:
                    raise FileNotFoundError(f"no ground-truth mask for {img} in {root / cat / 'ground_truth' / defect}")
                out.append(Sample(img, cat, split, label, defect, mask))
    return out


def load_image(path: str | Path, size: int) -> Tensor:
    """RGB [3, size, size] float in [0, 1]. Resized without keeping the aspect ratio, like the reference."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def load_mask(path: str | Path | None, size: int) -> Tensor:
    """bool [size, size]; nearest resize so the mask stays binary. None -> all normal."""
    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    with Image.open(path) as im:
        im = im.convert("L").resize((size, size), Image.NEAREST)
        return torch.from_numpy(np.asarray(im) > 0)


@dataclass
class Batch:
    images: Tensor  # [B, 3, S, S]
    labels: Tensor  # [B]
    gt: Tensor  # [B, S, S] bool
    categories: list[str]
    samples: list[Sample]


def batches(samples: Sequence[Sample], img_size: int, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            drop_last: bool = False, cache: dict | None = None) -> Iterator[Batch]:
    """Decode in order (or a seeded shuffle). `cache` (path -> tensor) avoids re-decoding across epochs."""
    order = np.arange(len(samples))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(samples))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        chosen = [samples[i] for i in idx]
        imgs = []
        for s in chosen:
            if cache is not None and s.path in cache:
                imgs.append(cache[s.path])
                continue
            t = load_image(s.path, img_size)
            if cache is not None:
                cache[s.path] = t
            imgs.append(t)
        yield Batch(torch.stack(imgs), torch.tensor([s.label for s in chosen]),
                    torch.stack([load_mask(s.mask_path, img_size) for s in chosen]),
                    [s.category for s in chosen], chosen)


def split_holdout(samples: Sequence[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Hold out a seeded fraction of each category's normal training images for calibration/validation."""
    train, held = [], []
    by_cat: dict[str, list[Sample]] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    rng = np.random.default_rng(seed)
    for cat in sorted(by_cat):
        items = by_cat[cat]
        n_held = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        perm = rng.permutation(len(items))
        held += [items[i] for i in sorted(perm[:n_held])]
        train += [items[i] for i in sorted(perm[n_held:])]
    return train, held
