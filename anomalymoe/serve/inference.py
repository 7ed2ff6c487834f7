"""What a scorer replica does with a batch, free of Ray Serve so it can be tested alone: load the artifact a
model URI names, decode the request bodies, run one forward pass for the batch, and shape each image's answer
(DESIGN.md §5): raw and normalised score, threshold, verdict, the per-level contributions and the routing that
explain it, and optionally the anomaly map as a base64 PNG overlay.

A request is scored exactly as `jobs/evaluate.py` scores the same image: the model derives its component masks
from its own backbone pass with the segmentation the artifact carries (models/parts.py), and the calibration is
the one fitted on that same path. A request without `?category=` in a domain of several categories gets the
category whose prototype (mean image embedding, fitted at calibration) is nearest; the answer says which and how
sure. The component level's explanation names the part slot that drove it and whether that part was missing.

Device: a replica with `scorer_gpus` loads the model on CUDA and runs each batch under bf16 autocast, then
brings the answer back to the host in fp32; on the CPU it runs in fp32 exactly as the evaluation does (bf16
autocast is 5x slower on CPUs without bf16 units, DESIGN.md §3), so served and evaluated scores agree bit for
bit there."""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomalymoe.models.artifact import load_artifact
from anomalymoe.models.config import LEVELS
from anomalymoe.models.model import AnomalyMoE, Prediction
from anomalymoe.models.scoring import DEFAULT_KEY, ScoreNorm
from anomalymoe.platform.data.transforms import Frame, Framing, decode_pool, decode_sized, to_tensor
from anomalymoe.platform.tracking import registry

DECODE_THREADS = 4  # decode threads per batch (a replica's CPUs are mostly the model's)


@dataclass
class Loaded:
    model: AnomalyMoE
    name: str  # registered model name (or the artifact path)
    version: str
    uri: str  # what was asked for (an alias URI, a version URI or a path)
    frame: Framing  # every category's input geometry (InputConfig), as training and evaluation decode

    def describe(self, variant: str | None = None) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "uri": self.uri, "variant": variant}

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (the one source of truth: set once by `load`)."""
        return next(self.model.parameters()).device


class DeviceError(RuntimeError):
    """A replica was given a GPU in its config but sees no CUDA device."""


def device_for(gpus: float) -> torch.device:
    """The torch device for a replica with `gpus` Ray GPUs. A GPU replica without CUDA is a deployment error
    (wrong node, missing driver, a CPU-only torch): failing at replica start says so, where a silent CPU fallback
    would serve many times slower with nobody told."""
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"this scorer replica asks for {gpus:g} GPU (scorer_gpus) but torch sees no CUDA device "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run it on a GPU node or set "
                          "scorer_gpus: 0")
    return torch.device("cuda")


def resolve(uri: str) -> tuple[str, str, str]:
    """(name, version, concrete URI) for a model URI; an alias is resolved to a version here, once."""
    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            from mlflow.exceptions import MlflowException

            try:
                v = registry.client().get_model_version_by_alias(name, alias)
            except MlflowException as e:
                raise registry.RegistryError(f"{uri}: {name} has no version under alias {alias!r} "
                                             f"(MLflow at {registry.tracking_uri()}): {e}") from e
            return name, str(v.version), f"models:/{name}/{v.version}"
        name, _, version = ref.partition("/")
        return name, version, uri
    return uri.rstrip("/"), "local", uri


def load(uri: str, threads: int | None = None, device: str | torch.device = "cpu") -> Loaded:
    """Resolve, download and strictly load an artifact (never unpickles) onto `device`."""
    if threads:
        torch.set_num_threads(threads)
    name, version, concrete = resolve(uri)
    if concrete.startswith("models:/") or concrete.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="anomalymoe-serve-") as tmp:  # weights end up in memory
            model = load_artifact(registry.download(concrete, Path(tmp)), device=device)
    else:
        model = load_artifact(concrete, device=device)
    if version == "local":
        version = model.cfg.config_hash()[:12]
    return Loaded(model, name, version, uri, Framing.for_model(model.cfg))


class InputError(ValueError):
    """An image that cannot be scored; `status` is the HTTP status the ingress answers with."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image"):
        super().__init__(message)
        self.status, self.code = status, code


def decode(data: bytes, frame: Frame) -> tuple[torch.Tensor, tuple[int, int]]:
    """Request bytes -> (model input through the category's frame, the image's own (width, height))."""
    try:
        rgb, size = decode_sized(data, frame)
    except Image.DecompressionBombError as e:  # PIL's process-wide limit (the ingress checks the service's first)
        raise InputError(str(e), 413, "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's truncated/corrupt
        raise InputError(f"the image cannot be decoded: {e}") from None
    return to_tensor(rgb), size


def category_key(loaded: Loaded, domain: str, category: str | None) -> str | None:
    """The calibration key for a request's ?category= (``domain/category``); None → inferred from the image when the
    model has category prototypes for the domain (`predict`), else the pooled threshold."""
    if not category:
        return None
    key = category if "/" in category else f"{domain}/{category}"
    if key not in loaded.model.calibration.scores:
        known = sorted(k for k in loaded.model.calibration.scores if k != DEFAULT_KEY)
        raise InputError(f"unknown category {category!r} for this model (known: {known})", 400, "unknown_category")
    return key


def outlines(masks: torch.Tensor, size: int) -> torch.Tensor:
    """[K, H, W] bool part masks -> [K, size, size] bool one-pixel outlines (the mask minus its 3x3 erosion)."""
    m = masks.float()[:, None]
    if m.shape[-1] != size:
        m = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")
    eroded = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)
    return ((m > 0) & (eroded <= 0))[:, 0]


def overlay_png(image: torch.Tensor, amap: torch.Tensor, norm: ScoreNorm | None, alpha: float = 0.5,
                parts: torch.Tensor | None = None, highlight: int | None = None, frame: Frame | None = None,
                original: tuple[int, int] | None = None) -> tuple[str, tuple[int, int]]:
    """The anomaly map over the image as a base64 PNG. Colours are in the units of `normalized_score`: dark blue
    at or below the median normal image's score, the middle of the scale (green) at the category's threshold,
    red at twice as far. So a normal image stays blue and only what scores like an anomaly lights up. Without a
    calibration the scale runs from 0 to max(1, peak), as in the evaluation panels. `parts` ([K, H, W] masks):
    their outlines are drawn in white, the `highlight` slot's (the one that drove the component score) in
    magenta. With `frame` and the image's `original` (width, height), the overlay is drawn in the model's geometry
    and returned in the image's own (Frame.restore: a letterbox's border dropped, a squashed image unsquashed).
    Returns (base64 PNG, its (width, height))."""
    from matplotlib import colormaps

    m = amap.float().numpy()
    if norm is not None:
        level = np.clip((m - norm.median) / max(norm.threshold - norm.median, 1e-12) / 2.0, 0, 1)
    else:
        level = np.clip(m / max(1.0, float(m.max())), 0, 1)
    if image.shape[-1] != m.shape[-1]:
        image = torch.nn.functional.interpolate(image[None], size=m.shape, mode="bilinear", align_corners=False)[0]
    rgb = image.permute(1, 2, 0).clamp(0, 1).numpy()
    heat = colormaps["jet"](level)[..., :3]
    out = ((1 - alpha) * rgb + alpha * heat) * 255
    if parts is not None and parts.numel():
        edges = outlines(parts.cpu(), m.shape[-1]).numpy()
        out[edges.any(0)] = (255, 255, 255)
        if highlight is not None and 0 <= highlight < edges.shape[0]:
            out[edges[highlight]] = (255, 0, 255)
    png = Image.fromarray(out.round().astype(np.uint8))
    if frame is not None and original is not None:
        png = frame.restore(png, *original)
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode(), png.size


def _f(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _host(x: Any) -> Any:
    """A prediction's tensors on the CPU in fp32 (autocast leaves some in bf16: ~3 significant digits)."""
    if isinstance(x, torch.Tensor):
        x = x.cpu()
        return x.float() if x.is_floating_point() else x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _host(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init})
    if isinstance(x, dict):
        return {k: _host(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_host(v) for v in x]
    return x


def merge_predictions(p: Prediction, redo: Prediction, rows: list[int]) -> Prediction:
    """`p` with rows `rows` replaced by `redo`'s rows 0..n-1 (every per-image tensor, list and routing), keeping
    p's category_info (how those categories were inferred). The originals are not modified."""
    idx = torch.tensor(rows, dtype=torch.long)

    def put(a: Any, b: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == len(p.score):
            a = a.clone()
            a[idx] = b.to(a.device, a.dtype)
            return a
        if isinstance(a, list) and len(a) == len(p.score):
            a = list(a)
            for j, r in enumerate(rows):
                a[r] = b[j]
            return a
        if isinstance(a, dict):
            return {k: put(v, b[k]) for k, v in a.items()}
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            return dataclasses.replace(a, **{f.name: put(getattr(a, f.name), getattr(b, f.name))
                                             for f in dataclasses.fields(a) if f.init})
        return a

    merged = put(p, redo)
    return dataclasses.replace(merged, category_info=p.category_info)


def predict(model: AnomalyMoE, images: torch.Tensor, categories: list[str | None],
            candidates: list[str] | None = None) -> Prediction:
    """One forward pass on the model's device, in the device's precision (AnomalyMoE.predict: fp32 on the CPU,
    bit-equal to the evaluation; bf16 autocast on CUDA, as calibration ran there), the result on the host.
    A None category is inferred among `candidates` (the domain's calibrated categories)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return model.predict(images, None, categories, candidates=candidates)
    return _host(model.predict(images.to(device), None, categories, candidates=candidates))


def domain_categories(model: AnomalyMoE, domain: str) -> list[str]:
    """The calibrated "domain/category" keys of one domain (what a request's category is inferred among)."""
    return sorted(k for k in model.calibration.prototypes if k.startswith(f"{domain}/"))


def part_explanation(model: AnomalyMoE, p: Prediction, b: int) -> dict[str, Any] | None:
    """The part slot that drove image b's component score: its slot index, the segmentation cluster it is, its
    slot-normalised score (1 = the slot's high normal quantile) as the larger of how the part looks (its distance to
    the nearest normal part of the slot, or the component experts' score: ScoringConfig.part_appearance) and where it
    is (its layout score), which of the two it was, whether the part was missing (an empty
    slot) and the share of the image it covers. None where the image had no component slots."""
    scores = p.component_scores[b] if b < len(p.component_scores) else None
    cat = p.categories[b] if b < len(p.categories) else None
    if scores is None or not scores.numel() or not model.parts.covers(cat):
        return None
    looks = torch.nan_to_num(scores.float(), nan=0.0)
    where = p.layout_scores[b].float() if b < len(p.layout_scores) else torch.zeros_like(looks)
    both = torch.maximum(looks, where)
    i = int(both.argmax())
    mask = p.masks[b][i]
    return {"slot": i, "cluster": int(model.parts.categories[cat].kept[i]), "score": _f(float(both[i])),
            "appearance_score": _f(float(looks[i])), "layout_score": _f(float(where[i])),
            "driven_by": "layout" if where[i] > looks[i] else "appearance",
            "missing": not bool(mask.any()), "area": round(float(mask.float().mean()), 5)}


def score_batch(loaded: Loaded, items: list[dict[str, Any]], domain: str, variant: str | None = None
                ) -> list[dict[str, Any]]:
    """Each item: {"data": bytes, "category": str|None, "map": bool, "enqueued": time.time()}.
    Returns one dict per item: the response body, or {"error": {"status", "code", "message"}}."""
    t0 = time.time()
    out: list[dict[str, Any] | None] = [None] * len(items)
    images, cats, keep, sizes = [], [], [], []
    candidates = domain_categories(loaded.model, domain)

    def one(it: dict[str, Any]) -> tuple[str | None, torch.Tensor, tuple[int, int]] | InputError:
        try:
            cat = category_key(loaded, domain, it.get("category"))
            return (cat, *decode(it["data"], loaded.frame.for_key(cat)))
        except InputError as e:
            return e

    # decoded side by side (Pillow releases the GIL), each item on its own: one bad image fails only itself
    workers = min(len(items), DECODE_THREADS)
    decoded = list(decode_pool(workers).map(one, items)) if workers > 1 else [one(it) for it in items]
    for i, got in enumerate(decoded):
        if isinstance(got, InputError):
            out[i] = {"error": {"status": got.status, "code": got.code, "message": str(got)}}
            continue
        cat, image, size = got
        images.append(image)
        sizes.append(size)
        cats.append(cat)
        keep.append(i)
    t1 = time.time()
    if keep:
        p = predict(loaded.model, torch.stack(images), cats, candidates)
        again = [b for b, c in enumerate(cats) if c is None and loaded.frame.for_key(p.categories[b])
                 != loaded.frame.for_key(None)]
        if again:  # inferred a category framed otherwise (InputConfig): score those again through its own frame
            for b in again:
                images[b] = decode(items[keep[b]]["data"], loaded.frame.for_key(p.categories[b]))[0]
            redo = predict(loaded.model, torch.stack([images[b] for b in again]), [p.categories[b] for b in again],
                           candidates)
            p = merge_predictions(p, redo, again)
        t2 = time.time()
        routing = p.routing
        names = [f"{lv}.{j}" for lv in LEVELS for j in range(routing.level_slices[lv].stop
                                                              - routing.level_slices[lv].start)]
        for b, i in enumerate(keep):
            w, sel = routing.weights[b].cpu(), routing.mask[b].cpu()
            levels = {lv: {"used": bool(p.present[b, j]), "routing_mass": float(p.level_mass[b, j]),
                           "score": _f(float(p.level_scores[b, j]))} for j, lv in enumerate(LEVELS)}
            part = part_explanation(loaded.model, p, b)
            if part is not None:
                levels["component"]["part"] = part
            body: dict[str, Any] = {
                "model": loaded.describe(variant),
                "category": p.categories[b],
                "category_inference": p.category_info[b],
                "score": float(p.score[b]),
                "normalized_score": _f(float(p.normalized_score[b])),
                "is_anomaly": bool(p.is_anomaly[b]),
                "threshold": _f(float(p.threshold[b])),
                "levels": levels,
                "experts": sorted(({"expert": names[e], "weight": float(w[e])} for e in np.flatnonzero(sel.numpy())),
                                  key=lambda x: -x["weight"]),
                "timings_ms": {"queue": round(1000 * (t0 - items[i]["enqueued"]), 2),
                               "decode": round(1000 * (t1 - t0) / len(items), 2),
                               "model": round(1000 * (t2 - t1), 2), "batch_size": len(keep)},
            }
            if items[i].get("map"):
                norm = loaded.model.calibration.for_category(p.categories[b])
                png, (width, height) = overlay_png(images[b], p.anomaly_map[b], norm, parts=p.masks[b],
                                                   highlight=None if part is None else part["slot"],
                                                   frame=loaded.frame.for_key(p.categories[b]), original=sizes[b])
                body["anomaly_map"] = {"png_base64": png, "width": width, "height": height,
                                       "size": int(p.anomaly_map.shape[-1]), "peak": float(p.anomaly_map[b].max())}
            out[i] = body
    return out  # type: ignore[return-value]
