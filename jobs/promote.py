"""Promote a registered model version to `champion` of anomalymoe-<domain>, only if its gates pass: the artifact
loads with a fitted calibration, a smoke inference succeeds, and its metrics are not worse than the current
champion's on the same evaluation set. Prints every gate's verdict; exit status 1 when refused.

    python jobs/promote.py --domain textures                       # the challenger, registered metrics
    python jobs/promote.py --domain textures --version 4 --data demo   # evaluate both on the demo test split
    python jobs/promote.py --domain textures --version 3 --dry-run     # only check

Rolling back is promoting the previous champion (its version is in the new champion's `previous_champion` tag).
MLflow from MLFLOW_TRACKING_URI, else the local store (outputs/mlflow)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from anomalymoe.platform import promotion
from anomalymoe.platform.tracking import registry  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True, help="the registered model is anomalymoe-<domain>")
    ap.add_argument("--version", default=registry.CHALLENGER, help="version number or alias (default challenger)")
    ap.add_argument("--data", action="append",
                    help="evaluate candidate and champion now on this data's test split (repeatable); default: "
                         "compare the metrics logged at registration when both used the same manifest")
    ap.add_argument("--tolerance", type=float, default=0.0, help="allowed drop per metric (default 0)")
    ap.add_argument("--dry-run", action="store_true", help="run the gates, change nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        version = promotion.resolve_version(args.domain, args.version)
    except registry.RegistryError as e:
        raise SystemExit(f"--version {args.version}: {e}") from None
    run = promotion.check if args.dry_run else promotion.promote
    rep = run(args.domain, version, args.data, args.tolerance)
    print(rep.text())
    if rep.passed:
        print(f"{'would promote' if args.dry_run else 'promoted'}: {registry.model_name(args.domain)}@champion -> "
              f"version {version}")
    else:
        print(f"refused: {registry.model_name(args.domain)}@champion stays at version {rep.champion or '(none)'}")
    print("SUMMARY " + json.dumps(promotion.summary(rep)))
    return 0 if rep.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
