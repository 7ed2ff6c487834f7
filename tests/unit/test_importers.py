"""Importers: each native layout, generated small here, converted into the MVTec layout; idempotent; S3 too."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomalymoe.platform.data import importers as imp
from anomalymoe.platform.data import storage
from anomalymoe.platform.data.catalog import load_catalog
from anomalymoe.platform.data.importers import DatasetImportError, run_importer
from anomalymoe.platform.data.manifest import (
    build_manifest_from_mvtec,
    read_manifest,
    validate_manifest,
    write_manifest,
)

pytestmark = pytest.mark.unit

SIZE = (24, 20)  # (w, h): not square, so a transposed mask would be caught


def _img(path: Path, seed: int, fmt: str | None = None, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (SIZE[1], SIZE[0], 3) if mode == "RGB" else (SIZE[1], SIZE[0])
    fmt = fmt or {".jpg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower(), "PNG")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _mask(path: Path, boxes: list[tuple[int, int, int, int]], value: int = 255, fmt: str = "PNG") -> np.ndarray:
    """Write a mask with `value` inside (x0, y0, x1, y1) boxes; return the boolean truth."""
    m = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path, format=fmt)
    return m > 0


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        a = np.asarray(im)
    assert im.mode == "L" and set(np.unique(a)) <= {0, 255}, (im.mode, np.unique(a))
    return a > 0


def _tree(root: Path) -> dict[str, int]:
    """relative folder -> number of files, for every folder holding files."""
    out: dict[str, int] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            key = p.parent.relative_to(root).as_posix()
            out[key] = out.get(key, 0) + 1
    return out


def _assert_idempotent(fn, summary):
    again = fn()
    assert again.written == 0 and again.skipped == summary.written + summary.skipped
    assert again.counts == summary.counts


# ----------------------------------------------------------------------------- VisA


def _visa(root: Path) -> dict:
    rows = ["object,split,label,image,mask"]
    truth = {}
    for k, obj in enumerate(["candle", "pcb1"]):
        for i in range(5):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _img(root / rel, seed=100 * k + i)
            rows.append(f"{obj},{'train' if i < 3 else 'test'},normal,{rel},")
        for i in range(2):
            rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / rel, seed=100 * k + 50 + i)
            truth[(obj, f"{i:03d}")] = _mask(root / mrel, [(2 + i, 3, 9 + i, 11)], value=1)  # VisA masks: 0/1
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return truth


def test_visa(tmp_path):
    src, dst = tmp_path / "VisA", tmp_path / "visa_mvtec"
    truth = _visa(src)
    summary = imp.import_visa(str(src), str(dst))
    for obj in ("candle", "pcb1"):
        assert summary.counts[obj] == {"train/good": 3, "test/good": 2, "test/bad": 2, "ground_truth/bad": 2}
    assert summary.written == 2 * 9 and summary.skipped == 0 and not summary.notes
    assert _tree(dst) == {f"{o}/{k}": n for o in ("candle", "pcb1") for k, n in summary.counts[o].items()}
    # images are byte copies; masks are binarised 0/255 PNGs named like the image (Dinomaly's preparation)
    original = (src / "candle/Data/Images/Normal/0000.JPG").read_bytes()
    assert (dst / "candle/train/good/0000.JPG").read_bytes() == original
    assert (dst / "candle/test/good/0003.JPG").is_file() and (dst / "candle/test/good/0004.JPG").is_file()
    for (obj, stem), m in truth.items():
        assert np.array_equal(_read_mask(dst / obj / "ground_truth" / "bad" / f"{stem}.png"), m)
    df = build_manifest_from_mvtec(str(dst), "industrial", "visa")
    assert len(df) == 14 and (df[df.defect == "bad"].label == 1).all() and df.mask_uri.notna().sum() == 4
    assert validate_manifest(df).ok

    _assert_idempotent(lambda: imp.import_visa(str(src), str(dst)), summary)
    (dst / "pcb1/ground_truth/bad/001.png").unlink()
    assert imp.import_visa(str(src), str(dst)).written == 1  # only the missing file is redone

    only = imp.import_visa(str(src), str(tmp_path / "one"), categories=["pcb1"])
    assert list(only.counts) == ["pcb1"]
    with pytest.raises(DatasetImportError, match="nope"):
        imp.import_visa(str(src), str(tmp_path / "x"), categories=["nope"])
    (src / "split_csv" / "1cls.csv").write_text("object,image\ncandle,a.JPG\n")
    with pytest.raises(DatasetImportError, match="expected columns"):
        imp.import_visa(str(src), str(tmp_path / "x"))


# ----------------------------------------------------------------------------- MVTec LOCO


def _loco(root: Path) -> dict:
    c = root / "breakfast_box"
    for i in range(3):
        _img(c / f"train/good/{i:03d}.png", seed=i)
    _img(c / "validation/good/000.png", seed=10)
    _img(c / "test/good/000.png", seed=11)
    truth = {}
    _img(c / "test/logical_anomalies/000.png", seed=12)
    a = _mask(c / "ground_truth/logical_anomalies/000/000.png", [(0, 0, 5, 5)], value=255)
    b = _mask(c / "ground_truth/logical_anomalies/000/001.png", [(10, 8, 20, 16)], value=37)  # other value
    d = _mask(c / "ground_truth/logical_anomalies/000/002.png", [(3, 3, 12, 12)], value=255)  # overlaps a
    truth["logical_anomalies/000"] = a | b | d
    _img(c / "test/logical_anomalies/001.png", seed=13)
    truth["logical_anomalies/001"] = _mask(c / "ground_truth/logical_anomalies/001/000.png", [(1, 1, 4, 9)])
    _img(c / "test/structural_anomalies/000.png", seed=14)
    truth["structural_anomalies/000"] = _mask(c / "ground_truth/structural_anomalies/000/000.png", [(5, 5, 7, 7)])
    (c / "defects_config.json").write_text("[]")  # LOCO ships one; not an image, ignored
    return truth


def test_mvtec_loco_merges_masks(tmp_path):
    src, dst = tmp_path / "loco", tmp_path / "loco_mvtec"
    truth = _loco(src)
    summary = imp.import_mvtec_loco(str(src), str(dst))
    assert summary.counts["breakfast_box"] == {
        "defect_groups.json": 1, "ground_truth/logical_anomalies": 2, "ground_truth/structural_anomalies": 1,
        "test/good": 1, "test/logical_anomalies": 2, "test/structural_anomalies": 1, "train/good": 3,
        "validation/good": 1}
    c = dst / "breakfast_box"
    for key, m in truth.items():
        merged = _read_mask(c / "ground_truth" / f"{key}_mask.png")
        assert np.array_equal(merged, m), key
    assert truth["logical_anomalies/000"].sum() > 25 + 80  # the OR really combined several masks
    assert not any(p.is_dir() for p in (c / "ground_truth/logical_anomalies").iterdir())  # no per-image folders
    assert json.loads((c / "defect_groups.json").read_text()) == {
        "logical_anomalies": "logical", "structural_anomalies": "structural"}

    df = build_manifest_from_mvtec(str(dst), "logical", "mvtec_loco")
    assert df.groupby("split").size().to_dict() == {"test": 4, "train": 3, "validation": 1}
    bad = df[df.label == 1].set_index("defect")
    assert set(bad.loc["logical_anomalies", "defect_group"]) == {"logical"}
    assert bad.loc["structural_anomalies", "defect_group"] == "structural"
    assert validate_manifest(df).ok

    _assert_idempotent(lambda: imp.import_mvtec_loco(str(src), str(dst)), summary)

    _mask(src / "breakfast_box/ground_truth/structural_anomalies/000/001.png", [(0, 0, 2, 2)])
    with Image.open(src / "breakfast_box/ground_truth/structural_anomalies/000/001.png") as im:
        im.resize((10, 10)).save(src / "breakfast_box/ground_truth/structural_anomalies/000/001.png")
    with pytest.raises(DatasetImportError, match="differ in size"):
        imp.import_mvtec_loco(str(src), str(tmp_path / "again"))


# ----------------------------------------------------------------------------- BMAD


def _bmad(root: Path) -> None:
    b = root / "BrainMRI"
    for i in range(3):
        _img(b / f"train/good/img/tr{i}.png", seed=i)
    _img(b / "valid/good/img/v0.png", seed=10)
    _img(b / "valid/Ungood/img/v1.png", seed=11)
    _mask(b / "valid/Ungood/label/v1.png", [(1, 1, 6, 6)], value=1)
    for i in range(2):
        _img(b / f"test/good/img/g{i}.png", seed=20 + i)
        _mask(b / f"test/good/label/g{i}.png", [])  # BMAD has empty labels for normals: ignored
        _img(b / f"test/Ungood/img/u{i}.png", seed=30 + i)
        _mask(b / f"test/Ungood/label/u{i}.png", [(i, 2, 9, 9)], value=255)
    r = root / "RESC"  # train/good without an img/ level
    for i in range(2):
        _img(r / f"train/good/{i}.png", seed=40 + i)
    _img(r / "test/good/img/0.png", seed=50)
    _img(r / "test/Ungood/img/1.png", seed=51)
    _mask(r / "test/Ungood/label/1.png", [(3, 3, 5, 5)])


def test_bmad(tmp_path):
    src, dst = tmp_path / "BMAD", tmp_path / "bmad_mvtec"
    _bmad(src)
    summary = imp.import_bmad(str(src), str(dst))
    assert summary.counts == {
        "BrainMRI": {"ground_truth/Ungood": 2, "test/Ungood": 2, "test/good": 2, "train/good": 3,
                     "validation/good": 1},
        "RESC": {"ground_truth/Ungood": 1, "test/Ungood": 1, "test/good": 1, "train/good": 2},
    }
    assert _read_mask(dst / "BrainMRI/ground_truth/Ungood/u1_mask.png")[2:9, 1:9].all()
    df = build_manifest_from_mvtec(str(dst), "medical", "bmad")
    assert set(df[df.label == 1].defect) == {"Ungood"} and df[df.label == 1].mask_uri.notna().all()
    assert validate_manifest(df).ok
    _assert_idempotent(lambda: imp.import_bmad(str(src), str(dst)), summary)

    valid = imp.import_bmad(str(src), str(tmp_path / "bmad_valid"), eval_split="valid", categories=["BrainMRI"])
    assert valid.counts == {"BrainMRI": {"ground_truth/Ungood": 1, "test/Ungood": 1, "test/good": 1,
                                         "train/good": 3}}
    assert (tmp_path / "bmad_valid/BrainMRI/test/Ungood/v1.png").is_file()
    no_val = imp.import_bmad(str(src), str(tmp_path / "bmad_noval"), keep_valid_good=False)
    assert "validation/good" not in no_val.counts["BrainMRI"]
    with pytest.raises(ValueError, match="eval_split"):
        imp.import_bmad(str(src), str(tmp_path / "x"), eval_split="train")


# ----------------------------------------------------------------------------- UCSD Ped2


def _ped2(root: Path) -> dict[str, bool]:
    """Two train clips, two test clips; returns the truth: output stem -> anomalous."""
    for clip, n in (("Train001", 3), ("Train002", 2)):
        for i in range(n):
            _img(root / "Train" / clip / f"{i + 1:03d}.tif", seed=i, mode="L")
    truth = {}
    for clip, anomalous in (("Test001", {1, 2}), ("Test002", set())):
        for i in range(4 if clip == "Test001" else 3):
            _img(root / "Test" / clip / f"{i + 1:03d}.tif", seed=60 + i, mode="L")
            boxes = [(4, 4, 4 + 3 * i, 12)] if i in anomalous else []
            _mask(root / "Test" / f"{clip}_gt" / f"{i + 1:03d}.bmp", boxes, value=255, fmt="BMP")
            truth[f"{clip}_{i:03d}"] = i in anomalous
    (root / "Test" / "Test001" / "._junk").write_bytes(b"x")  # hidden: ignored
    return truth


def test_ped2_frames_labelled_from_gt(tmp_path, monkeypatch):
    src, dst = tmp_path / "UCSDped2", tmp_path / "ped2_mvtec"
    truth = _ped2(src)
    summary = imp.import_ped2(str(src), str(dst))
    assert summary.counts == {"pedestrian": {"ground_truth/anomaly": 2, "test/anomaly": 2, "test/good": 5,
                                             "train/good": 5}}
    p = dst / "pedestrian"
    assert sorted(f.name for f in (p / "train/good").iterdir()) == [
        "Train001_000.png", "Train001_001.png", "Train001_002.png", "Train002_000.png", "Train002_001.png"]
    for stem, bad in truth.items():
        assert (p / "test" / ("anomaly" if bad else "good") / f"{stem}.png").is_file() == True  # noqa: E712
        assert (p / "ground_truth/anomaly" / f"{stem}_mask.png").is_file() == bad
    # frames stay grey and lossless: pixel-identical to the .tif
    with Image.open(p / "test/anomaly/Test001_002.png") as a, Image.open(src / "Test/Test001/003.tif") as b:
        assert a.mode == "L" and np.array_equal(np.asarray(a), np.asarray(b))
    assert _read_mask(p / "ground_truth/anomaly/Test001_002_mask.png")[4:12, 4:10].all()
    df = build_manifest_from_mvtec(str(dst), "video", "ped2")
    assert int(df.label.sum()) == 2 and validate_manifest(df).ok

    def no_gt_reads(uri):
        raise AssertionError(f"re-read GT {uri} on an idempotent run")

    monkeypatch.setattr(imp, "_mask_array", no_gt_reads)
    _assert_idempotent(lambda: imp.import_ped2(str(src), str(dst)), summary)
    monkeypatch.undo()

    rgb = imp.import_ped2(str(src), str(tmp_path / "rgb"), rgb=True)
    assert rgb.counts == summary.counts
    with Image.open(tmp_path / "rgb/pedestrian/train/good/Train001_000.png") as im:
        assert im.mode == "RGB"


# ----------------------------------------------------------------------------- MVTec 3D-AD and MVTec AD


def test_mvtec3d_rgb_only(tmp_path):
    src, dst = tmp_path / "mvtec3d", tmp_path / "mvtec3d_mvtec"
    b = src / "bagel"
    _img(b / "train/good/rgb/000.png", seed=0)
    _img(b / "train/good/rgb/001.png", seed=1)
    _img(b / "train/good/xyz/000.tiff", seed=2)
    _img(b / "validation/good/rgb/000.png", seed=3)
    _img(b / "test/good/rgb/000.png", seed=4)
    _mask(b / "test/good/gt/000.png", [])
    _img(b / "test/crack/rgb/000.png", seed=5)
    truth = _mask(b / "test/crack/gt/000.png", [(2, 2, 8, 8)])
    _img(b / "test/crack/xyz/000.tiff", seed=6)
    summary = imp.import_mvtec3d(str(src), str(dst))
    assert _tree(dst) == {"bagel/train/good": 2, "bagel/validation/good": 1, "bagel/test/good": 1,
                          "bagel/test/crack": 1, "bagel/ground_truth/crack": 1}
    assert np.array_equal(_read_mask(dst / "bagel/ground_truth/crack/000_mask.png"), truth)
    df = build_manifest_from_mvtec(str(dst), "industrial", "mvtec3d")
    assert len(df) == 5 and validate_manifest(df).ok
    _assert_idempotent(lambda: imp.import_mvtec3d(str(src), str(dst)), summary)


def test_mvtec_copy_and_registry(tmp_path):
    src = tmp_path / "mvtec"
    _img(src / "bottle/train/good/000.png", seed=0)
    _img(src / "bottle/test/good/000.png", seed=1)
    _img(src / "bottle/test/broken_large/000.png", seed=2)
    _mask(src / "bottle/ground_truth/broken_large/000_mask.png", [(1, 1, 3, 3)])
    (src / "bottle/defect_groups.json").write_text('{"broken_large": "structural"}')
    (src / "license.txt").write_text("CC BY-NC-SA 4.0")
    summary = run_importer("mvtec_ad", str(src), str(tmp_path / "out"))
    assert summary.format == "mvtec" and summary.written == 5
    assert _tree(tmp_path / "out") == {"bottle": 1, "bottle/train/good": 1, "bottle/test/good": 1,
                                       "bottle/test/broken_large": 1, "bottle/ground_truth/broken_large": 1}
    assert (tmp_path / "out/bottle/ground_truth/broken_large/000_mask.png").read_bytes() == (
        src / "bottle/ground_truth/broken_large/000_mask.png").read_bytes()
    with pytest.raises(ValueError, match="unknown dataset format"):
        run_importer("kitti", str(src), str(tmp_path / "x"))
    with pytest.raises(DatasetImportError, match="no files"):
        run_importer("mvtec", str(tmp_path / "empty"), str(tmp_path / "x"))


def test_cli_and_catalog_import_sources(tmp_path, capsys):
    src = tmp_path / "VisA"
    _visa(src)
    assert imp.main(["visa", "--src", str(src), "--dst", str(tmp_path / "cli"), "--categories", "candle"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["written"] == 9 and list(out["counts"]) == ["candle"]
    assert imp.main(["bmad", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "x")]) == 1

    _loco(tmp_path / "raw_loco")
    cfg = tmp_path / "catalog.yaml"
    cfg.write_text("""
domains:
  industrial:
    datasets:
      visa: {format: visa, source: VisA, root: data/visa, categories: [pcb1]}
  logical:
    datasets:
      loco: {format: mvtec_loco, source: raw_loco, root: data/loco}
""")
    cat = load_catalog(str(cfg))
    summaries = cat.import_sources()
    assert sorted(summaries) == ["industrial/visa", "logical/loco"]
    assert list(summaries["industrial/visa"].counts) == ["pcb1"]
    df = cat.build_manifest()
    assert df.groupby(["domain", "category"]).size().to_dict() == {("industrial", "pcb1"): 7,
                                                                   ("logical", "breakfast_box"): 8}
    assert cat.validate_manifest(df).ok
    assert all(s.written == 0 for s in cat.import_sources().values())


# ----------------------------------------------------------------------------- S3 (moto)


@pytest.fixture
def s3(monkeypatch, tmp_path):
    moto = pytest.importorskip("moto")
    import boto3

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "ANOMALYMOE_S3_ENDPOINT", "AWS_PROFILE",
                "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    with moto.mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="data")
        yield "s3://data"


def test_import_build_validate_on_s3(tmp_path, s3):
    src = tmp_path / "loco"
    truth = _loco(src)
    dst = f"{s3}/loco/"  # a trailing slash must not matter
    summary = imp.import_mvtec_loco(str(src), dst)
    assert summary.written == 12
    files = storage.list_files(f"{s3}/loco")
    assert f"{s3}/loco/breakfast_box/ground_truth/logical_anomalies/000_mask.png" in files
    merged = np.asarray(Image.open(io.BytesIO(storage.read_bytes(
        f"{s3}/loco/breakfast_box/ground_truth/logical_anomalies/000_mask.png")))) > 0
    assert np.array_equal(merged, truth["logical_anomalies/000"])
    _assert_idempotent(lambda: imp.import_mvtec_loco(str(src), dst), summary)

    df = build_manifest_from_mvtec(dst, "logical", "mvtec_loco")
    assert len(df) == 8 and df.uri.str.startswith(f"{s3}/loco/breakfast_box/").all()
    assert df.mask_uri.dropna().str.startswith("s3://").all()
    report = validate_manifest(df)
    assert report.ok, report.summary()
    assert (report.manifest.width == SIZE[0]).all() and (report.manifest.height == SIZE[1]).all()
    digest = write_manifest(report.manifest, f"{s3}/manifests/loco.parquet")
    back = read_manifest(f"{s3}/manifests/loco.parquet")
    pd.testing.assert_frame_equal(back, report.manifest)
    assert digest

    # problems found on S3 are reported like local ones
    storage.delete(f"{s3}/loco/breakfast_box/train/good/001.png")
    storage.write_bytes(f"{s3}/loco/breakfast_box/train/good/002.png", b"\x00" * 10)
    codes = {(p.uri.rsplit("/", 1)[-1], p.code) for p in validate_manifest(df).problems}
    assert codes == {("001.png", "missing_image"), ("002.png", "corrupt_image")}

    # S3 -> S3 import (e.g. a raw bucket into a prepared one)
    again = imp.import_mvtec(dst, f"{s3}/copy")
    assert again.written == 11 and again.counts["breakfast_box"]["defect_groups.json"] == 1


def test_visa_csv_columns_cannot_leave_the_source_or_destination(tmp_path):
    """The split CSV is outside data: `object=../../x` would write outside the destination and
    `image=../../../../etc/hostname` would copy a host file into the dataset. Both are refused with their line, and
    nothing is written outside."""
    src, dst = tmp_path / "VisA", tmp_path / "out" / "visa"
    _visa(src)
    outside = tmp_path / "escaped"
    for row, what in (("../../escaped,train,normal,candle/Data/Images/Normal/0000.JPG,", "../../escaped"),
                      ("candle,train,normal,../../../../etc/hostname,", "../../../../etc/hostname"),
                      ("candle,train,normal,/etc/hostname,", "/etc/hostname")):
        (src / "split_csv" / "1cls.csv").write_text(f"object,split,label,image,mask\n{row}\n")
        with pytest.raises(DatasetImportError, match=r"line 2: .*would leave"):
            imp.import_visa(str(src), str(dst))
        assert what
    assert not outside.exists() and not (dst.exists() and any(dst.rglob("hostname")))


def test_safe_join_refuses_what_would_leave_its_root():
    base = "s3://bucket/models/v4"
    assert storage.safe_join(base, "model/config.json") == "s3://bucket/models/v4/model/config.json"
    assert storage.safe_join("/data", "a..b/c.png") == "/data/a..b/c.png"  # dots inside a name are fine
    for bad in ("../x", "a/../../x", "/home/u/x.pth", "a\\..\\b", "a\x00b", ".."):
        with pytest.raises(storage.UnsafePath, match="would leave"):
            storage.safe_join(base, bad)
