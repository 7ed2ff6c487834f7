"""Deterministic built-in synthetic anomaly dataset ("textures") in the MVTec AD layout.

Why: the platform needs a dataset that exists offline, is tiny enough for a CPU demo and for tests,
and has *exact* pixel masks, so detection and localisation metrics can be checked end to end
without downloading MVTec AD.  The source textures are the CC0 images bundled with scikit-image
(``brick``, ``grass``, ``gravel``).

Layout written under ``root`` (MVTec AD's own convention)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/<good|defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png    # uint8 0/255, one per defective image
    <root>/.demo_textures.json                              # completion marker, written last

Determinism: every sample has its own ``np.random.default_rng([seed, category_id, split_id,
defect_id, index])`` stream (no Python ``hash()``), only the PCG64 integer/uniform draws are used
(no ziggurat/log-based samplers), per-pixel work uses only IEEE-exact arithmetic (+ - * / sqrt,
rounding; trigonometry only on scalar polygon vertices, rounded to 1/8 px), masks are rasterised
with integer/polygon routines, branch decisions use integer sums, and resizing is Pillow's
fixed-point 8-bit bilinear.  The output is therefore pixel-identical across runs and machines (a
golden-digest test pins it), and byte-identical for the same Pillow/zlib build.

Mask contract: for every defect type the mask is drawn first (a binary blob or a thick line), new
values are computed for the masked pixels only, and every masked pixel is then forced to differ
from the clean image by at least ``_MIN_DELTA`` in some channel.  Hence the mask *equals* the set
of changed pixels after uint8 quantisation (``(defective != clean).any(-1) == mask``), which
:func:`render_sample` asserts for every sample.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw

__all__ = [
    "CATEGORIES",
    "DEFECT_TYPES",
    "DOMAIN",
    "MARKER_NAME",
    "DemoSample",
    "generate_textures",
    "iter_samples",
    "load_mask",
    "main",
    "render_sample",
]

DOMAIN = "textures"
CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "stain", "paste")
MARKER_NAME = ".demo_textures.json"
_PARTIAL_NAME = ".demo_textures.partial.json"
# Bump when the rendering changes, so stale datasets on disk are regenerated.
_GENERATOR_VERSION = 1

DEFAULT_IMAGE_SIZE = 256
DEFAULT_N_TRAIN = 40
DEFAULT_N_TEST_GOOD = 10
DEFAULT_N_TEST_DEFECT_PER_TYPE = 6

# Defect area must be visible but not trivial: fraction of the image covered by the mask.
AREA_BOUNDS: tuple[float, float] = (0.005, 0.08)
_MIN_DELTA = 8  # every masked pixel changes by at least this much in some channel
_MIN_IMAGE_SIZE = 64
_SPLIT_IDS = {"train": 1, "test": 2}
_KIND_IDS = {"good": 0, **{d: i + 1 for i, d in enumerate(DEFECT_TYPES)}}
# Mild fixed per-category tint (R, G, B gains) so images are not pure grey.
_TINTS: dict[str, tuple[float, float, float]] = {
    "brick": (1.0, 0.84, 0.74),
    "grass": (0.82, 1.0, 0.72),
    "gravel": (0.95, 0.95, 1.0),
}
_STAIN_COLOURS: tuple[tuple[float, float, float], ...] = (
    (150.0, 80.0, 30.0),  # rust
    (40.0, 55.0, 110.0),  # ink / oil
    (200.0, 190.0, 60.0),  # yellow paint
    (110.0, 30.0, 90.0),  # wine
)


@dataclass(frozen=True)
class DemoSample:
    """One rendered sample; ``clean`` is what ``image`` would be without the defect."""

    clean: np.ndarray  # (H, W, 3) uint8
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, all False for good samples
    defect_type: str  # "good" or one of DEFECT_TYPES


# ----------------------------------------------------------------------------- rendering helpers


@cache
def _texture(name: str) -> np.ndarray:
    """Bundled 512x512 uint8 grey texture (loaded once, read-only)."""
    arr = np.ascontiguousarray(getattr(skdata, name)(), dtype=np.uint8)
    arr.setflags(write=False)
    return arr


def _category_id(category: str) -> int:
    """Stable per-category stream id (crc32, not Python's salted ``hash()``)."""
    return zlib.crc32(category.encode("utf-8"))


def _sample_rng(seed: int, category: str, split: str, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _category_id(category), _SPLIT_IDS[split], _KIND_IDS[kind], index])


def _texture_view(
    rng: np.random.Generator, source: str, image_size: int, tint: Sequence[float]
) -> np.ndarray:
    """Random crop / resize / flip / rot90 / brightness jitter of a texture, tinted to RGB uint8."""
    tex = _texture(source)
    full = tex.shape[0]
    crop = int(rng.integers(int(full * 0.375), int(full * 0.625) + 1))
    y0 = int(rng.integers(0, full - crop + 1))
    x0 = int(rng.integers(0, full - crop + 1))
    patch = tex[y0 : y0 + crop, x0 : x0 + crop]
    grey = np.asarray(
        Image.fromarray(np.ascontiguousarray(patch)).resize(
            (image_size, image_size), Image.Resampling.BILINEAR
        )
    )
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    if rng.random() < 0.5:
        grey = grey[::-1, :]
    grey = np.rot90(grey, k=int(rng.integers(0, 4)))
    gain = 0.88 + 0.24 * rng.random()
    offset = -10.0 + 20.0 * rng.random()
    g = grey.astype(np.float64) * gain + offset
    rgb = g[:, :, None] * np.asarray(tint, dtype=np.float64)[None, None, :]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _blob_mask(rng: np.random.Generator, size: int, area_lo: float, area_hi: float) -> np.ndarray:
    """Irregular filled blob: a 48-gon with low-frequency radial wobble, elliptic stretch, rotation.

    Trigonometry runs on scalars only (vertices rounded to 1/8 px); rasterisation is
    skimage.draw.polygon, so the pixel set is platform-independent.
    """
    target = area_lo + (area_hi - area_lo) * rng.random()
    r0 = math.sqrt(target * size * size / math.pi)
    harmonics = [(h, 0.18 * rng.random() / h * 2, 2 * math.pi * rng.random()) for h in (2, 3, 4, 5)]
    stretch = 1.0 + 0.8 * rng.random()
    sx, sy = math.sqrt(stretch), 1.0 / math.sqrt(stretch)
    psi = math.pi * rng.random()
    cos_p, sin_p = math.cos(psi), math.sin(psi)
    n_vert = 48
    xs, ys = [], []
    for k in range(n_vert):
        theta = 2 * math.pi * k / n_vert
        r = r0 * (1.0 + sum(a * math.cos(h * theta + ph) for h, a, ph in harmonics))
        x, y = r * math.cos(theta) * sx, r * math.sin(theta) * sy
        xs.append(round((x * cos_p - y * sin_p) * 8) / 8)
        ys.append(round((x * sin_p + y * cos_p) * 8) / 8)
    ext_x = max(abs(v) for v in xs) + 1
    ext_y = max(abs(v) for v in ys) + 1
    cx = ext_x + (size - 2 * ext_x) * rng.random() if size > 2 * ext_x else size / 2
    cy = ext_y + (size - 2 * ext_y) * rng.random() if size > 2 * ext_y else size / 2
    rows, cols = draw.polygon(np.asarray(ys) + cy, np.asarray(xs) + cx, shape=(size, size))
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


def _scratch_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Thick quadratic-Bezier line without anti-aliasing (integer lines dilated by a disk)."""
    margin = max(2, size // 16)
    while True:
        p0 = margin + (size - 2 * margin) * rng.random(2)
        p2 = margin + (size - 2 * margin) * rng.random(2)
        d = p2 - p0
        length = math.sqrt(float(d[0]) ** 2 + float(d[1]) ** 2)  # not BLAS: no FMA-dependent rounding
        if 0.4 * size <= length <= 0.9 * size:
            break
    bend = (-0.3 + 0.6 * rng.random()) * length
    p1 = (p0 + p2) / 2 + np.array([-d[1], d[0]]) / length * bend
    t = np.linspace(0.0, 1.0, max(8, int(length)))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    pts = np.clip(np.rint(pts), 0, size - 1).astype(np.int64)
    mask = np.zeros((size, size), dtype=bool)
    for (r0, c0), (r1, c1) in zip(pts[:-1], pts[1:], strict=True):
        rr, cc = draw.line(int(r0), int(c0), int(r1), int(c1))
        mask[rr, cc] = True
    half_width = int(rng.integers(1, max(1, size // 100) + 1))
    yy, xx = np.mgrid[-half_width : half_width + 1, -half_width : half_width + 1]
    return ndimage.binary_dilation(mask, structure=(yy * yy + xx * xx) <= half_width * half_width)


def _defect_mask(rng: np.random.Generator, defect: str, size: int) -> np.ndarray:
    """Draw a mask for ``defect`` whose area lies within AREA_BOUNDS (rejection sampling)."""
    lo, hi = AREA_BOUNDS
    for _ in range(100):
        if defect == "scratch":
            mask = _scratch_mask(rng, size)
        else:
            mask = _blob_mask(rng, size, 0.012, 0.055)
        frac = mask.mean()
        if lo <= frac <= hi:
            return mask
    raise RuntimeError(f"could not draw a {defect} mask within {AREA_BOUNDS} at size {size}")


def _defect_values(
    rng: np.random.Generator, defect: str, clean: np.ndarray, mask: np.ndarray, category: str, image_size: int
) -> np.ndarray:
    """Full-size float RGB proposal for the defective image; only ``mask`` pixels are used."""
    c = clean.astype(np.float64)
    # Integer sums: exact, so branch decisions cannot flip between machines.
    local_mean = clean[mask].astype(np.int64).sum(axis=0) / max(1, int(mask.sum()))
    if defect == "scratch":
        # Bright on dark backgrounds, dark on bright ones, with mild uniform grain.
        bright = local_mean.mean() < 128
        base = 225.0 + 30.0 * rng.random() if bright else 10.0 + 30.0 * rng.random()
        grain = -8.0 + 16.0 * rng.random(mask.shape)
        return np.repeat((base + grain)[:, :, None], 3, axis=2)
    if defect == "hole":
        # A dark pit that keeps a faint trace of the texture.
        return c * (0.15 + 0.2 * rng.random()) + 4.0
    if defect == "stain":
        # One of the two palette colours farthest from the local colour, so the stain always shows.
        palette = np.asarray(_STAIN_COLOURS)
        far = np.argsort(-np.abs(palette - local_mean).sum(axis=1), kind="stable")[:2]
        colour = palette[far[int(rng.integers(0, 2))]]
        alpha = 0.5 + 0.25 * rng.random()
        return (1 - alpha) * c + alpha * colour[None, None, :]
    if defect == "paste":
        # Foreign texture (never the category's own) with its own tint: structure and colour differ.
        others = [name for name in CATEGORIES if name != category]
        source = others[int(rng.integers(0, len(others)))]
        return _texture_view(rng, source, image_size, _TINTS[source]).astype(np.float64)
    raise ValueError(f"unknown defect type {defect!r}")


def _apply_defect(clean: np.ndarray, proposal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paste quantised ``proposal`` into ``mask`` and force every masked pixel to change."""
    new = np.clip(np.rint(proposal), 0, 255).astype(np.int16)
    old = clean.astype(np.int16)
    weak = mask & (np.abs(new - old).max(axis=2) < _MIN_DELTA)
    if weak.any():
        # Push towards the side with head-room: some channel is < 128 (resp. >= 128), so it moves by
        # exactly _MIN_DELTA without clipping.
        direction = np.where(old[weak].mean(axis=1, keepdims=True) < 128, 1, -1)
        new[weak] = np.clip(old[weak] + direction * _MIN_DELTA, 0, 255)
    out = clean.copy()
    out[mask] = new[mask].astype(np.uint8)
    return out


def render_sample(
    category: str,
    split: str,
    defect_type: str,
    index: int,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> DemoSample:
    """Render one sample exactly as :func:`generate_textures` writes it (plus its clean version).

    Exposed so tests and demos can check mask exactness without re-deriving the generator.
    """
    _validate(category=category, image_size=image_size, seed=seed)
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {tuple(_SPLIT_IDS)}, got {split!r}")
    if defect_type not in _KIND_IDS or (split == "train" and defect_type != "good"):
        raise ValueError(f"invalid defect type {defect_type!r} for split {split!r}")
    rng = _sample_rng(seed, category, split, defect_type, index)
    clean = _texture_view(rng, category, image_size, _TINTS[category])
    if defect_type == "good":
        return DemoSample(
            clean=clean, image=clean, mask=np.zeros(clean.shape[:2], dtype=bool), defect_type="good"
        )
    mask = _defect_mask(rng, defect_type, image_size)
    image = _apply_defect(clean, _defect_values(rng, defect_type, clean, mask, category, image_size), mask)
    if not np.array_equal((image != clean).any(axis=2), mask):  # the documented contract
        raise AssertionError("defect mask does not equal the set of changed pixels")
    return DemoSample(clean=clean, image=image, mask=mask, defect_type=defect_type)


# ----------------------------------------------------------------------------- writing the tree


def check_params(known: Sequence[str], *, category: str | None = None, image_size: int | None = None,
                 seed: int | None = None) -> None:
    """The demo generators' parameter checks: a category of theirs, images of at least 64 px, a seed >= 0."""
    if category is not None and category not in known:
        raise ValueError(f"unknown category {category!r}; choose from {tuple(known)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE):
        raise ValueError(f"image_size must be an int >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


_validate = functools.partial(check_params, CATEGORIES)


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Level 1: ~4x faster than the default 6 and no larger for noisy textures (these images are small anyway).
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _category_summary(n_train: int, n_test_good: int, n_defect: int) -> dict:
    return {
        "train": {"good": n_train},
        "test": {"good": n_test_good, **{d: n_defect for d in DEFECT_TYPES}},
        "ground_truth": {d: n_defect for d in DEFECT_TYPES},
    }


def generate_textures(
    root: str | os.PathLike[str],
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    n_train: int = DEFAULT_N_TRAIN,
    n_test_good: int = DEFAULT_N_TEST_GOOD,
    n_test_defect_per_type: int = DEFAULT_N_TEST_DEFECT_PER_TYPE,
    seed: int = 0,
    categories: Sequence[str] = CATEGORIES,
) -> dict:
    """Write the synthetic ``textures`` dataset under ``root`` (MVTec AD layout); return a summary.

    Idempotent: when ``root/.demo_textures.json`` records the same parameters, nothing is written.
    Otherwise only the category folders this generator owns (listed in its marker, or in the
    partial marker of an interrupted run) are removed and regenerated; a pre-existing category
    folder it does not own raises ``FileExistsError`` rather than being deleted.  The marker is
    written last, so an interrupted run is redone next time.

    Summary keys: ``root``, ``domain``, ``params``, ``categories`` (per category: counts per
    split and defect type, and masks per defect type), ``n_images``, ``n_masks``, ``regenerated``.
    """
    root, categories, params, summary = plan(
        root, categories, _validate, version=_GENERATOR_VERSION, domain=DOMAIN, defect_types=DEFECT_TYPES,
        category_summary=lambda cat: _category_summary(n_train, n_test_good, n_test_defect_per_type),
        image_size=image_size, n_train=n_train, n_test_good=n_test_good,
        n_test_defect_per_type=n_test_defect_per_type, seed=seed)

    def write_category(cat: str, base: Path) -> None:
        for i in range(n_train):
            save_png(
                base / "train" / "good" / f"{i:03d}.png",
                render_sample(cat, "train", "good", i, image_size=image_size, seed=seed).image,
            )
        for i in range(n_test_good):
            save_png(
                base / "test" / "good" / f"{i:03d}.png",
                render_sample(cat, "test", "good", i, image_size=image_size, seed=seed).image,
            )
        for defect in DEFECT_TYPES:
            for i in range(n_test_defect_per_type):
                s = render_sample(cat, "test", defect, i, image_size=image_size, seed=seed)
                save_png(base / "test" / defect / f"{i:03d}.png", s.image)
                save_png(base / "ground_truth" / defect / f"{i:03d}_mask.png", s.mask.astype(np.uint8) * 255)

    return materialize(root, categories, params, summary, write_category, marker_name=MARKER_NAME,
                       partial_name=_PARTIAL_NAME, known_categories=CATEGORIES, generator=__name__)


def plan(root: str | os.PathLike[str], categories: Sequence[str], validate: Callable[..., None], *, version: int,
         domain: str, defect_types: Sequence[str], category_summary: Callable[[str], dict], image_size: int,
         n_train: int, n_test_good: int, n_test_defect_per_type: int, seed: int) -> tuple[Path, tuple[str, ...],
                                                                                        dict, dict]:
    """The shared start of the demo generators: the request checked, the parameters their marker records and the
    summary (root, domain, params, per-category counts, image and mask totals)."""
    categories = tuple(categories)
    check_request(categories, validate, n_train=n_train, n_test_good=n_test_good,
                  n_test_defect_per_type=n_test_defect_per_type)
    validate(image_size=image_size, seed=seed)
    params = {
        "version": version,
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect_per_type": n_test_defect_per_type,
        "seed": seed,
        "categories": list(categories),
        "defect_types": list(defect_types),
    }
    n_per_cat = n_train + n_test_good + n_test_defect_per_type * len(defect_types)
    summary = {
        "root": str(root),
        "domain": domain,
        "params": params,
        "categories": {cat: category_summary(cat) for cat in categories},
        "n_images": n_per_cat * len(categories),
        "n_masks": n_test_defect_per_type * len(defect_types) * len(categories),
    }
    return Path(root), categories, params, summary


def check_request(categories: tuple[str, ...], validate, **counts: int) -> None:
    """Shared argument checks of the demo generators: unique known categories, non-negative counts."""
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be non-empty and unique, got {categories!r}")
    for cat in categories:
        validate(category=cat)
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")


def materialize(root: Path, categories: tuple[str, ...], params: dict, summary: dict,
                write_category: Callable[[str, Path], None], *, marker_name: str, partial_name: str,
                known_categories: Sequence[str], generator: str) -> dict:
    """The idempotent, interruption-safe write shared by the demo generators.

    Nothing is written when the marker records the same parameters. Otherwise only the category folders
    the generator owns (listed in its marker, or in the partial marker of an interrupted run) are removed
    and rewritten by ``write_category(category, folder)``; a pre-existing folder it does not own raises
    ``FileExistsError``. The complete marker is written last."""
    marker_path, partial_path = root / marker_name, root / partial_name
    marker = _read_json(marker_path)
    if (
        marker is not None
        and marker.get("params") == params
        and not partial_path.exists()
        and all((root / cat).is_dir() for cat in categories)
    ):
        return {**summary, "regenerated": False}

    owned: set[str] = set()
    for old in (marker, _read_json(partial_path)):
        if old is not None:
            owned.update(c for c in old.get("params", {}).get("categories", []) if c in known_categories)
    foreign = [cat for cat in categories if (root / cat).exists() and cat not in owned]
    if foreign:
        raise FileExistsError(
            f"{[str(root / c) for c in foreign]} exist but were not written by this generator; "
            "refusing to overwrite them"
        )

    root.mkdir(parents=True, exist_ok=True)
    # Record what we are about to own *before* touching anything, then drop the complete marker.
    _write_json_atomic(partial_path, {"params": {"categories": sorted(owned | set(categories))}})
    marker_path.unlink(missing_ok=True)
    for cat in sorted(owned | set(categories)):
        shutil.rmtree(root / cat, ignore_errors=True)

    for cat in categories:
        write_category(cat, root / cat)

    _write_json_atomic(marker_path, {"generator": generator, "params": params, "summary": summary})
    partial_path.unlink(missing_ok=True)
    return {**summary, "regenerated": True}


# ----------------------------------------------------------------------------- reading the tree


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an MVTec-style mask PNG as a boolean (H, W) array (any non-zero pixel is defective)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return arr > 0


def iter_samples(
    root: str | os.PathLike[str], category: str, split: str
) -> Iterator[tuple[Path, int, str, Path | None]]:
    """Yield ``(image_path, label, defect_type, mask_path_or_None)`` for one split, sorted.

    Label is 0 for ``good`` and 1 otherwise.  Works for any MVTec-AD-layout tree (not only ours);
    ordering is by defect folder name, then file name, so it is deterministic.  A defective image
    without its ``ground_truth/<defect>/<stem>_mask.png`` raises ``FileNotFoundError``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root) / category
    split_dir = base / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no such split directory: {split_dir}")
    for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for img in sorted(p for p in defect_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"):
            if defect == "good":
                yield img, 0, defect, None
                continue
            mask_path = base / "ground_truth" / defect / f"{img.stem}_mask.png"
            if not mask_path.is_file():
                raise FileNotFoundError(f"missing mask for {img}: {mask_path}")
            yield img, 1, defect, mask_path


# ----------------------------------------------------------------------------- CLI


def run_cli(argv: Sequence[str] | None, generate: Callable[..., dict], *, prog: str, description: str,
            categories: Sequence[str], defaults: dict[str, int]) -> int:
    """The demo generators' shared CLI: generate the dataset and print the summary as JSON."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", required=True, help="dataset root directory")
    parser.add_argument("--seed", type=int, default=0)
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--categories", nargs="+", default=list(categories), choices=categories)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    summary = generate(args.out, seed=args.seed, categories=args.categories,
                       **{name: getattr(args, name) for name in defaults})
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    json.dump(summary, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: generate the dataset and print the summary as JSON."""
    return run_cli(
        argv, generate_textures, prog="python -m anomalymoe.platform.data.demo.textures",
        description="Write the built-in synthetic 'textures' anomaly dataset (MVTec AD layout).",
        categories=CATEGORIES,
        defaults={"image_size": DEFAULT_IMAGE_SIZE, "n_train": DEFAULT_N_TRAIN, "n_test_good": DEFAULT_N_TEST_GOOD,
                  "n_test_defect_per_type": DEFAULT_N_TEST_DEFECT_PER_TYPE},
    )


if __name__ == "__main__":
    raise SystemExit(main())
