"""bf16 on CUDA, caught on a CPU (issue 12): CUDA's autocast returns float32 from softmax, sum, cosine_similarity,
upsampling and friends where a CPU's stays in bf16, so mixed-dtype bugs (a bf16 accumulator fed a float32 source,
or the reverse) crash only on GPUs. `CudaLikeAutocast` makes a CPU bf16 autocast promote like CUDA's, and the
whole model path runs under it: training step, calibration with part masks, predict."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from anomalymoe.models.calibration import fit_calibration
from anomalymoe.models.config import presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.router import _topk_softmax
from anomalymoe.platform.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.unit

# ops CUDA's autocast runs in float32 (aten/src/ATen/autocast_mode.cpp, its fp32 and fp32_set_opt_dtype lists),
# as the Python names they reach a TorchFunctionMode with
CUDA_FP32_OPS = {
    "softmax", "log_softmax", "sum", "cumsum", "prod", "exp", "log", "log2", "log10", "log1p", "pow", "__pow__",
    "__rpow__", "rsqrt", "reciprocal", "layer_norm", "group_norm", "cosine_similarity", "mse_loss", "l1_loss",
    "logsumexp", "interpolate", "norm", "softplus", "cdist", "dist", "kl_div", "nll_loss",
}


class CudaLikeAutocast(TorchFunctionMode):
    """Under a CPU bf16 autocast, run CUDA's float32 ops in float32 (inputs up-cast, autocast off inside)."""

    def __init__(self):
        super().__init__()
        self.promoted: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x

            args, kwargs = tree_map(up, (args, kwargs))
            self.promoted.add(name)
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _batch(b: int = 4, size: int = 56, parts: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g)
    masks = []
    for i in range(b):
        m = torch.zeros(parts, size, size, dtype=torch.bool)
        for k in range(parts if i else parts - 1):  # image 0 lacks its last part: a missing-part row
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            m[k, y : y + size // 3, x : x + size // 3] = True
        masks.append(m)
    return images, masks


def test_the_emulation_reproduces_the_cuda_crash_of_the_old_router():
    """The bug issue 12 found on the H200: bf16 zeros scattered with a float32 softmax. Under the emulation the
    old line fails as it did on CUDA; the router's own `_topk_softmax` returns float32 weights."""
    logits = torch.randn(4, 6).bfloat16()
    with CudaLikeAutocast(), torch.autocast("cpu", dtype=torch.bfloat16):
        top, idx = logits.topk(3, dim=1)
        with pytest.raises(RuntimeError, match="dtype"):
            torch.zeros_like(logits).scatter(1, idx, top.softmax(1))
        weights, mask = _topk_softmax(logits, 3)
    assert weights.dtype == torch.float32 and mask.sum() == 12
    torch.testing.assert_close(weights.sum(1), torch.ones(4))


@pytest.mark.parametrize("mode", ["joint", "per_level"])
def test_train_calibrate_predict_under_cuda_like_bf16(mode):
    cfg = presets()["test-tiny"].model_copy(deep=True)
    cfg.router.mode = mode
    cfg.router.top_k = sum(cfg.num_experts.values())  # joint: every level runs, so every path is checked
    torch.manual_seed(0)
    model = AnomalyMoE(cfg)
    model.inference_precision = "bf16"  # what CUDA gets by default; a CPU would stay in float32
    images, masks = _batch()
    emu = CudaLikeAutocast()
    with emu:
        trainer = Trainer(model, TrainConfig(steps=3, batch_size=4, warmup_steps=1), precision="bf16")
        recs = [trainer.step(images, masks) for _ in range(2)]
        cal = fit_calibration(model, [(images, masks, ["a"] * 4)])
        pred = model.predict(images, masks, ["a"] * 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, masks, compute_targets=False)
    assert {"softmax", "cosine_similarity", "interpolate"} <= emu.promoted  # the emulation was exercised
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert out.routing.weights.dtype == torch.float32  # routing weights: float32
    assert out.comp_feats.dtype == torch.float32  # component features: float32 accumulation
    assert any(o.de[0].dtype == torch.bfloat16 for o in out.patch.values())  # the experts did run in bf16
    for lv, m in pred.level_maps.items():
        assert m.dtype == torch.float32, lv
    assert pred.score.dtype == pred.anomaly_map.dtype == torch.float32
    assert torch.isfinite(pred.score).all() and torch.isfinite(pred.normalized_score).all()
    assert cal.fitted and cal.components  # slot statistics were fitted with the masks, on the same path
    assert pred.present[:, 2].any()  # the component level was used
    assert any(float(c.max()) > 0 for c in pred.component_scores)


def test_bf16_scores_track_fp32_scores():
    """Same weights, same images: the bf16 path may round, not change the verdict's scale."""
    torch.manual_seed(0)
    model = AnomalyMoE(presets()["test-tiny"])
    images, masks = _batch(seed=1)
    fit_calibration(model, [(images, masks, ["a"] * 4)])
    ref = model.predict(images, masks, ["a"] * 4)
    model.inference_precision = "bf16"
    with CudaLikeAutocast():
        low = model.predict(images, masks, ["a"] * 4)
    assert torch.equal(low.routing.mask, ref.routing.mask)  # routing is float32 either way
    torch.testing.assert_close(low.score, ref.score, rtol=0.05, atol=0.05)
