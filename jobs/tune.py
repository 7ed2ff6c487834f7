"""Search expert and router settings with Ray Tune: each trial is a Ray Train run (1 worker) of jobs/train.py's
loop, ASHA stops weak trials at validation rungs, Optuna TPE proposes configs; the objective is val_score on
held-out normal images plus synthetic defects (never the test split). MLflow gets a parent run with one child run
per trial; the best finished trial's model is calibrated, evaluated and registered (alias challenger).

    python jobs/tune.py                                   # demo data, cpu-small, 4 trials
    python jobs/tune.py --config configs/x.yaml --data mvtec=s3://bucket/mvtec --trials 32 --steps 2000

Takes the same --config / --data / --steps / --storage / --experiment flags as jobs/train.py."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from train import USER_ERRORS, build_spec  # noqa: E402  (jobs/train.py: the same flags mean the same here)

from anomalymoe.platform.tuning import run_tune  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML with preset / model / train / job sections (as jobs/train.py)")
    ap.add_argument("--data", action="append", help="as jobs/train.py (default: demo)")
    ap.add_argument("--domain", dest="domains", action="append")
    ap.add_argument("--steps", type=int, help="steps per trial (the ASHA maximum)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float, help="base learning rate (the search draws its own)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--trials", type=int, default=4, help="number of trials (default 4)")
    ap.add_argument("--max-concurrent", type=int, help="trials at once (default: one per cluster CPU/GPU)")
    ap.add_argument("--rung", type=int, help="steps between validations = ASHA rungs (default steps/4)")
    ap.add_argument("--storage", help="Tune and Train storage: s3://bucket/prefix or a directory")
    ap.add_argument("--output", help="where the best model, its evaluation and trials.csv go")
    ap.add_argument("--experiment")
    ap.add_argument("--name", help="search name (MLflow parent run name)")
    ap.add_argument("--address")
    ap.add_argument("--loader", choices=("ray", "local"))
    ap.add_argument("--holdout", type=float)
    ap.add_argument("--no-register", action="store_true")
    args = ap.parse_args(argv)
    for flag in ("backbone", "weights", "workers", "gpu", "checkpoint_every", "val_every", "log_every", "alpha",
                 "max_failures"):
        setattr(args, flag, None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = build_spec(args)
    try:
        summary = run_tune(spec, trials=args.trials, max_concurrent=args.max_concurrent, grace=args.rung,
                           seed=spec.train.seed)
    except USER_ERRORS as e:
        raise SystemExit(f"tune: {e}") from None
    print(f"\nbest trial {summary['best_trial']}: {summary['best_config']}")
    print(f"trials table : {summary['output']}/trials.csv\nmodel        : {summary['output']}/model")
    print("SUMMARY " + json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
