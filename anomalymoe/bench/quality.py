"""What a training budget buys (issue 12, item 7): one model trained on the demo data (both domains) through the
library's training loop on one device for a time budget, evaluated like the demo: textures and objects image and
pixel AUROC, the logical and component groups, and each level's own image AUROC (does the global level learn with
thousands of steps?). No Ray, no MLflow: it runs on a bare GPU machine (infra/gpu/check.sh quality).

    python jobs/benchmark.py quality --device cuda --minutes 8 --json
    python jobs/benchmark.py quality --device cpu --steps 20 --json        # the same path, small

The data are prepared exactly as the training job prepares them (train/job.prepare: demo data, segmentation of
the objects' parts, the calibration hold-out); the first steps measure the end-to-end rate (decoding included), and
the cosine schedule is then stretched over the steps that fit the budget."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from anomalymoe.models.config import LEVELS, presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.precision import device_of
from anomalymoe.platform.data.pipeline import category_batches, local_epochs, to_device
from anomalymoe.platform.data.transforms import Framing
from anomalymoe.platform.train.trainer import TrainConfig, fit, seed_everything


def level_aurocs(scores_csv: Path) -> dict[str, dict[str, float]]:
    """Image AUROC of each level's own score (top 1% of its calibrated map) per defect group vs the normal
    images, mean over categories: which level carries the detection."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    d = pd.read_csv(scores_csv)
    out: dict[str, dict[str, float]] = {}
    for group in sorted(g for g in d["defect_group"].dropna().unique() if g):
        per_level = {}
        for lv in ("score", *(f"level_{x}" for x in LEVELS)):
            vals = []
            for _, c in d.groupby("category"):
                sel = c[(c["label"] == 0) | (c["defect_group"] == group)]
                s = sel[lv]
                if sel["label"].nunique() == 2 and s.notna().all():
                    vals.append(roc_auc_score(sel["label"], s))
            per_level[lv.removeprefix("level_")] = float(statistics.mean(vals)) if vals else float("nan")
        out[group] = per_level
    return out


def bench_quality(args) -> dict:
    from anomalymoe.platform.evaluation.evaluate import evaluate
    from anomalymoe.platform.train.job import JobSpec, prepare
    from anomalymoe.platform.train.validation import bank_batches, calibrate

    device = device_of(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model_cfg = presets()[args.preset].model_copy(deep=True)
    if args.weights is not None:
        model_cfg.backbone.weights = args.weights or None
    tcfg = TrainConfig(steps=args.steps or 10**6, batch_size=args.batch_size, lr=args.lr,
                       warmup_steps=args.warmup, seed=args.seed)
    spec = JobSpec(model=model_cfg, train=tcfg, data=["demo"], demo_root=str(args.data_root), segment_k=args.k,
                   register=False)
    t_prep = time.perf_counter()
    prep = prepare(spec)  # demo data + segmentation + hold-out, exactly as the training job
    prep_s = time.perf_counter() - t_prep
    seed_everything(args.seed)
    model = AnomalyMoE(model_cfg)
    model.parts = prep.model.parts  # the part segmentation prepare() loaded or fitted, as the training job's model
    model.to_device(device)
    frame = Framing.for_model(model_cfg)
    epochs = local_epochs(prep.train, frame, args.batch_size, seed=args.seed, kept=prep.kept, threads=args.threads,
                          depth=4, pin=device.type == "cuda")
    t0 = time.perf_counter()
    history = fit(model, lambda: next(epochs), tcfg, log_every=50,
                  budget_s=args.minutes * 60 if not args.steps else None)  # the library loop, budget included
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    steps = len(history)
    calibrate(model, lambda: (to_device(b, device) for b in category_batches(prep.held, frame, prep.kept)),
              reference=bank_batches(prep.train, frame, prep.kept, device))
    test = prep.df[prep.df["split"] == "test"]
    eval_dir = (Path(args.out) if args.out else Path("outputs/quality")) / "eval"
    t_eval = time.perf_counter()
    rep = evaluate(model, test, out_dir=eval_dir, kept=prep.kept, batch_size=args.batch_size, progress=False)
    eval_s = time.perf_counter() - t_eval
    levels = level_aurocs(eval_dir / "scores.csv")
    dom = rep["domains"]
    res = {
        "benchmark": "quality",
        "config": {"preset": args.preset, "backbone": model_cfg.backbone.name, "weights": model_cfg.backbone.weights,
                   "img_size": model_cfg.backbone.img_size, "batch_size": args.batch_size, "lr": args.lr,
                   "warmup": args.warmup, "k": args.k, "device": str(device), "minutes": args.minutes,
                   "train_images": len(prep.train), "held_out": len(prep.held), "test_images": len(test)},
        "steps": steps, "train_s": train_s, "img_per_s_end_to_end": steps * args.batch_size / train_s,
        "prepare_s": prep_s, "evaluate_s": eval_s, "final_loss": history[-1]["loss"] if history else None,
        "domains": {d: {k: r.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")} |
                    {f"{g}_image_auroc": v["image_auroc"] for g, v in r.get("groups", {}).items()}
                    for d, r in dom.items()},
        "levels_image_auroc": levels,
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        + f", torch {torch.__version__}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python jobs/benchmark.py " + " ".join(getattr(args, "argv", ["quality"])),
    }
    return res


def table(res: dict) -> str:
    c = res["config"]
    lines = [f"{c['backbone']} @ {c['img_size']} px ({c['weights']}), batch {c['batch_size']}, lr {c['lr']}, "
             f"{res['steps']} steps in {res['train_s']:.0f} s on {res['machine']} "
             f"({res['img_per_s_end_to_end']:.0f} img/s with data loading)",
             "", "| domain | image AUROC | pixel AUROC | AUPRO | logical | component |",
             "|---|---:|---:|---:|---:|---:|"]

    def f(v):
        return "–" if v is None or v != v else f"{v:.3f}"

    for d, r in res["domains"].items():
        lines.append(f"| {d} | {f(r.get('image_auroc'))} | {f(r.get('pixel_auroc'))} | {f(r.get('aupro'))} | "
                     f"{f(r.get('logical_image_auroc'))} | {f(r.get('component_image_auroc'))} |")
    for g, lv in res["levels_image_auroc"].items():
        lines.append(f"objects · {g}: image AUROC by level " + ", ".join(f"{k} {f(v)}" for k, v in lv.items()))
    return "\n".join(lines)


def add_arguments(q) -> None:
    q.add_argument("--device", default=None, help="cpu | cuda | auto (default)")
    q.add_argument("--preset", default="cpu-small", choices=sorted(presets()))
    q.add_argument("--weights", default=None, help="backbone weights file/URI (default: the preset's)")
    q.add_argument("--minutes", type=float, default=8.0, help="training time budget (ignored with --steps)")
    q.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of a time budget")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--warmup", type=int, default=20)
    q.add_argument("--k", type=int, default=6, help="component clusters per objects category")
    q.add_argument("--threads", type=int, default=8, help="decode threads")
    q.add_argument("--data-root", type=Path, default=Path("outputs/demo/data"))
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", type=Path, help="evaluation reports and the JSON go here (default outputs/quality)")
    q.add_argument("--json", action="store_true")
