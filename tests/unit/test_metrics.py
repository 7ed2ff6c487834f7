"""Tests for anomalymoe.platform.evaluation.metrics: sklearn agreement, hand-worked AUPRO/F1 cases, a brute-force
AUPRO reference, streaming/merge equivalence, bounded memory and degenerate inputs."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomalymoe.platform.evaluation.metrics import (
    AnomalyMetrics,
    aupro,
    auroc,
    average_precision,
    f1_max,
    float16_keys,
)

pytestmark = pytest.mark.unit


# ----------------------------------------------------------------------------------------- helpers
def sk_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    return float(f1.max())


def f16(x: np.ndarray) -> np.ndarray:
    """float16-exact float32 values, so float16 quantisation inside the accumulator is lossless."""
    return np.asarray(x).astype(np.float16).astype(np.float32)


def random_pixels(seed: int, n: int = 12, h: int = 24, w: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Maps with negative and positive float16-exact scores and blobby masks (several regions each)."""
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(rng.random((n, h, w)) < 0.03, structure=np.ones((1, 3, 3)))
    masks[: n // 4] = False  # some all-normal maps
    maps = f16(rng.normal(size=(n, h, w)) + 1.5 * masks)
    return maps, masks


def image_labels(masks: np.ndarray) -> np.ndarray:
    return masks.reshape(len(masks), -1).any(1).astype(np.int64)


def brute_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Reference: explicit per-threshold PRO/FPR, per-segment trapezoid, interpolation at max_fpr."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    neg = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append((pred & neg).sum() / neg.sum())
        ys.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < max_fpr:
                yi = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
                area += (max_fpr - x0) * (y0 + yi) / 2
            break
    return area / max_fpr


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Dict equality where NaN equals NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def feed(acc: AnomalyMetrics, maps, masks, batch_sizes) -> None:
    scores = maps.reshape(len(maps), -1).max(1)
    labels = image_labels(masks)
    i = 0
    for b in batch_sizes:
        acc.update(scores[i : i + b], labels[i : i + b], maps[i : i + b], masks[i : i + b])
        i += b
    assert i == len(maps)


# ------------------------------------------------------------------------ 1. image-level vs sklearn
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [True, False])
def test_image_metrics_match_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    n = 300 + 50 * seed
    labels = (rng.random(n) < 0.3).astype(int)
    scores = rng.integers(0, 12, n).astype(float) + labels if ties else rng.normal(size=n) + labels
    assert (len(np.unique(scores)) < n) == ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert f1_max(scores, labels) == pytest.approx(sk_f1_max(labels, scores), abs=1e-12)


def test_signed_zeros_tie_and_torch_input() -> None:
    torch = pytest.importorskip("torch")
    assert auroc(np.array([-0.0, 0.0]), np.array([0, 1])) == 0.5
    s = np.array([0.3, 0.1, 0.7, 0.2, 0.9])
    y = np.array([0, 0, 1, 1, 1])
    assert auroc(torch.tensor(s), torch.tensor(y)) == auroc(s, y) == pytest.approx(roc_auc_score(y, s))


# ------------------------------------------------------------------- 4. hand-worked F1-max
def test_f1_max_hand_worked() -> None:
    # thresholds 0.9: TP1 FP0 -> F1 2/3; 0.8: TP1 FP1 -> 1/2; 0.7: TP2 FP1 -> P=2/3, R=1, F1=0.8;
    # 0.1: TP2 FP2 -> 2/3.  Max = 0.8 = 2*TP/(TP+FP+#pos) = 4/5.
    assert f1_max([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == 0.8
    # Ties: scores [0.5, 0.5, 0.5, 0.1], labels [1, 0, 0, 1].  The tied 0.5s form ONE threshold:
    #   0.5: TP1 FP2 -> P=1/3, R=1/2, F1 = 2/(1+2+2) = 0.4;   0.1: TP2 FP2 -> P=1/2, R=1, F1 = 4/6 = 2/3.
    # AP = (1/2)(1/3) + (1/2)(1/2) = 5/12.  Splitting the tie with the positive first would give a
    # (P=1, R=1/2) point and AP = 0.75 instead.
    assert f1_max([0.5, 0.5, 0.5, 0.1], [1, 0, 0, 1]) == pytest.approx(2 / 3, abs=1e-15)
    assert average_precision([0.5, 0.5, 0.5, 0.1], [1, 0, 0, 1]) == pytest.approx(5 / 12, abs=1e-15)


# ------------------------------------------------------------------- 2. pixel-level vs sklearn
def test_float16_keys_monotone_over_all_finite_values() -> None:
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    values = values[np.isfinite(values)]
    order = np.argsort(values.astype(np.float64), kind="stable")
    v, k = values[order].astype(np.float64), float16_keys(values[order]).astype(np.int64)
    dv, dk = np.diff(v), np.diff(k)
    assert np.all((dv > 0) == (dk > 0)) and np.all(dk >= 0)  # strictly monotone, equal only if equal
    assert np.all((dv == 0) == (dk == 0))  # the only equal pair: -0 and +0
    assert int((dv == 0).sum()) == 1
    inf_keys = float16_keys(np.array([-np.inf, np.inf], dtype=np.float16))
    assert inf_keys[0] < k.min() and inf_keys[1] > k.max()
    with pytest.raises(ValueError, match="NaN"):
        float16_keys(np.array([0.5, np.nan]))


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn(seed: int) -> None:
    maps, masks = random_pixels(seed, n=16, h=32, w=32)
    assert maps.min() < 0  # exercises the negative half of the key mapping
    acc = AnomalyMetrics()
    feed(acc, maps, masks, [5, 1, 7, 3])
    out = acc.compute()
    y, s = masks.ravel().astype(int), maps.ravel()
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert out["pixel_f1_max"] == pytest.approx(sk_f1_max(y, s), abs=1e-9)
    img_scores = maps.reshape(len(maps), -1).max(1)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(image_labels(masks), img_scores), abs=1e-12)
    assert out["num_images"] == 16 and out["num_anomalous"] == int(image_labels(masks).sum())


def test_pixel_scores_are_compared_at_float16_resolution() -> None:
    # 1.0 and 1.0001 round to the same float16 -> a tie at pixel level (documented), exact at image level.
    maps = np.array([[[1.0001, 1.0]]], dtype=np.float32)
    masks = np.array([[[1, 0]]], dtype=bool)
    acc = AnomalyMetrics()
    acc.update([1.0], [1], maps, masks)
    assert acc.compute()["pixel_auroc"] == 0.5
    assert auroc([1.0001, 1.0], [1, 0]) == 1.0


# ------------------------------------------------------------------------------- 3. AUPRO
def test_aupro_perfect_map() -> None:
    _, masks = random_pixels(1)
    assert aupro(masks.astype(np.float32), masks) == 1.0


def test_aupro_two_regions_one_missed() -> None:
    # Map 0: region A (2x2 = 4 px) scores 1.0; map 1: region B (4x4 = 16 px) scores 0.0; all other
    # (negative) pixels score 0.5.  Thresholds, descending:
    #   t=1.0: FPR 0, PRO = (4/4 + 0/16)/2 = 0.5      (per-region mean, not 4/20 = 0.2 per pixel)
    #   t=0.5: FPR 1, PRO 0.5                          (B is never above the background)
    #   t=0.0: FPR 1, PRO 1
    # Curve (0,0) -> (0,0.5) -> (1,0.5): PRO = 0.5 on all of [0, 0.3] -> area 0.15 / 0.3 = 0.5.
    maps = np.full((2, 8, 8), 0.5, dtype=np.float32)
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 0:2, 0:2] = True
    maps[0, 0:2, 0:2] = 1.0
    masks[1, 3:7, 2:6] = True
    maps[1, 3:7, 2:6] = 0.0
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    # Same regions in a single map (not touching, even diagonally): still two regions, same answer.
    assert not ndimage.binary_dilation(masks[0], np.ones((3, 3)))[masks[1]].any()
    one_map = np.where(masks[1], maps[1], maps[0])[None]
    assert aupro(one_map, (masks[0] | masks[1])[None]) == pytest.approx(0.5, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # GT: X = {(0,0), (1,1)} (diagonal neighbours: one region under 8-connectivity) and Y = {(5,5)}.
    # Scores: (0,0)=1, (1,1)=0, (5,5)=0, background 0.5.  At t=1: FPR 0, PRO = (1/2 + 0)/2 = 0.25, flat
    # until FPR 1, so AUPRO = 0.25 (4-connectivity would give three regions and (1+0+0)/3 = 1/3).
    maps = np.full((1, 8, 8), 0.5, dtype=np.float32)
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 5, 5] = True
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 5, 5] = 1.0, 0.0, 0.0
    assert aupro(maps, masks) == pytest.approx(0.25, abs=1e-12)


def test_aupro_interpolated_at_max_fpr() -> None:
    # One 1x10 map. GT region = pixels 0,1 (scores 0.875, 0.625); 8 negatives: 0.75, 0.6875, 0.625, 0.125 x5.
    # Thresholds descending (FPR over 8 negatives, PRO = fraction of the single region):
    #   0.875 : FPR 0     PRO 0.5
    #   0.75  : FPR 1/8   PRO 0.5
    #   0.6875: FPR 2/8   PRO 0.5
    #   0.625 : FPR 3/8   PRO 1.0   (tie: a GT and a negative pixel enter together -> sloped segment)
    #   0.125 : FPR 1     PRO 1.0
    # FPR 0.3 lies inside the sloped segment (0.25, 0.5) -> (0.375, 1.0): PRO(0.3) = 0.5 + 0.5*0.05/0.125
    # = 0.7.  Area: [0, 0.25] at 0.5 = 0.125, plus [0.25, 0.3] trapezoid 0.05*(0.5+0.7)/2 = 0.03;
    # total 0.155, / 0.3 = 31/60 = 0.516666...
    maps = np.array([[[0.875, 0.625, 0.75, 0.6875, 0.625] + [0.125] * 5]], dtype=np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, :2] = True
    assert aupro(maps, masks) == pytest.approx(31 / 60, abs=1e-6)
    # Up to FPR 1 no interpolation is needed: 0.125 + 0.125*(0.5+1)/2 + 0.625*1 = 0.84375.
    assert aupro(maps, masks, max_fpr=1.0) == pytest.approx(0.84375, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force(seed: int) -> None:
    maps, masks = random_pixels(seed, n=8, h=14, w=12)
    if seed % 2:  # coarse scores: many ties, including between GT and negative pixels
        maps = f16(np.round(maps * 4) / 4)
    assert masks.any()
    expected = brute_aupro(maps, masks)
    assert 0.0 < expected < 1.0
    acc = AnomalyMetrics()
    feed(acc, maps, masks, [3, 3, 2])
    assert acc.compute()["aupro"] == pytest.approx(expected, abs=1e-9)
    assert aupro(maps, masks, max_fpr=0.1) == pytest.approx(brute_aupro(maps, masks, 0.1), abs=1e-9)


# ----------------------------------------------------------------- 5. streaming equivalence
def test_streaming_and_merge_equivalence() -> None:
    maps, masks = random_pixels(7, n=20, h=16, w=16)
    whole = AnomalyMetrics()
    feed(whole, maps, masks, [20])
    parts = AnomalyMetrics()
    feed(parts, maps, masks, [1, 4, 2, 6, 7])
    a, b = AnomalyMetrics(), AnomalyMetrics()
    feed(a, maps[:9], masks[:9], [9])
    feed(b, maps[9:], masks[9:], [5, 6])
    b_before = b.compute()
    a.merge(b)
    ref = whole.compute()
    assert not math.isnan(ref["aupro"]) and not math.isnan(ref["image_auroc"])
    for other in (parts.compute(), a.compute()):
        assert other.keys() == ref.keys()
        for k, v in ref.items():
            if k == "aupro":  # float64 per-region weights summed in another order: equal to rounding
                assert other[k] == pytest.approx(v, rel=1e-12), k
            else:  # integer histograms and the same image scores: bit-identical
                assert other[k] == v, k
    assert same(b.compute(), b_before)  # merge does not touch its argument


def test_torch_and_channel_axis_inputs_match_numpy() -> None:
    torch = pytest.importorskip("torch")
    maps, masks = random_pixels(3, n=6, h=10, w=10)
    scores, labels = maps.reshape(6, -1).max(1), image_labels(masks)
    ref = AnomalyMetrics()
    ref.update(scores, labels, maps, masks)
    acc = AnomalyMetrics()
    acc.update(
        torch.from_numpy(scores),
        torch.from_numpy(labels),
        torch.from_numpy(maps)[:, None],
        torch.from_numpy(masks.astype(np.uint8))[:, None],
    )
    assert same(acc.compute(), ref.compute())
    assert not math.isnan(ref.compute()["aupro"])


# -------------------------------------------------------------------------- 6. bounded memory
def test_memory_bounded_state_and_update_peak() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((32, 256, 256), dtype=bool)
    masks[:, 100:140, 60:90] = True
    masks[::2, 10:20, 200:250] = True
    acc = AnomalyMetrics()
    labels = np.ones(32, dtype=np.int64)
    for _ in range(63):  # 2016 maps of 256x256 (~132M pixels)
        maps = rng.random((32, 256, 256), dtype=np.float32)
        acc.update(maps.max(axis=(1, 2)), labels, maps, masks)
    state = [acc._pixel_hist, acc._pro_hist, *acc._scores, *acc._labels]
    assert acc.nbytes == sum(a.nbytes for a in state) < 10 * 2**20
    # A batch of 64 maps (16 MiB of float32 input) is processed in chunks: ~10 MiB peak of temporaries,
    # where an unchunked update would allocate ~58 MiB.
    maps64, masks64 = np.concatenate([maps, maps]), np.concatenate([masks, masks])
    scores64, labels64 = maps64.max(axis=(1, 2)), np.ones(64, dtype=np.int64)
    tracemalloc.start()
    try:
        acc.update(scores64, labels64, maps64, masks64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2**20, peak / 2**20
    out = acc.compute()
    assert out["num_images"] == 63 * 32 + 64 and abs(out["pixel_auroc"] - 0.5) < 0.01


# --------------------------------------------------------------------------- 7. degenerate inputs
def test_single_class_gives_nan_not_exception() -> None:
    s = np.array([0.1, 0.5, 0.3])
    assert math.isnan(auroc(s, [0, 0, 0]))
    assert math.isnan(average_precision(s, [0, 0, 0])) and math.isnan(f1_max(s, [0, 0, 0]))
    assert math.isnan(auroc(s, [1, 1, 1])) and average_precision(s, [1, 1, 1]) == 1.0
    acc = AnomalyMetrics()
    maps = np.random.default_rng(0).random((3, 8, 8))
    acc.update(s, [0, 0, 0], maps, np.zeros((3, 8, 8), dtype=bool))
    out = acc.compute()
    for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert math.isnan(out[k]), k
    assert out["num_images"] == 3 and out["num_anomalous"] == 0
    empty = AnomalyMetrics().compute()
    assert math.isnan(empty["image_auroc"]) and math.isnan(empty["aupro"]) and empty["num_images"] == 0


def test_nan_scores_raise_and_leave_state_unchanged() -> None:
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])
    acc = AnomalyMetrics()
    maps, masks = random_pixels(0, n=4, h=8, w=8)
    acc.update(maps.reshape(4, -1).max(1), image_labels(masks), maps, masks)
    before = acc.compute()
    bad = maps.copy()
    bad[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        acc.update([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], bad, masks)
    with pytest.raises(ValueError, match="NaN"):
        acc.update([0.1, np.nan, 0.3, 0.4], [0, 1, 0, 1], maps, masks)
    assert same(acc.compute(), before)


def test_invalid_inputs_raise() -> None:
    acc = AnomalyMetrics()
    maps = np.zeros((2, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        acc.update([0, 1], [0, 1], maps, np.zeros((2, 8, 7), dtype=bool))
    with pytest.raises(ValueError, match="2 images"):
        acc.update([0, 1, 2], [0, 1, 0], maps, np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="binary"):
        acc.update([0, 1], [0, 2], maps, np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="binary"):  # 0/255 masks must be binarised by the caller
        acc.update([0, 1], [0, 1], maps, np.full((2, 8, 8), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match="needs maps"):
        acc.update([0, 1], [0, 1])
    with pytest.raises(ValueError, match="differ in size"):
        auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="max_fpr"):
        AnomalyMetrics(max_fpr=0.0)
    with pytest.raises(ValueError, match="pixel=False"):
        AnomalyMetrics(pixel=False).update([0, 1], [0, 1], maps, np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="merge"):
        acc.merge(AnomalyMetrics(pixel=False))
    assert acc.compute()["num_images"] == 0


def test_image_only_accumulator_and_overflow_warning() -> None:
    acc = AnomalyMetrics(pixel=False)
    acc.update([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0])
    out = acc.compute()
    assert out["image_f1_max"] == 0.8 and out["image_auroc"] == 0.75
    assert math.isnan(out["pixel_auroc"]) and math.isnan(out["aupro"])
    with pytest.warns(RuntimeWarning, match="float16 range"):
        float16_keys(np.array([1e6, 1.0]))


def test_images_without_known_masks_count_in_image_metrics_only() -> None:
    maps, masks = random_pixels(7)
    labels = image_labels(masks)
    covered = np.ones(len(labels), dtype=bool)
    covered[np.flatnonzero(labels)[::2]] = False  # every other anomalous image has an image-level label only
    acc = AnomalyMetrics()
    acc.update(maps.max((1, 2)), labels, maps, masks, covered)
    ref_pix = AnomalyMetrics()  # the pixel metrics of the covered images alone
    ref_pix.update(maps[covered].max((1, 2)), labels[covered], maps[covered], masks[covered])
    ref_img = AnomalyMetrics(pixel=False)  # the image metrics of every image
    ref_img.update(maps.max((1, 2)), labels)
    r, rp, ri = acc.compute(), ref_pix.compute(), ref_img.compute()
    for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert r[k] == rp[k], k
    for k in ("image_auroc", "image_ap", "image_f1_max", "num_images", "num_anomalous"):
        assert r[k] == ri[k], k
    assert r["pixel_images"] == int(covered.sum()) and r["pixel_anomalous"] == int((covered & (labels == 1)).sum())
    # none covered among the anomalous: pixel metrics are undefined (NaN), image metrics are not
    none = AnomalyMetrics()
    none.update(maps.max((1, 2)), labels, maps, masks, labels == 0)
    rn = none.compute()
    assert math.isnan(rn["pixel_auroc"]) and math.isnan(rn["aupro"]) and rn["image_auroc"] == ri["image_auroc"]
    assert rn["pixel_anomalous"] == 0
    with pytest.raises(ValueError, match="covered must be"):
        none.update(maps.max((1, 2)), labels, maps, masks, covered[:3])
