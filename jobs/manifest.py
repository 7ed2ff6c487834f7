"""Build or check a manifest: the table every job reads (anomalymoe/platform/data/manifest.py).

    python jobs/manifest.py build --root s3://bucket/mvtec --domain industrial --dataset mvtec --out m.parquet \\
        --validate
    python jobs/manifest.py build --catalog datasets.yaml --out m.parquet
    python jobs/manifest.py validate --manifest m.parquet          # every bad row at once, exit 1 if any"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from anomalymoe.platform.data import storage  # noqa: E402
from anomalymoe.platform.data.catalog import load_catalog  # noqa: E402
from anomalymoe.platform.data.manifest import (  # noqa: E402
    ManifestError,
    build_manifest_from_mvtec,
    read_manifest,
    validate_manifest,
    write_manifest,
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python jobs/manifest.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="walk an MVTec-layout root (or a catalog) and write a manifest")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="dataset root in the MVTec AD layout (path or s3://)")
    src.add_argument("--catalog", help="catalog YAML/JSON: build every dataset it lists")
    b.add_argument("--domain", help="domain name (with --root)")
    b.add_argument("--dataset", help="dataset name (with --root)")
    b.add_argument("--categories", nargs="*", help="only these categories (default: all found)")
    b.add_argument("--defect-group", default=None, help="defect_group for defects defect_groups.json lacks")
    b.add_argument("--out", required=True, help="manifest .parquet to write (path or s3://)")
    b.add_argument("--validate", action="store_true", help="validate before writing; exit 1 on problems")
    v = sub.add_parser("validate", help="check a manifest and every file it lists; exit 1 on problems")
    v.add_argument("--manifest", required=True)
    v.add_argument("--no-images", action="store_true", help="skip file checks (schema and values only)")
    v.add_argument("--workers", type=int, default=8)
    v.add_argument("--no-pixel-gt", nargs="*", default=(), help="datasets whose anomalies have no masks")
    v.add_argument("--write-sizes", metavar="URI", help="write the manifest with width/height filled here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "build":
            no_pixel_gt: Collection[str] = ()
            if args.catalog:
                cat = load_catalog(args.catalog)
                df = cat.build_manifest()
                no_pixel_gt = cat.no_pixel_gt()
            else:
                if not (args.domain and args.dataset):
                    p.error("--root needs --domain and --dataset")
                df = build_manifest_from_mvtec(args.root, args.domain, args.dataset, args.categories or None,
                                               default_defect_group=args.defect_group)
            if args.validate:
                report = validate_manifest(df, no_pixel_gt=no_pixel_gt)
                print(report.summary())
                if not report.ok:
                    return 1
                df = report.manifest
            digest = write_manifest(df, args.out)
            print(json.dumps({"out": args.out, "rows": len(df), "hash": digest,
                              "by_split": df["split"].value_counts().sort_index().to_dict()}))
            return 0
        df = read_manifest(args.manifest)
        report = validate_manifest(df, check_images=not args.no_images, max_workers=args.workers,
                                   no_pixel_gt=args.no_pixel_gt)
        print(report.summary())
        if report.ok and args.write_sizes:
            write_manifest(report.manifest, args.write_sizes)
        return 0 if report.ok else 1
    except (ManifestError, storage.StorageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2




if __name__ == "__main__":
    sys.exit(main())
