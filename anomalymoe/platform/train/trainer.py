"""The training step and a single-process fit loop (pure PyTorch; the Ray Train job wraps the same step).

One step = one forward (one backbone pass on the clean view, one on the jittered view only for the
samples a global expert ran on), one backward, then the EIR estimator learns from the *detached* pair
features of that same forward. ``reference_mode`` re-creates the reference's costs for benchmarking:
dense experts (set on the model config; every sample then gets the jittered pass), and a second full
no-grad forward just to train the estimator (METHOD.md §5 #1-#3)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from pydantic import Field, field_validator
from torch import Tensor
from tqdm.auto import tqdm

from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.precision import autocast
from anomalymoe.platform.train.optim import StableAdamW, warm_cosine_lr
from anomalymoe.strict import Strict

log = logging.getLogger(__name__)


PARAM_GROUPS = ("patch", "global", "component", "router")


class TrainConfig(Strict):
    steps: int = 100_000
    batch_size: int = 8
    lr: float = 5e-4
    warmup_steps: int = 100
    final_lr_ratio: float = 0.01
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    estimator_lr: float = 5e-4
    jitter: float = 0.2  # EfficientAD: brightness, contrast or saturation by a factor in U(0.8, 1.2)
    # LR multiplier per parameter group (patch, global, component, router); the reference uses one LR.
    # The component experts are small MLP autoencoders: under the warm-cosine schedule of a short run they
    # stay under-trained at the shared LR (objects demo, component AE alone, 100 steps: logical image
    # AUROC 0.66 / 0.71 at 2e-3, 0.94 / 0.81 at 5e-3), so they get 2.5x by default.
    lr_scale: dict[str, float] = Field(default_factory=lambda: {"component": 2.5})
    seed: int = 0

    @field_validator("lr_scale")
    @classmethod
    def _known_groups(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - set(PARAM_GROUPS)
        if bad or any(x <= 0 for x in v.values()):
            raise ValueError(f"lr_scale keys must be in {PARAM_GROUPS} with positive values, got {v}")
        return v


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - third-party code may still draw from the legacy global state
    torch.manual_seed(seed)


def color_jitter(images: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Per image, one of brightness / contrast / saturation scaled by U(1-s, 1+s) (the global experts' view)."""
    if strength <= 0:
        return images
    out = torch.empty_like(images)
    choice = torch.randint(0, 3, (images.shape[0],), generator=generator)
    factor = 1 - strength + 2 * strength * torch.rand(images.shape[0], generator=generator)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(images.shape[0]):
        out[i] = ops[int(choice[i])](images[i], float(factor[i])).clamp(0, 1)
    return out


class Trainer:
    def __init__(self, model: AnomalyMoE, cfg: TrainConfig, reference_mode: bool = False,
                 grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None, precision: str | None = None):
        """grad_sync: called on the parameters after each backward, before clipping (data-parallel training
        passes distributed.average_gradients). precision: None = the device's rule (bf16 autocast on CUDA,
        float32 on a CPU; precision.py), or "bf16" / "fp32" explicitly. Only the forward and the losses run
        under autocast; backward and the optimiser step do not."""
        self.model, self.cfg, self.reference_mode, self.grad_sync = model, cfg, reference_mode, grad_sync
        self.precision = precision
        groups = [
            {"params": [p for p in model.patch_experts.parameters()], "name": "patch"},
            {"params": [p for p in model.global_experts.parameters()], "name": "global"},
            {"params": [p for p in model.component_experts.parameters()], "name": "component"},
            {"params": [p for p in model.router.parameters()], "name": "router"},
        ]
        self.opt = StableAdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.est_opt = torch.optim.Adam(model.mi_estimator.parameters(), lr=cfg.estimator_lr, weight_decay=1e-4)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_num = 0

    def step(self, images: Tensor, masks: list[Tensor | None] | None = None,
             categories: list[str | None] | None = None) -> dict[str, float]:
        """One optimisation step. categories ("domain/category" per image): images without masks whose category
        the model's parts cover get their component masks from the model's own backbone pass."""
        m, cfg = self.model, self.cfg
        m.train()
        t0 = time.perf_counter()
        mixed = autocast(images.device, self.precision)
        images_ae = color_jitter(images, cfg.jitter, self.generator)
        with mixed:
            out = m(images, masks, images_ae, step=self.step_num, categories=categories)
            losses = m.losses(out, self.step_num)
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.grad_sync is not None:
            self.grad_sync(m.expert_parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(m.expert_parameters(), cfg.grad_clip)
        t2 = time.perf_counter()
        lr = warm_cosine_lr(self.step_num, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.final_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr * cfg.lr_scale.get(g["name"], 1.0)
        self.opt.step()
        pairs = out.eir_pairs
        if self.reference_mode:  # reference: a second full forward only to feed the estimator
            with torch.no_grad(), mixed:
                pairs = m(images, out.masks, images_ae, step=self.step_num).eir_pairs
        est = torch.zeros(())
        # Data parallel: every rank joins the estimator's gradient average, also a rank whose batch gave no expert
        # pair (it contributes zeros). Skipping it there left the ranks in different collectives: gloo aborted
        # (measured with per-level top-1 routing, 4 images per rank).
        if pairs or self.grad_sync is not None:
            self.est_opt.zero_grad(set_to_none=True)
            if pairs:
                with mixed:
                    est_loss = m.mi_estimator.learning_loss(pairs)
                est_loss.backward()
                est = est_loss.detach()
            if self.grad_sync is not None:
                self.grad_sync(list(m.mi_estimator.parameters()))
            if any(p.grad is not None for p in m.mi_estimator.parameters()):
                torch.nn.utils.clip_grad_norm_(m.mi_estimator.parameters(), cfg.grad_clip)
                self.est_opt.step()
        t3 = time.perf_counter()
        self.step_num += 1
        r = out.routing
        usage = r.mask.float().mean(0)
        # every device scalar of the step reaches the host in one copy (one sync per step, not one per value)
        scalars = {**{k: v.detach() for k, v in losses.items()}, "estimator_nll": est, "grad_norm": grad_norm,
                   **{f"use_{lv}": usage[s].sum() for lv, s in r.level_slices.items()}}
        values = torch.stack([v.float().to(usage.device).reshape(()) for v in scalars.values()]).tolist()
        rec = dict(zip(scalars, values, strict=True))
        return {**rec, "lr": lr, "time_forward": t1 - t0, "time_backward": t2 - t1, "time_optimizer": t3 - t2}


def fit(model: AnomalyMoE, batches: Callable[[], Iterator[tuple[Tensor, list | None]]], cfg: TrainConfig,
        log_every: int = 10, progress: bool = True, precision: str | None = None, budget_s: float | None = None,
        probe: int = 20) -> list[dict[str, float]]:
    """Train for cfg.steps, cycling over `batches()` (a fresh iterator per epoch), on the model's device.
    budget_s: train for about that long instead: the first `probe` steps measure the end-to-end rate (data loading
    included), and the run's length (and with it the cosine schedule) becomes the steps that fit the budget."""
    from anomalymoe.platform.data.pipeline import to_device  # local: keeps the step importable alone
    seed_everything(cfg.seed)
    device = next(model.parameters()).device
    trainer = Trainer(model, cfg, precision=precision)
    history = []
    it = batches()
    bar = tqdm(total=cfg.steps, desc="train", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    while trainer.step_num < trainer.cfg.steps:
        try:
            images, masks, *rest = next(it)
        except StopIteration:
            it = batches()
            continue
        images, masks = to_device((images, masks), device)
        rec = trainer.step(images, masks, rest[0] if rest else None)
        history.append(rec)
        bar.update(1)
        if budget_s and trainer.step_num == probe:
            rate = probe / (time.perf_counter() - start)
            trainer.cfg = cfg.model_copy(update={"steps": max(probe + 1, int(rate * budget_s))})
            bar.total = trainer.cfg.steps
            log.info("%.1f img/s end to end: %d steps fit the %.0f s budget", rate * images.shape[0],
                     trainer.cfg.steps, budget_s)
        if trainer.step_num % log_every == 0 or trainer.step_num == trainer.cfg.steps:
            ips = trainer.step_num * images.shape[0] / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", patch=f"{rec['patch']:.3f}", glob=f"{rec['global']:.3f}",
                            img_s=f"{ips:.1f}")
    bar.close()
    return history


def train_and_calibrate(model: AnomalyMoE, train_rows, cfg: TrainConfig, *, holdout: float = 0.2,
                        alpha: float = 0.0, kept: dict[str, list[int]] | None = None, progress: bool = True,
                        threads: int = 0, depth: int = 0):
    """Fit on the normal training rows of a manifest minus a held-out share per category, then fit the
    calibration on that share (normal images never seen in training, never the test split), on the model's
    device. threads / depth: decode threads and batches decoded ahead (pipeline.local_epochs); a GPU needs both.
    Returns (loss history, held-out rows)."""
    from anomalymoe.platform.data.pipeline import (  # local: see fit
        Framing,
        category_batches,
        holdout_split,
        local_epochs,
        to_device,
    )
    from anomalymoe.platform.train.validation import bank_batches, calibrate

    frame = Framing.for_model(model.cfg)
    normal = train_rows[(train_rows["split"] == "train") & (train_rows["label"] == 0)]
    train, held = holdout_split(normal, holdout, seed=cfg.seed)
    if train.empty:
        raise ValueError("no training images left after the calibration hold-out")
    bs = min(cfg.batch_size, len(train))
    device = next(model.parameters()).device
    epochs = local_epochs(train, frame, bs, seed=cfg.seed, alpha=alpha, kept=kept, threads=threads, depth=depth,
                          pin=device.type == "cuda")
    history = fit(model, lambda: next(epochs), cfg, progress=progress)
    if not held.empty:
        # a callable: streamed twice (slot statistics, then levels)
        calibrate(model, lambda: (to_device(b, device) for b in category_batches(held, frame, kept,
                                                                                       cfg.batch_size)),
                  reference=bank_batches(train, frame, kept, device, cfg.batch_size))
    return history, held
