"""Train AnomalyMoE on Ray Train: data-parallel workers over a manifest (demo data, a catalog, a manifest or
dataset roots, local or s3://), checkpoints to --storage (resumed automatically: worker failures are retried
from the latest checkpoint; rerunning with the same --name resumes too), an MLflow run with params, metrics and
artifacts, then calibration on held-out normal images, evaluation of the test split and a registered version
of anomalymoe-<domain> per domain trained, with alias `challenger`.

    python jobs/train.py                                    # embedded default: demo data, local Ray and MLflow
    python jobs/train.py --workers 2 --steps 200 --name exp1 --storage s3://bucket/runs
    ray job submit --working-dir . -- python jobs/train.py --data textures=s3://bucket/textures --workers 4
    python jobs/train.py --config configs/cpu-small.yaml --data mvtec=/data/mvtec --gpu

--config YAML: {preset: <name>, model: {...overrides...}, train: {...TrainConfig...}, job: {...flags...}};
flags given on the command line win. MLflow: MLFLOW_TRACKING_URI, else a local sqlite store (outputs/mlflow)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

import yaml  # noqa: E402

from anomalymoe.models.config import ModelConfig, presets  # noqa: E402
from anomalymoe.platform.checkpoint import CheckpointError  # noqa: E402
from anomalymoe.platform.manifest import ManifestError  # noqa: E402
from anomalymoe.platform.ray_training import JobSpec, MLflowUnavailable, run_job  # noqa: E402
from anomalymoe.platform.registry import RegistryError  # noqa: E402
from anomalymoe.platform.storage import StorageError  # noqa: E402
from anomalymoe.platform.trainer import TrainConfig  # noqa: E402

USER_ERRORS = (FileNotFoundError, ManifestError, StorageError, CheckpointError, RegistryError, MLflowUnavailable)

# the embedded default: the demo's CPU-sized settings
DEFAULTS = {"preset": "cpu-small", "train": {"steps": 60, "batch_size": 8, "lr": 2e-3, "warmup_steps": 6}}
JOB_FLAGS = ("data", "domains", "workers", "gpu", "storage", "output", "experiment", "name", "checkpoint_every",
             "val_every", "log_every", "holdout", "alpha", "loader", "max_failures", "address")


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_spec(args: argparse.Namespace) -> JobSpec:
    user = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    conf = merge(DEFAULTS, user)
    unknown = set(conf) - {"preset", "model", "train", "job"}
    if unknown:
        raise SystemExit(f"--config: unknown sections {sorted(unknown)} (allowed: preset, model, train, job)")
    if conf["preset"] not in presets():
        raise SystemExit(f"--config preset {conf['preset']!r} is not one of {sorted(presets())}")
    model = merge(presets()[conf["preset"]].to_dict(), conf.get("model") or {})
    if args.backbone:
        model["backbone"]["name"] = args.backbone
    if args.weights is not None:
        model["backbone"]["weights"] = args.weights or None
    train = dict(conf.get("train") or {})
    for flag, key in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            train[key] = getattr(args, flag)
    if args.steps is not None and "warmup_steps" not in (user.get("train") or {}):
        train["warmup_steps"] = max(1, args.steps // 10)
    job = dict(conf.get("job") or {})
    for k in JOB_FLAGS:
        v = getattr(args, k)
        if v is not None and v is not False:
            job[k] = v
    try:
        return JobSpec(model=ModelConfig.from_dict(model), train=TrainConfig(**train),
                       register=not args.no_register, **job)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"bad configuration: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML with preset / model / train / job sections")
    ap.add_argument("--data", action="append",
                    help="demo | manifest.parquet | catalog.yaml | dataset root (local or s3://) | domain=<root>; "
                         "repeatable (default: demo)")
    ap.add_argument("--domain", dest="domains", action="append", help="only these domains (repeatable)")
    ap.add_argument("--steps", type=int, help="training steps (default 60)")
    ap.add_argument("--batch-size", type=int, help="global batch size, split over the workers (default 8)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    ap.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker, NCCL, bf16 autocast")
    ap.add_argument("--storage", help="checkpoints: s3://bucket/prefix or a directory (default outputs/ray_runs)")
    ap.add_argument("--output", help="where the final model artifact and evaluation go (default outputs/train/<name>)")
    ap.add_argument("--backbone", help="timm backbone name (overrides the preset)")
    ap.add_argument("--weights", help="backbone weights: offline:dinov2_vits14, a .safetensors path/URI, '' = random")
    ap.add_argument("--experiment", help="MLflow experiment (default anomalymoe)")
    ap.add_argument("--name", help="run name; rerunning with the same name and storage resumes that run")
    ap.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 50)")
    ap.add_argument("--val-every", type=int, help="steps between validations on held-out normals (default: end only)")
    ap.add_argument("--log-every", type=int, help="steps between metric reports (default 10)")
    ap.add_argument("--holdout", type=float, help="share of each category's normal images held out (default 0.2)")
    ap.add_argument("--alpha", type=float, help="category balance: P(category) ~ size**alpha (default 0 = equal)")
    ap.add_argument("--loader", choices=("ray", "local"),
                    help="ray = Ray Data decode tasks (default); local = decode in the training process")
    ap.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint (default 3)")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--no-register", action="store_true", help="do not register model versions")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = build_spec(args)
    try:
        summary = run_job(spec)
    except USER_ERRORS as e:  # a user's mistake or an unreachable service: one message, no stack trace
        raise SystemExit(f"train: {e}") from None
    print(f"\nmodel artifact : {summary['output']}/model\nevaluation     : {summary['output']}/eval/metrics.md")
    print("SUMMARY " + json.dumps(summary, default=str), flush=True)  # one line, for scripts and tests
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
