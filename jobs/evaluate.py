"""Evaluate a model artifact on the test split of a dataset: metrics per domain, category, defect type and
defect group, anomaly-map panels, score histograms and the routing histogram.

    python jobs/evaluate.py --model outputs/demo/model --data demo --out outputs/eval
    python jobs/evaluate.py --model models:/anomalymoe-textures@champion --data s3://bucket/manifest.parquet --out ev

Writes <out>/report.json ({"mean", "domains", "categories"}), metrics.md, scores.csv, panels/, histograms/,
routing.png. Memory stays bounded: metrics are streamed, only one batch of images is held at a time."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

import torch  # noqa: E402

from anomalymoe.models.artifact import load_artifact  # noqa: E402
from anomalymoe.models.precision import describe, device_of  # noqa: E402
from anomalymoe.platform.data.manifest import ManifestError, ensure_valid  # noqa: E402
from anomalymoe.platform.data.sources import resolve_data  # noqa: E402
from anomalymoe.platform.data.storage import StorageError  # noqa: E402
from anomalymoe.platform.evaluation.evaluate import evaluate, metrics_table  # noqa: E402
from anomalymoe.platform.tracking import registry  # noqa: E402


def resolve_model(uri: str) -> Path:
    """An artifact directory (local or s3://), or an MLflow registry URI (models:/name@alias) downloaded."""
    try:
        p = registry.download(uri)
    except (registry.RegistryError, StorageError) as e:
        raise SystemExit(f"--model {uri}: {e}") from None
    if not p.is_dir():
        raise SystemExit(f"--model {uri}: not an artifact directory (model.safetensors + config.json + "
                         "calibration.json) nor a models:/ URI")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="artifact directory or models:/anomalymoe-<domain>@<alias>")
    ap.add_argument("--data", action="append", required=True,
                    help="demo | manifest.parquet | catalog.yaml | dataset root (local or s3://) | domain=<root>")
    ap.add_argument("--domain", action="append", help="only these domains (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, required=True, help="report directory")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--panels", type=int, default=6, help="panels per category (one per defect type)")
    ap.add_argument("--loader", choices=("local", "ray"), default="local",
                    help="decode in this process, or in parallel Ray Data tasks (a local Ray or RAY_ADDRESS)")
    ap.add_argument("--device", default="auto",
                    help="auto (a GPU when there is one, else the CPU) | cpu | cuda | cuda:N; a GPU scores in bf16")
    ap.add_argument("--skip-bad-rows", action="store_true", help="drop unreadable/inconsistent rows instead of failing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        device = device_of(args.device)
    except RuntimeError as e:
        raise SystemExit(f"--device {args.device}: {e}") from None
    path = resolve_model(args.model)
    model = load_artifact(path, device=device)
    calibrated = json.loads((path / "config.json").read_text()).get("calibrated_on")
    if calibrated and calibrated != describe(device, model.inference_precision):
        print(f"note: this model was calibrated on {calibrated}, it is scored here on "
              f"{describe(device, model.inference_precision)}: scores may differ from its registered report in "
              f"the last digits (--device {calibrated.split('/')[0]} reproduces them)", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    df, kept = resolve_data(args.data, domains=args.domain)
    try:  # a broken manifest is refused with every problem listed, unless told to skip bad rows
        df = ensure_valid(df, skip_bad_rows=args.skip_bad_rows, required_splits=(args.split,))
    except ManifestError as e:
        raise SystemExit(f"the data has problems (rerun with --skip-bad-rows to drop those rows):\n{e}") from None
    test = df[df["split"] == args.split]
    if test.empty:
        raise SystemExit(f"no {args.split!r} rows in {args.data}")
    report = evaluate(model, test, batch_size=args.batch_size, out_dir=args.out, panels_per_category=args.panels,
                      kept=kept, loader=args.loader)
    print(metrics_table(report))
    print(f"report: {args.out / 'report.json'}  table: {args.out / 'metrics.md'}  panels: {args.out / 'panels'}")
    print(json.dumps({"mean": report["mean"], "images": report["num_images"],
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
