"""Datasets as people have them, besides the MVTec tree (manifest.build_manifest_from_mvtec): a *flat* folder of good
and flagged images, and a *list* (CSV or Parquet) of paths and labels. Both become the same manifest rows the MVTec
walk gives; `--data` (platform/data/sources.py) picks the builder, local or s3://.

Flat layout::

    <root>/<category>/good/*.png                      normal
    <root>/<category>/<anything else>/*.png           flagged, the folder names the defect
    <root>/<category>/ground_truth/<defect>/<stem>[_mask].png   optional pixel masks, as in MVTec
    (or the same without the category level: <root>/good/*, <root>/<defect>/*; the category is the root's name)

List file (CSV or Parquet, one row per image): ``path, label[, mask, category, split, defect, defect_group]``.
``path``/``mask`` are relative to the list's folder (or absolute, or s3://). ``label`` is 0 / 1, or a word: good,
normal, ok, 0 are normal; anything else is flagged and names the defect (unless a ``defect`` column does).
``mask`` empty for a flagged row = an image-level label. Without ``category`` every row is the list's stem.

Where no split is given (flat layout, a list without ``split``), it is made per category with a seeded hold-out:
train = part of the good images, test = the other good images and *every* flagged one (a flagged image never
trains). The share and seed are the builders' `split_share` and `seed`."""

from __future__ import annotations

import io
import logging
import os
from collections import defaultdict
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from anomalymoe.platform.data import storage
from anomalymoe.platform.data.manifest import (
    _TYPES_MAPPER,
    SPLITS,
    VERSION_KEY,
    ManifestError,
    _is_image,
    _sort,
    build_manifest_from_mvtec,
    empty_manifest,
    normalize_root,
    read_manifest,
    relative_parts,
    to_table,
)
from anomalymoe.platform.data.pipeline import holdout_split

log = logging.getLogger(__name__)

NORMAL_WORDS = frozenset({"good", "normal", "ok", "0", "false", "no"})
TEST_SHARE = 0.2  # share of each category's good images a generated split puts in test
LIST_COLUMNS = ("path", "label", "mask", "category", "split", "defect", "defect_group")


def is_mvtec_tree(files: list[str], root: str) -> bool:
    """A tree is in the MVTec layout when images sit at <category>/<split>/<defect>/<file> with a known split."""
    for uri in files:
        parts = relative_parts(root, uri)
        if len(parts) == 4 and parts[1] in SPLITS and _is_image(parts[3]):
            return True
    return False


def split_good(rows: pd.DataFrame, share: float = TEST_SHARE, seed: int = 0) -> pd.Series:
    """Per category, a seeded `share` of the good rows (at least one where there are two or more) -> "test", the
    rest -> "train"; every flagged row -> "test". The same seeded per-category hold-out as the calibration split
    (pipeline.holdout_split), here over the good rows."""
    split = pd.Series("test", index=rows.index, dtype=object)
    good = rows[rows["label"] == 0]
    if not good.empty:
        train, _ = holdout_split(good, share, seed, group_by=("category",))
        split.loc[train.index] = "train"
    return split


def _finish(rows: list[dict], domain: str, dataset: str, split_share: float, seed: int) -> pd.DataFrame:
    if not rows:
        return empty_manifest()
    df = pd.DataFrame(rows)
    for c in ("defect_group", "mask_uri", "component_mask_uri", "has_mask", "split"):
        if c not in df:
            df[c] = None
    df["domain"], df["dataset"] = domain, dataset
    todo = df["split"].isna()
    if todo.any():
        df.loc[todo, "split"] = split_good(df[todo], split_share, seed)
    return to_table(_sort(df)).to_pandas(types_mapper=_TYPES_MAPPER)


def build_manifest_from_flat(root_uri: str, domain: str, dataset: str, *, split_share: float = TEST_SHARE,
                             seed: int = 0) -> pd.DataFrame:
    """Every image of a flat tree (see the module docstring) as manifest rows, split by `split_good`."""
    root = normalize_root(root_uri)
    files = storage.list_files(root, recursive=True)
    depth = [relative_parts(root, u) for u in files if _is_image(u.rsplit("/", 1)[-1])]
    flat_cats = any(len(p) == 3 and p[0] != "ground_truth" for p in depth)  # else <root>/<folder>/<file>
    images: list[tuple[str, str, str]] = []  # (category, defect, uri)
    masks: dict[tuple[str, str, str], str] = {}
    ignored = 0
    for uri in files:
        parts = relative_parts(root, uri)
        if not _is_image(parts[-1]) or any(p.startswith(".") for p in parts):
            continue
        if not flat_cats:  # <root>/<defect>/<file>, <root>/ground_truth/<defect>/<file>
            parts = (root.rstrip("/").rsplit("/", 1)[-1], *parts)
        if len(parts) == 3 and parts[1] != "ground_truth":
            images.append((parts[0], parts[1], uri))
        elif len(parts) == 4 and parts[1] == "ground_truth":
            stem = PurePosixPath(parts[3]).stem
            stem = stem[: -len("_mask")] if stem.endswith("_mask") else stem
            masks[(parts[0], parts[2], stem)] = uri
        else:
            ignored += 1
    if ignored:
        log.info("%s: ignored %d image file(s) outside <category>/<folder>/ (flat layout)", root, ignored)
    with_gt = {c for c, _, _ in masks}
    rows = []
    for cat, defect, uri in images:
        label = int(defect != "good")
        mask = masks.get((cat, defect, PurePosixPath(uri).stem)) if label else None
        rows.append({"uri": uri, "category": cat, "label": label, "defect": defect, "mask_uri": mask,
                     "component_mask_uri": None, "has_mask": False if label and cat not in with_gt else None})
    return _finish(rows, domain, dataset, split_share, seed)


def _read_list(uri: str) -> pd.DataFrame:
    data = storage.read_bytes(uri)
    try:
        if uri.lower().endswith(".parquet"):
            return pq.read_table(io.BytesIO(data)).to_pandas()
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any parser error is a bad list file, said with its name
        raise ManifestError(f"{uri}: not a readable image list ({type(e).__name__}: {e})") from None


def build_manifest_from_list(list_uri: str, domain: str, dataset: str, *, split_share: float = TEST_SHARE,
                             seed: int = 0) -> pd.DataFrame:
    """Every row of a CSV/Parquet image list (see the module docstring) as manifest rows."""
    df = _read_list(list_uri)
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df.columns]
    unknown = [c for c in df.columns if c not in LIST_COLUMNS]
    if missing or unknown:
        raise ManifestError(f"{list_uri}: an image list needs columns path, label (optional: "
                            f"{', '.join(LIST_COLUMNS[2:])}); "
                            + "; ".join(p for p in (f"missing {missing}" if missing else "",
                                                    f"unknown {unknown}" if unknown else "") if p))
    base = list_uri.rsplit("/", 1)[0] if storage.is_s3(list_uri) else str(
        PurePosixPath(normalize_root(list_uri)).parent)

    def where(p: object) -> str | None:
        p = "" if p is None or (isinstance(p, float) and np.isnan(p)) else str(p).strip()
        if not p:
            return None
        full = p if storage.is_s3(p) or p.startswith("/") else storage.join(base, p)
        if storage.is_s3(full):
            if ".." in full.split("/"):  # an S3 key is literal: "a/../b" is not "b"
                raise ManifestError(f"{list_uri}: {p!r}: '..' in an s3:// path")
            return full
        return os.path.normpath(full)  # one spelling per file: "lists/../x.png" is "x.png"

    stem = PurePosixPath(list_uri).stem
    rows, problems = [], []
    for i, r in enumerate(df.to_dict("records")):
        raw = str(r["label"]).strip()
        label = 0 if raw.lower() in NORMAL_WORDS else 1
        defect = str(r.get("defect") or "").strip() or ("good" if label == 0 else
                                                        (raw if raw not in ("1", "true", "yes") else "defect"))
        split = str(r.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            problems.append(f"row {i}: split {split!r} is not one of {list(SPLITS)}")
        uri = where(r["path"])
        if uri is None:
            problems.append(f"row {i}: empty path")
        mask = where(r.get("mask")) if label else None
        rows.append({"uri": uri, "category": str(r.get("category") or "").strip() or stem, "label": label,
                     "defect": defect, "defect_group": str(r.get("defect_group") or "").strip() or None,
                     "split": split, "mask_uri": mask, "component_mask_uri": None,
                     # as the MVTec walk: a flagged row without a mask is an image-level label
                     "has_mask": False if label and mask is None else None})
    if problems:
        raise ManifestError(f"{list_uri}: " + "; ".join(problems[:20]))
    by_cat: dict[str, set] = defaultdict(set)
    for r in rows:
        by_cat[r["category"]].add(r["split"] is None)
    mixed = sorted(c for c, kinds in by_cat.items() if len(kinds) > 1)
    if mixed:
        raise ManifestError(f"{list_uri}: categories {mixed} give a split for some rows and not others")
    return _finish(rows, domain, dataset, split_share, seed)


def is_list_file(uri: str) -> bool:
    """A .csv, or a .parquet that is not a manifest (no manifest version in its metadata)."""
    low = uri.lower()
    if low.endswith(".csv"):
        return True
    if not low.endswith(".parquet"):
        return False
    meta = pq.read_schema(io.BytesIO(storage.read_bytes(uri))).metadata or {}
    return VERSION_KEY not in meta


def build_manifest(spec: str, domain: str, dataset: str, *, seed: int = 0) -> pd.DataFrame:
    """One dataset, whatever its layout: a manifest (.parquet), an image list (.csv / .parquet without manifest
    metadata), an MVTec tree, or a flat tree (local or s3://)."""
    if is_list_file(spec):
        return build_manifest_from_list(spec, domain, dataset, seed=seed)
    if spec.lower().endswith(".parquet"):
        return read_manifest(spec)
    root = normalize_root(spec)
    if is_mvtec_tree(storage.list_files(root, recursive=True), root):
        return build_manifest_from_mvtec(root, domain, dataset)
    return build_manifest_from_flat(root, domain, dataset, seed=seed)
