"""The objects ablation: the full MoE vs patch experts only, the same training budget, evaluated like the demo
(`python jobs/benchmark.py ablation`)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from anomalymoe.bench.model import peak_rss_mb
from anomalymoe.bench.quality import level_aurocs
from anomalymoe.models.config import presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.precision import device_of
from anomalymoe.platform.train.trainer import TrainConfig


def bench_ablation(args) -> dict:
    """Full MoE vs a patch-experts-only model on the objects domain, same data, steps, batch, lr and seed."""
    from anomalymoe.models.artifact import save_artifact
    from anomalymoe.platform.data.segmentation import SegmentParams, prepare_parts
    from anomalymoe.platform.data.sources import resolve_data
    from anomalymoe.platform.data.transforms import Framing
    from anomalymoe.platform.evaluation.evaluate import evaluate
    from anomalymoe.platform.train.trainer import seed_everything, train_and_calibrate

    df, _ = resolve_data("demo", demo_root=args.data_root, domains=["objects"], seed=args.seed)
    device = device_of(args.device)
    base = presets()[args.preset].model_copy(deep=True)
    if args.weights is not None:
        base.backbone.weights = args.weights
    variants = {"full": base}
    patch_only = base.model_copy(deep=True)
    patch_only.global_.num = patch_only.component.num = 0
    variants["patch_only"] = patch_only
    results = {}
    for name, cfg in variants.items():
        if name not in args.variants:
            continue
        seed_everything(args.seed)
        model = AnomalyMoE(cfg.model_copy(deep=True))
        if name == "full":  # part masks from the model's own backbone pass, as the training job prepares them
            model.parts = prepare_parts(model.backbone, df, SegmentParams(k=args.k, seed=args.seed),
                                        framing=Framing.for_model(cfg))
        model.to_device(device)  # a GPU trains in bf16 autocast (precision.py), as the training job does there
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=max(1, args.steps // 10), seed=args.seed)
        t = time.perf_counter()
        train_and_calibrate(model, df[df["split"] == "train"], tcfg)
        train_s = time.perf_counter() - t
        rep = evaluate(model, df[df["split"] == "test"], batch_size=args.batch_size,
                       out_dir=args.out / name if args.out else None)
        if args.out:
            save_artifact(model, args.out / name / "model", metrics=rep["mean"])
            results[name + "_levels"] = level_aurocs(args.out / name / "scores.csv")
        dom = rep["domains"]["objects"]
        results[name] = {"train_s": train_s, "image_auroc": dom["image_auroc"], "pixel_auroc": dom["pixel_auroc"],
                         **{f"{g}_image_auroc": v["image_auroc"] for g, v in dom["groups"].items()},
                         **{f"{g}_pixel_auroc": v["pixel_auroc"] for g, v in dom["groups"].items()}}
    full, po = results.get("full", {}), results.get("patch_only", {})
    return {
        "benchmark": "ablation", "domain": "objects",
        "config": {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                   "seed": args.seed, "k": args.k, "device": str(device),
                   "weights": base.backbone.weights},
        "results": results,
        "logical_image_auroc_gain": full.get("logical_image_auroc", float("nan"))
        - po.get("logical_image_auroc", float("nan")),
        "component_image_auroc_gain": full.get("component_image_auroc", float("nan"))
        - po.get("component_image_auroc", float("nan")),
        "peak_rss_mb": peak_rss_mb(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": f"python jobs/benchmark.py ablation --steps {args.steps} --device {args.device}"
                   + (f" --weights {args.weights}" if args.weights else "") + " --json",
    }


def ablation_table(res: dict) -> str:
    keys = ["image_auroc", "logical_image_auroc", "component_image_auroc", "pixel_auroc", "train_s"]
    lines = ["variant     " + "  ".join(k.rjust(22) for k in keys)]
    for name, r in res["results"].items():
        if name.endswith("_levels"):
            continue
        lines.append(name.ljust(12) + "  ".join(f"{r.get(k, float('nan')):22.3f}" for k in keys))
    lines.append(f"logical image AUROC gain (full - patch only): {res['logical_image_auroc_gain']:+.3f}")
    lines.append(f"component image AUROC gain (full - patch only): {res['component_image_auroc_gain']:+.3f}")
    for name in ("full_levels", "patch_only_levels"):
        for group, lv in res["results"].get(name, {}).items():
            lines.append(f"{name.removesuffix('_levels')} {group}: image AUROC by level "
                         + ", ".join(f"{k} {v:.3f}" for k, v in lv.items()))
    return "\n".join(lines)
