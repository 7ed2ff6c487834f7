"""The embedded-default demo: build the synthetic demo data (domains `textures` and `objects`), segment the
objects' parts, train one AnomalyMoE on the normal images of both domains (CPU-sized), calibrate on held-out
normal images, score the test split and write anomaly-map panels, a metrics table and the model artifact.

    python jobs/demo.py                # everything under outputs/demo/
    python jobs/demo.py --steps 20     # quicker, weaker
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

import torch  # noqa: E402

from anomalymoe.models.anomalymoe import AnomalyMoE  # noqa: E402
from anomalymoe.models.artifact import save_artifact  # noqa: E402
from anomalymoe.models.config import presets  # noqa: E402
from anomalymoe.platform.data import ensure_demo_data, resolve_data  # noqa: E402
from anomalymoe.platform.evaluation import evaluate, metrics_table  # noqa: E402
from anomalymoe.platform.manifest import ensure_valid  # noqa: E402
from anomalymoe.platform.segmentation import SegmentParams, segment_manifest  # noqa: E402
from anomalymoe.platform.trainer import TrainConfig, seed_everything, train_and_calibrate  # noqa: E402


def stage(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def build_model(preset: str) -> AnomalyMoE:
    cfg = presets()[preset].model_copy(deep=True)
    if cfg.backbone.weights and cfg.backbone.weights.startswith("offline:"):
        try:
            from anomalymoe.models.backbone import resolve_weights_file

            resolve_weights_file(cfg.backbone.weights)
        except FileNotFoundError as e:
            warnings.warn(f"offline DINOv2-S weights unavailable ({e}); falling back to a RANDOM backbone: "
                          "maps will be close to meaningless", stacklevel=1)
            cfg.backbone.weights = None
    return AnomalyMoE(cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    ap.add_argument("--preset", default="cpu-small", choices=sorted(presets()), help="model config preset")
    ap.add_argument("--steps", type=int, default=60, help="training steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (Dinomaly's 2e-3 suits short runs)")
    ap.add_argument("--k", type=int, default=6, help="component clusters per objects category")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    out: Path = args.out

    stage(1, 6, f"synthetic demo data (textures + objects) -> {out / 'data'}")
    for dom, summary in ensure_demo_data(out / "data", seed=args.seed).items():
        print(f"    {dom}: {summary['n_images']} images, {summary['n_masks']} defect masks "
              f"({'generated' if summary['regenerated'] else 'reused'})")
    df, kept = resolve_data("demo", demo_root=out / "data", seed=args.seed)
    df = ensure_valid(df)  # every image and mask readable and consistent, or one report of all problems

    stage(2, 6, f"model ({args.preset})")
    model = build_model(args.preset)
    n_train = sum(p.numel() for p in model.trainable_state_dict().values())
    print(f"    backbone {model.cfg.backbone.name} weights={model.cfg.backbone.weights} "
          f"img_size={model.cfg.backbone.img_size}; trainable parameters {n_train / 1e6:.1f} M; "
          f"experts patch/global/component = {model.cfg.patch.num}/{model.cfg.global_.num}/{model.cfg.component.num}, "
          f"router {model.cfg.router.mode}")

    stage(3, 6, "component masks for the objects domain (k-means on backbone features, reused when present)")
    objects = df[df["domain"] == "objects"]
    if not objects.empty:
        seg_df, seg_kept = segment_manifest(model.backbone, objects, params=SegmentParams(k=args.k, seed=args.seed))
        df.loc[seg_df.index, "component_mask_uri"] = seg_df["component_mask_uri"]
        kept.update(seg_kept)
        for key, ks in seg_kept.items():
            print(f"    {key}: {len(ks)} part clusters kept {ks}")

    stage(4, 6, f"train {args.steps} steps on normal images, then calibrate on held-out normal images")
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       warmup_steps=max(1, args.steps // 10), seed=args.seed)
    history, held = train_and_calibrate(model, df[df["split"] == "train"], tcfg, kept=kept)
    print(f"    loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; calibrated on {len(held)} normal images")

    stage(5, 6, "score the test split")
    report = evaluate(model, df[df["split"] == "test"], batch_size=args.batch_size, out_dir=out / "eval", kept=kept)

    stage(6, 6, f"save the model artifact -> {out / 'model'}")
    save_artifact(model, out / "model", metrics=report)
    (out / "train_history.json").write_text(json.dumps(history) + "\n")

    print("\n" + metrics_table(report))
    print(f"Anomaly-map panels : {out / 'eval' / 'panels'}/<domain>/<category>/*.png")
    print(f"Metrics            : {out / 'eval' / 'metrics.md'} and report.json; per-image scores in scores.csv")
    print(f"Plots              : {out / 'eval' / 'histograms'}/*.png, {out / 'eval' / 'routing.png'}")
    print(f"Model artifact     : {out / 'model'}")
    print(f"Done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
