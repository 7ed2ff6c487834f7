"""Train AnomalyMoE on Ray Train: data-parallel workers over a manifest (demo data, a catalog, a manifest or
dataset roots, local or s3://), checkpoints to --storage (resumed automatically: worker failures are retried
from the latest checkpoint; rerunning with the same --name resumes too), an MLflow run with params, metrics and
artifacts, then calibration on held-out normal images, evaluation of the test split and a registered version
of anomalymoe-<domain> per domain trained, with alias `challenger`.

    python jobs/train.py                                    # configs/cpu-small.yaml: demo data, local Ray and MLflow
    python jobs/train.py --workers 2 --steps 200 --name exp1 --storage s3://bucket/runs
    ray job submit --working-dir . -- python jobs/train.py --data textures=s3://bucket/textures --workers 4
    python jobs/train.py --config configs/reference.yaml --data mvtec=/data/mvtec     # the reference, one GPU
    python jobs/train.py --preset test-tiny --steps 4 --no-register                  # = --config configs/test-tiny.yaml

--config YAML: {preset: <model preset>, model: {...overrides...}, train: {...TrainConfig...}, job: {...JobSpec...}},
a path or the name of a shipped config (configs/cpu-small.yaml, configs/reference.yaml, configs/test-tiny.yaml).
Layers, later wins: model preset < the config's sections < flags; built-in defaults fill only what none sets.
A backbone without weights is refused unless asked for by name (--weights random).
MLflow: MLFLOW_TRACKING_URI, else a local sqlite store (outputs/mlflow)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from anomalymoe.platform.train.config import (  # noqa: E402
    USER_ERRORS,
    add_config_arguments,
    build_spec,
    config_ref,
    flags_from_args,
)
from anomalymoe.platform.train.job import run_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    ap.add_argument("--data", action="append",
                    help="demo | manifest.parquet | catalog.yaml | dataset root (local or s3://) | domain=<root>; "
                         "repeatable (default: the config's, the built-in demo data)")
    ap.add_argument("--domain", dest="domains", action="append", help="only these domains (repeatable)")
    ap.add_argument("--workers", type=int, help="Ray Train workers (default: the config's)")
    ap.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                    help="one GPU per worker, NCCL, bf16 autocast (default: the config's)")
    ap.add_argument("--storage", help="checkpoints: s3://bucket/prefix or a directory (default outputs/ray_runs)")
    ap.add_argument("--output", help="where the final model artifact and evaluation go (default outputs/train/<name>)")
    ap.add_argument("--experiment", help="MLflow experiment (default anomalymoe)")
    ap.add_argument("--name", help="run name; rerunning with the same name and storage resumes that run")
    ap.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: the config's)")
    ap.add_argument("--val-every", type=int, help="steps between validations on held-out normals (0: end only)")
    ap.add_argument("--log-every", type=int, help="steps between metric reports (default: the config's)")
    ap.add_argument("--holdout", type=float, help="share of each category's normal images held out (default 0.2)")
    ap.add_argument("--alpha", type=float, help="category balance: P(category) ~ size**alpha (default 0 = equal)")
    ap.add_argument("--loader", choices=("ray", "local"),
                    help="ray = Ray Data decode tasks (default); local = decode in the training process")
    ap.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint (default 3)")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--no-register", action="store_true", help="do not register model versions")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = build_spec(config_ref(args), flags_from_args(args))
        summary = run_job(spec)
    except USER_ERRORS as e:  # a user's mistake or an unreachable service: one message, no stack trace
        raise SystemExit(f"train: {e}") from None
    print(f"\nmodel artifact : {summary['output']}/model\nevaluation     : {summary['output']}/eval/metrics.md")
    print("SUMMARY " + json.dumps(summary, default=str), flush=True)  # one line, for scripts and tests
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
