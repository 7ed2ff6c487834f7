"""Benchmarks: speed and memory targets of the platform, measured as ratios inside one run.

    python jobs/benchmark.py model --json       # sparse vs dense experts, ours vs the reference train step
    python jobs/benchmark.py ablation --json    # objects domain: full MoE vs patch experts only
    python jobs/benchmark.py train --json       # Ray Train throughput, 1 vs 2 workers, time split per step

Prints a table, then (with --json) one JSON object as the last stdout line."""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

import torch  # noqa: E402

from anomalymoe.models.anomalymoe import AnomalyMoE, MoEOutput  # noqa: E402
from anomalymoe.models.config import LEVELS, presets  # noqa: E402
from anomalymoe.platform.trainer import TrainConfig, Trainer  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_batch(b: int, size: int, parts: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random images plus `parts` rectangular part masks per image (so component experts have input)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g) * torch.linspace(0.2, 1.0, b)[:, None, None, None]
    masks = []
    for _ in range(b):
        m = torch.zeros(parts, size, size, dtype=torch.bool)
        for k in range(parts):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            m[k, y : y + size // 3, x : x + size // 3] = True
        masks.append(m)
    return images, masks


def expert_diff(s: MoEOutput, d: MoEOutput) -> float:
    diffs = [0.0]
    for j, po in s.patch.items():
        diffs += [float((a - b[po.idx]).abs().max()) for a, b in zip(po.de, d.patch[j].de, strict=True)]
    for j, go in s.global_.items():
        diffs += [float((go.ae - d.global_[j].ae[go.idx]).abs().max()),
                  float((go.student - d.global_[j].student[go.idx]).abs().max())]
    for j, co in s.component.items():
        diffs.append(float((co.recon - d.component[j].recon[co.cidx]).abs().max()))
    return max(diffs)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_model(args) -> dict:
    torch.manual_seed(args.seed)
    cfg = presets()[args.preset].model_copy(deep=True)
    sparse = AnomalyMoE(cfg)
    if args.spread_router:
        # The reference init (std 0.01) sends every image to the same 3 experts; a balanced, ESB-trained
        # router spreads them. Re-draw the gate so routing is spread, and report what it was.
        g = torch.Generator().manual_seed(args.seed)
        for p in sparse.router.parameters():
            p.data = torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.5)
    dense = copy.deepcopy(sparse)
    dense.cfg = cfg.model_copy(update={"execution": "dense"})
    sparse.eval(), dense.eval()
    images, masks = synthetic_batch(args.batch_size, cfg.backbone.img_size, args.parts, args.seed)
    params = {
        "trainable": sum(v.numel() for v in sparse.trainable_state_dict().values()),
        "backbone": sum(p.numel() for p in sparse.backbone.parameters()),
        **{lv: sum(p.numel() for p in mods.parameters()) for lv, mods in
           (("patch", sparse.patch_experts), ("global", sparse.global_experts),
            ("component", sparse.component_experts), ("router", sparse.router))},
    }

    # ---- inference: one warm-up each, then alternate so drift hits both modes alike
    with torch.no_grad():
        out_s, out_d = sparse(images, masks), dense(images, masks)
        diff_experts = expert_diff(out_s, out_d)
        ps, pd = sparse.predict(images, masks), dense.predict(images, masks)
        diff_maps = float((ps.anomaly_map - pd.anomaly_map).abs().max())
        t_sparse, t_dense = [], []
        for _ in range(args.reps):
            t_sparse += timed(lambda: sparse.predict(images, masks), 1)
            t_dense += timed(lambda: dense.predict(images, masks), 1)
    sel = out_s.routing.mask.float()
    share = {lv: float(sel[:, out_s.routing.level_slices[lv]].sum() / sel.sum()) for lv in LEVELS}
    experts_used = int(out_s.routing.mask.any(0).sum())

    # ---- training: ours (sparse, jittered pass only where needed, estimator on detached features)
    #      vs the reference (dense experts, jittered pass for all, second full forward for the estimator)
    tcfg = TrainConfig(steps=1000, batch_size=args.batch_size, warmup_steps=10)
    ours = Trainer(copy.deepcopy(sparse), tcfg)
    ref_model = copy.deepcopy(dense)
    ref = Trainer(ref_model, tcfg, reference_mode=True)
    ours.step(images, masks), ref.step(images, masks)  # warm-up
    tr_ours, tr_ref = [], []
    for _ in range(args.train_reps):
        tr_ours += timed(lambda: ours.step(images, masks), 1)
        tr_ref += timed(lambda: ref.step(images, masks), 1)

    b = args.batch_size
    med = statistics.median
    res = {
        "benchmark": "model",
        "config": {"preset": args.preset, "backbone": cfg.backbone.name, "weights": cfg.backbone.weights,
                   "img_size": cfg.backbone.img_size, "experts": cfg.num_experts, "router": cfg.router.mode,
                   "top_k": cfg.router.top_k, "decoder_depth": cfg.patch.decoder_depth, "batch_size": b,
                   "parts_per_image": args.parts, "dtype": "float32", "threads": torch.get_num_threads()},
        "params": params,
        "routing_share": share,
        "experts_used_in_batch": experts_used,
        "sparse_img_per_s": b / med(t_sparse),
        "dense_img_per_s": b / med(t_dense),
        "sparse_over_dense": med(t_dense) / med(t_sparse),
        "train_step_sparse_s": med(tr_ours),
        "train_step_dense_s": med(tr_ref),
        "train_dense_over_sparse": med(tr_ref) / med(tr_ours),
        "max_abs_diff": max(diff_experts, diff_maps),
        "max_abs_diff_experts": diff_experts,
        "max_abs_diff_maps": diff_maps,
        "reps": {"inference": args.reps, "train": args.train_reps},
        "peak_rss_mb": peak_rss_mb(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python jobs/benchmark.py model --json",
    }
    return res


def bench_ablation(args) -> dict:
    """Full MoE vs a patch-experts-only model on the objects domain, same data, steps, batch, lr and seed."""
    from anomalymoe.models.artifact import save_artifact
    from anomalymoe.platform.data import resolve_data
    from anomalymoe.platform.evaluation import evaluate
    from anomalymoe.platform.segmentation import SegmentParams, segment_manifest
    from anomalymoe.platform.trainer import seed_everything, train_and_calibrate

    df, kept = resolve_data("demo", demo_root=args.data_root, domains=["objects"], seed=args.seed)
    base = presets()[args.preset].model_copy(deep=True)
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
        if name == "full":
            seg, kept = segment_manifest(model.backbone, df, params=SegmentParams(k=args.k, seed=args.seed))
            df = seg
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=max(1, args.steps // 10), seed=args.seed)
        t = time.perf_counter()
        train_and_calibrate(model, df[df["split"] == "train"], tcfg, kept=kept if name == "full" else None)
        train_s = time.perf_counter() - t
        rep = evaluate(model, df[df["split"] == "test"], batch_size=args.batch_size,
                       kept=kept if name == "full" else None, out_dir=args.out / name if args.out else None)
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
                   "seed": args.seed, "k": args.k},
        "results": results,
        "logical_image_auroc_gain": full.get("logical_image_auroc", float("nan"))
        - po.get("logical_image_auroc", float("nan")),
        "component_image_auroc_gain": full.get("component_image_auroc", float("nan"))
        - po.get("component_image_auroc", float("nan")),
        "peak_rss_mb": peak_rss_mb(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": f"python jobs/benchmark.py ablation --steps {args.steps} --json",
    }


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


def table(res: dict) -> str:
    rows = [
        ("config", f"{res['config']['backbone']} @ {res['config']['img_size']} px, experts "
                   f"{'/'.join(str(v) for v in res['config']['experts'].values())}, {res['config']['router']} "
                   f"top-{res['config']['top_k']}, batch {res['config']['batch_size']}"),
        ("trainable params", f"{res['params']['trainable'] / 1e6:.1f} M"),
        ("routing share p/g/c", " / ".join(f"{v:.2f}" for v in res["routing_share"].values())),
        ("inference sparse", f"{res['sparse_img_per_s']:.2f} img/s"),
        ("inference dense (reference)", f"{res['dense_img_per_s']:.2f} img/s"),
        ("sparse / dense speed-up", f"{res['sparse_over_dense']:.2f}x"),
        ("train step ours", f"{res['train_step_sparse_s']:.2f} s"),
        ("train step reference", f"{res['train_step_dense_s']:.2f} s"),
        ("reference / ours", f"{res['train_dense_over_sparse']:.2f}x"),
        ("max |sparse - dense|", f"{res['max_abs_diff']:.2e}"),
        ("peak RSS", f"{res['peak_rss_mb']:.0f} MB"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _window(history: list[dict], warmup: int, batch: int) -> dict:
    """Throughput and per-step time split over the steps after `warmup` (the reports carry running averages since
    the loop started: differences of their totals give the window's own figures)."""
    rows = {int(r["step"]): r for r in history}
    a, b = min(max(warmup, min(rows)), max(rows) - 1), max(rows)
    elapsed = {s: s * batch / rows[s]["images_per_s"] for s in (a, b)}
    out = {"steps_timed": b - a, "img_s": (b - a) * batch / (elapsed[b] - elapsed[a])}
    split = {k: (rows[b][f"time_{k}"] * b - rows[a][f"time_{k}"] * a) / (b - a)
             for k in ("data", "forward", "backward", "optimizer")}
    step_s = (elapsed[b] - elapsed[a]) / (b - a)
    split["other"] = max(0.0, step_s - sum(split.values()))  # gradient all-reduce, metric reports, checkpoints
    out["step_s"] = step_s
    out["split_s"] = split
    out["split_share"] = {k: v / step_s for k, v in split.items()}
    return out


def bench_train(args) -> dict:
    """The Ray Train loop of jobs/train.py (Ray Data decoding, gradient averaging) on the demo textures, for 1 and
    2 workers with the same global batch; no MLflow, no validation, a checkpoint only at the end."""
    import tempfile

    from anomalymoe.platform.ray_training import (
        JobSpec,
        connect_ray,
        cpus_per_worker,
        fit_on_ray,
        loop_config,
        prepare,
        read_history,
    )

    tmp = Path(tempfile.mkdtemp(prefix="amoe-bench-train-"))
    spec = JobSpec(model=presets()[args.preset].model_copy(deep=True),
                   train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3, warmup_steps=1),
                   data=["demo"], domains=["textures"], storage=str(tmp), checkpoint_every=args.steps, log_every=1,
                   register=False, loader=args.loader)
    prep = prepare(spec)
    connect_ray(None)
    import ray

    res = {"benchmark": "train", "command": "python jobs/benchmark.py " + " ".join(sys.argv[1:]),
           "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": platform.platform(),
           "cpus": int(ray.cluster_resources().get("CPU", 0)), "torch": torch.__version__,
           "config": {"preset": args.preset, "img_size": spec.model.backbone.img_size, "global_batch": args.batch_size,
                      "steps": args.steps, "warmup_steps_excluded": args.warmup, "loader": args.loader,
                      "train_images": len(prep.train)},
           "workers": {}}
    for w in args.workers:
        cpus = cpus_per_worker(w)
        loop = loop_config(spec, prep, f"bench-{w}w-{int(time.time())}", None, threads=cpus)
        loop.val_rows = None
        t = time.perf_counter()
        result = fit_on_ray(loop, workers=w, storage_uri=str(tmp), cpus_per_worker=cpus, max_failures=0)
        wall = time.perf_counter() - t
        with result.checkpoint.as_directory() as d:
            hist = read_history(d)
        win = _window(hist, args.warmup, args.batch_size)
        win.update({"img_s_per_worker": win["img_s"] / w, "threads_per_worker": cpus, "wall_s_incl_startup": wall})
        res["workers"][str(w)] = win
    if {"1", "2"} <= set(res["workers"]):
        res["two_over_one"] = res["workers"]["2"]["img_s"] / res["workers"]["1"]["img_s"]
    return res


def train_table(res: dict) -> str:
    head = (f"Ray Train, {res['config']['preset']} @ {res['config']['img_size']} px, global batch "
            f"{res['config']['global_batch']}, {res['cpus']} CPUs, {res['config']['loader']} loader, "
            f"steps {res['config']['warmup_steps_excluded']}-{res['config']['steps']} timed")
    lines = [head, "| workers | img/s | img/s per worker | s/step | data | forward | backward | optimizer | other |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w, r in res["workers"].items():
        sp = r["split_s"]
        lines.append(f"| {w} | {r['img_s']:.2f} | {r['img_s_per_worker']:.2f} | {r['step_s']:.2f} | "
                     + " | ".join(f"{sp[k]:.2f} ({100 * r['split_share'][k]:.0f} %)"
                                  for k in ("data", "forward", "backward", "optimizer", "other")) + " |")
    if "two_over_one" in res:
        lines.append(f"2 workers / 1 worker throughput: {res['two_over_one']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)
    m = sub.add_parser("model", help="sparse vs dense experts; our train step vs the reference's")
    m.add_argument("--preset", default="cpu", choices=sorted(presets()),
                   help="model config (default: reference shape at ViT-S/14, 224 px, 6/6/6 experts, top-3)")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--parts", type=int, default=3, help="component masks per image")
    m.add_argument("--reps", type=int, default=3, help="timed inference batches per mode")
    m.add_argument("--train-reps", type=int, default=2, help="timed train steps per mode")
    m.add_argument("--no-spread-router", dest="spread_router", action="store_false",
                   help="keep the reference router init (every image routed alike)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    m.add_argument("--out", type=Path, help="also write the JSON here")
    a = sub.add_parser("ablation", help="objects domain: full MoE vs patch experts only, same training budget")
    a.add_argument("--preset", default="cpu-small", choices=sorted(presets()))
    a.add_argument("--steps", type=int, default=60)
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--lr", type=float, default=2e-3)
    a.add_argument("--k", type=int, default=6, help="component clusters per category")
    a.add_argument("--data-root", type=Path, default=Path("outputs/demo/data"))
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", action="store_true")
    a.add_argument("--out", type=Path, help="write per-variant evaluation reports and model artifacts here")
    a.add_argument("--variants", type=lambda s: s.split(","), default=["full", "patch_only"],
                   help="comma-separated subset of full,patch_only (default both; the gains need both)")
    t = sub.add_parser("train", help="Ray Train throughput for 1 and 2 workers and the per-step time split")
    t.add_argument("--preset", default="cpu-small", choices=sorted(presets()))
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    t.add_argument("--batch-size", type=int, default=8, help="global batch (split over the workers)")
    t.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    t.add_argument("--loader", choices=("ray", "local"), default="ray")
    t.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    run, show = {"model": (bench_model, table), "ablation": (bench_ablation, ablation_table),
                 "train": (bench_train, train_table)}[args.which]
    res = run(args)
    print(show(res), flush=True)
    if getattr(args, "out", None) and args.which == "model":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
