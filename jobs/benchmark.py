"""Benchmarks: speed and memory targets of the platform, measured as ratios inside one run.

    python jobs/benchmark.py model --json       # sparse vs dense experts, ours vs the reference train step
    python jobs/benchmark.py model --device cuda --preset reference --dtype bf16 --json   # one GPU (issue 12)
    python jobs/benchmark.py ablation --json    # objects domain: full MoE vs patch experts only
    python jobs/benchmark.py quality --device cuda --minutes 8 --json   # what a GPU budget buys (both domains)
    python jobs/benchmark.py train --json       # Ray Train throughput, 1 vs 2 workers, time split per step
    python jobs/benchmark.py serve --json       # Ray Serve over HTTP at 1/8/32 clients vs the raw model, one replica

Prints a table, then (with --json) one JSON object as the last stdout line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install


from anomalymoe.bench.ablation import ablation_table, bench_ablation  # noqa: E402
from anomalymoe.bench.model import add_arguments as model_arguments  # noqa: E402
from anomalymoe.bench.model import bench_model, table  # noqa: E402
from anomalymoe.bench.quality import add_arguments as quality_arguments  # noqa: E402
from anomalymoe.bench.quality import bench_quality  # noqa: E402
from anomalymoe.bench.quality import table as quality_table  # noqa: E402
from anomalymoe.bench.serve import SERVE_LEVELS, bench_serve, serve_default, serve_table  # noqa: E402
from anomalymoe.bench.train import bench_train, train_table  # noqa: E402
from anomalymoe.models.config import presets  # noqa: E402

# ------------------------------------------------------------------------------------------------ serve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)
    m = sub.add_parser("model", help="sparse vs dense experts; our train step vs the reference's")
    model_arguments(m)
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
    a.add_argument("--device", default="cpu", help="cpu | cuda | auto (a GPU trains under bf16 autocast)")
    a.add_argument("--weights", help="backbone weights instead of the preset's (e.g. a float16 .safetensors copy)")
    a.add_argument("--variants", type=lambda s: s.split(","), default=["full", "patch_only"],
                   help="comma-separated subset of full,patch_only (default both; the gains need both)")
    q = sub.add_parser("quality", help="train on the demo data for a time budget on one device (library loop, no "
                                       "Ray), evaluate like the demo, per-level AUROC")
    quality_arguments(q)
    t = sub.add_parser("train", help="Ray Train throughput for 1 and 2 workers and the per-step time split")
    t.add_argument("--preset", default="cpu-small", choices=sorted(presets()))
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    t.add_argument("--batch-size", type=int, default=8, help="global batch (split over the workers)")
    t.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    t.add_argument("--loader", choices=("ray", "local"), default="ray")
    t.add_argument("--json", action="store_true")
    s = sub.add_parser("serve", help="Ray Serve over HTTP (one domain, one Scorer replica) at 1/8/32 clients: "
                                     "img/s, latency percentiles, and img/s at 8 clients over the raw model's")
    s.add_argument("--preset", default="cpu-small", choices=sorted(presets()),
                   help="model config (default cpu-small: ViT-S/14 at 224 px; test-tiny for a quick check)")
    s.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads (= Ray CPUs) of the scorer replica and of the raw measurement "
                        "(default: this machine's cores)")
    s.add_argument("--batch-size", type=int, default=8, help="the scorer's max_batch_size and the raw batch")
    s.add_argument("--batch-wait", type=float, default=serve_default("batch_wait_timeout_s"),
                   help="the scorer's batch_wait_timeout_s (default: the serving default)")
    s.add_argument("--max-ongoing", type=int, default=serve_default("max_ongoing_requests"),
                   help="the scorer's max_ongoing_requests (default: the serving default)")
    s.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=list(SERVE_LEVELS),
                   help="comma-separated client counts (default 1,8,32)")
    s.add_argument("--requests", type=int, default=24, help="timed requests per client thread at each level")
    s.add_argument("--warmup", type=int, default=2, help="untimed requests per client thread before each level")
    s.add_argument("--raw-reps", type=int, default=6, help="timed raw batches, before and after the HTTP runs")
    s.add_argument("--image-size", type=int, default=256, help="side of the demo PNGs sent (resized by the model)")
    s.add_argument("--n-train", type=int, default=8, help="demo images to calibrate on")
    s.add_argument("--n-test", type=int, default=8, help="good demo test images (plus one per defect type)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    s.add_argument("--address", default=None,
                   help="connect to this Ray cluster instead of starting a local one (its Serve is shut down at "
                        "the end; the raw figure is still measured in this process)")
    s.add_argument("--ready-timeout", type=float, default=600.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    run, show = {"model": (bench_model, table), "ablation": (bench_ablation, ablation_table),
                 "train": (bench_train, train_table), "serve": (bench_serve, serve_table),
                 "quality": (bench_quality, quality_table)}[args.which]
    res = run(args)
    print(show(res), flush=True)
    if getattr(args, "out", None) and args.which in ("model", "quality"):
        path = args.out / "quality.json" if args.which == "quality" else args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
