"""Converters from the native layouts of the public anomaly datasets into the MVTec AD layout (DESIGN.md §5).

Every importer reads and writes through ``storage`` (source and destination may each be local or s3://),
lists each tree once, and is idempotent: a destination file that already exists is skipped without reading
its sources, and writes are atomic (locally) or whole-object (S3), so an interrupted import is finished by
running it again. Images are copied byte for byte (no re-encoding, no quality loss); masks are re-encoded as
binary uint8 PNGs (0/255, any value > 0 is foreground), because native masks use 0/1, palette or 0/255
values. Each importer returns an ``ImportSummary`` with per-category counts of the files the MVTec tree now
holds (written + skipped).

Decisions (METHOD.md §3.1):

* **VisA** follows the common Dinomaly preparation (``split_csv/1cls.csv``): anomalies become defect ``bad``,
  masks ``ground_truth/bad/<stem>.png``. The CSV is the only source of the split. An anomaly listed in the
  train split (no such row in ``1cls``) is put in ``test/bad`` and noted: training must see normals only.
* **MVTec LOCO**: the per-image mask folders ``ground_truth/<type>/<idx>/000.png, 001.png, …`` are merged by
  logical OR into ``ground_truth/<type>/<idx>_mask.png``; ``validation/good`` stays split ``validation``;
  ``defect_groups.json`` maps ``logical_anomalies → logical``, ``structural_anomalies → structural``.
* **BMAD**: the ``test`` split is the evaluation split (the split BMAD's published numbers use); with
  ``eval_split="valid"`` the ``valid`` split is used instead. When evaluating on ``test``, ``valid/good`` is
  kept as split ``validation`` (normal held-out images for calibration; ``keep_valid_good=False`` drops it);
  ``valid/Ungood`` is never used. Defect name ``Ungood``; masks ``ground_truth/Ungood/<stem>_mask.png``.
* **UCSD Ped2**: frames are independent images (no temporal model), named ``<clip>_<i:03d>.png`` with ``i``
  the 0-based position in the clip's sorted frames. A test frame is an anomaly iff its GT frame has any pixel
  > 0. Frames stay **grey** (8-bit ``L`` PNG, lossless and 1/3 the size); the loaders convert to RGB on
  decode (``rgb=True`` writes RGB PNGs instead).
* **MVTec 3D-AD**: RGB only (``<split>/<type>/rgb/*.png``, GT ``test/<type>/gt/*.png``); ``xyz`` point
  clouds are not imported (the reference reads RGB only). ``validation/good`` stays split ``validation``.
* **MVTec AD**: already in the layout; the importer copies it (e.g. from a local download into S3).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from anomalymoe.platform.data import storage
from anomalymoe.platform.data.manifest import IMAGE_EXTS, SPLITS, normalize_root, relative_parts

__all__ = [
    "FORMATS",
    "IMPORTERS",
    "DatasetImportError",
    "ImportSummary",
    "import_bmad",
    "import_mvtec",
    "import_mvtec3d",
    "import_mvtec_loco",
    "import_ped2",
    "import_visa",
    "main",
    "run_importer",
]

log = logging.getLogger(__name__)

LOCO_DEFECT_GROUPS = {"logical_anomalies": "logical", "structural_anomalies": "structural"}


class DatasetImportError(RuntimeError):
    """The source tree is not in the expected native layout, or its files contradict each other."""


@dataclass
class ImportSummary:
    format: str
    source: str
    dest: str
    written: int = 0
    skipped: int = 0
    # category -> "train/good" | "test/<defect>" | "validation/good" | "ground_truth/<defect>" -> files held
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def n(self, category: str, key: str) -> int:
        return self.counts.get(category, {}).get(key, 0)

    def to_dict(self) -> dict:
        return asdict(self)


# A task writes (at most) a few destination files and reports, per file: (category, count key, written?).
_Record = tuple[str, str, bool]
_Task = Callable[[frozenset[str]], list[_Record]]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_EXTS


def _stem(name: str) -> str:
    return PurePosixPath(name).stem


def _walk(src: str) -> list[tuple[str, tuple[str, ...]]]:
    """(uri, parts below src) of every non-hidden file under src, sorted."""
    try:
        files = storage.list_files(src, recursive=True)
    except FileNotFoundError:
        files = []
    out = []
    for uri in files:
        parts = relative_parts(src, uri)
        if parts and not any(p.startswith(".") for p in parts):
            out.append((uri, parts))
    if not out:
        raise DatasetImportError(f"no files under {src}")
    return out


def _existing(dst: str) -> frozenset[str]:
    try:
        return frozenset(storage.list_files(dst, recursive=True))
    except FileNotFoundError:
        return frozenset()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _mask_array(uri: str) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        a = np.asarray(im)
    return a.any(axis=-1) if a.ndim == 3 else a > 0


def _binary_mask_png(uris: Sequence[str]) -> bytes:
    """Logical OR of one or more masks as a 0/255 uint8 PNG."""
    merged = None
    for u in uris:
        a = _mask_array(u)
        if merged is not None and a.shape != merged.shape:
            raise DatasetImportError(f"masks to merge differ in size: {u} is {a.shape[::-1]}, "
                                     f"{uris[0]} is {merged.shape[::-1]}")
        merged = a if merged is None else merged | a
    return _png(merged.astype(np.uint8) * 255)


def _put(dst: str, existing: frozenset[str], produce: Callable[[], bytes]) -> bool:
    if dst in existing:
        return False
    storage.write_bytes(dst, produce())
    return True


def _copy_task(src: str, dst: str, category: str, key: str) -> _Task:
    return lambda existing: [(category, key, _put(dst, existing, lambda: storage.read_bytes(src)))]


def _mask_task(srcs: Sequence[str], dst: str, category: str, key: str) -> _Task:
    return lambda existing: [(category, key, _put(dst, existing, lambda: _binary_mask_png(srcs)))]


def _text_task(dst: str, text: str, category: str, key: str) -> _Task:
    def run(existing: frozenset[str]) -> list[_Record]:
        if dst in existing and storage.read_text(dst) == text:
            return [(category, key, False)]
        storage.write_text(dst, text)
        return [(category, key, True)]

    return run


class _Plan:
    """Destination files of one import, checked for clashes before anything is written."""

    def __init__(self, fmt: str, src: str, dst: str):
        self.summary = ImportSummary(fmt, src, dst)
        self.dst = dst
        self.tasks: list[_Task] = []
        self._targets: dict[str, str] = {}

    def claim(self, dst: str, origin: str) -> None:
        if dst in self._targets and self._targets[dst] != origin:
            raise DatasetImportError(f"two sources map to {dst}: {self._targets[dst]} and {origin}")
        self._targets[dst] = origin

    def copy(self, src: str, category: str, split: str, defect: str, name: str) -> None:
        dst = storage.safe_join(self.dst, category, split, defect, name)
        self.claim(dst, src)
        self.tasks.append(_copy_task(src, dst, category, f"{split}/{defect}"))

    def mask(self, srcs: Sequence[str], category: str, defect: str, name: str) -> None:
        dst = storage.safe_join(self.dst, category, "ground_truth", defect, name)
        self.claim(dst, "+".join(srcs))
        self.tasks.append(_mask_task(list(srcs), dst, category, f"ground_truth/{defect}"))

    def note(self, msg: str) -> None:
        log.warning("%s import: %s", self.summary.format, msg)
        self.summary.notes.append(msg)

    def run(self, max_workers: int) -> ImportSummary:
        existing = _existing(self.dst)
        counts: dict[str, Counter] = defaultdict(Counter)
        with ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="import") as pool:
            for records in pool.map(lambda t: t(existing), self.tasks):
                for category, key, written in records:
                    counts[category][key] += 1
                    if written:
                        self.summary.written += 1
                    else:
                        self.summary.skipped += 1
        self.summary.counts = {c: dict(sorted(k.items())) for c, k in sorted(counts.items())}
        log.info("%s import %s -> %s: %d written, %d already there", self.summary.format, self.summary.source,
                 self.dst, self.summary.written, self.summary.skipped)
        return self.summary


def _want(categories: Iterable[str] | None) -> Callable[[str], bool]:
    wanted = set(categories) if categories is not None else None
    return lambda c: wanted is None or c in wanted


def _check_found(plan: _Plan, categories: Iterable[str] | None, found: set[str]) -> None:
    if categories is not None:
        absent = sorted(set(categories) - found)
        if absent:
            raise DatasetImportError(
                f"{plan.summary.format}: category(ies) {absent} not found in {plan.summary.source}")
    if not found:
        raise DatasetImportError(f"{plan.summary.format}: no categories found in {plan.summary.source}")


# ----------------------------------------------------------------------------- VisA


def _visa_row(plan: _Plan, src: str, row: dict[str, str], obj: str, split: str, label: str, n: int) -> None:
    image = storage.safe_join(src, row["image"])
    name = PurePosixPath(row["image"]).name
    if label == "normal":
        plan.copy(image, obj, split, "good", name)
        return
    if split == "train":
        plan.note(f"line {n}: anomaly {row['image']} listed in train; put in test/bad")
    plan.copy(image, obj, "test", "bad", name)
    if row["mask"]:
        plan.mask([storage.safe_join(src, row["mask"])], obj, "bad", f"{_stem(name)}.png")
    else:
        plan.note(f"line {n}: anomaly {row['image']} has no mask")


def import_visa(src: str, dst: str, *, categories: Iterable[str] | None = None,
                split_csv: str = "split_csv/1cls.csv", max_workers: int = 8) -> ImportSummary:
    """VisA (``<cls>/Data/Images/{Normal,Anomaly}``, ``<cls>/Data/Masks/Anomaly``) by its split CSV."""
    src, dst = normalize_root(src), normalize_root(dst)
    plan, want = _Plan("visa", src, dst), _want(categories)
    csv_uri = storage.safe_join(src, *split_csv.split("/"))
    try:
        text = storage.read_text(csv_uri)
    except FileNotFoundError as e:
        raise DatasetImportError(f"VisA split file {csv_uri} not found") from e
    reader = csv.DictReader(io.StringIO(text))
    need = {"object", "split", "label", "image", "mask"}
    if not reader.fieldnames or not need <= {f.strip() for f in reader.fieldnames}:
        raise DatasetImportError(f"{csv_uri}: expected columns {sorted(need)}, got {reader.fieldnames}")
    found = set()
    for n, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        obj, split, label = row["object"], row["split"].lower(), row["label"].lower()
        if not obj or not want(obj):
            continue
        found.add(obj)
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise DatasetImportError(f"{csv_uri} line {n}: split {row['split']!r} / label {row['label']!r} "
                                     "must be train|test / normal|anomaly")
        try:  # CSV columns are outside data: a path that leaves src or dst is refused with its line
            _visa_row(plan, src, row, obj, split, label, n)
        except storage.UnsafePath as e:
            raise DatasetImportError(f"{csv_uri} line {n}: {e}") from None
    _check_found(plan, categories, found)
    return plan.run(max_workers)


# ----------------------------------------------------------------------------- MVTec LOCO


def import_mvtec_loco(src: str, dst: str, *, categories: Iterable[str] | None = None,
                      max_workers: int = 8) -> ImportSummary:
    """MVTec LOCO AD: merge each image's mask folder into one mask; write ``defect_groups.json``."""
    src, dst = normalize_root(src), normalize_root(dst)
    plan, want = _Plan("mvtec_loco", src, dst), _want(categories)
    gt: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    tests: dict[tuple[str, str], set[str]] = defaultdict(set)
    found = set()
    for uri, parts in _walk(src):
        if not _is_image(parts[-1]) or not want(parts[0]):
            continue
        if len(parts) == 4 and parts[1] in SPLITS:
            cat, split, defect, name = parts
            found.add(cat)
            plan.copy(uri, cat, split, defect, name)
            if split == "test" and defect != "good":
                tests[(cat, defect)].add(_stem(name))
        elif len(parts) == 5 and parts[1] == "ground_truth":
            cat, _, defect, idx, _name = parts
            gt[(cat, defect, idx)].append(uri)
        elif len(parts) == 4 and parts[1] == "ground_truth":  # already one mask per image
            cat, _, defect, name = parts
            stem = _stem(name)
            gt[(cat, defect, stem.removesuffix("_mask"))].append(uri)
    for (cat, defect, idx), uris in sorted(gt.items()):
        if idx not in tests.get((cat, defect), ()):
            plan.note(f"{cat}: ground truth {defect}/{idx} has no test image; skipped")
            continue
        plan.mask(sorted(uris), cat, defect, f"{idx}_mask.png")
    for (cat, defect), stems in sorted(tests.items()):
        lacking = sorted(s for s in stems if (cat, defect, s) not in gt)
        if lacking:
            plan.note(f"{cat}: {len(lacking)} {defect} image(s) without ground truth: {lacking[:5]}")
    _check_found(plan, categories, found)
    for cat in sorted(found):
        defects = sorted({d for (c, d) in tests if c == cat})
        groups = {d: LOCO_DEFECT_GROUPS.get(d, "structural" if "struct" in d else "logical") for d in defects}
        if groups:
            text = json.dumps(groups, indent=2, sort_keys=True) + "\n"
            plan.tasks.append(_text_task(storage.safe_join(dst, cat, "defect_groups.json"), text, cat,
                                         "defect_groups.json"))
    return plan.run(max_workers)


# ----------------------------------------------------------------------------- BMAD


def import_bmad(src: str, dst: str, *, categories: Iterable[str] | None = None, eval_split: str = "test",
                keep_valid_good: bool = True, max_workers: int = 8) -> ImportSummary:
    """BMAD (``train/good``, ``{valid,test}/{good,Ungood}/{img,label}``) with ``eval_split`` as the test split."""
    if eval_split not in ("test", "valid"):
        raise ValueError(f"eval_split must be 'test' or 'valid', got {eval_split!r}")
    src, dst = normalize_root(src), normalize_root(dst)
    plan, want = _Plan("bmad", src, dst), _want(categories)
    labels: dict[tuple[str, str], str] = {}
    anomalies: list[tuple[str, str]] = []
    found = set()
    for uri, parts in _walk(src):
        if not _is_image(parts[-1]) or not want(parts[0]) or len(parts) not in (4, 5):
            continue
        cat, split, kind, name = parts[0], parts[1], parts[2], parts[-1]
        sub = parts[3] if len(parts) == 5 else "img"
        if kind not in ("good", "Ungood") or sub not in ("img", "label"):
            continue
        if split == "train" and kind == "good" and sub == "img":
            found.add(cat)
            plan.copy(uri, cat, "train", "good", name)
        elif split == eval_split and kind == "good" and sub == "img":
            plan.copy(uri, cat, "test", "good", name)
        elif split == eval_split and kind == "Ungood" and sub == "img":
            plan.copy(uri, cat, "test", "Ungood", name)
            anomalies.append((cat, name))
        elif split == eval_split and kind == "Ungood" and sub == "label":
            labels[(cat, _stem(name))] = uri
        elif split == "valid" and eval_split == "test" and keep_valid_good and kind == "good" and sub == "img":
            plan.copy(uri, cat, "validation", "good", name)
    for cat, name in anomalies:
        label = labels.get((cat, _stem(name)))
        if label is None:
            plan.note(f"{cat}: {eval_split}/Ungood/img/{name} has no label mask")
        else:
            plan.mask([label], cat, "Ungood", f"{_stem(name)}_mask.png")
    _check_found(plan, categories, found)
    return plan.run(max_workers)


# ----------------------------------------------------------------------------- UCSD Ped2


def _frame_png(uri: str, rgb: bool) -> bytes:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        return _png(np.asarray(im.convert("RGB" if rgb else "L")))


def _pair_gt(frames: list[tuple[str, str]], gts: list[tuple[str, str]], clip: str) -> list[str]:
    """GT uri for each frame: by frame stem when the stems match, else by sorted position."""
    by_stem = {_stem(n): u for n, u in gts}
    if all(_stem(n) in by_stem for n, _ in frames):
        return [by_stem[_stem(n)] for n, _ in frames]
    if len(frames) == len(gts):
        return [u for _, u in gts]
    raise DatasetImportError(f"Ped2 clip {clip}: {len(frames)} frames but {len(gts)} GT frames, stems do not match")


def _ped2_train_task(frame: str, dst: str, category: str, rgb: bool) -> _Task:
    return lambda existing: [(category, "train/good", _put(dst, existing, lambda: _frame_png(frame, rgb)))]


def _ped2_test_task(frame: str, gt: str, dst: str, category: str, stem: str, rgb: bool) -> _Task:
    good = storage.safe_join(dst, category, "test", "good", f"{stem}.png")
    bad = storage.safe_join(dst, category, "test", "anomaly", f"{stem}.png")
    mask = storage.safe_join(dst, category, "ground_truth", "anomaly", f"{stem}_mask.png")

    def run(existing: frozenset[str]) -> list[_Record]:
        if good in existing:
            return [(category, "test/good", False)]
        if bad in existing and mask in existing:
            return [(category, "test/anomaly", False), (category, "ground_truth/anomaly", False)]
        m = _mask_array(gt)
        if not m.any():
            storage.write_bytes(good, _frame_png(frame, rgb))
            return [(category, "test/good", True)]
        wrote_mask = _put(mask, existing, lambda: _png(m.astype(np.uint8) * 255))
        wrote_img = _put(bad, existing, lambda: _frame_png(frame, rgb))
        return [(category, "test/anomaly", wrote_img), (category, "ground_truth/anomaly", wrote_mask)]

    return run


def import_ped2(src: str, dst: str, *, category: str = "pedestrian", categories: Iterable[str] | None = None,
                rgb: bool = False, max_workers: int = 8) -> ImportSummary:
    """UCSD Ped2 (``Train/TrainNNN/*.tif``, ``Test/TestNNN/*.tif``, ``Test/TestNNN_gt/*.bmp``) as PNG frames."""
    src, dst = normalize_root(src), normalize_root(dst)
    plan = _Plan("ped2", src, dst)
    if categories is not None and category not in set(categories):
        raise DatasetImportError(f"ped2 has one category, {category!r}; asked for {sorted(categories)}")
    clips: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for uri, parts in _walk(src):
        if len(parts) == 3 and parts[0].lower() in ("train", "test") and _is_image(parts[2]):
            clips[(parts[0].lower(), parts[1])].append((parts[2], uri))
    train = sorted(c for s, c in clips if s == "train")
    test = sorted(c for s, c in clips if s == "test" and not c.endswith("_gt"))
    if not train or not test:
        raise DatasetImportError(f"{src}: expected Train/<clip>/*.tif and Test/<clip>/*.tif (found "
                                 f"{len(train)} train and {len(test)} test clips)")
    for clip in train:
        for i, (_name, uri) in enumerate(sorted(clips[("train", clip)])):
            dst_uri = storage.safe_join(dst, category, "train", "good", f"{clip}_{i:03d}.png")
            plan.claim(dst_uri, uri)
            plan.tasks.append(_ped2_train_task(uri, dst_uri, category, rgb))
    for clip in test:
        frames = sorted(clips[("test", clip)])
        gts = sorted(clips.get(("test", f"{clip}_gt"), []))
        if not gts:
            plan.note(f"test clip {clip} has no {clip}_gt folder; skipped (its frame labels are unknown)")
            continue
        for i, gt in enumerate(_pair_gt(frames, gts, clip)):
            plan.tasks.append(_ped2_test_task(frames[i][1], gt, dst, category, f"{clip}_{i:03d}", rgb))
    return plan.run(max_workers)


# ----------------------------------------------------------------------------- MVTec 3D-AD and MVTec AD


def import_mvtec3d(src: str, dst: str, *, categories: Iterable[str] | None = None,
                   max_workers: int = 8) -> ImportSummary:
    """MVTec 3D-AD, RGB only: ``<cls>/<split>/<type>/rgb/*.png`` + ``gt/*.png``; ``xyz`` is left out."""
    src, dst = normalize_root(src), normalize_root(dst)
    plan, want = _Plan("mvtec3d", src, dst), _want(categories)
    found = set()
    for uri, parts in _walk(src):
        if len(parts) != 5 or not _is_image(parts[4]) or not want(parts[0]) or parts[1] not in SPLITS:
            continue
        cat, split, defect, kind, name = parts
        if kind == "rgb":
            found.add(cat)
            plan.copy(uri, cat, split, defect, name)
        elif kind == "gt" and split == "test" and defect != "good":
            plan.mask([uri], cat, defect, f"{_stem(name)}_mask.png")
    _check_found(plan, categories, found)
    return plan.run(max_workers)


def import_mvtec(src: str, dst: str, *, categories: Iterable[str] | None = None,
                 max_workers: int = 8) -> ImportSummary:
    """MVTec AD (or any tree already in its layout): a byte-for-byte copy of images, masks, defect groups."""
    src, dst = normalize_root(src), normalize_root(dst)
    plan, want = _Plan("mvtec", src, dst), _want(categories)
    found = set()
    for uri, parts in _walk(src):
        if not want(parts[0]):
            continue
        if len(parts) == 2 and parts[1] == "defect_groups.json":
            d = storage.safe_join(dst, *parts)
            plan.tasks.append(_copy_task(uri, d, parts[0], "defect_groups.json"))
        elif len(parts) == 4 and _is_image(parts[3]) and (parts[1] in SPLITS or parts[1] == "ground_truth"):
            cat, split, defect, name = parts
            if split != "ground_truth":
                found.add(cat)
            d = storage.safe_join(dst, *parts)
            plan.claim(d, uri)
            plan.tasks.append(_copy_task(uri, d, cat, f"{split}/{defect}"))
    _check_found(plan, categories, found)
    return plan.run(max_workers)


IMPORTERS: dict[str, Callable[..., ImportSummary]] = {
    "mvtec": import_mvtec,
    "mvtec3d": import_mvtec3d,
    "visa": import_visa,
    "mvtec_loco": import_mvtec_loco,
    "bmad": import_bmad,
    "ped2": import_ped2,
}
_ALIASES = {"mvtec_ad": "mvtec", "mvtec_ad_3d": "mvtec3d", "mvtec_3d": "mvtec3d", "loco": "mvtec_loco"}
FORMATS: tuple[str, ...] = tuple(IMPORTERS)


def run_importer(fmt: str, src: str, dst: str, **options) -> ImportSummary:
    key = _ALIASES.get(fmt.lower(), fmt.lower())
    if key not in IMPORTERS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {sorted(IMPORTERS)}")
    return IMPORTERS[key](src, dst, **options)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomalymoe.platform.data.importers",
                                description="Convert a native dataset tree into the MVTec AD layout.")
    p.add_argument("format", choices=sorted([*IMPORTERS, *_ALIASES]))
    p.add_argument("--src", required=True, help="native dataset root (path or s3://)")
    p.add_argument("--dst", required=True, help="MVTec-layout root to write (path or s3://)")
    p.add_argument("--categories", nargs="*", help="only these categories")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--eval-split", choices=("test", "valid"), help="bmad: the split used as test")
    p.add_argument("--rgb", action="store_true", help="ped2: write RGB frames instead of grey")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options: dict = {"max_workers": args.workers}
    if args.categories:
        options["categories"] = args.categories
    if args.eval_split:
        options["eval_split"] = args.eval_split
    if args.rgb:
        options["rgb"] = True
    try:
        summary = run_importer(args.format, args.src, args.dst, **options)
    except (DatasetImportError, storage.StorageError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if len(sys.argv) > 1 else None))
