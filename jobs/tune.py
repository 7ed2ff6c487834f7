"""Search expert and router settings with Ray Tune: each trial is a Ray Train run (1 worker) of jobs/train.py's
loop, ASHA stops weak trials at validation rungs, Optuna TPE proposes configs; the objective is val_score on
held-out normal images plus synthetic defects (never the test split). MLflow gets a parent run with one child run
per trial; the best finished trial's model is calibrated, evaluated and registered (alias challenger).

    python jobs/tune.py                                   # demo data, configs/cpu-small.yaml, 4 trials
    python jobs/tune.py --config configs/cpu-small.yaml --data mvtec=s3://bucket/mvtec --trials 32 --steps 2000

--config / --preset, --data, --steps, --lr, --weights, --storage, --experiment ... mean what they mean to
jobs/train.py (one implementation: anomalymoe.platform.train.config); each trial trains on 1 worker (one GPU with
--gpu, or where the config's job section says gpu: true)."""

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
from anomalymoe.platform.train.tuning import run_tune  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)  # --steps: steps per trial (the ASHA maximum); --lr: the base the search draws around
    ap.add_argument("--data", action="append", help="as jobs/train.py (default: the config's, the demo data)")
    ap.add_argument("--domain", dest="domains", action="append")
    ap.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                    help="one GPU per trial (default: the config's)")
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = build_spec(config_ref(args), flags_from_args(args))
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
