"""What a job's `--data` means, in one place: `demo`, a manifest (.parquet), a catalog (.yaml/.json), an image list
(.csv, or .parquet without manifest metadata), a dataset root in the MVTec or the flat layout (local or s3://;
platform/data/layouts.py), or `domain=<any of those>` (repeatable). Every form becomes a manifest;
categories that the segmentation job has finished also get their component label maps and kept clusters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from anomalymoe.platform.data import storage
from anomalymoe.platform.data.catalog import demo_catalog, load_catalog
from anomalymoe.platform.data.layouts import build_manifest
from anomalymoe.platform.data.manifest import concat_manifests
from anomalymoe.platform.data.segmentation import label_map_uri, load_kept

DEMO_ROOT = Path("outputs/demo/data")


def ensure_demo_data(root: str | Path = DEMO_ROOT, seed: int = 0, domains: Sequence[str] = ("textures", "objects")
                     ) -> dict:
    """Generate (or reuse) the built-in demo domains under root/<domain>."""
    from anomalymoe.platform.data.demo.objects import generate_objects
    from anomalymoe.platform.data.demo.textures import generate_textures

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
        elif spec.endswith((".yaml", ".yml", ".json")):
            frames.append(load_catalog(spec).build_manifest(domains))
        else:  # a manifest, an image list (.csv / .parquet), an MVTec or a flat tree; optionally domain=<that>
            domain, root = spec.split("=", 1) if "=" in spec and not spec.startswith(("s3://", "/")) else (None, spec)
            if not storage.is_s3(root) and not Path(root).exists():
                raise FileNotFoundError(f"--data {spec!r}: no such dataset root, manifest, image list or catalog")
            name = _name(root).rsplit(".", 1)[0] if Path(root).suffix.lower() in (".csv", ".parquet") else _name(root)
            frames.append(build_manifest(root, domain or name, name, seed=seed))
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


# The threshold is the 0.99 quantile of a category's held-out normal scores (ScoringConfig.threshold_quantile). From n
# scores that is their maximum for n < 100, and a new normal image exceeds the maximum of n with probability 1/(n+1):
# with 1 image the threshold is that image's score (half of all normal images flagged), with 9 one in ten. Below
# MIN_CALIBRATION_IMAGES a job refuses (no threshold can be fitted); below STABLE_CALIBRATION_IMAGES it warns.
MIN_CALIBRATION_IMAGES = 2
STABLE_CALIBRATION_IMAGES = 10


def check_calibration_split(normal: pd.DataFrame, held: pd.DataFrame, holdout: float) -> list[str]:
    """Per category of the normal training rows, how many were held out for its threshold: raises ValueError naming
    every category under MIN_CALIBRATION_IMAGES; returns a warning for each under STABLE_CALIBRATION_IMAGES."""
    n_held = held.groupby(["domain", "category"]).size()
    errors, warnings = [], []
    for (dom, cat), sub in sorted(normal.groupby(["domain", "category"]), key=lambda kv: kv[0]):
        n = int(n_held.get((dom, cat), 0))
        if n < MIN_CALIBRATION_IMAGES:
            errors.append(f"{dom}/{cat}: {n} held-out normal image(s) of {len(sub)} (--holdout {holdout})")
        elif n < STABLE_CALIBRATION_IMAGES:
            warnings.append(f"{dom}/{cat}: its threshold is fitted on {n} held-out normal images; about 1 in {n + 1} "
                            f"normal images will score above it (it is their maximum). {STABLE_CALIBRATION_IMAGES}+ "
                            "give a steadier threshold: add normal images or raise --holdout")
    if errors:
        raise ValueError(f"too few normal images to fit an anomaly threshold (at least {MIN_CALIBRATION_IMAGES} "
                         "held-out normal images per category; with one, the threshold is that image's score and "
                         "half of all normal images are flagged): " + "; ".join(errors)
                         + ". Add normal training images or raise --holdout.")
    return warnings


def describe_categories(df: pd.DataFrame, train: pd.DataFrame, held: pd.DataFrame) -> list[str]:
    """One line per category: the images a job uses, by role (what each metric will rest on)."""
    lines = []
    test = df[df["split"] == "test"]
    has_mask = df["mask_uri"].notna() if "mask_uri" in df else pd.Series(False, index=df.index)
    def count(rows: pd.DataFrame, dom: str, cat: str) -> int:
        return int(((rows["domain"] == dom) & (rows["category"] == cat)).sum())

    for dom, cat in sorted(df.groupby(["domain", "category"]).groups):
        t = test[(test["domain"] == dom) & (test["category"] == cat)]
        flagged = t[t["label"] == 1]
        lines.append(f"[data] {dom}/{cat}: train {count(train, dom, cat)} normal, calibration {count(held, dom, cat)} "
                     f"normal, test {int((t['label'] == 0).sum())} normal + {len(flagged)} flagged "
                     f"({int(has_mask[flagged.index].sum())} with pixel masks)")
    return lines


def describe_framing(model_cfg, df: pd.DataFrame) -> list[str]:
    """The input frame (InputConfig) of every category that is not the model-wide default, one `[data]` line each;
    an override naming a category the data does not have is an error (a typo would silently change nothing)."""
    have = set(df["domain"].astype(str) + "/" + df["category"].astype(str))
    unknown = sorted(set(model_cfg.input.categories) - have)
    if unknown:
        raise ValueError(f"input.categories names {unknown}, which the data does not have (its categories: "
                         f"{sorted(have)})")
    lines = []
    base = model_cfg.input.for_category(None)
    if base != ("squash", "type"):
        lines.append(f"[data] every category: aspect {base[0]}, intensity {base[1]}")
    for key in sorted(model_cfg.input.categories):
        aspect, intensity = model_cfg.input.for_category(key)
        lines.append(f"[data] {key}: aspect {aspect}, intensity {intensity}")
    return lines
