"""Manifests (build, schema, hash, validation) and the catalog, on generated MVTec-layout trees."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from anomalymoe.platform.data import manifest as mf
from anomalymoe.platform.data.catalog import Catalog, CatalogError, demo_catalog, load_catalog, save_catalog
from anomalymoe.platform.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    build_manifest_from_mvtec,
    ensure_valid,
    manifest_hash,
    read_manifest,
    validate_manifest,
    write_manifest,
)

pytestmark = pytest.mark.unit

N_TRAIN, N_GOOD, N_PER_DEFECT = 3, 2, 1
CATS = ("brick", "grass")


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    from anomalymoe.platform.data.demo.textures import generate_textures

    root = tmp_path_factory.mktemp("demo") / "textures"
    generate_textures(root, image_size=64, n_train=N_TRAIN, n_test_good=N_GOOD,
                      n_test_defect_per_type=N_PER_DEFECT, categories=CATS)
    return root


@pytest.fixture(scope="module")
def textures_df(textures) -> pd.DataFrame:
    return build_manifest_from_mvtec(str(textures), "textures", "demo_textures")


def _png(size=(32, 32), value=128, mode="RGB") -> bytes:
    buf = io.BytesIO()
    arr = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(size=(32, 32), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size=(64, 64), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _bomb_png(width=30000, height=30000) -> bytes:
    """A tiny PNG whose IHDR claims width x height (CRC fixed), like a decompression bomb's header."""
    data = bytearray(_png((4, 4)))
    # signature (8) + length (4) + b"IHDR" (4) -> width, height at 16..24; CRC over type+data at 29..33
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


# ----------------------------------------------------------------------------- build


def test_build_from_generated_mvtec_tree(textures, textures_df):
    df = textures_df
    from anomalymoe.platform.data.demo.textures import DEFECT_TYPES

    assert tuple(df.columns) == MANIFEST_COLUMNS
    per_cat = N_TRAIN + N_GOOD + N_PER_DEFECT * len(DEFECT_TYPES)
    assert len(df) == per_cat * len(CATS)
    assert sorted(df["category"].unique()) == list(CATS)
    assert set(df["domain"]) == {"textures"} and set(df["dataset"]) == {"demo_textures"}
    assert df["label"].dtype == np.int8
    for cat in CATS:
        sub = df[df.category == cat]
        assert (sub.split == "train").sum() == N_TRAIN
        assert ((sub.split == "test") & (sub.label == 0)).sum() == N_GOOD
        assert ((sub.split == "test") & (sub.label == 1)).sum() == N_PER_DEFECT * len(DEFECT_TYPES)
        assert set(sub[sub.label == 1].defect) == set(DEFECT_TYPES)
    assert (df.label == (df.defect != "good").astype(int)).all()
    assert (df[df.split == "train"].label == 0).all()
    bad = df[df.label == 1]
    assert bad.mask_uri.notna().all() and df[df.label == 0].mask_uri.isna().all()
    for uri, mask, cat, defect in zip(bad.uri, bad.mask_uri, bad.category, bad.defect, strict=True):
        assert Path(uri).is_file() and Path(mask).is_file()
        assert mask == str(textures / cat / "ground_truth" / defect / (Path(uri).stem + "_mask.png"))
    assert df.uri.map(lambda u: Path(u).is_absolute()).all()
    assert df.width.isna().all() and df.defect_group.isna().all() and df.component_mask_uri.isna().all()
    # the walk agrees with the generator's own reader
    from anomalymoe.platform.data.demo.textures import iter_samples

    want = {str(p) for cat in df.category.unique() for split in ("train", "test")
            for p, *_ in iter_samples(textures, cat, split)}
    assert set(df.uri) == want


def test_build_categories_validation_split_and_defect_groups(tmp_path):
    root = tmp_path / "objs"
    for i in range(2):
        _write(root / "widget" / "train" / "good" / f"{i:03d}.png", _png())
    _write(root / "widget" / "validation" / "good" / "000.png", _png())
    _write(root / "widget" / "test" / "good" / "000.png", _png())
    _write(root / "widget" / "test" / "missing_part" / "000.png", _png())
    _write(root / "widget" / "ground_truth" / "missing_part" / "000.png", _png(mode="L"))  # "<stem>.png" naming
    _write(root / "widget" / "test" / "scratch" / "000.jpg", _jpeg())
    _write(root / "widget" / "ground_truth" / "scratch" / "000_mask.png", _png(mode="L"))
    (root / "widget" / "defect_groups.json").write_text(json.dumps({"missing_part": "component"}))
    _write(root / "other" / "train" / "good" / "000.png", _png())
    _write(root / "other" / "test" / "good" / "000.png", _png())
    _write(root / "other" / "parts" / "train" / "good" / "000.png", _png())  # not a split: ignored
    _write(root / ".hidden" / "train" / "good" / "000.png", _png())

    df = build_manifest_from_mvtec(str(root), "objects", "objs", default_defect_group="structural")
    assert sorted(df.category.unique()) == ["other", "widget"]
    w = df[df.category == "widget"].set_index("defect")
    assert list(df[df.category == "widget"].split) == ["train", "train", "validation", "test", "test", "test"]
    assert w.loc["missing_part", "defect_group"] == "component"
    assert w.loc["scratch", "defect_group"] == "structural"  # default for unlisted defects
    assert w.loc["missing_part", "mask_uri"].endswith("ground_truth/missing_part/000.png")
    assert w.loc["scratch", "mask_uri"].endswith("ground_truth/scratch/000_mask.png")
    assert df[df.label == 0].defect_group.isna().all()

    only = build_manifest_from_mvtec(str(root), "objects", "objs", categories=["other"])
    assert set(only.category) == {"other"} and len(only) == 2
    with pytest.raises(ManifestError, match="nope"):
        build_manifest_from_mvtec(str(root), "objects", "objs", categories=["other", "nope"])


# ----------------------------------------------------------------------------- I/O and hash


def test_round_trip_write_read(tmp_path, textures_df):
    uri = str(tmp_path / "sub" / "m.parquet")
    digest = write_manifest(textures_df, uri)
    back = read_manifest(uri)
    pd.testing.assert_frame_equal(back, textures_df)
    meta = pq.read_schema(uri).metadata
    assert meta[b"anomalymoe.manifest.version"] == b"1"
    assert meta[b"anomalymoe.manifest.hash"].decode() == digest == manifest_hash(textures_df)
    # a pyarrow Table is accepted too, and a frame missing only nullable columns is completed
    write_manifest(pa.Table.from_pandas(textures_df, preserve_index=False), uri)
    pd.testing.assert_frame_equal(read_manifest(uri), textures_df)
    slim = textures_df.drop(columns=["width", "height", "component_mask_uri"])
    write_manifest(slim, uri)
    pd.testing.assert_frame_equal(read_manifest(uri), textures_df)


def test_hash_is_row_order_independent_and_content_sensitive(textures_df):
    h = manifest_hash(textures_df)
    shuffled = textures_df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert not shuffled.uri.equals(textures_df.uri)
    assert manifest_hash(shuffled) == h
    assert manifest_hash(shuffled[list(reversed(shuffled.columns))]) == h  # column order
    assert manifest_hash(textures_df.astype({"label": "int64"})) == h  # dtype
    sized = textures_df.copy()
    sized["width"] = pd.array([64] * len(sized), dtype="Int32")
    assert manifest_hash(sized) == h  # derived columns are not hashed

    for col, value in [("split", "validation"), ("label", 1), ("defect_group", "logical"), ("mask_uri", "x.png"),
                       ("component_mask_uri", "c.npz"), ("uri", textures_df.uri[0] + "x"), ("defect", "hole")]:
        changed = textures_df.copy()
        changed.loc[0, col] = value
        assert manifest_hash(changed) != h, col
    assert manifest_hash(textures_df.iloc[1:]) != h
    assert manifest_hash(pd.concat([textures_df, textures_df.iloc[[0]]])) != h  # duplicate row counts
    # None vs the string "None" vs "" differ
    a, b, c = (textures_df.copy() for _ in range(3))
    a.loc[0, "defect_group"], b.loc[0, "defect_group"], c.loc[0, "defect_group"] = None, "None", ""
    assert len({manifest_hash(a), manifest_hash(b), manifest_hash(c)}) == 3


def test_wrong_schema_files_give_clear_errors(tmp_path, textures_df):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pandas(textures_df, preserve_index=False).replace_schema_metadata({}), plain)
    with pytest.raises(ManifestError, match="not an anomalymoe manifest"):
        read_manifest(str(plain))

    t = mf.to_table(textures_df)
    v2 = tmp_path / "v2.parquet"
    pq.write_table(t.replace_schema_metadata({b"anomalymoe.manifest.version": b"2"}), v2)
    with pytest.raises(ManifestError, match="version 2.*reads version 1"):
        read_manifest(str(v2))

    wrong = tmp_path / "wrong.parquet"
    bad = t.set_column(t.schema.get_field_index("label"), "label", pa.array(["x"] * len(t)))
    bad = bad.drop_columns(["height"]).append_column("extra", pa.array([1] * len(t)))
    pq.write_table(bad.replace_schema_metadata(mf.MANIFEST_SCHEMA.metadata), wrong)
    with pytest.raises(ManifestError) as e:
        read_manifest(str(wrong))
    msg = str(e.value)
    assert "'label' has type string, expected int8" in msg and "missing column 'height'" in msg
    assert "unknown column 'extra'" in msg  # every difference, not the first

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(str(garbage))
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path / "absent.parquet"))

    with pytest.raises(ManifestError, match="missing required column"):
        write_manifest(textures_df.drop(columns=["split"]), str(tmp_path / "x.parquet"))
    with pytest.raises(ManifestError, match="null values in required"):
        write_manifest(textures_df.assign(category=None), str(tmp_path / "x.parquet"))
    with pytest.raises(ManifestError, match="do not fit the schema"):
        write_manifest(textures_df.assign(label=300), str(tmp_path / "x.parquet"))
    assert not (tmp_path / "x.parquet").exists()


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def broken(tmp_path):
    """A tree with one of each problem; returns (manifest, {row: expected codes}, uris by name)."""
    root = tmp_path / "broken"
    u = {}
    u["ok"] = _write(root / "a" / "train" / "good" / "000.png", _noise_png())
    u["ok2"] = _write(root / "a" / "train" / "good" / "001.png", _noise_png(seed=1))
    u["corrupt"] = _write(root / "a" / "train" / "good" / "002.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    full = _noise_png((64, 64), seed=2)
    u["truncated"] = _write(root / "a" / "train" / "good" / "003.png", full[: len(full) // 2])
    flipped = full[:200] + bytes([full[200] ^ 0xFF]) + full[201:]  # one IDAT byte: the chunk CRC fails
    u["bad_crc"] = _write(root / "a" / "train" / "good" / "006.png", flipped)
    u["bomb"] = _write(root / "a" / "train" / "good" / "004.png", _bomb_png())
    jpg = _jpeg((64, 64))
    u["trunc_jpg"] = _write(root / "a" / "train" / "good" / "005.jpg", jpg[: len(jpg) * 2 // 3])
    u["test_good"] = _write(root / "a" / "test" / "good" / "000.png", _png())
    u["no_mask"] = _write(root / "a" / "test" / "crack" / "000.png", _png())
    u["wrong_mask"] = _write(root / "a" / "test" / "crack" / "001.png", _png())
    _write(root / "a" / "ground_truth" / "crack" / "001_mask.png", _png((16, 16), 255, "L"))
    u["good_mask"] = _write(root / "a" / "test" / "crack" / "002.png", _png())
    _write(root / "a" / "ground_truth" / "crack" / "002_mask.png", _png((32, 32), 255, "L"))
    u["b_test"] = _write(root / "b" / "test" / "good" / "000.png", _png())  # category b: no train images
    u["c_train"] = _write(root / "c" / "train" / "good" / "000.png", _png())
    u["c_test"] = _write(root / "c" / "test" / "good" / "000.png", _png())
    df = build_manifest_from_mvtec(str(root), "d", "s")
    assert len(df) == 14

    extra = []
    base = df[df.uri == u["good_mask"]].iloc[0].to_dict()
    extra.append(dict(df[df.uri == u["ok"]].iloc[0].to_dict()))  # duplicate of an existing row
    extra.append({**base, "uri": str(root / "a" / "test" / "crack" / "404.png"), "mask_uri": None})  # + no mask
    extra.append({**base, "uri": u["good_mask"].replace("002", "003"), "mask_uri": str(root / "nowhere.png")})
    _write(Path(extra[-1]["uri"]), _png())
    extra.append({**dict(df[df.uri == u["c_test"]].iloc[0].to_dict()), "uri": u["c_test"], "split": "tset",
                  "label": 7})
    df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    row = {v: int(df.index[df.uri == v][0]) for v in u.values()}
    n = len(df)
    expected = {
        row[u["corrupt"]]: {"corrupt_image"},
        row[u["truncated"]]: {"truncated_image"},
        row[u["bad_crc"]]: {"corrupt_image"},
        row[u["bomb"]]: {"image_too_large"},
        row[u["trunc_jpg"]]: {"truncated_image"},
        row[u["no_mask"]]: {"missing_mask"},
        row[u["wrong_mask"]]: {"mask_size_mismatch"},
        n - 4: {"duplicate_uri"},
        n - 3: {"missing_image", "missing_mask"},
        n - 2: {"missing_mask_file"},
        n - 1: {"duplicate_uri", "bad_split", "bad_label"},
    }
    return df, expected, u


def test_validation_reports_every_problem_at_once(broken):
    df, expected, u = broken
    report = validate_manifest(df, max_workers=3)
    assert not report.ok
    got: dict[int, set[str]] = {}
    for p in report.problems:
        if p.row is not None:
            got.setdefault(p.row, set()).add(p.code)
            assert p.uri == df.uri[p.row]
    assert got == expected
    cat_level = [p for p in report.problems if p.row is None]
    assert [(p.code, "d/s/b" in p.message, "no train" in p.message) for p in cat_level] == [
        ("empty_category", True, True)]
    b_rows = set(df.index[df.category == "b"])
    assert set(report.bad_rows) == set(expected) | b_rows
    # sizes come from the headers wherever they parse, also for a truncated file; not for missing files or for
    # a bomb past PIL's hard limit (PIL refuses it at open)
    m = report.manifest
    assert m.loc[df.uri == u["ok"], "width"].iloc[0] == 32
    assert m.loc[df.uri == u["truncated"], "width"].iloc[0] == 64
    assert m.loc[df.uri == u["bomb"], ["width", "height"]].isna().all(axis=None)
    assert m.loc[df.uri == u["trunc_jpg"], "width"].iloc[0] == 64
    assert pd.isna(m.loc[len(df) - 3, "width"])
    assert df.width.isna().all()  # the input frame is not modified

    text = report.summary()
    for code in {c for codes in expected.values() for c in codes} | {"empty_category"}:
        assert f"\n{code} (" in text
    for r in expected:
        assert f"row {r}: {df.uri[r]}" in text
    assert f"{len(report.bad_rows)} of {len(df)} row(s)" in text
    assert report.counts()["duplicate_uri"] == 2

    quick = validate_manifest(df, check_images=False)  # no I/O: only the value checks
    assert {p.code for p in quick.problems} == {"duplicate_uri", "missing_mask", "bad_split", "bad_label",
                                                  "empty_category"}


def test_ensure_valid_raises_or_skips(broken, caplog):
    df, expected, u = broken
    with pytest.raises(ManifestError) as e:
        ensure_valid(df)
    msg = str(e.value)
    for r in expected:
        assert f"row {r}: {df.uri[r]}" in msg
    assert "empty_category" in msg

    with caplog.at_level(logging.WARNING, logger="anomalymoe.platform.data.manifest"):
        good = ensure_valid(df, skip_bad_rows=True)
    assert "dropped" in caplog.text
    keep = {u["ok"], u["ok2"], u["test_good"], u["good_mask"], u["c_train"], u["c_test"]}
    assert sorted(good.uri) == sorted(keep)  # the first c_test row stays; its broken twin is dropped
    assert good.width.notna().all()
    assert validate_manifest(good).ok


def test_skipping_rows_that_empty_a_category_drops_it(tmp_path):
    root = tmp_path / "t"
    _write(root / "a" / "train" / "good" / "000.png", b"broken")
    _write(root / "a" / "test" / "good" / "000.png", _png())
    _write(root / "b" / "train" / "good" / "000.png", _png())
    _write(root / "b" / "test" / "good" / "000.png", _png())
    df = build_manifest_from_mvtec(str(root), "d", "s")
    good = ensure_valid(df, skip_bad_rows=True)
    assert set(good.category) == {"b"}
    bad_only = df[df.category == "a"]
    with pytest.raises(ManifestError, match="no valid rows left"):
        ensure_valid(bad_only, skip_bad_rows=True)


def test_validation_of_a_clean_manifest_fills_sizes(textures_df):
    report = validate_manifest(textures_df)
    assert report.ok, report.summary()
    assert report.summary().startswith("manifest OK")
    assert (report.manifest.width == 64).all() and (report.manifest.height == 64).all()
    assert report.manifest.width.dtype == "Int32"
    assert manifest_hash(report.manifest) == manifest_hash(textures_df)


def test_pixel_limit_and_datasets_without_masks(tmp_path):
    root = tmp_path / "t"
    _write(root / "a" / "train" / "good" / "000.png", _png((40, 40)))
    _write(root / "a" / "test" / "good" / "000.png", _png((20, 20)))
    _write(root / "a" / "test" / "bad" / "000.png", _png((20, 20)))
    df = build_manifest_from_mvtec(str(root), "d", "nogt")
    bad_row = int(df.index[df.defect == "bad"][0])
    # no ground_truth/ at all: image-level labels, said in the has_mask column (normal rows leave it unset)
    assert not pd.isna(df.at[bad_row, "has_mask"]) and not df.at[bad_row, "has_mask"]
    assert df.loc[df.label == 0, "has_mask"].isna().all()
    report = validate_manifest(df, max_pixels=1000)  # 40x40 = 1600 px > 1000: reported, not decoded
    assert [(p.row, p.code) for p in report.problems] == [(0, "image_too_large")]
    assert report.manifest.width[0] == 40  # the header was read, the pixels were not
    # unset (as manifests written before the column): an anomalous row needs its mask unless its dataset has none
    legacy = df.assign(has_mask=None)
    assert [(p.row, p.code) for p in validate_manifest(legacy, max_pixels=None).problems] == [(bad_row, "missing_mask")]
    assert validate_manifest(legacy, no_pixel_gt={"nogt"}, max_pixels=None).ok
    # declared and missing is refused; declared false with a mask named is a contradiction
    declared = df.copy()
    declared.at[bad_row, "has_mask"] = True
    assert [p.code for p in validate_manifest(declared, max_pixels=None).problems] == ["missing_mask"]
    odd = df.copy()
    odd.at[bad_row, "mask_uri"] = str(root / "a" / "test" / "good" / "000.png")
    assert [p.code for p in validate_manifest(odd, max_pixels=None).problems] == ["mask_not_declared"]


def test_has_mask_leaves_old_hashes_alone_and_old_files_read(tmp_path, textures_df):
    h = mf.manifest_hash(textures_df)
    assert textures_df["has_mask"].isna().all()  # the demo tree has masks: nothing to declare
    assert mf.manifest_hash(textures_df.drop(columns=["has_mask"])) == h  # as before the column existed
    flagged = textures_df.copy()
    flagged.loc[flagged.label == 1, ["mask_uri", "has_mask"]] = [None, False]
    assert mf.manifest_hash(flagged) != mf.manifest_hash(flagged.assign(has_mask=None))  # a declaration is content
    # a Parquet file written before the column existed still reads, with has_mask null
    table = mf.to_table(textures_df).drop_columns(["has_mask"])
    pq.write_table(table.replace_schema_metadata(mf.MANIFEST_SCHEMA.metadata), tmp_path / "old.parquet")
    back = mf.read_manifest(str(tmp_path / "old.parquet"))
    assert back["has_mask"].isna().all() and mf.manifest_hash(back) == h


def test_component_mask_uris_are_checked(tmp_path, textures_df):
    df = textures_df.copy()
    there = tmp_path / "c.npz"
    np.savez(there, parts=np.zeros((4, 4), np.uint8))
    df.loc[0, "component_mask_uri"] = str(there)
    df.loc[1, "component_mask_uri"] = str(tmp_path / "absent.npz")
    report = validate_manifest(df)
    assert [(p.row, p.code) for p in report.problems] == [(1, "missing_component_mask")]


def test_cli_build_and_validate(tmp_path, textures, capsys):
    """jobs/manifest.py: build and validate from the command line (exit codes 0 / 1 / 2)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("manifest_job", Path(__file__).resolve().parents[2] / "jobs"
                                                  / "manifest.py")
    manifest_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manifest_job)
    out = tmp_path / "m.parquet"
    assert manifest_job.main(["build", "--root", str(textures), "--domain", "textures", "--dataset", "demo_textures",
                    "--out", str(out), "--validate"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    df = read_manifest(str(out))
    assert printed["rows"] == len(df) and printed["hash"] == manifest_hash(df)
    assert df.width.notna().all()  # --validate stores the sizes
    assert manifest_job.main(["validate", "--manifest", str(out)]) == 0
    assert "manifest OK" in capsys.readouterr().out

    df.loc[0, "uri"] = str(tmp_path / "gone.png")
    df.loc[1, "split"] = "nope"
    write_manifest(df, str(out))
    assert manifest_job.main(["validate", "--manifest", str(out)]) == 1
    text = capsys.readouterr().out
    assert "missing_image (1)" in text and "bad_split (1)" in text and "row 0:" in text and "row 1:" in text
    assert manifest_job.main(["validate", "--manifest", str(tmp_path / "absent.parquet")]) == 2


# ----------------------------------------------------------------------------- catalog


def _tree(root: Path, cats: dict[str, int]) -> None:
    for cat, n in cats.items():
        for i in range(n):
            _write(root / cat / "train" / "good" / f"{i:03d}.png", _png())
        _write(root / cat / "test" / "good" / "000.png", _png())
        _write(root / cat / "test" / "dent" / "000.png", _png())
        _write(root / cat / "ground_truth" / "dent" / "000_mask.png", _png(mode="L"))


def test_catalog_load_and_build_manifest(tmp_path):
    _tree(tmp_path / "data" / "ds1", {"bolt": 2, "nut": 3, "spare": 1})
    _tree(tmp_path / "elsewhere" / "ds1", {"washer": 1})
    _tree(tmp_path / "data" / "ds2", {"pill": 2})
    cfg = tmp_path / "conf" / "catalog.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"""
version: 1
domains:
  industrial:
    datasets:
      ds1:
        root: ../data/ds1
        default_defect_group: structural
        categories:
          bolt: null
          nut: null
          washer: {tmp_path / "elsewhere" / "ds1"}
  medical:
    datasets:
      ds2:
        root: ${{CATALOG_TEST_ROOT}}/ds2
        format: bmad
        pixel_gt: false
""")
    import os

    os.environ["CATALOG_TEST_ROOT"] = str(tmp_path / "data")
    try:
        cat = load_catalog(str(cfg))
    finally:
        del os.environ["CATALOG_TEST_ROOT"]
    assert cat.domains["industrial"].datasets["ds1"].root == str(tmp_path / "data" / "ds1")
    assert cat.domains["medical"].datasets["ds2"].root == str(tmp_path / "data" / "ds2")
    df = cat.build_manifest()
    assert tuple(df.columns) == MANIFEST_COLUMNS
    got = df.groupby(["domain", "dataset", "category"]).size().to_dict()
    assert got == {("industrial", "ds1", "bolt"): 4, ("industrial", "ds1", "nut"): 5,
                   ("industrial", "ds1", "washer"): 3, ("medical", "ds2", "pill"): 4}  # "spare" not listed
    assert set(df[df.label == 1].defect_group.dropna()) == {"structural"}
    assert df[(df.dataset == "ds2") & (df.label == 1)].defect_group.isna().all()
    assert df[df.category == "washer"].uri.str.startswith(str(tmp_path / "elsewhere")).all()
    assert set(cat.build_manifest(domains=["medical"]).domain) == {"medical"}
    assert cat.no_pixel_gt() == {"ds2"}
    assert cat.validate_manifest(df).ok

    # JSON round trip through save_catalog
    js = tmp_path / "cat.json"
    save_catalog(cat, str(js))
    again = load_catalog(str(js))
    assert again == cat
    pd.testing.assert_frame_equal(again.build_manifest(), df)


@pytest.mark.parametrize(
    "text, match",
    [
        ("domains: {}", "no domains"),
        ("domains: {x: {datasets: {d: {format: mvtec}}}}", "root"),
        ("domains: {x: {datasets: {d: {root: /r, format: nifti}}}}", "format"),
        ("domains: {x: {datasets: {d: {root: /r, colour: red}}}}", "colour"),
        ("domains: {'bad name': {datasets: {d: {root: /r}}}}", "bad name"),
        ("version: 2\ndomains: {x: {datasets: {d: {root: /r}}}}", "version"),
        ("[1, 2]", "expected a mapping"),
        ("domains: {x: [", "not valid YAML"),
    ],
)
def test_bad_catalogs_are_refused_clearly(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(CatalogError, match=match):
        load_catalog(str(p))


def test_demo_catalog(tmp_path, textures):
    import shutil

    from anomalymoe.platform.data.demo.objects import CATEGORIES as OBJ_CATS
    from anomalymoe.platform.data.demo.objects import DEFECT_GROUPS, generate_objects

    root = tmp_path / "demo"
    shutil.copytree(textures, root / "textures")
    generate_objects(root / "objects", image_size=64, n_train=2, n_test_good=1, n_test_defect_per_type=1)
    cat = demo_catalog(root)
    assert isinstance(cat, Catalog)
    assert {d: list(s.datasets) for d, s in cat.domains.items()} == {"textures": ["demo_textures"],
                                                                   "objects": ["demo_objects"]}
    df = cat.build_manifest()
    cats = df.groupby("domain").category.unique().map(sorted).to_dict()
    assert cats == {"objects": sorted(OBJ_CATS), "textures": list(CATS)}
    objs = df[df.domain == "objects"]
    assert len(objs) == len(OBJ_CATS) * (2 + 1 + len(DEFECT_GROUPS))  # part .npz files are not images
    bad = objs[objs.label == 1]
    assert dict(zip(bad.defect, bad.defect_group, strict=True)) == DEFECT_GROUPS  # from defect_groups.json
    assert df[df.domain == "textures"].defect_group.isna().all()
    assert cat.validate_manifest(df).ok
    assert set(demo_catalog(root, domains=["textures"]).domains) == {"textures"}
    with pytest.raises(CatalogError, match="nothing"):
        demo_catalog(root, domains=["nothing"])


def test_required_splits_allow_a_test_only_manifest(tmp_path):
    """Evaluating needs only test rows; training needs train and test: the empty-category check follows."""
    from anomalymoe.platform.data.demo.textures import generate_textures
    from anomalymoe.platform.data.manifest import build_manifest_from_mvtec, validate_manifest

    root = tmp_path / "t"
    generate_textures(root, n_train=2, n_test_good=1, n_test_defect_per_type=1, image_size=64, categories=("brick",))
    test_only = build_manifest_from_mvtec(str(root), "textures", "demo")
    test_only = test_only[test_only.split == "test"]
    assert not validate_manifest(test_only).ok
    assert validate_manifest(test_only, required_splits=("test",)).ok
