"""How a stored image becomes model input, one implementation for training, evaluation and serving: `Frame` (the
geometry: squash with the reference's resize + centre crop, or letterbox; and the intensity mapping), `Framing`
(each category's frame, from a model's InputConfig), `to_rgb8` (EXIF, 16-bit and single-channel values), decoding
(`decode_sized`: JPEG draft mode for large images, the image's own size kept) and the shared decode thread pool."""

from __future__ import annotations

import dataclasses
import functools
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor


@dataclass(frozen=True)
class Frame:
    """How a stored image becomes model input.

    aspect "squash": resized to `resize` x `resize`, then the centre `size` x `size` cut out (the reference's
    Resize(448) + CenterCrop(392)); `resize=None` resizes straight to `size`. "letterbox": the whole image fitted
    into `size` x `size` with its aspect ratio kept, centred, the rest black (`resize` is not used: a crop would cut
    a long part's ends). intensity: how single-channel values become 0..255 (to_rgb8). Label maps and ground-truth
    masks go through the same geometry (nearest), so they stay aligned."""

    size: int
    resize: int | None = None
    aspect: str = "squash"
    intensity: str | tuple[float, float] = "type"

    def __post_init__(self):
        if self.size <= 0 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"need 0 < size <= resize, got size={self.size} resize={self.resize}")
        if self.aspect not in ("squash", "letterbox"):
            raise ValueError(f"aspect must be 'squash' or 'letterbox', got {self.aspect!r}")

    @classmethod
    def of(cls, frame: int | Frame | Framing) -> Frame | Framing:
        return frame if isinstance(frame, (Frame, Framing)) else cls(int(frame))

    @classmethod
    def for_backbone(cls, cfg) -> Frame:
        """The input geometry of a BackboneConfig (img_size, optional resize before the centre crop)."""
        return cls(cfg.img_size, cfg.resize)

    def for_key(self, key: str | None) -> Frame:
        """The frame of a "domain/category" (one Frame is every category's)."""
        return self

    def scaled(self, size: int) -> Frame:
        """The same geometry at another output size (ground truth read at the anomaly map's size)."""
        if self.resize is None or size == self.size:
            return dataclasses.replace(self, size=size)
        return dataclasses.replace(self, size=size, resize=max(size, round(self.resize * size / self.size)))

    def whole(self) -> Frame:
        """This frame without the centre crop (what part segmentation fits on: label maps cover the whole image)."""
        return dataclasses.replace(self, resize=None)

    def content_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): where a width x height image lies in this frame's square (all of it unless
        letterboxed)."""
        s = self.size
        if self.aspect != "letterbox" or width == height:
            return 0, 0, s, s
        scale = s / max(width, height)
        w, h = max(1, min(s, round(width * scale))), max(1, min(s, round(height * scale)))
        x0, y0 = (s - w) // 2, (s - h) // 2
        return x0, y0, x0 + w, y0 + h

    def apply(self, im: Image.Image, resample: int, original: tuple[int, int] | None = None) -> Image.Image:
        """`im` through this frame; `original`: the image's own (width, height) when `im` is a reduced decode of it
        (the letterbox box is the original's, as every other path computes it)."""
        if self.aspect == "letterbox":
            x0, y0, x1, y1 = self.content_box(*(original or im.size))
            if (x1 - x0, y1 - y0) == (self.size, self.size):
                return im.resize((self.size, self.size), resample)
            canvas = Image.new(im.mode, (self.size, self.size), 0)
            canvas.paste(im.resize((x1 - x0, y1 - y0), resample), (x0, y0))
            return canvas
        full = self.resize or self.size
        im = im.resize((full, full), resample)
        if self.resize is None:
            return im
        off = (full - self.size) // 2
        return im.crop((off, off, off + self.size, off + self.size))

    def restore(self, im: Image.Image, width: int, height: int, max_side: int = 1024) -> Image.Image:
        """An image in this frame's geometry (a map or overlay of any square size) back in the original image's
        geometry: its aspect ratio, and its size up to `max_side` on the long side. What the centre crop cut off is
        black; a letterbox's border is dropped."""
        f = self.scaled(im.size[0])
        if f.aspect == "letterbox":
            im = im.crop(f.content_box(width, height))
        elif f.resize is not None:
            off = (f.resize - f.size) // 2
            canvas = Image.new(im.mode, (f.resize, f.resize), 0)
            canvas.paste(im, (off, off))
            im = canvas
        scale = min(1.0, max_side / max(width, height))
        return im.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)


@dataclass(frozen=True)
class Framing:
    """Every category's Frame: the model-wide one, and the categories whose InputConfig overrides it. Anything
    that takes a frame takes a Framing and picks each row's by its "domain/category"."""

    default: Frame
    categories: tuple[tuple[str, Frame], ...] = ()

    @classmethod
    def for_model(cls, cfg) -> Framing:
        """A ModelConfig's framing: its backbone's input size and crop, its InputConfig per category."""
        base = Frame.for_backbone(cfg.backbone)

        def frame(key: str | None) -> Frame:
            aspect, intensity = cfg.input.for_category(key)
            return dataclasses.replace(base, aspect=aspect,
                                       intensity=tuple(intensity) if isinstance(intensity, list) else intensity)

        return cls(frame(None), tuple((k, frame(k)) for k in sorted(cfg.input.categories)))

    @property
    def size(self) -> int:
        return self.default.size

    def for_key(self, key: str | None) -> Frame:
        return dict(self.categories).get(key or "", self.default)

    def scaled(self, size: int) -> Framing:
        return Framing(self.default.scaled(size), tuple((k, f.scaled(size)) for k, f in self.categories))


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb8(im: Image.Image, intensity: str | tuple[float, float] = "type") -> Image.Image:
    """Any image Pillow opens -> 8-bit RGB as a person would see it: EXIF orientation applied (a phone or camera
    photo stored sideways is turned upright); grey, palette and alpha images to RGB (alpha dropped).
    Single-channel values are mapped to 0..255 by `intensity` (InputConfig): "type" = the container's range
    (16-bit 0..65535, float 0..1 or 0..max, 8-bit as is) instead of Pillow's clip to 255 (a 16-bit image went
    near-white); "image" = the image's own min..max; (lo, hi) = that fixed span, values outside clipped."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _HIGH_DEPTH or (im.mode == "L" and intensity != "type"):
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if intensity == "image":
            lo, hi = (float(a.min()), top) if a.size else (0.0, 1.0)
        elif intensity != "type":
            lo, hi = float(intensity[0]), float(intensity[1])
        elif im.mode == "F":
            lo, hi = min(0.0, float(a.min()) if a.size else 0.0), (1.0 if top <= 1.0 else top)
        else:  # 16-bit containers (Pillow opens them as I;16 or I), or 32-bit integers beyond that range
            lo, hi = 0.0, (65535.0 if top <= 65535 else top)
        a = np.clip(np.rint((a - lo) * (255.0 / max(hi - lo, 1e-12))), 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "L")
    return im.convert("RGB")


def decode_sized(data: bytes, frame: Frame) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded bytes -> (uint8 [size, size, 3] through the frame, the upright image's (width, height)).

    A JPEG much larger than the frame is decoded at a reduced scale (Pillow's draft mode: 1/2, 1/4 or 1/8 in the
    DCT, never below the frame's side): a 24 MP JPEG scaled to 224 px decodes 6x faster (0.29 s -> 0.05 s), pixel
    values within 4/255 of the full decode (mean 0.55). Every path decodes here (training, evaluation, serving),
    so all see the same pixels; the size returned is the image's own, not the draft's."""
    with Image.open(io.BytesIO(data)) as im:
        own = im.size
        if im.format == "JPEG":
            side = frame.resize or frame.size
            im.draft(im.mode, (side, side))
            if _exif_turns(im):
                own = own[::-1]
        else:
            own = None
        rgb = to_rgb8(im, frame.intensity)
        if own is None:
            own = rgb.size
        return np.asarray(frame.apply(rgb, Image.BILINEAR, own)), own


def _exif_turns(im: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height (5-8: a quarter turn)."""
    try:
        return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as exif_transpose ignores it
        return False


def decode_rgb(data: bytes, frame: int | Frame) -> np.ndarray:
    """Encoded bytes -> uint8 [size, size, 3] through the frame's geometry (what Ray decode tasks ship; the scoring
    service decodes through it too). Pixels as they are: to_rgb8."""
    return decode_sized(data, Frame.of(frame))[0]


def decode_image(data: bytes, frame: int | Frame) -> Tensor:
    """Encoded bytes -> [3, size, size] float in [0, 1]."""
    return to_tensor(decode_rgb(data, frame))


def to_tensor(rgb: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] -> [3, H, W] float in [0, 1] (the one conversion every path uses: bit-identical input)."""
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def decode_label_map(data: bytes, frame: int | Frame, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A stored label map or mask through the frame (nearest). `image_size`: the (width, height) of the image it
    labels, for a letterbox frame when the map is stored at another shape (jobs/segment.py writes square maps)."""
    frame = Frame.of(frame)
    with Image.open(io.BytesIO(data)) as im:
        if frame.aspect == "letterbox" and image_size is not None and im.size != tuple(image_size):
            im = im.resize(tuple(image_size), Image.NEAREST)
        return np.asarray(frame.apply(im, Image.NEAREST))


@functools.cache
def decode_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="decode")
