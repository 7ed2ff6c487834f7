"""Tests for the built-in synthetic ``textures`` dataset (MVTec AD layout, exact masks, determinism)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalymoe.platform.data.demo import textures as dd

pytestmark = pytest.mark.unit

# Small parameters keep every generation well under a second.
SMALL = {"image_size": 64, "n_train": 3, "n_test_good": 2, "n_test_defect_per_type": 2}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("textures")
    return root, dd.generate_textures(root, seed=0, **SMALL)


def test_layout_masks_and_counts_match_summary(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    assert summary["regenerated"] is True
    assert set(summary["categories"]) == set(dd.CATEGORIES)
    lo, hi = dd.AREA_BOUNDS
    n_images = n_masks = 0
    for cat, counts in summary["categories"].items():
        base = root / cat
        assert sorted(p.name for p in base.iterdir()) == ["ground_truth", "test", "train"]
        assert sorted(p.name for p in (base / "train").iterdir()) == ["good"]
        assert (
            len(list((base / "train" / "good").glob("*.png"))) == counts["train"]["good"] == SMALL["n_train"]
        )
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(["good", *dd.DEFECT_TYPES])
        assert sorted(p.name for p in (base / "ground_truth").iterdir()) == sorted(dd.DEFECT_TYPES)
        for kind in ["good", *dd.DEFECT_TYPES]:
            imgs = sorted((base / "test" / kind).glob("*.png"))
            assert len(imgs) == counts["test"][kind]
            for img in imgs:
                with Image.open(img) as im:
                    assert im.mode == "RGB" and im.size == (SMALL["image_size"],) * 2
                n_images += 1
            if kind == "good":
                continue
            masks = sorted((base / "ground_truth" / kind).glob("*"))
            # Exactly one mask per defective image, MVTec naming, nothing else.
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in imgs]
            assert len(masks) == counts["ground_truth"][kind] == SMALL["n_test_defect_per_type"]
            for m in masks:
                with Image.open(m) as im:
                    assert im.mode == "L" and im.size == (SMALL["image_size"],) * 2
                    raw = np.asarray(im)
                assert set(np.unique(raw).tolist()) == {0, 255}
                area = dd.load_mask(m).mean()
                assert lo <= area <= hi, (m, area)
                n_masks += 1
        n_images += counts["train"]["good"]
    assert not list(root.glob("*/ground_truth/good"))
    assert n_images == summary["n_images"] == len(dd.CATEGORIES) * (3 + 2 + 2 * len(dd.DEFECT_TYPES))
    assert n_masks == summary["n_masks"] == len(list(root.rglob("*_mask.png")))


def test_iter_samples_is_sorted_and_pairs_masks(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    train = list(dd.iter_samples(root, "grass", "train"))
    assert [(p.name, lab, kind, m) for p, lab, kind, m in train] == [
        (f"{i:03d}.png", 0, "good", None) for i in range(SMALL["n_train"])
    ]
    test = list(dd.iter_samples(root, "grass", "test"))
    assert test == sorted(test, key=lambda s: (s[2], s[0].name))
    assert len(test) == SMALL["n_test_good"] + SMALL["n_test_defect_per_type"] * len(dd.DEFECT_TYPES)
    for img, label, kind, mask in test:
        assert label == (0 if kind == "good" else 1)
        assert img.parent.name == kind
        if kind == "good":
            assert mask is None
        else:
            assert mask == root / "grass" / "ground_truth" / kind / f"{img.stem}_mask.png"
    (root / "grass" / "ground_truth" / "hole" / "000_mask.png").rename(root / "moved.png")
    try:
        with pytest.raises(FileNotFoundError):
            list(dd.iter_samples(root, "grass", "test"))
    finally:
        (root / "moved.png").rename(root / "grass" / "ground_truth" / "hole" / "000_mask.png")
    with pytest.raises(ValueError):
        list(dd.iter_samples(root, "grass", "val"))


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    dd.generate_textures(a, seed=7, **SMALL)
    dd.generate_textures(b, seed=7, **SMALL)
    dd.generate_textures(c, seed=8, **SMALL)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert ha == hb
    assert (a / dd.MARKER_NAME).read_bytes().replace(b"/a", b"") == (b / dd.MARKER_NAME).read_bytes().replace(
        b"/b", b""
    )
    assert ha.keys() == hc.keys()
    images = [k for k in ha if not k.endswith("_mask.png")]
    assert all(ha[k] != hc[k] for k in images)
    # Samples vary within one dataset too (no accidental constant stream).
    assert len({ha[k] for k in images}) == len(images)


def test_golden_pixels_pin_cross_machine_determinism() -> None:
    """Pins the rendered pixels: if this fails without an intended generator change, determinism broke.

    After an intended change, bump ``_GENERATOR_VERSION`` and update the digests.
    """
    s = dd.render_sample("brick", "test", "scratch", 0, image_size=64, seed=0)
    t = dd.render_sample("gravel", "test", "paste", 1, image_size=64, seed=0)
    digest = hashlib.sha256(s.image.tobytes() + s.mask.tobytes() + t.image.tobytes() + t.mask.tobytes())
    assert digest.hexdigest() == GOLDEN


GOLDEN = "5be3fd56801bf51cef88e6e41339541af67944cbf06713e05e95e6d87efbadbc"


@pytest.mark.parametrize("category", dd.CATEGORIES)
@pytest.mark.parametrize("defect", dd.DEFECT_TYPES)
def test_mask_equals_changed_pixels_and_defect_is_visible(category: str, defect: str) -> None:
    for index in range(3):
        for size in (64, 160):
            s = dd.render_sample(category, "test", defect, index, image_size=size, seed=3)
            assert s.image.shape == s.clean.shape == (size, size, 3) and s.image.dtype == np.uint8
            assert s.mask.shape == (size, size) and s.mask.dtype == bool
            changed = (s.image != s.clean).any(axis=2)
            np.testing.assert_array_equal(changed, s.mask)  # inside all changed, outside identical
            lo, hi = dd.AREA_BOUNDS
            assert lo <= s.mask.mean() <= hi
            diff = np.abs(s.image.astype(int) - s.clean.astype(int)).max(axis=2)[s.mask]
            assert diff.min() >= 1
            assert diff.mean() >= 25, (
                f"{category}/{defect}/{index}: region barely differs ({diff.mean():.1f})"
            )
    # The clean base of a defect sample is a normal image, and good samples are untouched.
    g = dd.render_sample(category, "test", "good", 0, image_size=64)
    assert g.image is g.clean and not g.mask.any()


def test_files_on_disk_match_rendered_samples(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for img, _label, kind, mask in dd.iter_samples(root, "brick", "test"):
        s = dd.render_sample("brick", "test", kind, int(img.stem), image_size=SMALL["image_size"], seed=0)
        np.testing.assert_array_equal(np.asarray(Image.open(img)), s.image)
        if mask is not None:
            np.testing.assert_array_equal(dd.load_mask(mask), s.mask)


def test_second_call_is_a_noop_and_new_params_regenerate(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    dd.generate_textures(root, seed=0, **SMALL)
    (root / "my_notes.txt").write_text("keep me")
    (root / "carpet" / "train" / "good").mkdir(parents=True)
    (root / "carpet" / "train" / "good" / "000.png").write_bytes(b"not ours")
    before = _mtimes(root)
    again = dd.generate_textures(root, seed=0, **SMALL)
    assert again["regenerated"] is False
    assert _mtimes(root) == before

    changed = dd.generate_textures(root, seed=0, **{**SMALL, "image_size": 72})
    assert changed["regenerated"] is True
    with Image.open(root / "gravel" / "test" / "hole" / "000.png") as im:
        assert im.size == (72, 72)
    marker = json.loads((root / dd.MARKER_NAME).read_text())
    assert marker["params"]["image_size"] == 72
    # Unowned files survive a regeneration.
    assert (root / "my_notes.txt").read_text() == "keep me"
    assert (root / "carpet" / "train" / "good" / "000.png").read_bytes() == b"not ours"

    # Fewer images than before: stale files of owned categories are removed, not left behind.
    dd.generate_textures(root, seed=0, **{**SMALL, "n_train": 1, "categories": ("brick",)})
    assert [p.name for p in (root / "brick" / "train" / "good").iterdir()] == ["000.png"]
    assert not (root / "grass").exists() and not (root / "gravel").exists()


def test_interrupted_run_is_redone(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    dd.generate_textures(root, seed=0, **SMALL)
    (root / dd.MARKER_NAME).unlink()  # as if killed before the marker was written
    (root / "grass" / "train" / "good" / "001.png").unlink()
    (root / dd._PARTIAL_NAME).write_text(json.dumps({"params": {"categories": list(dd.CATEGORIES)}}))
    out = dd.generate_textures(root, seed=0, **SMALL)
    assert out["regenerated"] is True
    assert (root / "grass" / "train" / "good" / "001.png").is_file()
    assert (root / dd.MARKER_NAME).is_file() and not (root / dd._PARTIAL_NAME).exists()


def test_refuses_to_delete_category_folders_it_does_not_own(tmp_path: Path) -> None:
    precious = tmp_path / "brick" / "train" / "good" / "000.png"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"real data")
    with pytest.raises(FileExistsError):
        dd.generate_textures(tmp_path, **SMALL)
    assert precious.read_bytes() == b"real data"


@pytest.mark.parametrize(
    "kwargs",
    [{"categories": ("carpet",)}, {"image_size": 32}, {"seed": -1}, {"n_train": -1}, {"categories": ()}],
)
def test_rejects_bad_parameters(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        dd.generate_textures(tmp_path, **{**SMALL, **kwargs})
    assert not list(tmp_path.iterdir())


def test_load_mask_round_trip(tmp_path: Path) -> None:
    mask = np.zeros((9, 7), dtype=bool)
    mask[2:5, 1:3] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    out = dd.load_mask(tmp_path / "m.png")
    assert out.dtype == bool
    np.testing.assert_array_equal(out, mask)


def test_cli_generates_and_prints_summary(tmp_path: Path) -> None:
    repo_root = Path(dd.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    args = "--seed 5 --image-size 64 --n-train 2 --n-test-good 1 --n-test-defect-per-type 1".split()
    cmd = [sys.executable, "-m", "anomalymoe.platform.data.demo.textures", "--out", str(tmp_path / "cli"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["params"]["seed"] == 5 and summary["params"]["image_size"] == 64
    assert summary["n_images"] == 3 * (2 + 1 + len(dd.DEFECT_TYPES))
    assert summary["categories"]["gravel"]["test"]["scratch"] == 1
    assert len(list((tmp_path / "cli").rglob("*.png"))) == summary["n_images"] + summary["n_masks"]
