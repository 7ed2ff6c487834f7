"""What a job's `--data` means, in one place: `demo`, a manifest (.parquet), a catalog (.yaml/.json), a dataset
root in the MVTec layout (local or s3://), or `domain=<root>` (repeatable). Every form becomes a manifest;
categories that the segmentation job has finished also get their component label maps and kept clusters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from . import storage
from .catalog import demo_catalog, load_catalog
from .manifest import build_manifest_from_mvtec, concat_manifests, read_manifest
from .segmentation import label_map_uri, load_kept

DEMO_ROOT = Path("outputs/demo/data")


def ensure_demo_data(root: str | Path = DEMO_ROOT, seed: int = 0, domains: Sequence[str] = ("textures", "objects")
                     ) -> dict:
    """Generate (or reuse) the built-in demo domains under root/<domain>."""
    from .demo_data import generate_textures
    from .demo_objects import generate_objects

    gens = {"textures": generate_textures, "objects": generate_objects}
    return {d: gens[d](Path(root) / d, seed=seed) for d in domains}


def _name(root: str) -> str:
    return root.rstrip("/").rsplit("/", 1)[-1]


def resolve_data(specs: str | Sequence[str], *, demo_root: str | Path = DEMO_ROOT, seed: int = 0,
                 domains: Sequence[str] | None = None) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """(manifest, kept clusters per "domain/category") for one or more --data values."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    frames = []
    for spec in specs:
        if spec == "demo":
            ensure_demo_data(demo_root, seed, domains or ("textures", "objects"))
            frames.append(demo_catalog(str(demo_root), domains or ("textures", "objects")).build_manifest())
        elif spec.endswith(".parquet"):
            frames.append(read_manifest(spec))
        elif spec.endswith((".yaml", ".yml", ".json")):
            frames.append(load_catalog(spec).build_manifest(domains))
        elif "=" in spec and not spec.startswith(("s3://", "/")):
            domain, root = spec.split("=", 1)
            frames.append(build_manifest_from_mvtec(root, domain, _name(root)))
        else:
            if not storage.is_s3(spec) and not Path(spec).exists():
                raise FileNotFoundError(f"--data {spec!r}: no such dataset root, manifest or catalog")
            frames.append(build_manifest_from_mvtec(spec, _name(spec), _name(spec)))
    df = concat_manifests(frames)
    if domains is not None:
        df = df[df["domain"].isin(domains)]
    return attach_components(df)


def attach_components(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """Fill component_mask_uri for categories whose segmentation finished (clusters.json present)."""
    kept = load_kept(df)
    if kept:
        df = df.copy()
        keys = df["domain"] + "/" + df["category"]
        rows = keys.isin(list(kept))
        df.loc[rows, "component_mask_uri"] = [label_map_uri(u) for u in df.loc[rows, "uri"]]
    return df, kept
