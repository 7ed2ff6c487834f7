"""Component masks for a dataset: backbone patch features -> per-category k-means -> soft assignment ->
guided-filter refinement -> lossless label maps beside the images, plus each category's cluster centres and
kept-cluster list (background clusters removed by a vote over the training images).

    python jobs/segment.py --data demo --domain objects
    python jobs/segment.py --data s3://bucket/mvtec --k screw=6 --k default=5 --ray

Idempotent: a rerun skips finished categories and every label map already written, so a killed run resumes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from anomalymoe.models.backbone import Backbone  # noqa: E402
from anomalymoe.models.config import BackboneConfig  # noqa: E402
from anomalymoe.platform.data.manifest import ManifestError, ensure_valid  # noqa: E402
from anomalymoe.platform.data.segmentation import SegmentParams, segment_manifest  # noqa: E402
from anomalymoe.platform.data.sources import resolve_data  # noqa: E402


def parse_k(values: list[str]) -> tuple[int, dict[str, int]]:
    default, per = 5, {}
    for v in values:
        name, _, k = v.rpartition("=")
        if not name:
            default = int(k)
        elif name == "default":
            default = int(k)
        else:
            per[name] = int(k)
    return default, per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True,
                    help="demo | manifest.parquet | catalog.yaml | dataset root (local or s3://) | domain=<root>")
    ap.add_argument("--domain", action="append", help="only these domains (repeatable)")
    ap.add_argument("--k", action="append", default=[], help="clusters: N (all), category=N or default=N")
    ap.add_argument("--backbone", default="vit_small_patch14_dinov2", help="timm backbone name")
    ap.add_argument("--weights", default="offline:dinov2_vits14", help="backbone weights URI")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--out-size", type=int, default=256, help="label map side")
    ap.add_argument("--no-refine", action="store_true", help="argmax of the upsampled soft assignment only")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--manifest-out", help="write the manifest with component_mask_uri filled here (.parquet)")
    ap.add_argument("--ray", action="store_true", help="run feature extraction and assignment as Ray Data jobs "
                    "(a local Ray unless RAY_ADDRESS points at a cluster)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-bad-rows", action="store_true", help="drop unreadable/inconsistent rows instead of failing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    df, _ = resolve_data(args.data, domains=args.domain, seed=args.seed)
    try:  # a broken manifest is refused with every problem listed, unless told to skip bad rows
        df = ensure_valid(df, skip_bad_rows=args.skip_bad_rows, required_splits=("train",))
    except ManifestError as e:
        raise SystemExit(f"the data has problems (rerun with --skip-bad-rows to drop those rows):\n{e}") from None
    k_default, k_per = parse_k(args.k)
    backbone = Backbone(BackboneConfig(name=args.backbone, weights=args.weights, img_size=args.img_size))
    params = SegmentParams(k=k_default, out_size=args.out_size, refine=not args.no_refine, seed=args.seed)
    print(f"segmenting {df['category'].nunique()} categories, {len(df)} images "
          f"(k={k_default}, per category {k_per or '-'})", flush=True)
    if args.ray:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False)
    df, kept = segment_manifest(backbone, df, k_per, params, batch_size=args.batch_size, use_ray=args.ray)
    for key, ks in kept.items():
        print(f"  {key}: kept clusters {ks}")
    if args.manifest_out:
        from anomalymoe.platform.data.manifest import write_manifest

        write_manifest(df, args.manifest_out)
        print(f"manifest with component masks -> {args.manifest_out}")
    print(json.dumps({"categories": len(kept), "images": len(df), "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
