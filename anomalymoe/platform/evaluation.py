"""Score a test split, accumulate metrics per category (streaming), and write what a person looks at:
a metrics table, anomaly-map panels (image | ground truth | map overlay) and a score CSV."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ..models.anomalymoe import AnomalyMoE  # noqa: E402
from ..models.config import LEVELS  # noqa: E402
from ..models.scoring import LevelNorm  # noqa: E402
from .datasets import Sample, batches  # noqa: E402
from .metrics import AnomalyMetrics  # noqa: E402

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1_max", "pixel_f1_max")


def _mean(reports: list[dict]) -> dict:
    out = {}
    for k in METRIC_KEYS:
        vals = [r[k] for r in reports if r.get(k) is not None and not math.isnan(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


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
    vmax = max(1.0, float(amap.max()))
    axes[2].imshow(img)
    im = axes[2].imshow(amap.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax)
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


@torch.no_grad()
def evaluate(model: AnomalyMoE, samples: Sequence[Sample], *, batch_size: int = 8, out_dir: str | Path | None = None,
             panels_per_category: int = 6, progress: bool = True) -> dict:
    """Metrics per category and their mean. Never fits anything on the test samples: the model's
    calibration (from normal validation images) is used as is."""
    img_size = model.cfg.backbone.img_size
    out = Path(out_dir) if out_dir else None
    acc: dict[str, AnomalyMetrics] = {}
    rows = []
    panels_shown: dict[str, set[str]] = {}
    routing_hist: dict[str, np.ndarray] = {}
    bar = tqdm(total=len(samples), desc="evaluate", disable=not progress, dynamic_ncols=True)
    for batch in batches(samples, img_size, batch_size):
        pred = model.predict(batch.images, None, batch.categories)
        maps = pred.anomaly_map
        if maps.shape[-1] != img_size:
            maps = torch.nn.functional.interpolate(maps[:, None], size=(img_size,) * 2, mode="bilinear")[:, 0]
        for cat in set(batch.categories):
            rows_c = [i for i, c in enumerate(batch.categories) if c == cat]
            acc.setdefault(cat, AnomalyMetrics()).update(
                pred.score[rows_c], batch.labels[rows_c], maps[rows_c], batch.gt[rows_c])
        mask = pred.routing.mask.cpu().numpy()
        for i, s in enumerate(batch.samples):
            routing_hist.setdefault(s.category, np.zeros(mask.shape[1], dtype=np.int64))
            routing_hist[s.category] += mask[i]
            rows.append({
                "path": str(s.path), "category": s.category, "defect": s.defect, "label": s.label,
                "score": float(pred.score[i]), "normalized_score": float(pred.normalized_score[i]),
                "is_anomaly": bool(pred.is_anomaly[i]),
                **{f"level_{lv}": float(pred.level_scores[i, j]) for j, lv in enumerate(LEVELS)},
            })
            if out is None:
                continue
            # one panel per defect type (and one normal image) per category, up to panels_per_category
            shown = panels_shown.setdefault(s.category, set())
            if s.defect not in shown and len(shown) < panels_per_category:
                shown.add(s.defect)
                lv_maps = {lv: model.calibration.levels.get(lv, LevelNorm()).apply(pred.level_maps[lv][i])
                           for j, lv in enumerate(LEVELS) if pred.present[i, j]}
                thr = float(pred.threshold[i])
                verdict = "ANOMALY" if pred.is_anomaly[i] else "normal"
                title = (f"{s.category}/{s.defect}/{s.path.name}  score {float(pred.score[i]):.4f} "
                         f"(normalized {float(pred.normalized_score[i]):.2f}, threshold {thr:.4f}) -> {verdict}")
                save_panel(out / "panels" / s.category / f"{s.defect}_{s.path.stem}.png", batch.images[i],
                           batch.gt[i], maps[i], title, lv_maps)
        bar.update(len(batch.samples))
    bar.close()
    cats = {c: acc[c].compute() for c in sorted(acc)}
    report = {"mean": _mean(list(cats.values())), "categories": cats,
              "routing": {c: h.tolist() for c, h in sorted(routing_hist.items())},
              "num_images": len(samples)}
    if out is not None:
        write_report(out, report, rows)
    return report


def metrics_table(report: dict) -> str:
    head = "| category | " + " | ".join(METRIC_KEYS) + " |\n|---|" + "---:|" * len(METRIC_KEYS) + "\n"
    lines = []
    for name, r in [*report["categories"].items(), ("**mean**", report["mean"])]:
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in METRIC_KEYS) + " |")
    return head + "\n".join(lines) + "\n"


def write_report(out: Path, report: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "metrics.md").write_text(metrics_table(report))
    if rows:
        with open(out / "scores.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
