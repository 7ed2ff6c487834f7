"""Ray Train throughput: 1 vs 2 workers with the same global batch, and where a step's time goes
(`python jobs/benchmark.py train`)."""

from __future__ import annotations

import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from anomalymoe.models.config import presets
from anomalymoe.platform.train.trainer import TrainConfig


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

    from anomalymoe.platform.cluster.ray import connect_ray
    from anomalymoe.platform.train.job import JobSpec, loop_config, prepare
    from anomalymoe.platform.train.loop import cpus_per_worker, fit_on_ray, read_history

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
