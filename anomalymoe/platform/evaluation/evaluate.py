"""Judge a model on a test manifest: metrics per domain, category, defect type and defect group (streaming,
memory bounded), plus what a person looks at: a Markdown table, anomaly-map panels, score histograms and the
routing histogram. Nothing is fitted on the test rows: the model's calibration comes from normal images."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from anomalymoe.models.config import LEVELS  # noqa: E402
from anomalymoe.models.model import AnomalyMoE  # noqa: E402
from anomalymoe.models.scoring import LevelNorm  # noqa: E402
from anomalymoe.platform.data import storage  # noqa: E402
from anomalymoe.platform.data.pipeline import load_rows, ray_rows, to_batch, to_device  # noqa: E402
from anomalymoe.platform.data.transforms import Framing, decode_label_map
from anomalymoe.platform.evaluation.metrics import AnomalyMetrics  # noqa: E402

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "f1_max", "pixel_f1_max")


COUNT_KEYS = ("num_images", "num_anomalous", "pixel_images", "pixel_anomalous", "pixels")
NO_PIXEL_GT = ("no anomalous image here has a pixel mask (image-level labels only): pixel AUROC, pixel AP / F1 "
               "and AUPRO need masks")


def _note(r: dict) -> dict:
    """Say why the pixel metrics are null where they are (JSON has no NaN: they are written as null)."""
    if r.get("pixel_anomalous", 0) == 0 and r.get("num_anomalous", 0) > 0:
        r["pixel_note"] = NO_PIXEL_GT
    return r


def _finish(m: AnomalyMetrics) -> dict:
    r = m.compute()
    r["f1_max"] = r.pop("image_f1_max")  # the detection decision's F1-max; pixel_f1_max stays separate
    return _note(r)


def _mean(reports: list[dict]) -> dict:
    """Mean of each metric over the reports where it is defined; image counts summed (what the means cover)."""
    out = {}
    for k in METRIC_KEYS:
        vals = [r[k] for r in reports if r.get(k) is not None and not math.isnan(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    for k in COUNT_KEYS:
        out[k] = int(sum(r.get(k, 0) for r in reports))
    return _note(out)


def save_panel(path: Path, image: torch.Tensor, gt: torch.Tensor, amap: torch.Tensor, title: str,
               levels: dict[str, torch.Tensor] | None = None) -> None:
    """image | ground truth | fused map overlay | one column per level the router used.
    Maps are in calibrated units (1 = the 99.5% quantile of normal pixels); the colour scale runs from 0 to
    max(1, the image's own maximum) so a normal image stays dark and an anomaly's peak is visible."""
    img = image.permute(1, 2, 0).numpy()
    levels = levels or {}
    cols = 3 + len(levels)
    fig, axes = plt.subplots(1, cols, figsize=(3 * cols, 3.4), dpi=90)
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(gt.numpy(), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth")
    axes[2].imshow(img)
    im = axes[2].imshow(amap.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=max(1.0, float(amap.max())))
    axes[2].set_title("anomaly map (fused)")
    for ax, (name, m) in zip(axes[3:], levels.items(), strict=True):
        ax.imshow(m.numpy(), cmap="jet", vmin=0.0, vmax=max(1.0, float(m.max())))
        ax.set_title(f"{name} level")
    for a in axes:
        a.axis("off")
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _decoded(df: pd.DataFrame, frame: Framing, batch_size: int, kept: dict | None, loader: str):
    """(rows, images, component masks, each image's own (width, height)) per batch, in manifest order."""
    if loader == "local":
        for start in range(0, len(df), batch_size):
            chunk = df.iloc[start : start + batch_size]
            sizes: list[tuple[int, int]] = []
            images, masks = load_rows(chunk, frame, kept, sizes=sizes)
            yield chunk, images, masks, sizes
    elif loader == "ray":
        start = 0
        for b in ray_rows(df, frame).iter_batches(batch_size=batch_size, batch_format="pandas", prefetch_batches=2):
            chunk = df.iloc[start : start + len(b)]
            if b["uri"].tolist() != chunk["uri"].tolist():
                raise RuntimeError("Ray Data returned rows out of order")  # preserve_order is set; never expected
            start += len(b)
            yield (chunk, *to_batch(b, kept), list(zip(b["width"].tolist(), b["height"].tolist(), strict=True)))
    else:
        raise ValueError(f"loader must be 'local' or 'ray', got {loader!r}")


def _gt_masks(rows: pd.DataFrame, frame: Framing, sizes: list[tuple[int, int]]) -> torch.Tensor:
    size, out = frame.size, []
    for uri, key, wh in zip(rows["mask_uri"], rows["cat_key"], sizes, strict=True):
        if isinstance(uri, str) and uri:
            out.append(torch.from_numpy(decode_label_map(storage.read_bytes(uri), frame.for_key(key), wh) > 0))
        else:
            out.append(torch.zeros(size, size, dtype=torch.bool))
    return torch.stack(out)


class _Accumulators:
    """Per category: all test rows; per defect type and per defect group: that type's rows + the category's
    normal rows (so each type's AUROC is 'this defect vs normal')."""

    def __init__(self):
        self.cat: dict[str, AnomalyMetrics] = {}
        self.defect: dict[tuple[str, str], AnomalyMetrics] = {}
        self.group: dict[tuple[str, str], AnomalyMetrics] = {}
        self.defects_of: dict[str, set[str]] = {}
        self.groups_of: dict[str, set[str]] = {}

    def register(self, df: pd.DataFrame) -> None:
        for key, sub in df.groupby("cat_key"):
            bad = sub[sub["label"] == 1]
            self.defects_of[key] = set(bad["defect"])
            self.groups_of[key] = {g for g in bad["defect_group"] if isinstance(g, str) and g}

    def update(self, key: str, label: int, defect: str, group: str | None, score, lab, amap, gt, covered: bool
               ) -> None:
        cov = np.array([covered])
        self.cat.setdefault(key, AnomalyMetrics()).update(score, lab, amap, gt, cov)
        targets_d = self.defects_of.get(key, set()) if label == 0 else {defect}
        for d in targets_d:
            self.defect.setdefault((key, d), AnomalyMetrics()).update(score, lab, amap, gt, cov)
        targets_g = self.groups_of.get(key, set()) if label == 0 else ({group} if group else set())
        for g in targets_g:
            self.group.setdefault((key, g), AnomalyMetrics()).update(score, lab, amap, gt, cov)


@torch.no_grad()
def evaluate(model: AnomalyMoE, manifest: pd.DataFrame, *, batch_size: int = 8, out_dir: str | Path | None = None,
             panels_per_category: int = 6, kept: dict[str, list[int]] | None = None, progress: bool = True,
             loader: str = "local", threads: int | None = None) -> dict:
    """Metrics per category (key "domain/category"), defect type and group, and means per domain and overall.
    `manifest` holds the test rows (uri, domain, category, label, defect, defect_group, mask_uri,
    component_mask_uri); `kept` maps "domain/category" to its kept component clusters. loader "ray" decodes
    images and label maps in parallel Ray Data tasks (pipeline.ray_rows, same order), "local" in this process;
    the numbers are identical.

    Float reductions depend on the number of intra-op threads (measured: pixel AUROC moves by ~1e-7 between 1 and
    2 threads), so scoring runs at `threads` (default: every CPU this process may use, whatever OMP_NUM_THREADS
    says, e.g. 1 inside a Ray job): the same artifact on the same machine gives the same report bit for bit,
    whether scored in a training job's driver or by jobs/evaluate.py. The report records the thread count.
    Batches go to the model's device (a GPU scores under bf16 autocast, as its calibration was fitted); the
    report records the device."""
    threads = threads or len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        report = _evaluate(model, manifest, batch_size, out_dir, panels_per_category, kept, progress, loader)
    finally:
        torch.set_num_threads(before)
    return report


def _evaluate(model: AnomalyMoE, manifest: pd.DataFrame, batch_size: int, out_dir, panels_per_category: int,
              kept: dict | None, progress: bool, loader: str) -> dict:
    device = next(model.parameters()).device
    frame = Framing.for_model(model.cfg)
    # a category the model has parts for is scored with the masks it derives itself, as the service scores it;
    # stored label maps are read only for categories it does not cover
    kept = {k: v for k, v in (kept or {}).items() if not model.parts.covers(k)}
    out = Path(out_dir) if out_dir else None
    df = manifest.reset_index(drop=True).copy()
    if "defect_group" not in df:
        df["defect_group"] = None
    df["cat_key"] = df["domain"] + "/" + df["category"]
    acc = _Accumulators()
    acc.register(df)
    rows, panels_shown = [], {}
    routing_hist: dict[str, np.ndarray] = {}
    bar = tqdm(total=len(df), desc="evaluate", disable=not progress, dynamic_ncols=True)
    for chunk, images, masks, sizes in _decoded(df, frame, batch_size, kept, loader):
        pred = model.predict(*to_device((images, masks), device), chunk["cat_key"].tolist())
        maps = pred.anomaly_map  # at scoring.map_size (default: the input size): ground truth is read at that size
        at_map = frame.scaled(maps.shape[-1])
        gt = _gt_masks(chunk, at_map, sizes)
        sel = pred.routing.mask.cpu().numpy()
        for i, r in enumerate(chunk.itertuples(index=False)):
            group = r.defect_group if isinstance(r.defect_group, str) and r.defect_group else None
            # a normal image's mask is known (empty); an anomalous one's only where the row has one
            covered = int(r.label) == 0 or (isinstance(r.mask_uri, str) and bool(r.mask_uri))
            # pixels of the image only: a letterboxed image's black border is not scored (the same box the
            # service's map is cut to)
            x0, y0, x1, y1 = at_map.for_key(r.cat_key).content_box(*sizes[i])
            acc.update(r.cat_key, int(r.label), r.defect, group, pred.score[i : i + 1], torch.tensor([int(r.label)]),
                       maps[i : i + 1, y0:y1, x0:x1], gt[i : i + 1, y0:y1, x0:x1], covered)
            routing_hist.setdefault(r.domain, np.zeros(sel.shape[1], dtype=np.int64))
            routing_hist[r.domain] += sel[i]
            rows.append({
                "uri": r.uri, "domain": r.domain, "category": r.category, "defect": r.defect,
                "defect_group": group or "", "label": int(r.label), "score": float(pred.score[i]),
                "normalized_score": float(pred.normalized_score[i]), "threshold": float(pred.threshold[i]),
                "is_anomaly": bool(pred.is_anomaly[i]),
                **{f"level_{lv}": float(pred.level_scores[i, j]) for j, lv in enumerate(LEVELS)},
                "experts": ",".join(str(e) for e in np.flatnonzero(sel[i])),
            })
            shown = panels_shown.setdefault(r.cat_key, set())
            if out is not None and r.defect not in shown and len(shown) < panels_per_category:
                shown.add(r.defect)
                lv_maps = {lv: model.calibration.levels.get(lv, LevelNorm()).apply(pred.level_maps[lv][i])
                           for j, lv in enumerate(LEVELS) if pred.present[i, j]}
                verdict = "ANOMALY" if pred.is_anomaly[i] else "normal"
                title = (f"{r.cat_key}/{r.defect}/{Path(r.uri).name}  score {float(pred.score[i]):.4f} "
                         f"(normalized {float(pred.normalized_score[i]):.2f}, threshold "
                         f"{float(pred.threshold[i]):.4f}) -> {verdict}")
                shown_img = torch.nn.functional.interpolate(images[i : i + 1], size=maps.shape[-2:], mode="bilinear")[0]
                lv_maps = {lv: m[y0:y1, x0:x1] if m.shape[-1] == maps.shape[-1] else m for lv, m in lv_maps.items()}
                save_panel(out / "panels" / r.domain / r.category / f"{r.defect}_{Path(r.uri).stem}.png",
                           shown_img[:, y0:y1, x0:x1], gt[i, y0:y1, x0:x1], maps[i, y0:y1, x0:x1], title, lv_maps)
        bar.update(len(chunk))
    bar.close()
    report = build_report(acc, routing_hist, model, len(df))
    report["torch_threads"] = torch.get_num_threads()
    report["device"] = str(device)
    if out is not None:
        write_report(out, report, rows)
    return report


def build_report(acc: _Accumulators, routing_hist: dict, model: AnomalyMoE, n: int) -> dict:
    cats: dict[str, dict] = {}
    for key in sorted(acc.cat):
        c = _finish(acc.cat[key])
        c["defects"] = {d: _finish(m) for (k, d), m in sorted(acc.defect.items()) if k == key}
        c["groups"] = {g: _finish(m) for (k, g), m in sorted(acc.group.items()) if k == key}
        cats[key] = c
    domains = {}
    for dom in sorted({k.split("/", 1)[0] for k in cats}):
        mine = [v for k, v in cats.items() if k.split("/", 1)[0] == dom]
        groups = sorted({g for v in mine for g in v["groups"]})
        domains[dom] = {**_mean(mine), "groups": {g: _mean([v["groups"][g] for v in mine if g in v["groups"]])
                                                  for g in groups}}
    sl = model.router.level_slices
    names = [f"{lv}{j}" for lv in LEVELS for j in range(sl[lv].stop - sl[lv].start)]
    return {"mean": _mean(list(cats.values())), "domains": domains, "categories": cats,
            "routing": {"experts": names, "counts": {d: h.tolist() for d, h in sorted(routing_hist.items())}},
            "num_images": n}


def metrics_table(report: dict) -> str:
    """Markdown: every metric per category, group and domain, and the images each covers ("images": all of them,
    for the image metrics; "pixel": those with known masks, for pixel metrics and AUPRO; "–" = not defined)."""
    keys = METRIC_KEYS
    head = "| | " + " | ".join(keys) + " | images | pixel |\n|---|" + "---:|" * (len(keys) + 2) + "\n"
    lines = []

    def row(name: str, r: dict) -> str:
        return (f"| {name} | " + " | ".join(f"{r[k]:.3f}" if not math.isnan(r[k]) else "–" for k in keys)
                + f" | {r.get('num_images', '')} | {r.get('pixel_images', '')} |")

    for key, r in report["categories"].items():
        lines.append(row(key, r))
        for g, rg in r.get("groups", {}).items():
            lines.append(row(f"&nbsp;&nbsp;{key} · {g}", rg))
    for dom, r in report["domains"].items():
        lines.append(row(f"**{dom}** (mean)", r))
        for g, rg in r.get("groups", {}).items():
            lines.append(row(f"**{dom}** · {g}", rg))
    lines.append(row("**all** (mean)", report["mean"]))
    return head + "\n".join(lines) + "\n"


def _histograms(out: Path, rows: list[dict]) -> None:
    df = pd.DataFrame(rows)
    for (dom, cat), sub in df.groupby(["domain", "category"]):
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
        bins = np.linspace(sub["score"].min(), sub["score"].max() + 1e-9, 30)
        ax.hist(sub.loc[sub.label == 0, "score"], bins=bins, alpha=0.6, label="normal")
        for g, sg in sub[sub.label == 1].groupby(sub.loc[sub.label == 1, "defect_group"].replace("", "anomalous")):
            ax.hist(sg["score"], bins=bins, alpha=0.5, label=g)
        thr = sub["threshold"].iloc[0]
        if not math.isnan(thr):
            ax.axvline(thr, color="k", ls="--", label="threshold")
        ax.set_title(f"{dom}/{cat}: image scores")
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
        fig.tight_layout()
        (out / "histograms").mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "histograms" / f"{dom}_{cat}.png")
        plt.close(fig)


def _routing_plot(out: Path, routing: dict) -> None:
    names, counts = routing["experts"], routing["counts"]
    if not counts:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3.2), dpi=90)
    width = 0.8 / len(counts)
    x = np.arange(len(names))
    for i, (dom, c) in enumerate(counts.items()):
        c = np.asarray(c, dtype=float)
        ax.bar(x + i * width, c / max(c.sum(), 1), width, label=dom)
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=60, fontsize=7)
    ax.set_ylabel("share of selections")
    ax.set_title("which experts each domain uses")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "routing.png")
    plt.close(fig)


def _json_safe(x):
    """NaN (an undefined metric, e.g. AUROC with one class) -> null: report.json stays strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float | np.floating):
        return None if math.isnan(x) else float(x)
    return x


def write_report(out: Path, report: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    (out / "metrics.md").write_text(metrics_table(report))
    if rows:
        with open(out / "scores.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        _histograms(out, rows)
    _routing_plot(out, report["routing"])
