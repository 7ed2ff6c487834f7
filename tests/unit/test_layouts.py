"""The layouts people have (platform/data/layouts.py): a flat folder and a CSV/Parquet list give the same manifest as
the equivalent MVTec tree, through the same --data (platform/data/sources.resolve_data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from anomalymoe.platform.data.layouts import build_manifest_from_flat, build_manifest_from_list, split_good
from anomalymoe.platform.data.manifest import ManifestError, build_manifest_from_mvtec, validate_manifest
from anomalymoe.platform.data.sources import resolve_data

COMPARED = ["category", "split", "label", "defect", "defect_group", "has_mask"]


def _img(path: Path, seed: int, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = (rng.random((24, 24)) > 0.5).astype(np.uint8) * 255 if mask else (rng.random((24, 24, 3)) * 255).astype(
        np.uint8)
    Image.fromarray(a).save(path)


@pytest.fixture()
def flat(tmp_path) -> Path:
    """Category "pcb" with masks for its scratches, "cable" with image-level labels only."""
    root = tmp_path / "flat"
    for i in range(10):
        _img(root / "pcb" / "good" / f"g{i}.png", i)
        _img(root / "cable" / "good" / f"g{i}.png", 100 + i)
    for i in range(3):
        _img(root / "pcb" / "scratch" / f"s{i}.png", 200 + i)
        _img(root / "pcb" / "ground_truth" / "scratch" / f"s{i}_mask.png", 300 + i, mask=True)
        _img(root / "cable" / "flagged" / f"f{i}.png", 400 + i)
    return root


def _key(df: pd.DataFrame) -> pd.DataFrame:
    out = df.assign(name=df["uri"].map(lambda u: Path(u).name), mask=df["mask_uri"].map(
        lambda u: None if pd.isna(u) else Path(u).name))
    return out.sort_values(["category", "name"]).reset_index(drop=True)[["name", "mask", *COMPARED]]


def _as_mvtec(df: pd.DataFrame, root: Path) -> Path:
    """The MVTec tree with the same images, masks and split as a manifest."""
    for r in df.itertuples():
        (root / r.category / r.split / r.defect).mkdir(parents=True, exist_ok=True)
        shutil.copy(r.uri, root / r.category / r.split / r.defect / Path(r.uri).name)
        if isinstance(r.mask_uri, str):
            (root / r.category / "ground_truth" / r.defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(r.mask_uri, root / r.category / "ground_truth" / r.defect / Path(r.mask_uri).name)
    return root


def test_a_flat_folder_gives_the_manifest_of_its_mvtec_tree(flat, tmp_path):
    df = build_manifest_from_flat(str(flat), "d", "mine", seed=3)
    assert len(df) == 26 and set(df["category"]) == {"pcb", "cable"}
    # the generated split: flagged images are always test, part of the good ones are
    assert (df.loc[df.label == 1, "split"] == "test").all()
    good = df[df.label == 0]
    assert good.groupby("category")["split"].apply(lambda s: (s == "test").sum()).to_dict() == {"cable": 2, "pcb": 2}
    # pcb's flagged rows carry their masks; cable's are image-level labels (has_mask false); all valid
    assert df.loc[(df.category == "pcb") & (df.label == 1), "mask_uri"].notna().all()
    assert (df.loc[(df.category == "cable") & (df.label == 1), "has_mask"] == False).all()  # noqa: E712
    assert validate_manifest(df).ok
    mv = build_manifest_from_mvtec(str(_as_mvtec(df, tmp_path / "mvtec")), "d", "mine")
    pd.testing.assert_frame_equal(_key(df), _key(mv))
    # seeded: the same seed the same split, another seed another one
    assert build_manifest_from_flat(str(flat), "d", "mine", seed=3).equals(df)
    other = build_manifest_from_flat(str(flat), "d", "mine", seed=4)
    assert set(other.loc[other.split == "test", "uri"]) != set(df.loc[df.split == "test", "uri"])


def test_a_flat_folder_without_a_category_level(tmp_path):
    root = tmp_path / "solar_el"
    for i in range(6):
        _img(root / "good" / f"{i}.png", i)
    _img(root / "crack" / "c.png", 9)
    _img(root / "ground_truth" / "crack" / "c_mask.png", 10, mask=True)
    df = build_manifest_from_flat(str(root), "el", "solar_el")
    assert set(df["category"]) == {"solar_el"} and df.loc[df.label == 1, "defect"].tolist() == ["crack"]
    assert df.loc[df.label == 1, "mask_uri"].tolist() == [str(root / "ground_truth" / "crack" / "c_mask.png")]
    assert (df["split"] == "train").sum() == 5


def test_a_csv_or_parquet_list_gives_the_same_manifest(flat, tmp_path):
    df = build_manifest_from_flat(str(flat), "d", "mine", seed=3)
    base = tmp_path / "lists"
    base.mkdir()
    rel = lambda u: None if pd.isna(u) else str(Path(u).relative_to(flat.parent))  # noqa: E731
    listed = pd.DataFrame({"path": ["../" + rel(u) for u in df["uri"]],
                           "label": df["defect"].where(df["label"] == 1, "good"),
                           "mask": [None if m is None else "../" + m for m in map(rel, df["mask_uri"])],
                           "category": df["category"], "split": df["split"]})
    listed.to_csv(base / "mine.csv", index=False)
    got = build_manifest_from_list(str(base / "mine.csv"), "d", "mine")
    pd.testing.assert_frame_equal(_key(got), _key(df))
    assert sorted(map(str, got["uri"])) == sorted(str(Path(u).resolve()) for u in df["uri"])
    # Parquet works the same, and --data picks the builder from what it is given
    pq.write_table(pa.Table.from_pandas(listed), base / "mine.parquet")
    pd.testing.assert_frame_equal(_key(build_manifest_from_list(str(base / "mine.parquet"), "d", "mine")), _key(df))
    for spec in (f"d={base / 'mine.csv'}", f"d={base / 'mine.parquet'}", f"d={flat}"):
        via, _ = resolve_data(spec)
        pd.testing.assert_frame_equal(_key(via), _key(df) if "flat" not in spec else _key(
            build_manifest_from_flat(str(flat), "d", "mine")))
        assert set(via["domain"]) == {"d"}
    # no split column: the seeded hold-out; 0/1 labels; the list's stem as the category
    pd.DataFrame({"path": listed["path"], "label": df["label"]}).to_csv(base / "plain.csv", index=False)
    plain = build_manifest_from_list(str(base / "plain.csv"), "d", "plain")
    assert set(plain["category"]) == {"plain"} and (plain.loc[plain.label == 1, "split"] == "test").all()
    assert set(plain.loc[plain.label == 1, "defect"]) == {"defect"} and (plain.split == "train").sum() == 16


def test_bad_lists_are_refused_clearly(tmp_path):
    (tmp_path / "a.csv").write_text("file,label\nx.png,good\n")
    with pytest.raises(ManifestError, match=r"needs columns path, label.*missing \['path'\]"):
        build_manifest_from_list(str(tmp_path / "a.csv"), "d", "a")
    (tmp_path / "b.csv").write_text("path,label,split\nx.png,good,train\ny.png,bad,later\n")
    with pytest.raises(ManifestError, match="row 1: split 'later'"):
        build_manifest_from_list(str(tmp_path / "b.csv"), "d", "b")
    (tmp_path / "c.csv").write_text("path,label,split\nx.png,good,train\ny.png,bad,\n")
    with pytest.raises(ManifestError, match="give a split for some rows and not others"):
        build_manifest_from_list(str(tmp_path / "c.csv"), "d", "c")


def test_split_good_never_trains_on_a_flagged_image():
    rows = pd.DataFrame({"uri": [f"{i}" for i in range(12)], "category": "c", "label": [0] * 9 + [1] * 3})
    s = split_good(rows, 0.3, seed=0)
    assert (s[rows.label == 1] == "test").all() and (s[rows.label == 0] == "test").sum() == 3
