"""AnomalyMoE: a frozen ViT feeding patch, global and component experts, picked per image by a router.

Sparse execution: each expert runs only on the samples routed to it (the batch is grouped per expert),
in training and inference. ``execution="dense"`` runs every expert on every sample and zero-weights the
unselected ones, as the reference code does; both give the same outputs for the selected experts."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalymoe.models import layout
from anomalymoe.models.backbone import Backbone, BackboneFeatures
from anomalymoe.models.config import LEVELS, ModelConfig
from anomalymoe.models.experts.component import ComponentExpert, component_features, stack_masks
from anomalymoe.models.experts.global_ import GlobalExpert
from anomalymoe.models.experts.patch import PatchExpert
from anomalymoe.models.losses import (
    MIEstimator,
    component_loss,
    esb_loss,
    global_loss,
    hard_mining_cosine,
    hard_mining_p,
)
from anomalymoe.models.parts import Parts, bank_scores
from anomalymoe.models.precision import autocast, fp32
from anomalymoe.models.router import Router, Routing
from anomalymoe.models.scoring import (
    Calibration,
    LevelNorm,
    fuse,
    smooth,
    top_ratio_score,
)


@dataclass
class PatchOut:
    idx: Tensor  # samples this expert ran on (on the model's device)
    de: list[Tensor]  # per fuse group [n, C, h, w]
    rows: list[int] | None = None  # the same samples, known on the host (no device sync to read them)

    def feature(self) -> Tensor:  # pooled last group, used by EIR
        return self.de[-1].mean((2, 3))


@dataclass
class GlobalOut:
    idx: Tensor
    ae: Tensor  # [n, C, h, w]
    student: Tensor
    rows: list[int] | None = None

    def feature(self) -> Tensor:
        return self.student.mean((2, 3))


@dataclass
class ComponentOut:
    cidx: Tensor  # components (rows of MoEOutput.comp_feats) this expert ran on
    recon: Tensor  # [n_c, C]


@dataclass
class MoEOutput:
    routing: Routing
    en_groups: list[Tensor]  # reconstruction targets per fuse group, [B, C, h, w]
    patch: dict[int, PatchOut]
    global_: dict[int, GlobalOut]
    component: dict[int, ComponentOut]
    comp_feats: Tensor  # [K, C] float32
    comp_owner: Tensor  # [K] image index of each component
    comp_valid: Tensor  # [K] the component's mask is not empty (else: a missing part)
    masks: list[Tensor | None]
    batch_size: int
    grid: tuple[int, int]
    global_target: Tensor | None = None  # [B, C, h, w] (rows only for samples that need it)
    eir_pairs: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    n_valid: int = 0  # comp_valid.sum(), read once on the host with the routing mask
    comp_colour: Tensor | None = None  # [K, 3] mean RGB inside each component row's mask (NaN where empty)
    categories: list[str | None] | None = None  # "domain/category" per image, as forward() was given them


def _host_rows(col: Tensor) -> list[int]:
    return col.nonzero(as_tuple=True)[0].tolist()


# Raw score of an empty component slot: 1 - cos(reconstruction, 0) for a zero feature.
MISSING_PART_SCORE = 1.0


class AnomalyMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: Backbone | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else Backbone(cfg.backbone)
        dim, bb = self.backbone.embed_dim, self.backbone
        heads = max(1, dim // 64)
        groups = len(cfg.backbone.fuse_groups)
        self.patch_experts = nn.ModuleList(PatchExpert(dim, heads, groups, cfg.patch) for _ in range(cfg.patch.num))
        self.global_experts = nn.ModuleList(
            GlobalExpert(dim, cfg.backbone.img_size, bb.patch_size, cfg.global_) for _ in range(cfg.global_.num)
        )
        self.component_experts = nn.ModuleList(ComponentExpert(dim, cfg.component) for _ in range(cfg.component.num))
        self.router = Router(dim, cfg.num_experts, cfg.router)
        self.mi_estimator = MIEstimator(dim)
        # fitted on normal images (calibration.fit_calibration), saved as calibration.json
        self.calibration = Calibration()
        # per-category part segmentation (models/parts.py), saved as parts.safetensors: an image of a category it
        # covers gets its component masks from the model's own backbone pass, on every path; its part bank is fitted
        # by calibration.fit_part_bank
        self.parts = Parts()
        # mixed precision of predict / calibration: None = the device's rule (bf16 autocast on CUDA, float32 on a
        # CPU; precision.py), or "bf16" / "fp32". Not part of the config: the same artifact runs on either device.
        self.inference_precision: str | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        """Reference init: trunc-normal(0.01) Linear weights in experts and gate, zero bias; convs default.
        With component.init="pytorch" the component experts keep their construction-time (Kaiming-uniform)
        init, but the same random numbers are drawn: the choice changes nothing else (the router's init, and
        with it the routing of a short run, stays the same)."""
        keep = ({k: v.clone() for k, v in self.component_experts.state_dict().items()}
                if self.cfg.component.init != "reference" else None)
        for mod in [self.patch_experts, self.component_experts, self.router]:
            for m in mod.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        if keep is not None:
            self.component_experts.load_state_dict(keep)

    # ----------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything the artifact stores: experts and router (not the frozen backbone, not the MI
        estimator, which only matters during training)."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("backbone.", "mi_estimator."))}

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith(("backbone.", "mi_estimator."))]

    def _ran_on(self, mask_host: Tensor, j: int) -> list[int]:
        if self.cfg.execution == "dense":
            return list(range(mask_host.shape[0]))
        return _host_rows(mask_host[:, j])

    def to_device(self, device: str | torch.device) -> AnomalyMoE:
        """Move to `device`; on CUDA the convolutional global experts use channels_last (cuDNN's NHWC kernels
        for bf16; NCHW made cuDNN fall back to implicit-GEMM kernels and convert layouts around every conv)."""
        dev = torch.device(device)
        self.to(dev)
        if dev.type == "cuda":
            self.global_experts.to(memory_format=torch.channels_last)
        return self

    def forward(
        self,
        images: Tensor,
        masks: list[Tensor | None] | None = None,
        images_ae: Tensor | None = None,
        *,
        step: int = 0,
        compute_targets: bool | None = None,
        feats: BackboneFeatures | None = None,
        categories: list[str | None] | None = None,
    ) -> MoEOutput:
        """images: [B,3,S,S] in [0,1]. masks: component masks per image ([K,H,W], K may be 0) or None.
        categories: "domain/category" per image; an image without given masks whose category `self.parts` covers
        gets its masks from this forward's own backbone pass (models/parts.py).
        images_ae: the colour-jittered view for global experts (training); defaults to `images`.
        compute_targets: run the backbone on images_ae for the global experts' training target
        (default: in training mode). At inference there is exactly one backbone pass."""
        b = images.shape[0]
        dev = images.device
        masks = list(masks) if masks is not None else [None] * b
        feats = feats if feats is not None else self.backbone(images)
        if self.parts and categories is not None:
            need = [c if masks[i] is None else None for i, c in enumerate(categories)]
            if any(self.parts.covers(c) for c in need):
                derived = self.parts.masks(self.backbone, feats, images, need)
                masks = [m if m is not None else d for m, d in zip(masks, derived, strict=True)]
        available = torch.ones(b, self.router.total, dtype=torch.bool, device=dev)
        has_parts = torch.tensor([m is not None and m.shape[0] > 0 for m in masks], device=dev)
        available[:, self.router.level_slices["component"]] = has_parts[:, None]
        routing = self.router(feats.cls, available)
        groups = self.cfg.backbone.fuse_groups
        en_groups = [feats.to_map(feats.fuse(g)) for g in groups]
        fused_all = feats.fuse()
        sl = routing.level_slices
        comp_feats, owner, valid = component_features(feats.to_map(fused_all), masks, self.cfg.component.dilation)
        # Dispatch: the routing mask and the component validity reach the host in ONE copy; every expert's rows
        # are then known on the host (one device sync per forward instead of one `nonzero` per expert).
        host = torch.cat([routing.mask.flatten(), valid]).cpu()
        mask_h, valid_h = host[: routing.mask.numel()].view_as(routing.mask), host[routing.mask.numel():]

        def on_device(rows: list[int]) -> Tensor:
            return torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)

        # Patch experts
        patch: dict[int, PatchOut] = {}
        for j in range(self.cfg.patch.num):
            rows = self._ran_on(mask_h, sl["patch"].start + j)
            if rows:
                idx = on_device(rows)
                patch[j] = PatchOut(idx, [feats.to_map(d) for d in self.patch_experts[j](fused_all[idx])], rows)

        # Global experts: normalised (jittered, in training) view; target = backbone map of that view
        ae_view = images if images_ae is None else images_ae
        ae_norm = self.backbone.normalize(ae_view)
        if ae_norm.is_cuda:
            ae_norm = ae_norm.contiguous(memory_format=torch.channels_last)
        glob: dict[int, GlobalOut] = {}
        for j in range(self.cfg.global_.num):
            rows = self._ran_on(mask_h, sl["global"].start + j)
            if rows:
                idx = on_device(rows)
                glob[j] = GlobalOut(idx, *self.global_experts[j](ae_norm[idx]), rows)
        if compute_targets is None:
            compute_targets = self.training
        target = None
        if compute_targets and glob:
            need = on_device(sorted({r for g in glob.values() for r in g.rows}))
            target = en_groups[-1].new_zeros(en_groups[-1].shape)
            if images_ae is None:
                target[need] = en_groups[-1][need]
            else:  # second backbone pass, only on the samples a global expert ran on
                f_ae = self.backbone(images_ae[need])
                target[need] = f_ae.to_map(f_ae.fuse(groups[-1])).to(target.dtype)

        # Component experts: only on non-empty slots (an empty slot is a missing part, scored in level_maps)
        owner_h = torch.repeat_interleave(torch.arange(b), torch.tensor([0 if m is None else m.shape[0]
                                                                         for m in masks]))
        comp: dict[int, ComponentOut] = {}
        if bool(valid_h.any()):
            for j in range(self.cfg.component.num):
                col = mask_h[:, sl["component"].start + j]
                crow = _host_rows(valid_h if self.cfg.execution == "dense" else valid_h & col[owner_h])
                if crow:
                    cidx = on_device(crow)
                    comp[j] = ComponentOut(cidx, self.component_experts[j](comp_feats[cidx]))

        colours = layout.slot_colours(images, masks)
        out = MoEOutput(routing, en_groups, patch, glob, comp, comp_feats, owner, valid, masks, b, feats.grid,
                        target, n_valid=int(valid_h.sum()),
                        comp_colour=torch.cat(colours) if colours else None, categories=categories)
        if self.training and self.cfg.loss.lambda_eir > 0:
            out.eir_pairs = self._eir_pairs(out, fused_all, ae_norm, feats)
        return out

    def _eir_pairs(self, out: MoEOutput, fused_all: Tensor, ae_norm: Tensor, feats: BackboneFeatures
                   ) -> dict[str, tuple[Tensor, Tensor]]:
        """Pooled features of one random pair of *active* experts per level, on the union of their
        samples. In sparse mode a sample routed to only one of the two is run through the other too
        (one extra expert pass on a few samples), so the bound compares both experts on the same inputs."""
        pairs = {}
        for level, outs in (("patch", out.patch), ("global", out.global_)):
            active = sorted(outs)
            if len(active) < 2:
                continue
            i, j = random.sample(active, 2)
            union = sorted(set(outs[i].rows) | set(outs[j].rows))
            if len(union) < 2:
                continue
            pairs[level] = (self._feature_on(level, i, outs[i], union, fused_all, ae_norm, feats),
                            self._feature_on(level, j, outs[j], union, fused_all, ae_norm, feats))
        return pairs

    def _feature_on(self, level: str, j: int, have: PatchOut | GlobalOut, union: list[int], fused_all: Tensor,
                    ae_norm: Tensor, feats: BackboneFeatures) -> Tensor:
        dev = fused_all.device
        pos = {s: k for k, s in enumerate(have.rows)}
        missing_rows = [s for s in union if s not in pos]
        base = have.feature()
        if not missing_rows:
            return base[torch.tensor([pos[s] for s in union], device=dev)]
        missing = torch.tensor(missing_rows, dtype=torch.long, device=dev)
        if level == "patch":
            extra = PatchOut(missing, [feats.to_map(d) for d in self.patch_experts[j](fused_all[missing])]).feature()
        else:
            extra = GlobalOut(missing, *self.global_experts[j](ae_norm[missing])).feature()
        rows = torch.cat([base, extra.to(base.dtype)])
        order = {s: k for k, s in enumerate(have.rows + missing_rows)}
        return rows[torch.tensor([order[s] for s in union], device=dev)]

    # ----------------------------------------------------------------------------------------------
    def losses(self, out: MoEOutput, step: int = 0) -> dict[str, Tensor]:
        """Total loss and its parts. Every expert term is weighted by the per-sample routing weight, so
        the router learns from reconstruction as well as from ESB; unrouted experts get no gradient."""
        cfg, r = self.cfg.loss, out.routing
        b = out.batch_size
        sl = r.level_slices
        zero = r.logits.new_zeros(())
        p = hard_mining_p(step, cfg.p_hm, cfg.p_warmup_steps)
        l_patch = zero
        for j, po in out.patch.items():
            w = r.weights[po.idx, sl["patch"].start + j]
            per = hard_mining_cosine([e[po.idx] for e in out.en_groups], po.de, p, cfg.factor_hm)
            l_patch = l_patch + (w * per).sum() / b
        l_global = zero
        if out.global_ and out.global_target is None:
            raise ValueError("global experts ran but no training target was computed (compute_targets=False)")
        for j, go in out.global_.items():
            w = r.weights[go.idx, sl["global"].start + j]
            per = global_loss(go.ae, go.student, out.global_target[go.idx])
            l_global = l_global + (w * per).sum() / b
        l_comp = zero
        n_comp = max(1, out.n_valid)
        for j, co in out.component.items():
            w = r.weights[out.comp_owner[co.cidx], sl["component"].start + j]
            per = component_loss(co.recon, out.comp_feats[co.cidx])
            l_comp = l_comp + (w * per).sum() / n_comp
        esb = esb_loss(r.logits, r.mask, cfg.esb_load, cfg.esb_importance, cfg.esb_z)
        eir = self.mi_estimator.bound(out.eir_pairs) if out.eir_pairs else zero
        total = (cfg.w_patch * l_patch + cfg.w_global * l_global + cfg.w_component * l_comp
                 + cfg.lambda_esb * esb["esb"] + cfg.lambda_eir * eir)
        return {"loss": total, "patch": l_patch.detach(), "global": l_global.detach(),
                "component": l_comp.detach(), "eir": eir.detach(), **{k: v.detach() for k, v in esb.items()}}

    # ----------------------------------------------------------------------------------------------
    def component_scores(self, out: MoEOutput) -> tuple[Tensor, Tensor]:
        """Per component row (all images' slots, concatenated): the routing-weighted mean of the selected
        experts' 1 - cos, and whether the image's component level was routed at all. An empty slot
        (a missing part) scores MISSING_PART_SCORE, the value of 1 - cos against a zero feature.
        Float32 accumulators and sources, autocast off (precision.py)."""
        r, sl = out.routing, out.routing.level_slices
        k = out.comp_feats.shape[0]
        with fp32(out.comp_feats.device):
            s = out.comp_feats.new_zeros(k, dtype=torch.float32)
            mass = torch.zeros_like(s)
            for j, co in out.component.items():
                wj = r.weights[out.comp_owner[co.cidx], sl["component"].start + j].float()
                s.index_add_(0, co.cidx, wj * component_loss(co.recon.float(), out.comp_feats[co.cidx].float()))
                mass.index_add_(0, co.cidx, wj)
        valid = out.comp_valid
        routed = r.mask[out.comp_owner][:, sl["component"]].any(1)
        s = torch.where(valid, s / mass.clamp_min(1e-12), torch.full_like(s, MISSING_PART_SCORE))
        return s, routed & ((mass > 0) | ~valid)

    def level_maps(self, out: MoEOutput, size: int, slot_norm: Tensor | None = None,
                   lay: tuple[Tensor, Tensor] | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """Raw per-level anomaly maps [B, size, size] (float32) and a [B, 3] bool of which levels the router used.

        Inside a level, the map is the routing-weighted mean of the selected experts' maps (weights
        renormalised within the level), so a level's scale does not depend on how much routing mass it
        got; how levels are combined is the scoring config's explicit fusion rule (METHOD.md §5 #8).
        slot_norm: [K, 3] (low, high, presence) per component row (Calibration.slot_rows); component scores
        become (s - low) / (high - low), clamped at 0, before they are painted (see _normalize_slots).
        lay: (priors, norms) per component row (layout.layout_rows): each slot's layout score is painted on its
        unexpected cells, and the component map is the pixel-wise max of what the parts look like and where they are.
        Computed in float32 with autocast off, without a host synchronisation."""
        with fp32(out.en_groups[0].device):
            return self._level_maps(out, size, slot_norm, lay)

    def _stacked_masks(self, out: MoEOutput, size: int) -> Tensor:
        """[sum K, size, size] float32: every image's component masks at the map size, in component-row order."""
        counted = [m for m in out.masks if m is not None and m.shape[0] > 0]
        if not counted:
            return out.comp_feats.new_zeros(0, size, size, dtype=torch.float32)
        return stack_masks(counted, lambda x: F.interpolate(x, size=(size, size), mode="nearest"))

    def _level_maps(self, out: MoEOutput, size: int, slot_norm: Tensor | None,
                    lay: tuple[Tensor, Tensor] | None) -> tuple[dict[str, Tensor], Tensor]:
        r, sl, b = out.routing, out.routing.level_slices, out.batch_size
        h, w = out.grid
        dev = out.en_groups[0].device
        maps, present = {}, torch.zeros(b, len(LEVELS), dtype=torch.bool, device=dev)

        def accumulate(level: str, items: dict) -> Tensor:
            acc, mass = torch.zeros(b, h, w, device=dev), torch.zeros(b, device=dev)
            for j, o in items.items():
                wj = r.weights[o.idx, sl[level].start + j].float()
                if level == "patch":
                    m = torch.stack([1 - F.cosine_similarity(e[o.idx].float(), d.float(), dim=1)
                                     for e, d in zip(out.en_groups, o.de, strict=True)]).mean(0)
                else:
                    m = ((o.ae.float() - o.student.float()) ** 2).mean(1)
                acc.index_add_(0, o.idx, wj[:, None, None] * m)
                mass.index_add_(0, o.idx, wj)
            present[:, LEVELS.index(level)] = mass > 0
            return acc / mass.clamp_min(1e-12)[:, None, None]

        # patch and global maps upsampled in one call (bilinear works per channel: the same maps as two calls)
        grid_maps = torch.stack([accumulate(lv, items) for lv, items in (("patch", out.patch),
                                                                         ("global", out.global_))], 1)
        up = F.interpolate(grid_maps, size=(size, size), mode="bilinear", align_corners=False)
        maps["patch"], maps["global"] = up[:, 0], up[:, 1]

        # Component level: score per component painted into its mask, max over components. A missing part
        # has no pixels of its own: its score covers the whole image (the absence is the anomaly).
        comp_map = torch.zeros(b, size, size, device=dev)
        counted = [m for m in out.masks if m is not None and m.shape[0] > 0]
        if out.comp_feats.shape[0] and counted:
            s, used = self.component_scores(out)
            valid = out.comp_valid
            if slot_norm is not None:
                s = self.appearance_scores(out, s, slot_norm).clamp_min(0)
            mk = self._stacked_masks(out, size)
            whole = torch.ones_like(mk)
            if lay is not None:
                # a missing part of a slot with a layout prior is painted where the slot normally is
                expected = layout.expected_region(lay[0].to(mk.device), size).float()
                whole = torch.where(expected.flatten(1).any(1)[:, None, None], expected, whole)
            painted = (s * used.float())[:, None, None] * torch.where(valid[:, None, None], mk, whole)
            if lay is not None:
                z, region = layout.score_and_region(mk > 0.5, *lay, size, out.comp_colour)
                painted = torch.maximum(painted, (z * used.float())[:, None, None] * region)
            owner = out.comp_owner
            flat = painted.flatten(1)
            comp_map = comp_map.flatten(1).scatter_reduce_(0, owner[:, None].expand_as(flat), flat, "amax")
            comp_map = comp_map.view(b, size, size)
            routed = torch.zeros(b, device=dev).index_add_(0, owner, used.float()) > 0
            present[:, LEVELS.index("component")] = routed
        maps["component"] = comp_map
        return maps, present

    def _normalize_slots(self, s: Tensor, valid: Tensor, slot_norm: Tensor) -> Tensor:
        """(s - low) / (high - low) per row; a missing slot that normal images do not reliably have
        (presence below missing_part_min_presence) is segmentation noise and scores 0."""
        sc = self.cfg.scoring
        slot_norm = slot_norm.to(s.device, torch.float32)
        z = (s - slot_norm[:, 0]) / (slot_norm[:, 1] - slot_norm[:, 0]).clamp_min(1e-12)
        z = torch.where(valid, z, z.clamp_min(sc.missing_part_score))
        unreliable = ~valid & (slot_norm[:, 2] < sc.missing_part_min_presence)
        return torch.where(unreliable, torch.zeros_like(z), z)

    def part_bank_scores(self, out: MoEOutput) -> Tensor:
        """[K] per component row: parts.bank_scores against its category's part bank (NaN where the category has no
        bank or the slot is empty)."""
        dev = out.comp_feats.device
        res = torch.full((out.comp_feats.shape[0],), math.nan, device=dev)
        feats = self.bank_features(out)
        rows: dict[str, list[int]] = {}  # category -> first component row of each of its images (one einsum each)
        start = 0
        for m, c in zip(out.masks, out.categories or [None] * out.batch_size, strict=True):
            n = 0 if m is None else m.shape[0]
            cp = self.parts.categories.get(c) if c is not None else None
            if n and cp is not None and cp.bank is not None and cp.bank.shape[1] == n:
                rows.setdefault(c, []).append(start)
            start += n
        for c, firsts in rows.items():
            n = len(self.parts.categories[c].kept)
            idx = (torch.tensor(firsts, device=dev)[:, None] + torch.arange(n, device=dev)).flatten()
            got = bank_scores(self.parts.categories[c].bank_on(dev), feats[idx].view(len(firsts), n, -1))
            res[idx] = got.flatten()
        return torch.where(out.comp_valid, res, torch.full_like(res, math.nan))

    def bank_features(self, out: MoEOutput) -> Tensor:
        """[K, C(+3)] unit rows: each slot's pooled feature (the component experts' input), with the slot's mean
        colour appended at the segmentation's colour weight (as parts are told apart: DINO features see shape more
        than colour)."""
        with fp32(out.comp_feats.device):
            f = F.normalize(out.comp_feats.float(), dim=1)
            cw = self.parts.params.color_weight
            if cw > 0 and out.comp_colour is not None:
                f = torch.cat([f, cw * (torch.nan_to_num(out.comp_colour.to(f.device).float(), nan=0.5) - 0.5)], 1)
            return F.normalize(f, dim=1)

    def appearance_scores(self, out: MoEOutput, s: Tensor, slot_norm: Tensor) -> Tensor:
        """What each part looks like on its slot-normalised scale (ScoringConfig.part_appearance): the experts'
        score s (component_scores) normalised by _normalize_slots, the part-bank score normalised by its own normal
        range, or the larger of the two; a row without a bank score or bank range keeps the experts' score."""
        z = self._normalize_slots(s, out.comp_valid, slot_norm)
        mode = self.cfg.scoring.part_appearance
        if mode == "experts" or not self.parts:
            return z
        sn = slot_norm.to(z.device, torch.float32)
        with fp32(z.device):
            zb = (self.part_bank_scores(out) - sn[:, 3]) / (sn[:, 4] - sn[:, 3]).clamp_min(1e-12)
        has = torch.isfinite(zb) & out.comp_valid
        return torch.where(has, zb if mode == "bank" else torch.maximum(z, zb), z)

    def level_mass(self, routing: Routing) -> Tensor:
        """[B, 3] routing mass per level (used by the `routing` fusion rule and for explanations)."""
        return torch.stack([routing.weights[:, routing.level_slices[lv]].sum(1) for lv in LEVELS], 1)

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor, masks: list[Tensor | None] | None = None,
                categories: list[str | None] | None = None, calibration: Calibration | None = None,
                candidates: list[str] | None = None) -> Prediction:
        """Score images (eval mode, deterministic, one backbone pass). An image without a category gets the one
        whose prototype (the mean image embedding of its calibration images) is nearest, among `candidates`
        (default: every calibrated category); Prediction.categories / category_info say which and how sure."""
        was_training = self.training
        self.eval()
        try:
            cal = calibration if calibration is not None else self.calibration
            sc = self.cfg.scoring
            size = sc.map_size or images.shape[-1]
            with autocast(images.device, self.inference_precision):
                feats = self.backbone(images)
                emb = feats.embedding()
                cats, info = cal.infer_categories(emb, categories, candidates)
                out = self(images, masks, compute_targets=False, feats=feats, categories=cats)
            counts = [0 if m is None else m.shape[0] for m in out.masks]
            slot_norm = cal.slot_rows(cats, counts) if sc.component_slot_norm else None
            lay = layout.layout_rows(cal.layouts, cats, counts) if sc.part_layout else None
            raw, present = self.level_maps(out, size, slot_norm, lay)
            mass = self.level_mass(out.routing)
            with fp32(images.device):  # the score and its parts: float32 whatever the experts ran in
                fused = smooth(fuse(raw, present, mass, cal, sc, cal.level_weights(cats, sc)), sc.smooth_kernel,
                               sc.smooth_sigma)
                score = top_ratio_score(fused, sc.top_ratio)
                level_scores = torch.stack(
                    [torch.where(present[:, i], top_ratio_score(cal.levels.get(lv, LevelNorm()).apply(raw[lv]),
                                                                sc.top_ratio), torch.nan)
                     for i, lv in enumerate(LEVELS)], 1)
            norms = [cal.for_category(c) for c in cats]
            normalized = torch.tensor(
                [n.normalize(float(s)) if n else math.nan for n, s in zip(norms, score, strict=True)])
            threshold = torch.tensor([n.threshold if n else math.nan for n in norms])
            comp_scores = self.component_scores(out)[0]
            if slot_norm is not None:
                comp_scores = self.appearance_scores(out, comp_scores, slot_norm)
            lay_scores = torch.zeros_like(comp_scores)
            if lay is not None and comp_scores.numel():
                with fp32(images.device):
                    lay_scores = layout.score_and_region(self._stacked_masks(out, size) > 0.5, *lay, size,
                                                         out.comp_colour)[0]
            return Prediction(score.cpu(), normalized, threshold, fused.cpu(), {k: v.cpu() for k, v in raw.items()},
                              present.cpu(), level_scores.cpu(), out.routing, mass.cpu(),
                              list(comp_scores.cpu().split(counts)), cats, info,
                              [None if m is None else m.cpu() for m in out.masks], emb.cpu(),
                              list(lay_scores.cpu().split(counts)))
        finally:
            self.train(was_training)


@dataclass
class Prediction:
    score: Tensor  # [B] raw image score (top-1% mean of the fused, smoothed map)
    normalized_score: Tensor  # [B] 0 = median normal image, 1 = threshold; NaN before calibration
    threshold: Tensor  # [B] raw-score threshold of the image's category
    anomaly_map: Tensor  # [B, S, S] fused, smoothed
    level_maps: dict[str, Tensor]  # raw per-level maps [B, S, S]
    present: Tensor  # [B, 3] levels the router used
    level_scores: Tensor  # [B, 3] top-1% mean of each calibrated level map (NaN where unused)
    routing: Routing
    level_mass: Tensor  # [B, 3]
    # per image: one score per component slot (slot-normalised once calibrated: 0 = median normal, 1 = its
    # high quantile); an empty slot (missing part) scores high
    component_scores: list[Tensor] = field(default_factory=list)
    categories: list[str | None] = field(default_factory=list)  # the category each image was scored as
    # per image: None where the category was given, else how it was inferred (Calibration.infer_categories)
    category_info: list[dict | None] = field(default_factory=list)
    masks: list[Tensor | None] = field(default_factory=list)  # the component masks scored ([K, H, W] bool)
    embedding: Tensor | None = None  # [B, C] BackboneFeatures.embedding (what category prototypes are fitted on)
    # per image: each slot's layout score (models/layout.py: 0 = where it normally is, 1 = its high normal quantile)
    layout_scores: list[Tensor] = field(default_factory=list)

    @property
    def is_anomaly(self) -> Tensor:
        return self.score > self.threshold  # False where the threshold is NaN (uncalibrated)
