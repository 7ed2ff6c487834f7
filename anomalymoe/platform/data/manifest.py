"""Dataset manifests: one Parquet row per image, the contract training and evaluation read (DESIGN.md §5).

Why a manifest and not a directory walk: a walk over S3 is slow and repeated by every worker, it cannot be
hashed into a model's lineage, and it cannot be checked once, up front, for the broken files that would
otherwise crash a long training run hours in. ``build_manifest_from_mvtec`` walks an MVTec-layout tree once
(one ``storage.list_files`` call per root); ``validate_manifest`` checks every row and reports *all* problems
at once; ``write_manifest``/``read_manifest`` store it with a fixed, versioned schema; ``manifest_hash`` is
the content hash the registry tags model versions with.

Image checks (``validate_manifest(check_images=True)``), decided here:

* the header is read lazily first (size only); an image over ``max_pixels`` (default: PIL's
  ``Image.MAX_IMAGE_PIXELS``) is reported as ``image_too_large`` and never decoded — a decompression bomb
  costs the bytes of its file, not its pixels;
* ``Image.verify()`` then checks the container (PNG chunk CRCs) without decoding;
* a real decode follows, because ``verify()`` misses truncated data and most JPEG damage. JPEGs are decoded
  with ``draft()`` at 1/8 scale (the DCT's own down-scaling: every entropy-coded byte is still read, so
  truncation is caught, at 1/64 of the memory); other formats are decoded in full, which is bounded by
  ``max_pixels`` and by ``max_workers`` images at a time;
* ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is a process-wide switch this module does not touch: if a caller
  sets it, truncated files pass.

Columns ``width``/``height`` are filled from the image headers by validation (the input frame is not
modified; ``report.manifest`` is the filled copy) and are excluded from ``manifest_hash``, so the same data
hashes the same before and after validation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from anomalymoe.platform.data import storage

__all__ = [
    "IMAGE_EXTS",
    "MANIFEST_COLUMNS",
    "MANIFEST_SCHEMA",
    "MANIFEST_VERSION",
    "PROBLEM_CODES",
    "SPLITS",
    "ManifestError",
    "Problem",
    "ValidationReport",
    "build_manifest_from_mvtec",
    "concat_manifests",
    "empty_manifest",
    "ensure_valid",
    "manifest_hash",
    "normalize_root",
    "read_manifest",
    "relative_parts",
    "to_table",
    "validate_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
VERSION_KEY = b"anomalymoe.manifest.version"
HASH_KEY = b"anomalymoe.manifest.hash"
SPLITS: tuple[str, ...] = ("train", "validation", "test")
IMAGE_EXTS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFECT_GROUPS_FILE = "defect_groups.json"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("defect", pa.string(), nullable=False),
        pa.field("defect_group", pa.string(), nullable=True),
        pa.field("mask_uri", pa.string(), nullable=True),
        pa.field("component_mask_uri", pa.string(), nullable=True),
        pa.field("width", pa.int32(), nullable=True),
        pa.field("height", pa.int32(), nullable=True),
        # does an anomalous row come with a pixel mask? false: an image-level label only (its image metrics count,
        # pixel metrics skip it); true: the mask is declared and must exist; null: inferred (an anomalous row needs
        # its mask_uri unless its dataset is passed as no_pixel_gt), as manifests written before this column
        pa.field("has_mask", pa.bool_(), nullable=True),
    ],
    metadata={VERSION_KEY: str(MANIFEST_VERSION).encode()},
)
MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)
_REQUIRED = tuple(f.name for f in MANIFEST_SCHEMA if not f.nullable)
# derived columns excluded; has_mask is hashed only where it is set (manifests without it keep their hash)
_HASHED = tuple(c for c in MANIFEST_COLUMNS if c not in ("width", "height", "has_mask"))
_ADDED_LATER = ("has_mask",)  # nullable columns a file written before them may lack (read as null)
_TYPES_MAPPER = {pa.int32(): pd.Int32Dtype()}.get
_SPLIT_ORDER = {s: i for i, s in enumerate(SPLITS)}


class ManifestError(ValueError):
    """A manifest that cannot be used: wrong schema or version, or (from ``ensure_valid``) bad rows."""


# ----------------------------------------------------------------------------- schema, I/O, hash


def empty_manifest() -> pd.DataFrame:
    return MANIFEST_SCHEMA.empty_table().to_pandas(types_mapper=_TYPES_MAPPER)


def _with_all_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Fixed column order; absent nullable columns added as nulls; missing required / unknown columns refused."""
    missing = [c for c in _REQUIRED if c not in df.columns]
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing required column(s) {missing}")
        if extra:
            parts.append(f"unknown column(s) {extra}")
        raise ManifestError(f"not a manifest frame: {'; '.join(parts)}; the schema is {list(MANIFEST_COLUMNS)}")
    df = df.copy()
    for c in MANIFEST_COLUMNS:
        if c not in df.columns:
            df[c] = pd.array([pd.NA] * len(df), dtype="Int32") if c in ("width", "height") else None
    return df[list(MANIFEST_COLUMNS)]


def to_table(df_or_table: pd.DataFrame | pa.Table) -> pa.Table:
    """The manifest as an Arrow table with exactly ``MANIFEST_SCHEMA`` (types cast, nulls checked)."""
    if isinstance(df_or_table, pa.Table):
        df_or_table = df_or_table.to_pandas(types_mapper=_TYPES_MAPPER)
    if not isinstance(df_or_table, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame or pyarrow Table, got {type(df_or_table).__name__}")
    df = _with_all_columns(df_or_table).reset_index(drop=True)
    nulls = {c: int(df[c].isna().sum()) for c in _REQUIRED if df[c].isna().any()}
    if nulls:
        raise ManifestError(f"null values in required column(s) {nulls} (row counts)")
    try:
        table = pa.Table.from_pandas(df, schema=MANIFEST_SCHEMA, preserve_index=False, safe=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as e:
        raise ManifestError(f"manifest columns do not fit the schema: {e}") from e
    return table.replace_schema_metadata(MANIFEST_SCHEMA.metadata)


def write_manifest(df_or_table: pd.DataFrame | pa.Table, uri: str) -> str:
    """Write a manifest Parquet file (local or s3://, atomic through storage); returns its content hash."""
    table = to_table(df_or_table)
    digest = manifest_hash(table.to_pandas(types_mapper=_TYPES_MAPPER))
    table = table.replace_schema_metadata({**MANIFEST_SCHEMA.metadata, HASH_KEY: digest.encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())
    return digest


def read_manifest(uri: str) -> pd.DataFrame:
    """Read and check a manifest. Raises ``ManifestError`` naming every schema difference, ``NotFound`` if absent."""
    data = storage.read_bytes(uri)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{uri} is not a readable Parquet file: {e}") from e
    meta = table.schema.metadata or {}
    if VERSION_KEY not in meta:
        raise ManifestError(
            f"{uri} is not an anomalymoe manifest: its Parquet metadata has no {VERSION_KEY.decode()!r} key"
        )
    version = meta[VERSION_KEY].decode()
    if version != str(MANIFEST_VERSION):
        raise ManifestError(f"{uri} is manifest version {version}; this code reads version {MANIFEST_VERSION}")
    problems = []
    for name in _ADDED_LATER:
        if name not in table.schema.names:
            f = MANIFEST_SCHEMA.field(name)
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    names = table.schema.names
    for f in MANIFEST_SCHEMA:
        if f.name not in names:
            problems.append(f"missing column {f.name!r} ({f.type})")
        elif not table.schema.field(f.name).type.equals(f.type):
            problems.append(f"column {f.name!r} has type {table.schema.field(f.name).type}, expected {f.type}")
        elif not f.nullable and table.column(f.name).null_count:
            problems.append(f"column {f.name!r} has {table.column(f.name).null_count} null(s) but is required")
    problems += [f"unknown column {n!r}" for n in names if n not in MANIFEST_COLUMNS]
    if problems:
        raise ManifestError(f"{uri} does not match manifest schema v{MANIFEST_VERSION}: " + "; ".join(problems))
    return table.select(list(MANIFEST_COLUMNS)).to_pandas(types_mapper=_TYPES_MAPPER)


def manifest_hash(df: pd.DataFrame | pa.Table) -> str:
    """sha256 over the rows as a sorted multiset: independent of row and column order and of dtypes.

    ``width``/``height`` are left out: they are derived from the images and filled by validation.
    Each value is length-prefixed (nulls are a distinct token), so no two different rows encode alike."""
    if isinstance(df, pa.Table):
        df = df.to_pandas(types_mapper=_TYPES_MAPPER)
    df = _with_all_columns(df)
    enc = None
    for c in _HASHED:
        col = df[c]
        if c == "label":
            col = pd.to_numeric(col, errors="coerce").astype("Int64")
        s = col.astype("string")
        piece = (s.str.len().astype("string") + ":" + s).fillna("-")
        enc = piece if enc is None else enc + "|" + piece
    if enc is not None:
        declared = df["has_mask"].map(lambda v: "" if pd.isna(v) else f"|has_mask={bool(v)}")
        enc = enc + declared.astype("string")
    rows = sorted(hashlib.sha256(r.encode()).digest() for r in (enc if enc is not None else []))
    h = hashlib.sha256(f"anomalymoe.manifest.v{MANIFEST_VERSION}\n".encode())
    for r in rows:
        h.update(r)
    return h.hexdigest()


# ----------------------------------------------------------------------------- building from an MVTec tree


def relative_parts(root: str, uri: str) -> tuple[str, ...]:
    """Path components of ``uri`` below ``root`` (both local paths or both s3:// URIs)."""
    if storage.is_s3(root):
        prefix = root.rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri} is not under {root}")
        return tuple(p for p in uri[len(prefix) :].split("/") if p)
    rel = os.path.relpath(os.path.abspath(uri), os.path.abspath(root))
    if rel.startswith(".."):
        raise ValueError(f"{uri} is not under {root}")
    return Path(rel).parts


def normalize_root(root: str | os.PathLike[str]) -> str:
    """Local roots become absolute (a manifest must not depend on the cwd); s3 roots lose trailing slashes."""
    root = os.fspath(root)
    if storage.is_s3(root):
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_EXTS


def _read_defect_groups(uri: str) -> dict[str, str]:
    try:
        obj = json.loads(storage.read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{uri} is not valid JSON: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("defect_groups"), dict):
        obj = obj["defect_groups"]  # tolerate a wrapped form {"defect_groups": {...}}
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise ManifestError(f"{uri} must map defect type -> group name (strings), got {obj!r:.200}")
    return obj


def build_manifest_from_mvtec(
    root_uri: str,
    domain: str,
    dataset: str,
    categories: Sequence[str] | None = None,
    *,
    default_defect_group: str | None = None,
) -> pd.DataFrame:
    """Every image of an MVTec-layout tree (local or s3://) as manifest rows.

    Reads ``<cat>/{train,validation,test}/<defect>/<image>`` (exactly that depth; deeper files such as
    native LOCO or 3D-AD trees are ignored — import them first), masks ``ground_truth/<defect>/<stem>_mask.<ext>``
    or ``<stem>.<ext>``, and ``<cat>/defect_groups.json`` (defect -> group) when present. A category with no mask
    files under ``ground_truth/`` has image-level labels: its anomalous rows get ``has_mask = False``. In a category
    with masks, an anomalous image without one gets ``mask_uri = None``: ``validate_manifest`` reports it rather
    than this walk failing.
    Categories are the folders holding images; an explicitly requested category with none is an error."""
    root = normalize_root(root_uri)
    files = storage.list_files(root, recursive=True)
    images: dict[str, list[tuple[str, str, str, tuple[str, ...]]]] = defaultdict(list)
    masks: dict[tuple[str, str, str], str] = {}
    groups_files: dict[str, str] = {}
    ignored = 0
    for uri in files:
        parts = relative_parts(root, uri)
        if any(p.startswith(".") for p in parts):
            continue
        if len(parts) == 2 and parts[1] == DEFECT_GROUPS_FILE:
            groups_files[parts[0]] = uri
        elif len(parts) == 4 and _is_image(parts[3]):
            cat, split, defect, name = parts
            if split in SPLITS:
                images[cat].append((split, defect, name, parts))
            elif split == "ground_truth":
                stem = PurePosixPath(name).stem
                # "<stem>_mask" wins over "<stem>" (MVTec AD's own naming), whatever order the listing has
                if stem.endswith("_mask"):
                    masks[(cat, defect, stem[: -len("_mask")])] = uri
                else:
                    masks.setdefault((cat, defect, stem), uri)
            else:
                ignored += 1
        elif _is_image(parts[-1]):
            ignored += 1
    if ignored:
        log.info("%s: ignored %d image file(s) outside <category>/<split>/<defect>/ (not MVTec layout)", root, ignored)

    if categories is None:
        cats = sorted(images)
    else:
        cats = list(dict.fromkeys(categories))
        absent = [c for c in cats if c not in images]
        if absent:
            raise ManifestError(f"{dataset}: no images for category(ies) {absent} under {root}")
    rows = []
    with_gt = {c for c, _, _ in masks}
    for cat in cats:
        groups = _read_defect_groups(groups_files[cat]) if cat in groups_files else {}
        for split, defect, name, parts in images[cat]:
            label = int(defect != "good")
            mask_uri = masks.get((cat, defect, PurePosixPath(name).stem)) if label else None
            group = groups.get(defect, default_defect_group) if label else None
            rows.append(
                {
                    "uri": storage.join(root, *parts),
                    "domain": domain,
                    "dataset": dataset,
                    "category": cat,
                    "split": split,
                    "label": label,
                    "defect": defect,
                    "defect_group": group,
                    "mask_uri": mask_uri,
                    "component_mask_uri": None,
                    "has_mask": False if label and cat not in with_gt else None,
                }
            )
    if not rows:
        return empty_manifest()
    df = pd.DataFrame(rows)
    df = _sort(df)
    return to_table(df).to_pandas(types_mapper=_TYPES_MAPPER)


def _sort(df: pd.DataFrame) -> pd.DataFrame:
    key = df["split"].map(_SPLIT_ORDER).fillna(len(SPLITS))
    order = df.assign(_k=key).sort_values(["domain", "dataset", "category", "_k", "defect", "uri"], kind="stable")
    return df.loc[order.index].reset_index(drop=True)


# ----------------------------------------------------------------------------- validation


class Problem(NamedTuple):
    """One finding. ``row`` is the position in the validated frame; None for a category-level problem."""

    row: int | None
    uri: str | None
    code: str
    message: str


PROBLEM_CODES: dict[str, str] = {
    "missing_value": "a required column is empty",
    "duplicate_uri": "the same image is listed twice",
    "bad_split": f"split is not one of {list(SPLITS)}",
    "bad_label": "label is not 0 or 1",
    "label_defect_mismatch": "label 0 must have defect 'good' and label 1 another defect",
    "anomalous_in_train": "an anomalous image in the train split",
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image could not be read from storage",
    "corrupt_image": "the image cannot be opened or decoded",
    "truncated_image": "the image file is truncated",
    "image_too_large": "the image exceeds the pixel limit (decompression-bomb guard); not decoded",
    "missing_mask": "an anomalous image declares a mask (has_mask, or a dataset with pixel ground truth) but has "
                    "none; an image-level label says has_mask = false",
    "mask_not_declared": "has_mask is false but the row names a mask_uri",
    "missing_mask_file": "the mask file does not exist",
    "corrupt_mask": "the mask cannot be read, opened or decoded",
    "mask_size_mismatch": "the mask's size differs from the image's",
    "missing_component_mask": "the component mask file does not exist",
    "empty_category": "a category with no train images or no test images",
}


@dataclass
class ValidationReport:
    """Every problem found, and the checked manifest with ``width``/``height`` filled (``manifest``)."""

    manifest: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    empty_categories: list[tuple[str, str, str]] = field(default_factory=list)  # (domain, dataset, category)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_rows(self) -> list[int]:
        """Rows with a row-level problem, plus every row of a category with a category-level problem."""
        bad = {p.row for p in self.problems if p.row is not None}
        if self.empty_categories and len(self.manifest):
            keys = set(self.empty_categories)
            m = self.manifest
            in_empty = [k in keys for k in zip(m["domain"], m["dataset"], m["category"], strict=True)]
            bad.update(i for i, flag in enumerate(in_empty) if flag)
        return sorted(bad)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(p.code for p in self.problems).items()))

    def summary(self) -> str:
        n = len(self.manifest)
        if self.ok:
            return f"manifest OK: {n} rows, no problems"
        bad = self.bad_rows
        lines = [
            f"manifest has {len(self.problems)} problem(s) in {len(bad)} of {n} row(s), "
            f"{len(self.counts())} kind(s): " + ", ".join(f"{c}={k}" for c, k in self.counts().items())
        ]
        by_code: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            by_code[p.code].append(p)
        for code in sorted(by_code):
            items = sorted(by_code[code], key=lambda p: (p.row is None, p.row if p.row is not None else 0, p.uri or ""))
            lines.append(f"{code} ({len(items)}): {PROBLEM_CODES.get(code, '')}")
            for p in items:
                if p.row is None:
                    lines.append(f"  {p.message}")
                else:
                    lines.append(f"  row {p.row}: {p.uri or '<no uri>'} — {p.message}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class _Probe(NamedTuple):
    size: tuple[int, int] | None  # from the header, even when decoding later fails
    code: str | None  # None: fine
    message: str


def _probe_image(uri: str, max_pixels: int | None, *, kind: str) -> _Probe:
    """Header size, container check and a (scaled where possible) decode; never raises for bad data."""
    missing, unreadable, corrupt = (
        ("missing_image", "unreadable_image", "corrupt_image") if kind == "image" else
        ("missing_mask_file", "corrupt_mask", "corrupt_mask")
    )
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:  # storage.NotFound is one
        return _Probe(None, missing, f"{kind} file not found: {uri}")
    except storage.StorageError as e:
        return _Probe(None, unreadable, f"{kind} could not be read ({type(e).__name__}): {e}")
    size = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if max_pixels is not None and size[0] * size[1] > max_pixels:
                return _Probe(size, "image_too_large" if kind == "image" else corrupt,
                              f"{kind} header says {size[0]}x{size[1]} = {size[0] * size[1]} px > limit {max_pixels}")
            fmt = im.format
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            if fmt == "JPEG":
                im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except Image.DecompressionBombError as e:  # PIL's own hard limit (2x MAX_IMAGE_PIXELS) at open
        return _Probe(size, "image_too_large" if kind == "image" else corrupt, f"{kind}: {e}")
    except UnidentifiedImageError:
        return _Probe(size, corrupt, f"{kind} is not in a format PIL recognises ({len(data)} bytes)")
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        msg = str(e)
        # "truncated" only when the header was fine: a file that breaks before its size is known is corrupt
        code = "truncated_image" if kind == "image" and size and "truncat" in msg.lower() else corrupt
        return _Probe(size, code, f"{kind} failed to decode ({type(e).__name__}): {msg}")
    return _Probe(size, None, "")


def _exists(uri: str) -> bool | str:
    try:
        return storage.exists(uri)
    except storage.StorageError as e:
        return f"{type(e).__name__}: {e}"


def _category_problems(df: pd.DataFrame, required_splits: Sequence[str] = ("train", "test")
                       ) -> tuple[list[Problem], list[tuple[str, str, str]]]:
    problems, empty = [], []
    if not len(df):
        return problems, empty
    splits = df.groupby(["domain", "dataset", "category"], sort=True, dropna=False)["split"].agg(set)
    for key, present in splits.items():
        lacking = [s for s in required_splits if s not in present]
        if lacking:
            domain, dataset, cat = key
            empty.append(key)
            problems.append(Problem(None, None, "empty_category",
                                    f"category {domain}/{dataset}/{cat} has no {' and no '.join(lacking)} images"))
    return problems, empty


def validate_manifest(
    df: pd.DataFrame,
    *,
    check_images: bool = True,
    max_workers: int = 4,
    no_pixel_gt: Collection[str] = (),
    max_pixels: int | None | bool = True,
    required_splits: Sequence[str] = ("train", "test"),
) -> ValidationReport:
    """Check every row and report every problem at once (see ``PROBLEM_CODES``).

    ``no_pixel_gt``: datasets without pixel ground truth (their anomalous rows need no mask).
    ``check_images=False`` runs only the checks that need no I/O. ``max_pixels=True`` means PIL's current
    ``Image.MAX_IMAGE_PIXELS``; None disables the size guard. ``required_splits``: the splits every category
    must have (training needs train and test; evaluating a test-only manifest needs only test).
    Row numbers are positions in ``df``."""
    if max_pixels is True:
        max_pixels = Image.MAX_IMAGE_PIXELS
    m = _with_all_columns(df).reset_index(drop=True)
    problems: list[Problem] = []
    n = len(m)
    uris = m["uri"].tolist()

    def add(i: int, code: str, msg: str) -> None:
        problems.append(Problem(i, None if pd.isna(uris[i]) else uris[i], code, msg))

    for c in _REQUIRED:
        for i in m.index[m[c].isna()]:
            add(int(i), "missing_value", f"column {c!r} is empty")
    first_row: dict[str, int] = {}
    for i, u in enumerate(uris):
        if pd.isna(u):
            continue
        if u in first_row:
            add(i, "duplicate_uri", f"same uri as row {first_row[u]}")
        else:
            first_row[u] = i
    labels = pd.to_numeric(m["label"], errors="coerce")
    for i in range(n):
        split, defect, label = m.at[i, "split"], m.at[i, "defect"], labels.iat[i]
        if not pd.isna(split) and split not in SPLITS:
            add(i, "bad_split", f"split {split!r} is not one of {list(SPLITS)}")
        if pd.isna(label) or label not in (0, 1):
            if not pd.isna(m.at[i, "label"]):
                add(i, "bad_label", f"label {str(m.at[i, 'label'])!r} is not 0 or 1")
            continue
        if not pd.isna(defect) and (label == 0) != (defect == "good"):
            add(i, "label_defect_mismatch", f"label {int(label)} with defect {defect!r}")
        if label == 1 and split == "train":
            add(i, "anomalous_in_train", f"anomalous image (defect {defect!r}) in the train split")
        declared = m.at[i, "has_mask"]
        if not pd.isna(declared) and not declared and not pd.isna(m.at[i, "mask_uri"]):
            add(i, "mask_not_declared", "has_mask is false but mask_uri is given")
        if label == 1 and pd.isna(m.at[i, "mask_uri"]):
            if not pd.isna(declared) and declared:
                add(i, "missing_mask", f"anomalous image (defect {defect!r}) declares a mask (has_mask) but has no "
                                       "mask_uri")
            elif pd.isna(declared) and m.at[i, "dataset"] not in no_pixel_gt:
                add(i, "missing_mask", f"anomalous image (defect {defect!r}) has no mask_uri (an image-level label "
                                       "only? set has_mask = false)")
    cat_problems, empty = _category_problems(m, required_splits)
    problems += cat_problems

    if check_images and n:
        image_uris = list(first_row)  # unique, in row order
        mask_uris = list(dict.fromkeys(u for u in m["mask_uri"] if not pd.isna(u)))
        comp_uris = list(dict.fromkeys(u for u in m["component_mask_uri"] if not pd.isna(u)))
        with ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="manifest-check") as pool:
            img_f = {u: pool.submit(_probe_image, u, max_pixels, kind="image") for u in image_uris}
            mask_f = {u: pool.submit(_probe_image, u, max_pixels, kind="mask") for u in mask_uris}
            comp_f = {u: pool.submit(_exists, u) for u in comp_uris}
            img = {u: f.result() for u, f in img_f.items()}
            msk = {u: f.result() for u, f in mask_f.items()}
            comp = {u: f.result() for u, f in comp_f.items()}
        widths: list[int | None] = []
        heights: list[int | None] = []
        for i in range(n):
            u = uris[i]
            probe = img.get(u) if not pd.isna(u) else None
            size = probe.size if probe is not None else None
            widths.append(size[0] if size else None)
            heights.append(size[1] if size else None)
            if probe is not None and probe.code and first_row.get(u) == i:
                add(i, probe.code, probe.message)
            mu = m.at[i, "mask_uri"]
            if not pd.isna(mu):
                mp = msk[mu]
                if mp.code:
                    add(i, mp.code, f"{mp.message} (mask {mu})" if mu not in mp.message else mp.message)
                elif size is not None and probe.code != "image_too_large" and mp.size != size:
                    add(i, "mask_size_mismatch",
                        f"mask {mu} is {mp.size[0]}x{mp.size[1]}, image is {size[0]}x{size[1]}")
            cu = m.at[i, "component_mask_uri"]
            if not pd.isna(cu) and comp[cu] is not True:
                why = "not found" if comp[cu] is False else comp[cu]
                add(i, "missing_component_mask", f"component mask {cu}: {why}")
        m["width"] = pd.array(widths, dtype="Int32")
        m["height"] = pd.array(heights, dtype="Int32")
    problems.sort(key=lambda p: (p.row is None, p.row if p.row is not None else 0, p.code))
    return ValidationReport(manifest=m, problems=problems, empty_categories=empty)


def ensure_valid(df: pd.DataFrame, skip_bad_rows: bool = False, **validate_kwargs) -> pd.DataFrame:
    """The validated manifest (width/height filled). With problems: raise ``ManifestError`` carrying the full
    summary, or with ``skip_bad_rows`` drop the bad rows — and then any category left without train or test
    images — log what was dropped, and return the rest (positions renumbered)."""
    report = validate_manifest(df, **validate_kwargs)
    if report.ok:
        return report.manifest
    if not skip_bad_rows:
        raise ManifestError(report.summary())
    bad = set(report.bad_rows)
    good = report.manifest.drop(index=sorted(bad)).reset_index(drop=True)
    extra, empty = _category_problems(good, validate_kwargs.get("required_splits", ("train", "test")))
    if empty:  # dropping rows can empty a category (e.g. all its train images were corrupt)
        keys = set(empty)
        keep = [k not in keys for k in zip(good["domain"], good["dataset"], good["category"], strict=True)]
        good = good[keep].reset_index(drop=True)
    dropped = len(report.manifest) - len(good)
    log.warning(
        "manifest: dropped %d of %d rows with problems (%s)%s",
        dropped, len(report.manifest), ", ".join(f"{c}={k}" for c, k in report.counts().items()),
        f"; then emptied categories {[p.message for p in extra]}" if extra else "",
    )
    if not len(good):
        raise ManifestError("no valid rows left after dropping bad ones:\n" + report.summary())
    return good


def concat_manifests(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [_with_all_columns(f) for f in frames if len(f)]
    if not frames:
        return empty_manifest()
    df = pd.concat(frames, ignore_index=True)
    return to_table(_sort(df)).to_pandas(types_mapper=_TYPES_MAPPER)


# ----------------------------------------------------------------------------- CLI
