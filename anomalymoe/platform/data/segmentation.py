"""Unsupervised component (part) masks: backbone patch features -> per-category k-means -> soft
assignment -> edge-aware refinement -> label map, plus a background-cluster filter decided by a vote.

Differences from the reference's segment_image.py (METHOD.md §2, §5 #18-#21), each deliberate:
- features come from the model's own backbone (last block, final norm), no extra DINO v1 download;
- k-means is seeded and sees a seeded random subset of every image's patches (no unseeded projection);
- refinement is a guided filter on the image (no pydensecrf); output is a lossless uint8 label map;
- background clusters are voted over many training images, not decided from one."""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.cluster import KMeans
from torch import Tensor
from tqdm.auto import tqdm

from anomalymoe.models.backbone import Backbone
from anomalymoe.models.config import BackboneConfig
from anomalymoe.models.parts import (  # noqa: F401 - assign, guided_filter, component_masks re-exported
    CategoryParts,
    PartParams,
    Parts,
    assign,
    component_masks,
    guided_filter,
    token_features,
)
from anomalymoe.platform.data import storage
from anomalymoe.platform.data.pipeline import load_rows
from anomalymoe.platform.data.transforms import Frame, Framing


@torch.no_grad()
def patch_features(backbone: Backbone, images: Tensor, color_weight: float = 0.0) -> Tensor:
    """[B, C(+3), h, w] unit-norm last-block features (after the final norm) plus colour: the model's own part
    features (models/parts.token_features) from one backbone pass, so label maps written here and the masks the
    model derives at scoring time are the same computation."""
    if images.shape[-2:] != (backbone.cfg.img_size,) * 2:
        images = F.interpolate(images, size=(backbone.cfg.img_size,) * 2, mode="bilinear", align_corners=False)
    return token_features(backbone, backbone(images), images, color_weight)


def coreset_patches(feats: Tensor, n: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-centre selection of n patch features of one image ([1, C, h, w] -> [n, C]), as the reference
    does (seeded here): rare parts get as many samples as large background, so k-means gives them centres."""
    _, c, h, w = feats.shape
    f = feats[0].permute(1, 2, 0).reshape(h * w, c)
    n = min(n, h * w)
    idx = [int(rng.integers(h * w))]
    dist = 1 - f @ f[idx[0]]
    for _ in range(n - 1):
        j = int(dist.argmax())
        idx.append(j)
        dist = torch.minimum(dist, 1 - f @ f[j])
    return f[idx].cpu().numpy()


def fit_centers(samples: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means on unit vectors; centres re-normalised so assignment is by cosine similarity."""
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(samples.astype(np.float64))
    centers = km.cluster_centers_.astype(np.float32)
    return centers / np.linalg.norm(centers, axis=1, keepdims=True).clip(1e-12)


PLACE_GRID = 32  # where-a-cluster-is statistics: share of each cell of a 32 x 32 grid it covers, summed over images


@dataclass
class ClusterStats:
    """Per-cluster evidence accumulated over images for the background vote and the part test."""

    k: int
    images: int = 0
    border_votes: np.ndarray = field(default=None)  # images where the cluster covers >= 3 of the 4 corners
    area: np.ndarray = field(default=None)  # summed area fraction
    place: np.ndarray = field(default=None)  # [k, G, G] summed coverage of each grid cell

    def __post_init__(self):
        if self.border_votes is None:
            self.border_votes = np.zeros(self.k, dtype=np.int64)
        if self.area is None:
            self.area = np.zeros(self.k, dtype=np.float64)
        if self.place is None:
            self.place = np.zeros((self.k, PLACE_GRID, PLACE_GRID), dtype=np.float64)

    def update(self, labels: np.ndarray, corner: float = 0.08) -> None:
        """labels [B, S, S] with values 1..k."""
        b, s, _ = labels.shape
        c = max(1, int(round(s * corner)))
        corners = [labels[:, :c, :c], labels[:, :c, -c:], labels[:, -c:, :c], labels[:, -c:, -c:]]
        for j in range(self.k):
            touched = sum(((q == j + 1).mean((1, 2)) > 0.5).astype(np.int64) for q in corners)
            self.border_votes[j] += int((touched >= 3).sum())
            self.area[j] += float((labels == j + 1).mean((1, 2)).sum())
            cover = torch.from_numpy((labels == j + 1).astype(np.float32))[:, None]
            self.place[j] += F.adaptive_avg_pool2d(cover, PLACE_GRID)[:, 0].sum(0).double().numpy()
        self.images += b

    def merge(self, other: ClusterStats) -> None:
        self.images += other.images
        self.border_votes += other.border_votes
        self.area += other.area
        self.place += other.place

    def consistency(self) -> np.ndarray:
        """[k] how much a cluster keeps to one place: the mean, over the cells it covers (weighted by coverage), of
        the share of images covering that cell. A part at a fixed place scores near 1; a texture's cluster, spread
        evenly, scores near its area."""
        freq = self.place / max(self.images, 1)
        return (freq**2).sum((1, 2)) / np.maximum(freq.sum((1, 2)), 1e-12)

    def kept(self, min_area: float = 0.005, vote: float = 0.5, fallback: bool = True, localized: bool = False
             ) -> list[int]:
        """Clusters (0-based) that are parts: not background by majority vote and not negligible. When every
        cluster is background (a texture: each one reaches the image's corners), `fallback` keeps the one least
        often at the border; without it the category has no parts. `localized`: a part must also keep to a place
        (consistency >= 0.5, or >= 3 x its area): a texture's clusters, spread evenly over every image, are none
        (on the demo every texture cluster scores <= 0.39 and <= 1.8 x its area, every object part >= 0.41 and
        >= 1.6 x or >= 0.5)."""
        if self.images == 0:
            return list(range(self.k))
        frac_border = self.border_votes / self.images
        mean_area = self.area / self.images
        cons = self.consistency()
        keep = [j for j in range(self.k) if frac_border[j] <= vote and mean_area[j] >= min_area
                and (not localized or cons[j] >= 0.5 or cons[j] >= 3 * mean_area[j])]
        return keep or ([int(np.argmin(frac_border))] if fallback else [])


def best_match_iou(pred_labels: np.ndarray, gt_labels: np.ndarray, kept: list[int]) -> dict[int, float]:
    """For each ground-truth part type (gt value > 0), the IoU of the best-matching kept cluster, pooled
    over all given images ([N, S, S] arrays). Used to check that clusters cover parts."""
    out = {}
    for part in sorted(int(v) for v in np.unique(gt_labels) if v > 0):
        g = gt_labels == part
        best = 0.0
        for j in kept:
            p = pred_labels == j + 1
            inter = np.logical_and(g, p).sum()
            union = np.logical_or(g, p).sum()
            best = max(best, inter / union if union else 0.0)
        out[part] = float(best)
    return out


# ------------------------------------------------------------------------------------------------------
# The batch job over a manifest (jobs/segment.py): per category fit -> assign -> vote, written beside the data.

SEG_VERSION = 2


def label_map_uri(image_uri: str) -> str:
    """<root>/<cat>/<split>/<defect>/<stem>.<ext> -> <root>/<cat>/components/<split>/<defect>/<stem>.png"""
    head, split, defect, name = image_uri.rsplit("/", 3)
    return f"{head}/components/{split}/{defect}/{name.rsplit('.', 1)[0]}.png"


def category_dir(image_uri: str) -> str:
    return image_uri.rsplit("/", 3)[0]


def _rel(image_uri: str) -> str:
    """<split>/<defect>/<file>: the image's path inside its category."""
    return image_uri[len(category_dir(image_uri)) + 1 :]


@dataclass
class SegmentParams:
    k: int = 5  # reference: 5 for every category
    per_image: int = 16  # coreset patch features per training image fed to k-means
    color_weight: float = 2.0
    max_fit_images: int = 200
    temperature: float = 0.05
    refine: bool = True
    out_size: int = 256
    seed: int = 0

    def key(self, backbone_hash: str | None) -> dict:
        return {"version": SEG_VERSION, "k": self.k, "per_image": self.per_image, "max_fit_images": self.max_fit_images,
                "color_weight": self.color_weight,
                "temperature": self.temperature, "refine": self.refine, "out_size": self.out_size, "seed": self.seed,
                "backbone": backbone_hash}



def _encode_png(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


class _FitWorker:
    """Rows -> a seeded sample of each image's patch features (seeded per image, so the result does not depend
    on how rows are batched or which worker gets them)."""

    def __init__(self, backbone: Backbone | dict, params: SegmentParams, frame: Frame | None = None):
        self.backbone = backbone if isinstance(backbone, Backbone) else Backbone(BackboneConfig(**backbone))
        self.params = params
        # a plain resize, never the model's centre crop: label maps cover the whole image, and the model's
        # Frame then crops them exactly as it crops the image; a letterboxed category is fitted letterboxed
        self.frame = frame.whole() if frame is not None else Frame(self.backbone.cfg.img_size)

    def __call__(self, chunk):
        images, _ = load_rows(chunk, self.frame)
        feats = patch_features(self.backbone, images, self.params.color_weight)
        out = chunk[["uri"]].copy()
        # seeded by the path inside the category, so the same data elsewhere (another folder, S3) clusters alike
        out["feats"] = [coreset_patches(feats[i : i + 1], self.params.per_image,
                                        np.random.default_rng([self.params.seed, zlib.crc32(_rel(u).encode())]))
                        for i, u in enumerate(chunk["uri"])]
        return out


class _LabelWorker:
    """Rows -> label maps kept in memory (the in-process fit of the training job; nothing written)."""

    def __init__(self, backbone: Backbone | dict, params: SegmentParams, centers: np.ndarray,
                 frame: Frame | None = None):
        self.backbone = backbone if isinstance(backbone, Backbone) else Backbone(BackboneConfig(**backbone))
        self.params, self.centers = params, torch.from_numpy(centers)
        self.frame = frame.whole() if frame is not None else Frame(self.backbone.cfg.img_size)

    def labels(self, chunk) -> np.ndarray:
        images, _ = load_rows(chunk, self.frame)
        p = self.params
        return assign(patch_features(self.backbone, images, p.color_weight), self.centers, images, p.out_size,
                      p.refine, p.temperature).numpy()

    def __call__(self, chunk):
        out = chunk[["uri"]].copy()
        out["labels"] = list(self.labels(chunk))
        return out


class _AssignWorker(_LabelWorker):
    """Rows -> label maps written beside the images (lossless PNG)."""

    def __call__(self, chunk):
        labels = self.labels(chunk)
        for u, lab in zip(chunk["uri"], labels, strict=True):
            storage.write_bytes(label_map_uri(u), _encode_png(lab))
        return chunk[["uri"]].copy()


def run_batches(rows, worker_cls, backbone: Backbone, kwargs: dict, *, batch_size: int, use_ray: bool,
                progress: bool = False, desc: str = ""):
    """Apply a worker to manifest rows in batches: in-process, or as a Ray Data job (one actor per CPU slot,
    each building its own backbone; rows stream from storage, results come back as one frame)."""
    import pandas as pd

    if use_ray:
        import ray.data

        cfg = backbone.cfg.model_dump()
        uris = rows[["uri"]].reset_index(drop=True)
        ds = ray.data.from_pandas([uris.iloc[i : i + batch_size] for i in range(0, len(uris), batch_size)])
        actors = ray.data.ActorPoolStrategy(size=max(1, int(ray.available_resources().get("CPU", 1))))
        out = ds.map_batches(worker_cls, fn_constructor_kwargs={"backbone": cfg, **kwargs}, batch_size=batch_size,
                             batch_format="pandas", compute=actors)
        return out.to_pandas()
    worker = worker_cls(backbone, **kwargs)
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, dynamic_ncols=True)
    parts = []
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start : start + batch_size]
        parts.append(worker(chunk))
        bar.update(len(chunk))
    bar.close()
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"uri": []})


def segment_category(backbone: Backbone, rows, params: SegmentParams, *, batch_size: int = 8,
                     progress: bool = True, use_ray: bool = False) -> tuple[list[int], dict]:
    """Fit, assign and vote for one category's manifest rows (idempotent, resumable).

    Writes beside the data: label maps (lossless uint8 PNG, values 1..k) for every row, and
    `<category>/components/{centers.npy, clusters.json}`. clusters.json is written last, so a category
    without it is unfinished; a rerun reuses the centres and every label map already written."""
    rows = rows.sort_values("uri").reset_index(drop=True)
    cat_dir = category_dir(rows["uri"].iloc[0])
    comp = f"{cat_dir}/components"
    key = params.key(backbone.cfg.weights_sha256)
    done_uri, centers_uri = f"{comp}/clusters.json", f"{comp}/centers.npy"
    if storage.exists(done_uri):
        info = json.loads(storage.read_text(done_uri))
        if info.get("params") == key:
            return info["kept"], info
    fit_rows = rows[(rows["split"] == "train") & (rows["label"] == 0)]
    if fit_rows.empty:
        raise ValueError(f"{cat_dir}: no normal training images to fit component clusters on")

    # 1. centres (reused when a previous run with the same parameters wrote them)
    meta_uri = f"{comp}/centers.json"
    reuse = storage.exists(centers_uri) and storage.exists(meta_uri) and json.loads(storage.read_text(meta_uri)) == key
    if reuse:
        centers = np.load(io.BytesIO(storage.read_bytes(centers_uri)))
    else:
        feats = run_batches(fit_rows.iloc[: params.max_fit_images], _FitWorker, backbone,
                            {"params": params}, batch_size=batch_size, use_ray=use_ray)
        centers = fit_centers(np.concatenate(list(feats["feats"])), params.k, params.seed)
        buf = io.BytesIO()
        np.save(buf, centers)
        storage.write_bytes(centers_uri, buf.getvalue())
        storage.write_text(meta_uri, json.dumps(key))

    # 2. label maps for every row. Maps already written are kept only when the centres were reused (a killed
    #    run resumes here); new centres make every old map stale.
    todo = rows[[not storage.exists(label_map_uri(u)) for u in rows["uri"]]] if reuse else rows
    if not todo.empty:
        run_batches(todo, _AssignWorker, backbone, {"params": params, "centers": centers}, batch_size=batch_size,
                    use_ray=use_ray, progress=progress, desc=f"segment {cat_dir.rsplit('/', 1)[-1]}")

    # 3. background vote over all normal training images
    stats = ClusterStats(params.k)
    for u in fit_rows["uri"]:
        stats.update(_decode_png(storage.read_bytes(label_map_uri(u)))[None])
    kept = stats.kept()
    info = {"params": key, "k": params.k, "kept": kept, "images_voted": stats.images,
            "border_votes": stats.border_votes.tolist(), "mean_area": (stats.area / max(stats.images, 1)).tolist()}
    storage.write_text(done_uri, json.dumps(info, indent=2))
    return kept, info


def part_params(params: SegmentParams) -> PartParams:
    """The assignment settings the model needs to derive masks as this segmentation writes them."""
    return PartParams(color_weight=params.color_weight, temperature=params.temperature, refine=params.refine,
                      out_size=params.out_size)


def fit_parts(backbone: Backbone, rows, params: SegmentParams, *, batch_size: int = 8, use_ray: bool = False,
              frame: Frame | None = None) -> CategoryParts:
    """Fit one category's part segmentation in memory (no label maps written): centres on coreset features of up
    to `max_fit_images` normal training images, then the background vote over all of them. The same centres and
    kept clusters `segment_category` writes for the same rows and parameters, except that a cluster must also keep
    to one place to be a part (ClusterStats.kept(localized=True)): a texture keeps none and has no component level.
    `frame`: the category's input frame (InputConfig: a letterboxed category is fitted letterboxed)."""
    rows = rows.sort_values("uri").reset_index(drop=True)
    fit_rows = rows[(rows["split"] == "train") & (rows["label"] == 0)]
    if fit_rows.empty:
        raise ValueError(f"{category_dir(rows['uri'].iloc[0])}: no normal training images to fit component "
                         "clusters on")
    feats = run_batches(fit_rows.iloc[: params.max_fit_images], _FitWorker, backbone,
                        {"params": params, "frame": frame}, batch_size=batch_size, use_ray=use_ray)
    centers = fit_centers(np.concatenate(list(feats["feats"])), params.k, params.seed)
    labels = run_batches(fit_rows, _LabelWorker, backbone, {"params": params, "centers": centers, "frame": frame},
                         batch_size=batch_size, use_ray=use_ray)
    stats = ClusterStats(params.k)
    for lab in labels["labels"]:
        stats.update(np.asarray(lab)[None])
    kept = stats.kept(fallback=False, localized=True)
    return CategoryParts(torch.from_numpy(centers), kept, {
        "source": "fitted by the training job", "k": params.k, "images_fitted": min(len(fit_rows),
                                                                                    params.max_fit_images),
        "images_voted": stats.images, "border_votes": stats.border_votes.tolist(),
        "mean_area": (stats.area / max(stats.images, 1)).round(4).tolist(),
        "consistency": stats.consistency().round(3).tolist()})


def load_category_parts(image_uri: str, params: SegmentParams, backbone_hash: str | None) -> CategoryParts | None:
    """The parts `jobs/segment.py` finished for the category of `image_uri` (centres + kept clusters), or None when
    it has not, or ran with other parameters or another backbone (then the training job fits its own)."""
    comp = f"{category_dir(image_uri)}/components"
    if not (storage.exists(f"{comp}/clusters.json") and storage.exists(f"{comp}/centers.npy")):
        return None
    info = json.loads(storage.read_text(f"{comp}/clusters.json"))
    want = params.key(backbone_hash)
    have = info.get("params", {})
    if any(have.get(k) != want[k] for k in ("version", "color_weight", "temperature", "refine", "out_size",
                                            "backbone")):
        return None
    centers = np.load(io.BytesIO(storage.read_bytes(f"{comp}/centers.npy")))
    return CategoryParts(torch.from_numpy(centers), [int(j) for j in info["kept"]],
                         {"source": f"{comp} (jobs/segment.py)", "k": int(info["k"]),
                          "images_voted": info.get("images_voted"), "border_votes": info.get("border_votes"),
                          "mean_area": info.get("mean_area")})


def segment_manifest(backbone: Backbone, manifest, k_per_category: dict[str, int] | None = None,
                     params: SegmentParams | None = None, *, batch_size: int = 8, progress: bool = True,
                     use_ray: bool = False):
    """Run every category of a manifest; returns (manifest with component_mask_uri filled,
    kept clusters per "domain/category")."""
    params = params or SegmentParams()
    out = manifest.copy()
    kept_all: dict[str, list[int]] = {}
    for (dom, cat), sub in sorted(out.groupby(["domain", "category"]), key=lambda kv: kv[0]):
        k = (k_per_category or {}).get(cat, (k_per_category or {}).get(f"{dom}/{cat}", params.k))
        p = SegmentParams(**{**params.__dict__, "k": k})
        kept, _ = segment_category(backbone, sub, p, batch_size=batch_size, progress=progress, use_ray=use_ray)
        kept_all[f"{dom}/{cat}"] = kept
        out.loc[sub.index, "component_mask_uri"] = [label_map_uri(u) for u in sub["uri"]]
    return out, kept_all


def load_kept(manifest) -> dict[str, list[int]]:
    """Kept clusters per "domain/category" for a manifest whose categories were segmented."""
    kept = {}
    for (dom, cat), sub in manifest.groupby(["domain", "category"]):
        uri = f"{category_dir(sub['uri'].iloc[0])}/components/clusters.json"
        if storage.exists(uri):
            kept[f"{dom}/{cat}"] = json.loads(storage.read_text(uri))["kept"]
    return kept


def prepare_parts(backbone: Backbone, manifest, params: SegmentParams, *, batch_size: int = 8, use_ray: bool = False,
                  log=print, framing: Framing | None = None) -> Parts:
    """Parts for every category of a manifest: the ones `jobs/segment.py` finished with these parameters and this
    backbone are loaded, every other category is fitted here (in memory; said in the log). `framing`: the model's
    input frames (Framing.for_model); jobs/segment.py fits on squashed images as read, so a category framed
    otherwise (letterbox, a set intensity range) is always fitted here, as its images are framed."""
    out = Parts(part_params(params))
    for (dom, cat), sub in sorted(manifest.groupby(["domain", "category"]), key=lambda kv: kv[0]):
        key = f"{dom}/{cat}"
        frame = framing.for_key(key) if framing is not None else None
        plain = frame is None or (frame.aspect, frame.intensity) == ("squash", "type")
        cp = load_category_parts(sub["uri"].iloc[0], params, backbone.cfg.weights_sha256) if plain else None
        if cp is None:
            n = int(((sub["split"] == "train") & (sub["label"] == 0)).sum())
            why = "with these settings" if plain else f"for its frame ({frame.aspect}, intensity {frame.intensity})"
            log(f"[parts] {key}: no segmentation from jobs/segment.py {why}: fitting {params.k} "
                f"clusters on {min(n, params.max_fit_images)} normal training images")
            cp = fit_parts(backbone, sub, params, batch_size=batch_size, use_ray=use_ray, frame=frame)
        what = (f"parts = clusters {cp.kept}" if cp.kept else
                "no cluster is a part (each is background or spread over the image, as in a texture): "
                "no component level")
        log(f"[parts] {key}: {what} ({cp.info.get('source')})")
        out.categories[key] = cp
    return out
