"""Deterministic built-in synthetic "objects" dataset: multi-part objects with component and logical anomalies.

Why: the ``textures`` domain (:mod:`anomalymoe.platform.data.demo.textures`) only has local defects, which patch
experts alone can find.  This domain shows why the model has three expert levels: every image is a tray
holding a fixed arrangement of coloured parts, and its anomalies are either *component* anomalies (one part
is wrong in itself) or *logical* anomalies (every part is fine, but the arrangement or count is wrong), in
the spirit of MVTec LOCO AD.  Every image also has exact part masks, so unsupervised part segmentation can be
checked against ground truth.

Categories and their parts (part-type id: name, count, where), see :data:`PART_TYPES`::

    tray        a light moulded tray on a dark table, a 3x3 grid of places
                1: red_circle       2  top row, left and right   (top centre is empty)
                2: blue_square      1  middle row, centre        (middle left/right are empty)
                3: yellow_triangle  3  bottom row
    breakfast   a cream bento box with a divider: a narrow left and a wide right compartment
                1: green_ellipse    1  left compartment, lower half (upper half is empty)
                2: orange_rectangle 2  right compartment, top row, side by side
                3: purple_star      1  right compartment, centre (bottom is empty)

Normal images vary like photographs of the same product: the whole tray shifts by up to 4 px and rotates
by up to 4 degrees, every part jitters by up to 3 px, rotates slightly and varies in size by 5 %, colours
vary by a few levels, and global brightness, a lighting gradient, the tray's moulded texture (blotches,
brushed streaks, grain) and the table change from image to image.  Geometry is given in pixels at 256 px
and scaled with ``image_size``; at 256 px every part is at least ~25 px across (a rectangle's short side)
and at most ~67 px (the ellipse's long axis), so at 224 px each part spans at least two ViT-S/14 tokens in
each direction.

Defect types (:data:`DEFECT_GROUPS` maps each to its group) and their masks:

- ``wrong_shape`` (component): one part has another shape, same colour and place; mask = old | new pixels.
- ``wrong_color`` (component): one part has a colour no part of the category has; mask = the part.
- ``missing`` (logical): one part is removed, the tray shows through; mask = where it was.
- ``extra`` (logical): one more part of an existing type lies on an empty place; mask = the new part.
- ``swapped`` (logical): two parts of different types exchange places; mask = both old and both new places.
- ``misplaced`` (logical): one part moved to an empty place in another row / compartment; mask = old | new.

Layout written under ``root`` (MVTec AD's convention plus the part ground truth)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/<good|defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png    # uint8 0/255, one per defective image
    <root>/<category>/parts/<split>/<good|defect>/000.npz   # part ground truth of every image, lossless
    <root>/<category>/defect_groups.json                    # {"wrong_shape": "component", ...}
    <root>/<category>/part_types.json                       # {"1": "red_circle", ...}
    <root>/.demo_objects.json                               # completion marker, written last

Each ``parts`` ``.npz`` (read it with :func:`load_parts`) holds two arrays describing the image as written:
``labels`` uint8 [H, W], 0 = background (table and tray), k = part-type id (stable per category: the same
kind of part has the same id in every image; a defective part keeps the id of the type it stands for, so a
red circle with a wrong shape or colour is still 1); ``instances`` uint16 [H, W], 0 = background, one id
per part instance, unique within the image (normal parts are numbered in layout order, an ``extra`` part
gets the next free id, a moved part keeps its id).  ``instances == i`` is instance i's binary mask and
``labels[instances == i]`` is constant: its part-type id.

Determinism: as in ``demo.textures``, every sample has its own ``np.random.default_rng([seed, category_id,
split_id, defect_id, index])`` stream (crc32, no Python ``hash()``) and uses only PCG64 integer/uniform
draws; trigonometry runs on scalar polygon vertices rounded to 1/8 px, parts are rasterised with
``skimage.draw.polygon`` (no anti-aliasing, so part masks are exact), the tray's large regions are tested
per pixel in tray coordinates and all other per-pixel work is elementwise IEEE arithmetic (+ - * /, no
transcendental functions), smooth noise is Pillow's fixed-point bilinear resize of uint8 noise, and choices
between candidates are checked on boolean pixel sets.  The output is pixel-identical across runs and
machines (a golden-digest test pins it) and byte-identical for the same Pillow/zlib build (the ``.npz``
files carry fixed zip timestamps).  The clean scene is drawn completely before any defect draw,
so the clean version of a defective sample is a normal image.

Mask contract: the defective image is the clean scene re-rendered with the changed parts (same tray, same
noise fields); parts outside the mask are untouched by construction.  A part redrawn in place with a new
shape gets a different grain, and any masked pixel that still equals the clean one after uint8 quantisation
(only possible where both are clipped) is pushed by ``_MIN_DELTA``.  Hence ``(image != clean).any(-1) ==
mask`` exactly, which :func:`render_sample` asserts for every sample.
"""

from __future__ import annotations

import functools
import io
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw

from anomalymoe.platform.data.demo.textures import (  # noqa: F401 - iter_samples/load_mask are re-exported
    _category_id,
    _write_json_atomic,
    check_params,
    iter_samples,
    load_mask,
    materialize,
    plan,
    run_cli,
    save_png,
)

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "DEFECT_GROUPS",
    "DEFECT_TYPES",
    "DOMAIN",
    "MARKER_NAME",
    "PART_TYPES",
    "ObjectSample",
    "PartType",
    "generate_objects",
    "iter_samples",
    "load_mask",
    "load_parts",
    "main",
    "render_sample",
]

DOMAIN = "objects"
CATEGORIES: tuple[str, ...] = ("tray", "breakfast")
DEFECT_GROUPS: dict[str, str] = {
    "wrong_shape": "component",
    "wrong_color": "component",
    "missing": "logical",
    "extra": "logical",
    "swapped": "logical",
    "misplaced": "logical",
}
DEFECT_TYPES: tuple[str, ...] = tuple(DEFECT_GROUPS)
MARKER_NAME = ".demo_objects.json"
_PARTIAL_NAME = ".demo_objects.partial.json"
# Bump when the rendering changes, so stale datasets on disk are regenerated.
_GENERATOR_VERSION = 1

DEFAULT_IMAGE_SIZE = 256
DEFAULT_N_TRAIN = 40
DEFAULT_N_TEST_GOOD = 10
DEFAULT_N_TEST_DEFECT_PER_TYPE = 5

_MIN_DELTA = 8  # a masked pixel that did not change after quantisation is pushed by this much
_REF = 256.0  # layout geometry is in pixels at this image size
_SPLIT_IDS = {"train": 1, "test": 2}
_KIND_IDS = {"good": 0, **{d: i + 1 for i, d in enumerate(DEFECT_TYPES)}}

# Part colours (RGB).  The first six are used by the categories; the rest only appear as wrong colours.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 40),
    "blue": (40, 80, 190),
    "yellow": (226, 186, 36),
    "green": (60, 150, 55),
    "orange": (232, 122, 30),
    "purple": (122, 52, 158),
    "cyan": (30, 168, 186),
    "pink": (232, 118, 172),
    "brown": (112, 70, 40),
    "black": (44, 44, 50),
    "lime": (158, 206, 44),
    "teal": (20, 108, 100),
}
_WRONG_COLOUR_MIN_DIST = 60  # a wrong colour differs from the right one by at least this much in some channel
# Wrong shapes that are clearly different at a glance (circle vs hexagon would be too subtle).
_WRONG_SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("square", "triangle", "star", "cross"),
    "square": ("circle", "triangle", "star", "cross"),
    "triangle": ("circle", "square", "star", "cross"),
    "ellipse": ("rectangle", "triangle", "star", "cross"),
    "rectangle": ("ellipse", "triangle", "star", "cross"),
    "star": ("circle", "square", "cross", "triangle"),
}
_TABLE_COLOUR = (48.0, 54.0, 62.0)


@dataclass(frozen=True)
class PartType:
    """One kind of part: its shape, colour name, nominal radius (px at 256) and random spin (degrees)."""

    name: str
    shape: str
    colour: str
    size: float
    spin: float


@dataclass(frozen=True)
class _Place:
    x: float  # tray coordinates, px at 256, origin at the tray centre, y down
    y: float
    region: str  # the arrangement rule's unit: a row of the tray or a compartment of the box
    kind: int = 0  # part-type id for a slot, 0 for an empty place


@dataclass(frozen=True)
class _Layout:
    half_w: float
    half_h: float
    tray_colour: tuple[float, float, float]
    part_types: tuple[PartType, ...]
    slots: tuple[_Place, ...]  # where the parts of a normal image lie, in instance-id order
    spots: tuple[_Place, ...]  # empty places, used by `extra` and `misplaced`
    areas: tuple[tuple[float, float, float, float], ...]  # (x0, y0, x1, y1) rectangles parts must lie in
    dividers: tuple[tuple[float, float, float, float], ...] = ()


_LAYOUTS: dict[str, _Layout] = {
    "tray": _Layout(
        half_w=100.0,
        half_h=100.0,
        tray_colour=(200.0, 198.0, 190.0),
        part_types=(
            PartType("red_circle", "circle", "red", 19.0, 0.0),
            PartType("blue_square", "square", "blue", 20.0, 10.0),
            PartType("yellow_triangle", "triangle", "yellow", 19.0, 10.0),
        ),
        slots=(
            _Place(-60.0, -60.0, "top", 1),
            _Place(60.0, -60.0, "top", 1),
            _Place(0.0, 0.0, "middle", 2),
            _Place(-60.0, 60.0, "bottom", 3),
            _Place(0.0, 60.0, "bottom", 3),
            _Place(60.0, 60.0, "bottom", 3),
        ),
        spots=(_Place(0.0, -60.0, "top"), _Place(-60.0, 0.0, "middle"), _Place(60.0, 0.0, "middle")),
        areas=((-92.0, -92.0, 92.0, 92.0),),
    ),
    "breakfast": _Layout(
        half_w=110.0,
        half_h=104.0,
        tray_colour=(222.0, 214.0, 196.0),
        part_types=(
            PartType("green_ellipse", "ellipse", "green", 22.0, 8.0),
            PartType("orange_rectangle", "rectangle", "orange", 20.0, 8.0),
            PartType("purple_star", "star", "purple", 17.0, 15.0),
        ),
        slots=(
            _Place(-60.0, 26.0, "left", 1),
            _Place(16.0, -64.0, "right", 2),
            _Place(76.0, -64.0, "right", 2),
            _Place(46.0, 2.0, "right", 3),
        ),
        spots=(_Place(-60.0, -62.0, "left"), _Place(46.0, 66.0, "right")),
        areas=((-102.0, -96.0, -18.0, 96.0), (-10.0, -96.0, 102.0, 96.0)),
        dividers=((-18.0, -96.0, -10.0, 96.0),),
    ),
}

PART_TYPES: dict[str, dict[int, str]] = {
    cat: {i + 1: t.name for i, t in enumerate(layout.part_types)} for cat, layout in _LAYOUTS.items()
}


@dataclass(frozen=True)
class ObjectSample:
    """One rendered sample.  ``clean`` is what ``image`` would be without the defect; ``labels`` and
    ``instances`` are the part ground truth of ``image`` (``clean_labels`` / ``clean_instances`` of
    ``clean``), in the format of the ``parts`` ``.npz`` files."""

    clean: np.ndarray  # (H, W, 3) uint8
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, all False for good samples
    labels: np.ndarray  # (H, W) uint8 part-type ids, 0 = background
    instances: np.ndarray  # (H, W) uint16 instance ids, 0 = background
    defect_type: str  # "good" or one of DEFECT_TYPES
    clean_labels: np.ndarray | None = None
    clean_instances: np.ndarray | None = None

    def part_masks(self) -> dict[int, np.ndarray]:
        """Instance id -> its binary (H, W) mask, for every part of ``image``."""
        return {int(i): self.instances == i for i in np.unique(self.instances) if i}

    def part_types(self) -> dict[int, int]:
        """Instance id -> part-type id, for every part of ``image``."""
        return _instance_types(self.labels, self.instances)


def _instance_types(labels: np.ndarray, instances: np.ndarray) -> dict[int, int]:
    fg = instances > 0
    pairs = np.unique(np.stack([instances[fg].astype(np.int64), labels[fg].astype(np.int64)]), axis=1)
    return {int(i): int(k) for i, k in pairs.T}


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Part:
    iid: int
    kind: int  # part-type id
    shape: str
    size: float
    colour: tuple[float, float, float]
    x: float
    y: float
    angle: float  # degrees
    scale: float
    region: str
    alt_grain: bool = False  # redrawn in place: use the second grain field so every pixel changes


@dataclass(frozen=True)
class _Pose:
    cos: float
    sin: float
    dx: float
    dy: float
    s: float  # image_size / 256
    c: float  # image centre


def _sample_rng(seed: int, category: str, split: str, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _category_id(category), _SPLIT_IDS[split], _KIND_IDS[kind], index])


def _round8(v: float) -> float:
    return round(v * 8) / 8


@cache
def _shape_vertices(shape: str) -> tuple[tuple[float, float], ...]:
    """Unit-size polygon of a shape (nominal radius 1), centred, in (x, y) with y down."""

    def ring(n: int, rx: float, ry: float, start: float = 0.0) -> list[tuple[float, float]]:
        return [
            (rx * math.cos(start + 2 * math.pi * k / n), ry * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)
        ]

    up = -math.pi / 2
    if shape == "circle":
        pts = ring(48, 1.0, 1.0)
    elif shape == "ellipse":
        pts = ring(48, 0.95, 1.45)  # upright
    elif shape == "square":
        h = 0.85
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "rectangle":
        pts = [(-0.65, -1.0), (0.65, -1.0), (0.65, 1.0), (-0.65, 1.0)]  # upright
    elif shape == "triangle":
        # Circumradius 1.2, centroid at the origin, apex up.
        pts = ring(3, 1.2, 1.2, up)
    elif shape == "star":
        pts = [
            ((1.25 if k % 2 == 0 else 0.52) * math.cos(up + math.pi * k / 5),
             (1.25 if k % 2 == 0 else 0.52) * math.sin(up + math.pi * k / 5))
            for k in range(10)
        ]
    elif shape == "cross":
        a, w = 1.0, 0.36
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
               (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return tuple(pts)


def _to_image(pose: _Pose, xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Tray coordinates (px at 256) -> image (rows, cols), scalar maths, rounded to 1/8 px."""
    rows, cols = [], []
    for x, y in zip(xs, ys, strict=True):
        cols.append(_round8(pose.c + pose.s * (pose.dx + x * pose.cos - y * pose.sin)))
        rows.append(_round8(pose.c + pose.s * (pose.dy + x * pose.sin + y * pose.cos)))
    return np.asarray(rows), np.asarray(cols)


def _polygon_mask(rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    rr, cc = draw.polygon(rows, cols, shape=(size, size))
    mask = np.zeros((size, size), dtype=bool)
    mask[rr, cc] = True
    return mask


def _tray_coords(pose: _Pose, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tray coordinates (px at 256) of every pixel centre: the inverse of :func:`_to_image`, elementwise."""
    grid = np.arange(size, dtype=np.float64)
    u = (grid[None, :] - pose.c) / pose.s - pose.dx  # (1, W)
    v = (grid[:, None] - pose.c) / pose.s - pose.dy  # (H, 1)
    return u * pose.cos + v * pose.sin, v * pose.cos - u * pose.sin


def _rect_mask(
    xy: tuple[np.ndarray, np.ndarray], x0: float, y0: float, x1: float, y1: float, corner: float = 0.0
) -> np.ndarray:
    """Pixels inside a rectangle of tray coordinates, optionally with rounded corners.

    Large regions are tested per pixel (elementwise IEEE arithmetic, as exact as a polygon rasteriser
    and ~20x faster for a tray-sized area than ``skimage.draw.polygon``)."""
    x, y = xy
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hx, hy = (x1 - x0) / 2 - corner, (y1 - y0) / 2 - corner
    qx = np.maximum(np.abs(x - cx) - hx, 0.0)
    qy = np.maximum(np.abs(y - cy) - hy, 0.0)
    return qx * qx + qy * qy <= corner * corner


def _part_mask(part: _Part, pose: _Pose, size: int) -> np.ndarray:
    a = math.radians(part.angle)
    ca, sa = math.cos(a), math.sin(a)
    r = part.size * part.scale
    xs, ys = [], []
    for u, v in _shape_vertices(part.shape):
        xs.append(part.x + r * (u * ca - v * sa))
        ys.append(part.y + r * (u * sa + v * ca))
    return _polygon_mask(*_to_image(pose, xs, ys), size)


def _gap_px(pose: _Pose) -> int:
    return max(1, round(3 * pose.s))


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Scene:
    """Everything of an image except its parts (shared by the clean and the defective rendering)."""

    pose: _Pose
    size: int
    base: np.ndarray  # (H, W, 3) float: table + tray with texture, light and grain
    light: np.ndarray  # (H, W) float: gain * lighting gradient
    grain: np.ndarray  # (H, W) float: part grain
    alt_grain: np.ndarray  # (H, W) float: differs from `grain` at every pixel
    allowed: np.ndarray  # (H, W) bool: where a part may lie (inside a compartment, off the rims)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], size: int) -> np.ndarray:
    """Noise of ``shape`` upsampled to size x size with Pillow's fixed-point bilinear, in [-1, 1]."""
    small = rng.integers(0, 256, size=shape, dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))
    return (big.astype(np.float64) - 127.5) / 127.5


def _scene(rng: np.random.Generator, layout: _Layout, size: int) -> _Scene:
    s = size / _REF
    theta = math.radians(-4.0 + 8.0 * rng.random())
    pose = _Pose(
        cos=math.cos(theta),
        sin=math.sin(theta),
        dx=-4.0 + 8.0 * rng.random(),
        dy=-4.0 + 8.0 * rng.random(),
        s=s,
        c=size / 2,
    )
    gain = 0.93 + 0.14 * rng.random()
    gx, gy = -0.12 + 0.24 * rng.random(), -0.12 + 0.24 * rng.random()
    tray_colour = np.asarray(layout.tray_colour) + rng.integers(-5, 6, size=3)
    table_colour = np.asarray(_TABLE_COLOUR) + rng.integers(-6, 7, size=3)

    coords = (np.arange(size, dtype=np.float64) - size / 2) / size
    light = gain * (1.0 + gx * coords[None, :] + gy * coords[:, None])
    blotch = _smooth_noise(rng, (6, 6), size)
    mottle = _smooth_noise(rng, (max(2, size // 6), max(2, size // 6)), size)
    brushed = _smooth_noise(rng, (size, max(2, size // 24)), size)
    tray_grain = rng.integers(-5, 6, size=(size, size)).astype(np.float64)
    part_grain = rng.integers(-3, 4, size=(size, size))
    shift = rng.integers(1, 7, size=(size, size))
    alt_grain = (part_grain + 3 + shift) % 7 - 3  # uniform on -3..3 and never equal to part_grain

    hw, hh = layout.half_w, layout.half_h
    xy = _tray_coords(pose, size)
    outer = _rect_mask(xy, -hw, -hh, hw, hh, corner=14.0)
    lip = _rect_mask(xy, -hw + 7, -hh + 7, hw - 7, hh - 7, corner=8.0)
    floor = _rect_mask(xy, -hw + 9, -hh + 9, hw - 9, hh - 9, corner=6.0)
    factor = np.where(floor, 1.0, np.where(lip, 1.07, 0.84))
    for x0, y0, x1, y1 in layout.dividers:
        wall = _rect_mask(xy, x0, y0 - 2, x1, y1 + 2)
        ridge = _rect_mask(xy, x0, y0 - 2, x0 + 2, y1 + 2)
        factor = np.where(ridge, 1.07, np.where(wall, 0.84, factor))
    texture = 1.0 + 0.05 * blotch + 0.035 * mottle + 0.03 * brushed
    tray = (light * factor * texture)[:, :, None] * tray_colour[None, None, :]
    table = (light * (1.0 + 0.15 * blotch[::-1] + 0.08 * mottle[:, ::-1]))[:, :, None] * table_colour[None, None, :]
    base = np.where(outer[:, :, None], tray, table) + np.where(outer, tray_grain, tray_grain * 0.6)[:, :, None]

    allowed = np.zeros((size, size), dtype=bool)
    for area in layout.areas:
        allowed |= _rect_mask(xy, *area)
    allowed = ndimage.binary_erosion(allowed, iterations=_gap_px(pose))
    return _Scene(pose, size, base, light, part_grain.astype(np.float64), alt_grain.astype(np.float64), allowed)


def _new_part(rng: np.random.Generator, layout: _Layout, kind: int, place: _Place, iid: int) -> _Part:
    """A part of type ``kind`` at ``place`` with its own random jitter (4 uniform + 3 integer draws)."""
    ptype = layout.part_types[kind - 1]
    u = rng.random(4)
    r, g, b = (np.asarray(COLOURS[ptype.colour]) + rng.integers(-6, 7, size=3)).tolist()
    return _Part(
        iid=iid,
        kind=kind,
        shape=ptype.shape,
        size=ptype.size,
        colour=(float(r), float(g), float(b)),
        x=place.x - 3.0 + 6.0 * float(u[0]),
        y=place.y - 3.0 + 6.0 * float(u[1]),
        angle=ptype.spin * (-1.0 + 2.0 * float(u[2])),
        scale=0.95 + 0.1 * float(u[3]),
        region=place.region,
    )


def _render(scene: _Scene, parts: Sequence[_Part]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``parts`` onto the scene; return (uint8 image, labels, instances).  Parts must not overlap."""
    size, pose = scene.size, scene.pose
    img = scene.base.copy()
    labels = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.uint16)
    rim_iter = max(1, round(2 * pose.s))
    for part in parts:
        fp = _part_mask(part, pose, size)
        if (instances[fp] != 0).any():
            raise AssertionError(f"part {part.iid} overlaps another part")
        rows, cols = np.nonzero(fp)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        crop = np.pad(fp[r0:r1, c0:c1], 1)
        inner = ndimage.binary_erosion(crop, iterations=rim_iter)[1:-1, 1:-1][rows - r0, cols - c0]
        pr = pose.c + pose.s * (pose.dy + part.x * pose.sin + part.y * pose.cos)
        pc = pose.c + pose.s * (pose.dx + part.x * pose.cos - part.y * pose.sin)
        reach = part.size * part.scale * pose.s
        # Light from the top left: a highlight gradient across the part and a darker bevelled rim.
        shade = 1.0 - 0.1 * ((cols - pc) * 0.6 + (rows - pr) * 0.8) / reach
        shade = shade * np.where(inner, 1.0, 0.8) * scene.light[rows, cols]
        grain = (scene.alt_grain if part.alt_grain else scene.grain)[rows, cols]
        img[rows, cols] = shade[:, None] * np.asarray(part.colour)[None, :] + grain[:, None]
        labels[rows, cols] = part.kind
        instances[rows, cols] = part.iid
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, instances


# ----------------------------------------------------------------------------- defects


def _fits(scene: _Scene, new: Sequence[_Part], others: Sequence[_Part]) -> list[np.ndarray] | None:
    """Footprints of ``new`` if they lie in the allowed area and keep a gap to each other and ``others``."""
    size, pose = scene.size, scene.pose
    taken = np.zeros((size, size), dtype=bool)
    for p in others:
        taken |= _part_mask(p, pose, size)
    fps = []
    for p in new:
        fp = _part_mask(p, pose, size)
        if not fp.any() or (fp & ~scene.allowed).any():
            return None
        fps.append(fp)
    for i, fp in enumerate(fps):
        grown = ndimage.binary_dilation(fp, iterations=_gap_px(pose))
        if (grown & taken).any() or any((grown & other).any() for other in fps[i + 1 :]):
            return None
    return fps


def _defect(
    rng: np.random.Generator, defect: str, layout: _Layout, scene: _Scene, parts: list[_Part]
) -> tuple[list[_Part], np.ndarray]:
    """Return the defective part list and the anomaly mask (before the quantisation check)."""
    size, pose = scene.size, scene.pose
    n = len(parts)
    if defect == "missing":
        i = int(rng.integers(0, n))
        return parts[:i] + parts[i + 1 :], _part_mask(parts[i], pose, size)
    if defect == "wrong_color":
        i = int(rng.integers(0, n))
        used = {t.colour for t in layout.part_types}
        right = np.asarray(parts[i].colour)
        choices = [
            name for name, rgb in COLOURS.items()
            if name not in used and np.abs(np.asarray(rgb) - right).max() >= _WRONG_COLOUR_MIN_DIST
        ]
        base = np.asarray(COLOURS[choices[int(rng.integers(0, len(choices)))]])
        r, g, b = (base + rng.integers(-6, 7, size=3)).tolist()
        new = replace(parts[i], colour=(float(r), float(g), float(b)))
        return parts[:i] + [new] + parts[i + 1 :], _part_mask(parts[i], pose, size)

    # The other defects try candidates in a random order and take the first one that fits.
    if defect == "wrong_shape":
        cands = [(i, shape) for i in range(n) for shape in _WRONG_SHAPES[parts[i].shape]]
    elif defect == "extra":
        cands = [(k, spot) for k in range(1, len(layout.part_types) + 1) for spot in layout.spots]
    elif defect == "swapped":
        cands = [(i, j) for i in range(n) for j in range(i + 1, n) if parts[i].kind != parts[j].kind]
    elif defect == "misplaced":
        cands = [(i, spot) for i in range(n) for spot in layout.spots if spot.region != parts[i].region]
    else:
        raise ValueError(f"unknown defect type {defect!r}")
    for c in rng.permutation(len(cands)).tolist():
        a, b = cands[c]
        if defect == "wrong_shape":
            old = parts[a]
            moved = [replace(old, shape=b, alt_grain=True)]
            keep, gone = parts[:a] + parts[a + 1 :], [old]
        elif defect == "extra":
            moved = [_new_part(rng, layout, a, b, max(p.iid for p in parts) + 1)]
            keep, gone = parts, []
        elif defect == "swapped":
            pa, pb = parts[a], parts[b]
            moved = [replace(pa, x=pb.x, y=pb.y, region=pb.region), replace(pb, x=pa.x, y=pa.y, region=pa.region)]
            keep, gone = [p for k, p in enumerate(parts) if k not in (a, b)], [pa, pb]
        else:  # misplaced
            old = parts[a]
            u = rng.random(2)
            moved = [replace(old, x=b.x - 3.0 + 6.0 * float(u[0]), y=b.y - 3.0 + 6.0 * float(u[1]), region=b.region)]
            keep, gone = parts[:a] + parts[a + 1 :], [old]
        fps = _fits(scene, moved, keep)
        if fps is None:
            continue
        mask = np.zeros((size, size), dtype=bool)
        for p in gone:
            mask |= _part_mask(p, pose, size)
        for fp in fps:
            mask |= fp
        new_parts = sorted([*keep, *moved], key=lambda p: p.iid)
        return new_parts, mask
    raise RuntimeError(f"no {defect} candidate fits in this layout")


def _force_change(clean: np.ndarray, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Keep ``clean`` outside ``mask`` and make every masked pixel differ from it (see the mask contract)."""
    if ((image != clean).any(axis=2) & ~mask).any():
        raise AssertionError("the defect changed pixels outside its mask")
    out = image.copy()
    weak = mask & ~(image != clean).any(axis=2)
    if weak.any():
        old = clean[weak].astype(np.int16)
        direction = np.where(old.mean(axis=1, keepdims=True) < 128, 1, -1)
        out[weak] = np.clip(old + direction * _MIN_DELTA, 0, 255).astype(np.uint8)
    return out


def render_sample(
    category: str,
    split: str,
    defect_type: str,
    index: int,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> ObjectSample:
    """Render one sample exactly as :func:`generate_objects` writes it (plus its clean version and parts)."""
    _validate(category=category, image_size=image_size, seed=seed)
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {tuple(_SPLIT_IDS)}, got {split!r}")
    if defect_type not in _KIND_IDS or (split == "train" and defect_type != "good"):
        raise ValueError(f"invalid defect type {defect_type!r} for split {split!r}")
    layout = _LAYOUTS[category]
    rng = _sample_rng(seed, category, split, defect_type, index)
    scene = _scene(rng, layout, image_size)
    parts = [_new_part(rng, layout, slot.kind, slot, i + 1) for i, slot in enumerate(layout.slots)]
    clean, labels, instances = _render(scene, parts)
    if defect_type == "good":
        return ObjectSample(
            clean=clean, image=clean, mask=np.zeros(clean.shape[:2], dtype=bool), labels=labels,
            instances=instances, defect_type="good", clean_labels=labels, clean_instances=instances,
        )
    bad_parts, mask = _defect(rng, defect_type, layout, scene, parts)
    rendered, bad_labels, bad_instances = _render(scene, bad_parts)
    image = _force_change(clean, rendered, mask)
    if not np.array_equal((image != clean).any(axis=2), mask):  # the documented contract
        raise AssertionError("defect mask does not equal the set of changed pixels")
    return ObjectSample(
        clean=clean, image=image, mask=mask, labels=bad_labels, instances=bad_instances,
        defect_type=defect_type, clean_labels=labels, clean_instances=instances,
    )


# ----------------------------------------------------------------------------- writing the tree
_validate = functools.partial(check_params, CATEGORIES)


def _save_parts(path: Path, labels: np.ndarray, instances: np.ndarray) -> None:
    """Write an ``.npz`` that ``np.load`` reads, byte-identical across runs (fixed zip timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in (("labels", labels.astype(np.uint8)), ("instances", instances.astype(np.uint16))):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=1)


def load_parts(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``parts`` ``.npz``: ``(labels uint8 [H, W], instances uint16 [H, W])``."""
    with np.load(path, allow_pickle=False) as z:
        return z["labels"], z["instances"]


def _category_summary(category: str, n_train: int, n_test_good: int, n_defect: int) -> dict:
    test = {"good": n_test_good, **{d: n_defect for d in DEFECT_TYPES}}
    return {
        "train": {"good": n_train},
        "test": test,
        "ground_truth": {d: n_defect for d in DEFECT_TYPES},
        "parts": {"train": {"good": n_train}, "test": dict(test)},
        "part_types": {str(k): v for k, v in PART_TYPES[category].items()},
        "defect_groups": dict(DEFECT_GROUPS),
    }


def generate_objects(
    root: str | os.PathLike[str],
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    n_train: int = DEFAULT_N_TRAIN,
    n_test_good: int = DEFAULT_N_TEST_GOOD,
    n_test_defect_per_type: int = DEFAULT_N_TEST_DEFECT_PER_TYPE,
    seed: int = 0,
    categories: Sequence[str] = CATEGORIES,
) -> dict:
    """Write the synthetic ``objects`` dataset under ``root`` (MVTec AD layout + part masks); return a summary.

    Idempotent: when ``root/.demo_objects.json`` records the same parameters, nothing is written.
    Otherwise only the category folders this generator owns (listed in its marker, or in the partial
    marker of an interrupted run) are removed and regenerated; a pre-existing category folder it does not
    own raises ``FileExistsError`` rather than being deleted.  The marker is written last, so an
    interrupted run is redone next time.

    Summary keys: ``root``, ``domain``, ``params``, ``categories`` (per category: counts per split and
    defect type, masks and part files per defect type, part types, defect groups), ``n_images``,
    ``n_masks``, ``n_part_files``, ``regenerated``.
    """
    root, categories, params, summary = plan(
        root, categories, _validate, version=_GENERATOR_VERSION, domain=DOMAIN, defect_types=DEFECT_TYPES,
        category_summary=lambda cat: _category_summary(cat, n_train, n_test_good, n_test_defect_per_type),
        image_size=image_size, n_train=n_train, n_test_good=n_test_good,
        n_test_defect_per_type=n_test_defect_per_type, seed=seed)
    summary["n_part_files"] = summary["n_images"]  # one part file per image

    def write_category(cat: str, base: Path) -> None:
        jobs = [("train", "good", i) for i in range(n_train)] + [("test", "good", i) for i in range(n_test_good)]
        jobs += [("test", d, i) for d in DEFECT_TYPES for i in range(n_test_defect_per_type)]
        for split, kind, i in jobs:
            s = render_sample(cat, split, kind, i, image_size=image_size, seed=seed)
            save_png(base / split / kind / f"{i:03d}.png", s.image)
            _save_parts(base / "parts" / split / kind / f"{i:03d}.npz", s.labels, s.instances)
            if kind != "good":
                save_png(base / "ground_truth" / kind / f"{i:03d}_mask.png", s.mask.astype(np.uint8) * 255)
        _write_json_atomic(base / "defect_groups.json", dict(DEFECT_GROUPS))
        _write_json_atomic(base / "part_types.json", {str(k): v for k, v in PART_TYPES[cat].items()})

    return materialize(root, categories, params, summary, write_category, marker_name=MARKER_NAME,
                       partial_name=_PARTIAL_NAME, known_categories=CATEGORIES, generator=__name__)


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: generate the dataset and print the summary as JSON."""
    return run_cli(
        argv, generate_objects, prog="python -m anomalymoe.platform.data.demo.objects",
        description="Write the built-in synthetic 'objects' anomaly dataset (MVTec AD layout + part masks).",
        categories=CATEGORIES,
        defaults={"image_size": DEFAULT_IMAGE_SIZE, "n_train": DEFAULT_N_TRAIN, "n_test_good": DEFAULT_N_TEST_GOOD,
                  "n_test_defect_per_type": DEFAULT_N_TEST_DEFECT_PER_TYPE},
    )


if __name__ == "__main__":
    raise SystemExit(main())
