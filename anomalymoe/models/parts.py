"""Part masks inside the model: what unsupervised segmentation learned per category (cluster centres over the
backbone's last-block tokens plus colour, which clusters are parts, the colour weight and assignment settings),
applied to the tokens of the model's *own* backbone pass. Training, calibration, validation, evaluation and the
scoring service all get a request's component masks here, so the component level scores the same way on every
path and needs no label maps at scoring time.

The math is the one `jobs/segment.py` uses to write label maps (platform/data/segmentation.py imports it from here):
unit-norm last-block tokens after the final norm, each token's mean colour appended with `color_weight`, softmax
over cosine similarities to the centres / `temperature`, bilinear upsampling to `out_size`, a guided filter on the
grey image, argmax; masks are the kept clusters of that label map, in kept order (slot i = kept cluster i), brought
to the input size with the same nearest-pixel rule Pillow's NEAREST resize uses for stored label maps.

Stored in the artifact as ``parts.safetensors``: one centre matrix per "domain/category" and, once fitted, its part
bank (each slot's features on normal training images, `bank_scores`), the kept clusters and the settings in its
metadata (plain JSON, never a pickle)."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from anomalymoe.models.backbone import Backbone, BackboneFeatures
from anomalymoe.models.precision import fp32

PARTS_FORMAT = "anomalymoe-parts/1"


def _box(x: Tensor, r: int) -> Tensor:
    """Mean over a (2r+1)^2 window, [B, C, H, W], edges replicated."""
    k = 2 * r + 1
    return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), k, stride=1)


def guided_filter(guide: Tensor, src: Tensor, r: int, eps: float) -> Tensor:
    """He et al.'s guided filter with a grey guide: smooths `src` [B,K,H,W] while keeping the guide's edges
    [B,1,H,W] - the cheap stand-in for the reference's dense CRF."""
    mean_i = _box(guide, r)
    mean_p = _box(src, r)
    cov_ip = _box(guide * src, r) - mean_i * mean_p
    var_i = _box(guide * guide, r) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return _box(a, r) * guide + _box(b, r)


@torch.no_grad()
def token_features(backbone: Backbone, feats: BackboneFeatures, images: Tensor, color_weight: float) -> Tensor:
    """[B, C(+3), h, w] unit-norm last-block tokens after the final norm, from a backbone pass already made.
    color_weight > 0 appends each token's mean colour (centred at grey): DINO features alone merge small parts of
    different colour with their surroundings (measured on the objects demo: best-match part IoU 0.48 -> 0.71 with
    weight 2). `images`: the [0, 1] input of that pass."""
    with fp32(images.device):
        tokens = backbone.vit.norm(feats.last.float())
        f = F.normalize(feats.to_map(tokens), dim=1)
        if color_weight > 0:
            if images.shape[-2:] != (backbone.cfg.img_size,) * 2:
                images = F.interpolate(images.float(), size=(backbone.cfg.img_size,) * 2, mode="bilinear",
                                       align_corners=False)
            colour = F.adaptive_avg_pool2d(images.float(), f.shape[-2:]) - 0.5
            f = F.normalize(torch.cat([f, color_weight * colour], 1), dim=1)
    return f


@torch.no_grad()
def assign(feats: Tensor, centers: Tensor, images: Tensor, out_size: int, refine: bool = True,
           temperature: float = 0.05) -> Tensor:
    """Label maps [B, S, S] uint8 with values 1..k (cluster index + 1).

    Soft assignment = softmax over cosine similarities / temperature at the token grid, bilinearly
    upsampled, optionally refined by a guided filter on the image, then argmax."""
    with fp32(images.device):
        sim = torch.einsum("bchw,kc->bkhw", feats.float(), centers.to(feats.device, torch.float32))
        soft = (sim / temperature).softmax(1)
        soft = F.interpolate(soft, size=(out_size, out_size), mode="bilinear", align_corners=False)
        if refine:
            grey = F.interpolate(images.float().mean(1, keepdim=True), size=(out_size, out_size), mode="bilinear",
                                 align_corners=False)
            r = max(1, out_size // 64)
            soft = guided_filter(grey, soft, r=r, eps=1e-3)
    return (soft.argmax(1) + 1).to(torch.uint8)


@functools.cache
def _nearest_index(src: int, dst: int) -> tuple[int, ...]:
    """The source pixel Pillow's NEAREST resize takes for each of `dst` output pixels (read off a resized ramp:
    Pillow's fixed-point rounding sends some ties the other way than any float formula)."""
    ramp = Image.fromarray(np.arange(src, dtype=np.int32)[None].repeat(2, 0), mode="I")
    return tuple(int(v) for v in np.asarray(ramp.resize((dst, 2), Image.NEAREST))[0])


def resize_labels(labels: Tensor, size: int) -> Tensor:
    """[B, S, S] label maps to [B, size, size] exactly as Pillow's NEAREST resize does it (how a stored label map is
    read through the model's frame), as a gather on the maps' device."""
    if labels.shape[-1] == size:
        return labels
    idx = torch.tensor(_nearest_index(labels.shape[-1], size), device=labels.device)
    return labels.index_select(-1, idx).index_select(-2, idx)


def slot_masks(labels: Tensor, kept: list[int]) -> Tensor:
    """[S, S] (or [B, S, S]) label map (1..k) -> [K, S, S] (or [B, K, S, S]) bool masks, one per kept cluster in
    kept order: row i is always cluster kept[i] (the model's component slot i), and an empty row is a missing
    part, which the model scores as an anomaly."""
    if not kept:
        return torch.zeros(*labels.shape[:-2], 0, *labels.shape[-2:], dtype=torch.bool, device=labels.device)
    ids = torch.tensor([j + 1 for j in kept], dtype=labels.dtype, device=labels.device)
    return labels.unsqueeze(-3) == ids.view(-1, 1, 1)


def component_masks(labels: Tensor | np.ndarray, kept: list[int], drop_empty: bool = False) -> Tensor:
    """A stored [S, S] label map (1..k) -> [K, S, S] bool masks, one per kept cluster in kept order (slot_masks):
    row i is always cluster kept[i] (the model's component slot i), and an empty slot is a missing part."""
    masks = slot_masks(torch.as_tensor(np.array(labels)), kept)  # a copy: PIL arrays are read-only
    if drop_empty and masks.numel():
        masks = masks[masks.flatten(1).any(1)]
    return masks


@dataclass
class PartParams:
    """How tokens become label maps (the assignment half of segmentation.SegmentParams)."""

    color_weight: float = 2.0
    temperature: float = 0.05
    refine: bool = True
    out_size: int = 256


@dataclass
class CategoryParts:
    centers: Tensor  # [k, C(+3)] float32, unit rows
    kept: list[int]  # clusters (0-based) that are parts, in slot order
    info: dict = field(default_factory=dict)  # how it was fitted (images, votes, source), for the log and the card
    # what each part looks like on normal training images: [N, K, C] float16 unit slot features (the component
    # experts' input), a zero row where that image lacked the slot; None until calibration.fit_part_bank (bank_scores)
    bank: Tensor | None = None
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (bank, its copy there)

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    def bank_on(self, device: torch.device) -> Tensor | None:
        """The bank on `device`, copied once per device (and again only after the bank is refitted)."""
        if self.bank is None:
            return None
        held = self._on_device.get(str(device))
        if held is None or held[0] is not self.bank:
            held = (self.bank, self.bank.to(device))
            self._on_device[str(device)] = held
        return held[1]


def bank_scores(bank: Tensor, feats: Tensor) -> Tensor:
    """[K] (or [M, K]) 1 - the best cosine similarity of each slot feature ([K, C], or [M, K, C] for M images of one
    category) to the same slot in the bank's normal images ([N, K, C] unit rows; an image that lacked the slot does
    not count); NaN for a slot no bank image has.
    The nearest normal part, PatchCore's rule per part: a part of another shape or colour is far from every normal
    instance of its slot, while the component experts' reconstruction of it, trained for a few hundred steps, is not
    yet that sharp (measured on the objects demo: docs and README)."""
    with fp32(feats.device):  # float64: a score divided by a narrow normal range must not depend on the batch size
        b = bank.to(feats.device, torch.float64)
        f = F.normalize(feats.double(), dim=-1)
        one = f.ndim == 2
        sim = torch.einsum("nkc,mkc->mnk", b, f[None] if one else f)
        sim = sim.masked_fill((b.abs().sum(2) == 0)[None], -math.inf).amax(1)
        sim = torch.where(torch.isfinite(sim), 1 - sim, torch.full_like(sim, math.nan)).float()
        return sim[0] if one else sim


class Parts:
    """Per-category part segmentation, applied to the model's own backbone pass."""

    def __init__(self, params: PartParams | None = None, categories: dict[str, CategoryParts] | None = None):
        self.params = params or PartParams()
        self.categories: dict[str, CategoryParts] = dict(categories or {})

    def __bool__(self) -> bool:
        return bool(self.categories)

    def covers(self, category: str | None) -> bool:
        return category is not None and category in self.categories

    def label_maps(self, backbone: Backbone, feats: BackboneFeatures, images: Tensor, categories: list[str]
                   ) -> Tensor:
        """[B, out_size, out_size] uint8 label maps (1..k) of images that all belong to covered categories."""
        p = self.params
        tok = token_features(backbone, feats, images, p.color_weight)
        out = torch.zeros(len(categories), p.out_size, p.out_size, dtype=torch.uint8, device=images.device)
        for cat in sorted(set(categories)):
            rows = [i for i, c in enumerate(categories) if c == cat]
            idx = torch.tensor(rows, device=images.device)
            out[idx] = assign(tok[idx], self.categories[cat].centers, images[idx], p.out_size, p.refine,
                              p.temperature)
        return out

    def masks(self, backbone: Backbone, feats: BackboneFeatures, images: Tensor, categories: list[str | None]
              ) -> list[Tensor | None]:
        """Component masks [K, H, W] (H, W: the input size) per image; None for an image whose category has no
        parts (no category, or one segmentation never saw)."""
        rows = [i for i, c in enumerate(categories) if self.covers(c)]
        out: list[Tensor | None] = [None] * len(categories)
        if not rows:
            return out
        idx = torch.tensor(rows, device=images.device)
        sub = BackboneFeatures([], feats.cls[idx], feats.num_prefix, feats.grid, feats.last[idx])
        labels = resize_labels(self.label_maps(backbone, sub, images[idx], [categories[i] for i in rows]),
                               images.shape[-1])
        for j, i in enumerate(rows):
            out[i] = slot_masks(labels[j], self.categories[categories[i]].kept)
        return out

    # ------------------------------------------------------------------------------------------ storage
    def state(self) -> dict:
        """Plain data (what a Ray Train worker receives; save() writes the same)."""
        return {"params": asdict(self.params),
                "categories": {k: {"centers": v.centers.detach().cpu().float().numpy(), "kept": list(v.kept),
                                   "info": v.info, "bank": None if v.bank is None else v.bank.cpu().numpy()}
                               for k, v in self.categories.items()}}

    @classmethod
    def from_state(cls, state: dict | None) -> Parts:
        if not state:
            return cls()
        return cls(PartParams(**state["params"]),
                   # copies: a state that crossed Ray's object store holds read-only arrays
                   {k: CategoryParts(torch.tensor(v["centers"], dtype=torch.float32), [int(j) for j in v["kept"]],
                                     v.get("info", {}),
                                     None if v.get("bank") is None else torch.tensor(v["bank"], dtype=torch.float16))
                    for k, v in state["categories"].items()})

    def save(self, path: str | Path) -> None:
        tensors = {f"centers/{k}": v.centers.detach().cpu().float().contiguous() for k, v in self.categories.items()}
        tensors |= {f"bank/{k}": v.bank.cpu().half().contiguous() for k, v in self.categories.items()
                    if v.bank is not None}
        meta = {"format": PARTS_FORMAT, "params": json.dumps(asdict(self.params)),
                "kept": json.dumps({k: v.kept for k, v in self.categories.items()}),
                "info": json.dumps({k: v.info for k, v in self.categories.items()})}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Parts:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PARTS_FORMAT:
                raise ValueError(f"{path}: not a parts file (format {meta.get('format')!r}, expected {PARTS_FORMAT})")
            kept, info = json.loads(meta["kept"]), json.loads(meta.get("info", "{}"))
            names = set(f.keys())
            cats = {k: CategoryParts(f.get_tensor(f"centers/{k}"), [int(j) for j in kept[k]], info.get(k, {}),
                                     f.get_tensor(f"bank/{k}") if f"bank/{k}" in names else None)
                    for k in kept}
        for k, c in cats.items():
            if any(not 0 <= j < c.k for j in c.kept):
                raise ValueError(f"{path}: {k} keeps clusters {c.kept} of only {c.k}")
            if c.bank is not None and (c.bank.ndim != 3 or c.bank.shape[1] != len(c.kept)):
                raise ValueError(f"{path}: {k}'s part bank has shape {tuple(c.bank.shape)}, expected [N, "
                                 f"{len(c.kept)}, C]")
        return cls(PartParams(**json.loads(meta["params"])), cats)
