"""Streaming anomaly-detection metrics: image/pixel AUROC, AP, F1-max and AUPRO (MVTec AD protocol).

Why streaming: a test set of a few thousand 256x256 maps holds hundreds of millions of pixel scores;
keeping them all (as sklearn needs) costs gigabytes. :class:`AnomalyMetrics` keeps only

* the per-image scores and labels (exact, float64; O(num_images)), and
* three 65536-bin histograms indexed by the *float16 key* of each pixel score (O(1) in dataset size):
  positive-pixel counts, negative-pixel counts and the per-region overlap mass used by AUPRO.

Pixel-level precision: pixel scores are rounded to float16 before counting, so pixels are compared at
float16 resolution (11 significant bits, relative precision ~1e-3 -- half an ulp is 2**-11 ~ 4.9e-4).
Scores that round to the same float16 are ties. Given that quantisation the pixel metrics are *exact*
(no threshold grid, no sampling), the histograms merge exactly across batches/workers (integer counts),
and the range of the scores need not be known in advance. Scores are best kept within float16's normal
range (~6.1e-5 .. 65504 in magnitude): smaller magnitudes lose relative precision (subnormals, then 0)
and larger ones saturate to +-inf (a RuntimeWarning is issued). Image-level metrics are not quantised.

Degenerate data: AUROC is NaN unless both classes are present; AP and F1-max are NaN without positives;
AUPRO is NaN without any GT region or without any negative pixel. NaN is returned instead of raising so
that one odd category does not abort a whole evaluation run; aggregate with ``np.nanmean`` if wanted.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "NUM_KEYS",
    "AnomalyMetrics",
    "aupro",
    "auroc",
    "average_precision",
    "f1_max",
    "float16_keys",
]

NUM_KEYS = 1 << 16
# Pixels processed per chunk inside update(): bounds temporaries to ~10 MiB whatever the batch size.
_CHUNK_PIXELS = 1 << 19
# 8-connectivity inside each map, none across the batch axis (MVTec AD protocol).
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    """numpy view/copy of an array-like or torch tensor (any device; bfloat16 widened to float32)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        return t.cpu().numpy()
    return np.asarray(x)


def _binary(x: np.ndarray, what: str) -> np.ndarray:
    """Validate that ``x`` only holds 0/1 (or bools) and return it as bool."""
    if x.dtype == np.bool_:
        return x
    if not np.all((x == 0) | (x == 1)):
        raise ValueError(f"{what} must be binary (0/1 or bool); binarise it first (got dtype {x.dtype})")
    return x != 0


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    y = _to_numpy(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, _binary(y, "labels")


def _maps_shape(x: Any, what: str) -> tuple[int, ...]:
    """Shape as [B, H, W]; a singleton channel axis ([B, 1, H, W]) is accepted and dropped."""
    shape = tuple(int(d) for d in x.shape)
    if len(shape) == 4 and shape[1] == 1:
        shape = (shape[0], shape[2], shape[3])
    if len(shape) != 3:
        raise ValueError(f"{what} must have shape [B, H, W] or [B, 1, H, W], got {shape}")
    return shape


# --------------------------------------------------------------------------------------------------
# float16 keys
# --------------------------------------------------------------------------------------------------
def float16_keys(x: Any) -> np.ndarray:
    """Round ``x`` to float16 and return uint16 keys whose integer order equals the float order.

    Negative floats get all 16 bits flipped, non-negative ones only the sign bit; -0 is mapped to +0
    first so that the two zeros tie (as they compare equal). Raises ValueError on NaN. Scores beyond
    +-65504 saturate to +-inf (RuntimeWarning).
    """
    a = _to_numpy(x)
    with np.errstate(over="ignore"):  # overflow gets the clearer warning below
        h = a.astype(np.float16)  # always a fresh copy, so the in-place bit edits below are safe
    u = h.view(np.uint16)
    mag = u & np.uint16(0x7FFF)
    if np.any(mag > 0x7C00):
        raise ValueError("scores contain NaN")
    inf = mag == 0x7C00
    if inf.any() and np.isfinite(a[inf]).any():
        warnings.warn(
            "pixel scores beyond float16 range (|x| > 65504) saturate to +-inf and tie; rescale the maps",
            RuntimeWarning,
            stacklevel=2,
        )
    del mag, inf
    u[u == 0x8000] = 0  # -0 -> +0
    key = u >> np.uint16(15)  # 1 for negatives
    np.negative(key, out=key)  # 0xFFFF for negatives, 0 otherwise (uint16 wraps)
    key |= np.uint16(0x8000)
    key ^= u
    return key


# --------------------------------------------------------------------------------------------------
# Curve metrics from cumulative counts
# --------------------------------------------------------------------------------------------------
def _curve_metrics(tps: np.ndarray, fps: np.ndarray) -> tuple[float, float, float]:
    """AUROC, AP and F1-max from cumulative TP/FP counts at distinct thresholds, descending.

    Matches sklearn: ROC trapezoid over distinct thresholds (from (0, 0)); AP = sum (R_n - R_{n-1}) P_n;
    F1 = 2PR/(P+R) = 2TP / (TP + FP + #pos), maximised over thresholds.
    """
    if tps.size == 0:
        return float("nan"), float("nan"), float("nan")
    tps = tps.astype(np.float64, copy=False)
    fps = fps.astype(np.float64, copy=False)
    n_pos, n_neg = tps[-1], fps[-1]
    if n_pos == 0:
        return float("nan"), float("nan"), float("nan")
    d_tps = np.diff(tps, prepend=0.0)
    ap = float(np.sum(d_tps * (tps / (tps + fps))) / n_pos)
    f1 = float(np.max(2.0 * tps / (tps + fps + n_pos)))
    if n_neg == 0:
        return float("nan"), ap, f1
    # Trapezoid in integer units (each term exact in float64), one division at the end.
    tps_prev = tps - d_tps
    roc = float(np.sum(np.diff(fps, prepend=0.0) * (tps + tps_prev)) / (2.0 * n_pos * n_neg))
    return roc, ap, f1


def _counts_from_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative TP/FP counts at each distinct score, descending (sklearn's _binary_clf_curve)."""
    order = np.argsort(scores, kind="stable")[::-1]
    s, y = scores[order], labels[order]
    # `!=` rather than diff: inf - inf is NaN, and -0 == 0 must tie.
    last = np.flatnonzero(s[1:] != s[:-1])
    idx = np.append(last, s.size - 1) if s.size else last
    tps = np.cumsum(y, dtype=np.int64)[idx]
    return tps, idx + 1 - tps


def _counts_from_hist(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative TP/FP counts over occupied keys, descending threshold."""
    pos, neg = pos[::-1], neg[::-1]
    occupied = (pos + neg) > 0
    return np.cumsum(pos)[occupied], np.cumsum(neg)[occupied]


def _integrate_pro(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Area under PRO(FPR) on [0, max_fpr] (trapezoid, PRO interpolated at max_fpr) / max_fpr."""
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    ins = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:ins] <= max_fpr, ins >= 1
    x, y = fpr[:ins], pro[:ins]
    if x[-1] < max_fpr:  # fpr ends at 1 >= max_fpr, so fpr[ins] exists and exceeds max_fpr
        x0, x1, y0, y1 = fpr[ins - 1], fpr[ins], pro[ins - 1], pro[ins]
        x = np.append(x, max_fpr)
        y = np.append(y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / max_fpr)


# --------------------------------------------------------------------------------------------------
# Accumulator
# --------------------------------------------------------------------------------------------------
class AnomalyMetrics:
    """Streaming accumulator for image- and pixel-level anomaly-detection metrics.

    ``update()`` batch by batch, ``merge()`` accumulators from other workers, ``compute()`` at the end.
    State is O(65536 + num_images) whatever the number/size of maps; see the module docstring for
    the float16 quantisation of pixel scores and the NaN conventions.
    """

    def __init__(self, pixel: bool = True, max_fpr: float = 0.3) -> None:
        if not 0.0 < max_fpr <= 1.0:
            raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
        self.pixel = pixel
        self.max_fpr = float(max_fpr)
        self.reset()

    def reset(self) -> None:
        """Drop all accumulated data."""
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        # Row 0: negative pixels, row 1: positive pixels, per float16 key.
        self._pixel_hist = np.zeros((2, NUM_KEYS), dtype=np.int64)
        # Sum over GT regions r of bincount(keys of r) / |r|.
        self._pro_hist = np.zeros(NUM_KEYS, dtype=np.float64)
        self._num_regions = 0
        self._pixel_images = 0  # images whose pixels were counted (an image-level label only is not)
        self._pixel_anomalous = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator's arrays (bounded: ~1.5 MB + 9 bytes per image)."""
        lists = sum(a.nbytes for a in self._scores) + sum(a.nbytes for a in self._labels)
        return lists + self._pixel_hist.nbytes + self._pro_hist.nbytes

    def update(self, scores: Any, labels: Any, maps: Any = None, masks: Any = None, covered: Any = None) -> None:
        """Add a batch.

        scores: [B] image scores; labels: [B] in {0, 1}; maps: [B, H, W] (or [B, 1, H, W]) pixel
        scores and masks: same shape, binary GT. numpy arrays or torch tensors (any device).
        maps/masks are required iff the accumulator was built with ``pixel=True``.
        covered: [B] bool, the images whose masks are known (default all); the others (an anomalous image with an
        image-level label only) count in the image metrics and not in the pixel metrics or AUPRO.
        """
        s, y = _scores_labels(scores, labels)
        if self.pixel:
            if maps is None or masks is None:
                raise ValueError("pixel=True: update() needs maps and masks")
            maps = maps if hasattr(maps, "shape") else np.asarray(maps)
            b = _maps_shape(maps, "maps")[0]
            if b != s.size:
                raise ValueError(f"maps hold {b} images but scores hold {s.size}")
            keep = np.ones(b, dtype=bool) if covered is None else np.asarray(_to_numpy(covered), dtype=bool)
            if keep.shape != (b,):
                raise ValueError(f"covered must be [{b}] booleans, got shape {keep.shape}")
            if keep.all():
                self._update_pixels(maps, masks)  # validate pixels before committing image scores
            elif keep.any():
                idx = np.flatnonzero(keep)
                self._update_pixels(_to_numpy(maps)[idx], _to_numpy(masks)[idx])
            self._pixel_images += int(keep.sum())
            self._pixel_anomalous += int((keep & y).sum())
        elif maps is not None or masks is not None:
            raise ValueError("maps/masks given to an accumulator built with pixel=False")
        self._scores.append(s.copy())
        self._labels.append(y.copy())

    def _update_pixels(self, maps: Any, masks: Any) -> None:
        """Add maps to the pixel histograms in chunks of ~_CHUNK_PIXELS pixels (bounded temporaries).

        All chunks are validated before any is counted, so a failing batch leaves the state unchanged.
        """
        maps = maps if hasattr(maps, "shape") else np.asarray(maps)
        masks = masks if hasattr(masks, "shape") else np.asarray(masks)
        shape = _maps_shape(maps, "maps")
        mshape = _maps_shape(masks, "masks")
        if shape != mshape:
            raise ValueError(f"maps and masks differ in shape: {tuple(maps.shape)} vs {tuple(masks.shape)}")
        b, h, w = shape
        step = max(1, _CHUNK_PIXELS // max(1, h * w))
        hist = np.zeros((2, NUM_KEYS), dtype=np.int64)
        pro = np.zeros(NUM_KEYS, dtype=np.float64)
        regions = 0
        for i in range(0, b, step):
            m = _binary(_to_numpy(masks[i : i + step]).reshape(-1, h, w), "masks")
            key = float16_keys(_to_numpy(maps[i : i + step]).reshape(-1, h, w))
            # One bincount for both classes: positive pixels are offset by NUM_KEYS.
            idx = key.astype(np.intp)
            np.add(idx, NUM_KEYS, out=idx, where=m)
            hist += np.bincount(idx.ravel(), minlength=2 * NUM_KEYS).reshape(2, NUM_KEYS)
            del idx
            region, n = ndimage.label(m, structure=_STRUCTURE)
            if n:
                inv_size = 1.0 / np.bincount(region.ravel(), minlength=n + 1)[1:]
                # region labels of positive pixels are >= 1
                pro += np.bincount(key[m], weights=inv_size[region[m] - 1], minlength=NUM_KEYS)
                regions += n
        self._pixel_hist += hist
        self._pro_hist += pro
        self._num_regions += regions

    def merge(self, other: AnomalyMetrics) -> None:
        """Add ``other``'s accumulated data to this one (e.g. results gathered from workers)."""
        if other.pixel != self.pixel or other.max_fpr != self.max_fpr:
            raise ValueError("cannot merge accumulators with different pixel/max_fpr settings")
        self._scores.extend(a.copy() for a in other._scores)
        self._labels.extend(a.copy() for a in other._labels)
        self._pixel_hist += other._pixel_hist
        self._pro_hist += other._pro_hist
        self._num_regions += other._num_regions
        self._pixel_images += other._pixel_images
        self._pixel_anomalous += other._pixel_anomalous

    def _image_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self._scores) > 1:  # consolidate so repeated compute() does not re-concatenate
            self._scores = [np.concatenate(self._scores)]
            self._labels = [np.concatenate(self._labels)]
        if not self._scores:
            return np.zeros(0), np.zeros(0, dtype=bool)
        return self._scores[0], self._labels[0]

    def _aupro(self) -> float:
        neg = self._pixel_hist[0]
        n_neg = int(neg.sum())
        if self._num_regions == 0 or n_neg == 0:
            return float("nan")
        neg_r, pos_r, pro_r = neg[::-1], self._pixel_hist[1][::-1], self._pro_hist[::-1]
        occupied = (neg_r + pos_r) > 0
        fpr = np.cumsum(neg_r)[occupied] / n_neg
        cum_pro = np.cumsum(pro_r)[occupied]
        # cum_pro[-1] equals the region count up to float rounding (each region adds |r| * 1/|r|);
        # dividing by it instead makes PRO end at exactly 1 and keeps rounding relative.
        pro = cum_pro / cum_pro[-1]
        return _integrate_pro(fpr, pro, self.max_fpr)

    def compute(self) -> dict[str, float]:
        """All metrics as floats (NaN where undefined; pixel_* and aupro are NaN if pixel=False)."""
        s, y = self._image_arrays()
        img = _curve_metrics(*_counts_from_scores(s, y))
        nan = float("nan")
        pix = _curve_metrics(*_counts_from_hist(self._pixel_hist[1], self._pixel_hist[0]))
        if not self.pixel:
            pix = (nan, nan, nan)
        return {
            "image_auroc": img[0],
            "image_ap": img[1],
            "image_f1_max": img[2],
            "pixel_auroc": pix[0],
            "pixel_ap": pix[1],
            "pixel_f1_max": pix[2],
            "aupro": self._aupro() if self.pixel else nan,
            "num_images": int(s.size),
            "num_anomalous": int(y.sum()),
            "pixel_images": self._pixel_images if self.pixel else 0,
            "pixel_anomalous": self._pixel_anomalous if self.pixel else 0,
            "pixels": int(self._pixel_hist.sum()) if self.pixel else 0,  # what the pixel metrics rest on
        }


# --------------------------------------------------------------------------------------------------
# Standalone functions
# --------------------------------------------------------------------------------------------------
def auroc(scores: Any, labels: Any) -> float:
    """Exact ROC AUC (as sklearn's roc_auc_score); NaN unless both classes are present."""
    return _curve_metrics(*_counts_from_scores(*_scores_labels(scores, labels)))[0]


def average_precision(scores: Any, labels: Any) -> float:
    """Exact average precision (as sklearn's average_precision_score); NaN without positives."""
    return _curve_metrics(*_counts_from_scores(*_scores_labels(scores, labels)))[1]


def f1_max(scores: Any, labels: Any) -> float:
    """Max F1 over all thresholds (score >= t is anomalous); NaN without positives."""
    return _curve_metrics(*_counts_from_scores(*_scores_labels(scores, labels)))[2]


def aupro(maps: Any, masks: Any, max_fpr: float = 0.3) -> float:
    """AUPRO up to ``max_fpr`` (normalised by it) of [B, H, W] maps vs binary masks, at float16 resolution."""
    acc = AnomalyMetrics(pixel=True, max_fpr=max_fpr)
    acc._update_pixels(maps, masks)
    return acc._aupro()
