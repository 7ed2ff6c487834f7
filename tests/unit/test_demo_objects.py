"""Tests for the built-in synthetic ``objects`` dataset: multi-part objects, component and logical anomalies,
exact anomaly masks, exact part masks, determinism and the MVTec AD layout."""

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
from scipy import ndimage

from anomalymoe.platform.data.demo import objects as do
from anomalymoe.platform.data.demo import textures as dd

pytestmark = pytest.mark.unit

# Small parameters keep every generation around a second.
SMALL = {"image_size": 96, "n_train": 3, "n_test_good": 2, "n_test_defect_per_type": 2}

# The arrangement rules, written out independently of the generator: part-type id -> (colour, count).
RULES: dict[str, dict[int, tuple[str, int]]] = {
    "tray": {1: ("red", 2), 2: ("blue", 1), 3: ("yellow", 3)},
    "breakfast": {1: ("green", 1), 2: ("orange", 2), 3: ("purple", 1)},
}
# Approximate surface colours of the tray / box and of the table, for nearest-colour checks.
SURFACES = {"tray": (200, 198, 190), "breakfast": (222, 214, 196), "table": (48, 54, 62)}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".png", ".npz")
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _counts(sample_types: dict[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for kind in sample_types.values():
        out[kind] = out.get(kind, 0) + 1
    return out


def _centroids(instances: np.ndarray) -> dict[int, np.ndarray]:
    return {
        int(i): np.argwhere(instances == i).mean(axis=0) for i in np.unique(instances) if i
    }


def _chroma(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64) + 1.0
    return rgb / rgb.sum(axis=-1, keepdims=True)


def _nearest(pixels: np.ndarray, category: str) -> np.ndarray:
    """Nearest reference chromaticity per pixel (brightness-free, so shaded rims count): 1..3 = the category's
    part types, 0 = tray or table."""
    refs = [SURFACES[category], SURFACES["table"]] + [do.COLOURS[c] for c, _ in RULES[category].values()]
    d = np.abs(_chroma(pixels)[:, None, :] - _chroma(np.asarray(refs))[None, :, :]).sum(axis=2)
    return np.maximum(np.argmin(d, axis=1) - 1, 0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("objects")
    return root, do.generate_objects(root, seed=0, **SMALL)


def test_defect_groups_constant_and_part_types() -> None:
    assert do.DEFECT_GROUPS == {
        "wrong_shape": "component",
        "wrong_color": "component",
        "missing": "logical",
        "extra": "logical",
        "swapped": "logical",
        "misplaced": "logical",
    }
    assert do.DEFECT_TYPES == tuple(do.DEFECT_GROUPS)
    assert len(do.CATEGORIES) >= 2 and set(do.PART_TYPES) == set(do.CATEGORIES)
    for cat in do.CATEGORIES:
        assert sorted(do.PART_TYPES[cat]) == sorted(RULES[cat])
    assert do.MARKER_NAME != dd.MARKER_NAME
    assert do.iter_samples is dd.iter_samples  # reused, not copied


def test_layout_counts_and_metadata_match_summary(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    assert summary["regenerated"] is True and summary["domain"] == "objects"
    assert set(summary["categories"]) == set(do.CATEGORIES)
    size = SMALL["image_size"]
    n_images = n_masks = n_parts = 0
    for cat, counts in summary["categories"].items():
        base = root / cat
        assert sorted(p.name for p in base.iterdir()) == [
            "defect_groups.json", "ground_truth", "part_types.json", "parts", "test", "train"
        ]
        assert json.loads((base / "defect_groups.json").read_text()) == do.DEFECT_GROUPS
        assert json.loads((base / "part_types.json").read_text()) == {str(k): v for k, v in do.PART_TYPES[cat].items()}
        assert counts["part_types"] == {str(k): v for k, v in do.PART_TYPES[cat].items()}
        assert sorted(p.name for p in (base / "train").iterdir()) == ["good"]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(["good", *do.DEFECT_TYPES])
        assert sorted(p.name for p in (base / "ground_truth").iterdir()) == sorted(do.DEFECT_TYPES)
        assert sorted(p.name for p in (base / "parts").iterdir()) == ["test", "train"]
        for split, kinds in (("train", ["good"]), ("test", ["good", *do.DEFECT_TYPES])):
            for kind in kinds:
                imgs = sorted((base / split / kind).glob("*.png"))
                assert len(imgs) == counts[split][kind] == counts["parts"][split][kind]
                for img in imgs:
                    with Image.open(img) as im:
                        assert im.mode == "RGB" and im.size == (size, size)
                    n_images += 1
                parts = sorted((base / "parts" / split / kind).iterdir())
                assert [p.name for p in parts] == [f"{p.stem}.npz" for p in imgs]
                for p in parts:
                    labels, instances = do.load_parts(p)
                    assert labels.dtype == np.uint8 and instances.dtype == np.uint16
                    assert labels.shape == instances.shape == (size, size)
                    np.testing.assert_array_equal(labels > 0, instances > 0)
                    n_parts += 1
                if kind == "good":
                    continue
                masks = sorted((base / "ground_truth" / kind).glob("*"))
                assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in imgs]
                assert len(masks) == counts["ground_truth"][kind] == SMALL["n_test_defect_per_type"]
                for m in masks:
                    with Image.open(m) as im:
                        assert im.mode == "L" and im.size == (size, size)
                        assert set(np.unique(np.asarray(im)).tolist()) == {0, 255}
                    n_masks += 1
    assert not list(root.glob("*/ground_truth/good"))
    n_per_cat = 3 + 2 + 2 * len(do.DEFECT_TYPES)
    assert n_images == summary["n_images"] == len(do.CATEGORIES) * n_per_cat
    assert n_parts == summary["n_part_files"] == n_images
    assert n_masks == summary["n_masks"] == len(list(root.rglob("*_mask.png")))
    # The textures reader sees a plain MVTec tree.
    test = list(do.iter_samples(root, "tray", "test"))
    assert len(test) == 2 + 2 * len(do.DEFECT_TYPES)
    assert all((mask is None) == (kind == "good") for _, _, kind, mask in test)


def test_files_on_disk_match_rendered_samples(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for cat in do.CATEGORIES:
        for split in ("train", "test"):
            for img, _label, kind, mask in do.iter_samples(root, cat, split):
                s = do.render_sample(cat, split, kind, int(img.stem), image_size=SMALL["image_size"], seed=0)
                np.testing.assert_array_equal(np.asarray(Image.open(img)), s.image)
                labels, instances = do.load_parts(root / cat / "parts" / split / kind / f"{img.stem}.npz")
                np.testing.assert_array_equal(labels, s.labels)
                np.testing.assert_array_equal(instances, s.instances)
                if mask is not None:
                    np.testing.assert_array_equal(do.load_mask(mask), s.mask)


@pytest.mark.parametrize("category", do.CATEGORIES)
@pytest.mark.parametrize("defect", do.DEFECT_TYPES)
def test_mask_is_exactly_the_changed_parts(category: str, defect: str) -> None:
    for index in range(3):
        for size in (64, 160):
            s = do.render_sample(category, "test", defect, index, image_size=size, seed=3)
            assert s.image.shape == s.clean.shape == (size, size, 3) and s.image.dtype == np.uint8
            assert s.mask.shape == (size, size) and s.mask.dtype == bool and s.mask.any()
            changed = (s.image != s.clean).any(axis=2)
            np.testing.assert_array_equal(changed, s.mask)  # outside identical, inside all changed
            diff = np.abs(s.image.astype(int) - s.clean.astype(int)).max(axis=2)
            # A part redrawn in place with the same colour differs only by surface grain where the shapes
            # overlap; everywhere else a part became tray or another colour.
            strong = s.mask & ~((s.labels == s.clean_labels) & (s.labels > 0)) if defect == "wrong_shape" else s.mask
            assert diff[strong].mean() >= 40, f"{category}/{defect}/{index}: barely differs ({diff[strong].mean():.1f})"
            # Part ground truth only changes inside the mask ...
            outside = ~s.mask
            np.testing.assert_array_equal(s.labels[outside], s.clean_labels[outside])
            np.testing.assert_array_equal(s.instances[outside], s.clean_instances[outside])
            # ... and the mask is exactly the old and new footprints of the parts the defect touched.
            before, after = s.clean_instances, s.instances
            touched = [
                i for i in np.union1d(np.unique(before), np.unique(after)).tolist()
                if i and not np.array_equal(before == i, after == i)
            ]
            if defect == "wrong_color":
                touched = [int(i) for i in np.unique(before[s.mask]) if i]
            union = np.isin(before, touched) | np.isin(after, touched)
            np.testing.assert_array_equal(union, s.mask)
            expected = {"wrong_shape": 1, "wrong_color": 1, "missing": 1, "extra": 1, "swapped": 2, "misplaced": 1}
            assert len(touched) == expected[defect], (defect, touched)
            if defect == "missing":
                # The tray shows through where the part was.
                assert not s.labels[s.mask].any()
                assert (_nearest(s.image[s.mask], category) == 0).mean() > 0.99


def test_good_samples_are_untouched_and_train_differs_from_test() -> None:
    g = do.render_sample("tray", "test", "good", 0, image_size=64)
    assert g.image is g.clean and not g.mask.any() and g.labels is g.clean_labels
    t = do.render_sample("tray", "train", "good", 0, image_size=64)
    assert not np.array_equal(g.image, t.image)
    with pytest.raises(ValueError):
        do.render_sample("tray", "train", "missing", 0)
    with pytest.raises(ValueError):
        do.render_sample("tray", "val", "good", 0)
    with pytest.raises(ValueError):
        do.render_sample("tray", "test", "scratch", 0)


@pytest.mark.parametrize("category", do.CATEGORIES)
def test_part_masks_match_the_image_and_ids_are_stable(category: str) -> None:
    rules = RULES[category]
    for split, index in [("train", i) for i in range(6)] + [("test", i) for i in range(3)]:
        s = do.render_sample(category, split, "good", index, seed=1)
        types = s.part_types()
        # The arrangement rule: the same type ids with the same counts in every normal image.
        assert _counts(types) == {k: n for k, (_, n) in rules.items()}
        masks = s.part_masks()
        assert sorted(masks) == sorted(types)
        for iid, m in masks.items():
            kind = types[iid]
            assert (s.labels[m] == kind).all()
            # At least ~25 px across at 256 px (ViT-S/14 at 224 px: two tokens or more).
            rows, cols = np.nonzero(m)
            assert min(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= 24
            # Inside: the part's colour; the one-pixel ring just outside: not the part's colour.
            inside = _nearest(s.image[m], category)
            assert (inside == kind).mean() >= 0.99, (split, index, iid, np.bincount(inside))
            ring = ndimage.binary_dilation(m) & ~m
            assert not (_nearest(s.image[ring], category) == kind).any()
        # Background pixels are never a part's colour.
        assert (_nearest(s.image[s.labels == 0], category) == 0).all()


@pytest.mark.parametrize("category", do.CATEGORIES)
def test_logical_anomalies_break_the_arrangement_rule(category: str) -> None:
    normal = {k: n for k, (_, n) in RULES[category].items()}
    for index in range(6):
        miss = do.render_sample(category, "test", "missing", index)
        c = _counts(miss.part_types())
        assert sum(normal.values()) - sum(c.values()) == 1
        assert sum(normal[k] - c.get(k, 0) for k in normal) == 1 and all(c.get(k, 0) <= normal[k] for k in normal)

        extra = do.render_sample(category, "test", "extra", index)
        c = _counts(extra.part_types())
        assert sum(c[k] - normal[k] for k in normal) == 1 and all(c[k] >= normal[k] for k in normal)
        old, now = _centroids(extra.clean_instances), _centroids(extra.instances)
        (new,) = set(now) - set(old)
        assert all(np.abs(now[i] - old[i]).max() <= 1e-9 for i in old)
        assert min(np.abs(now[new] - old[i]).max() for i in old) >= 30  # on a place empty in normal images

        for defect in ("swapped", "misplaced"):
            s = do.render_sample(category, "test", defect, index)
            assert _counts(s.part_types()) == normal  # counts hold; only positions break the rule
            old, now = _centroids(s.clean_instances), _centroids(s.instances)
            assert sorted(old) == sorted(now)
            moved = [i for i in old if np.abs(old[i] - now[i]).max() > 10]
            still = [i for i in old if np.abs(old[i] - now[i]).max() <= 1e-9]
            assert len(moved) + len(still) == len(old)
            if defect == "swapped":
                a, b = moved
                types = s.part_types()
                assert types[a] != types[b]
                assert np.abs(now[a] - old[b]).max() <= 2.0 and np.abs(now[b] - old[a]).max() <= 2.0
            else:
                (m,) = moved
                assert np.abs(now[m] - old[m]).max() >= 40
                # Moved onto a place that is empty in the normal arrangement.
                assert min(np.abs(now[m] - old[i]).max() for i in old if i != m) >= 30


@pytest.mark.parametrize("category", do.CATEGORIES)
def test_component_anomalies_change_one_part_in_place(category: str) -> None:
    for index in range(6):
        s = do.render_sample(category, "test", "wrong_color", index)
        np.testing.assert_array_equal(s.instances, s.clean_instances)
        np.testing.assert_array_equal(s.labels, s.clean_labels)  # the part keeps its type id
        (iid,) = [int(i) for i in np.unique(s.instances[s.mask]) if i]
        kind = s.part_types()[iid]
        m = s.instances == iid
        assert (_nearest(s.clean[m], category) == kind).mean() >= 0.99
        right, wrong = np.median(s.clean[m], axis=0), np.median(s.image[m], axis=0)
        # Not the colour of any part type of the category, under this image's lighting.
        nominal = np.asarray(do.COLOURS[RULES[category][kind][0]], dtype=np.float64)
        gain = right[nominal > 100].sum() / nominal[nominal > 100].sum()
        for colour, _ in RULES[category].values():
            assert np.abs(wrong - gain * np.asarray(do.COLOURS[colour])).max() >= 40, (index, wrong, colour)

        s = do.render_sample(category, "test", "wrong_shape", index)
        assert s.part_types() == _instance_types(s.clean_labels, s.clean_instances)
        (iid,) = [int(i) for i in np.unique(s.instances[s.mask]) if i]
        old, new = s.clean_instances == iid, s.instances == iid
        iou = (old & new).sum() / (old | new).sum()
        assert iou < 0.8, f"shape barely changed (IoU {iou:.2f})"
        assert np.abs(np.argwhere(old).mean(0) - np.argwhere(new).mean(0)).max() <= 3.0  # same place
        kind = s.part_types()[iid]
        assert (_nearest(s.image[new], category) == kind).mean() >= 0.99  # same colour


def _instance_types(labels: np.ndarray, instances: np.ndarray) -> dict[int, int]:
    return {int(i): int(labels[instances == i][0]) for i in np.unique(instances) if i}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    small = {**SMALL, "image_size": 64}
    do.generate_objects(a, seed=7, **small)
    do.generate_objects(b, seed=7, **small)
    do.generate_objects(c, seed=8, **small)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert ha == hb and any(k.endswith(".npz") for k in ha)
    assert (a / do.MARKER_NAME).read_bytes().replace(b"/a", b"") == (b / do.MARKER_NAME).read_bytes().replace(
        b"/b", b""
    )
    assert ha.keys() == hc.keys()
    images = [k for k in ha if k.endswith(".png") and not k.endswith("_mask.png")]
    assert all(ha[k] != hc[k] for k in images)
    assert len({ha[k] for k in images}) == len(images)  # samples vary within one dataset too


def test_golden_pixels_pin_cross_machine_determinism() -> None:
    """Pins the rendered pixels: if this fails without an intended generator change, determinism broke.

    After an intended change, bump ``_GENERATOR_VERSION`` and update the digest.
    """
    h = hashlib.sha256()
    for cat, defect, index in (("tray", "swapped", 0), ("breakfast", "wrong_shape", 1), ("tray", "extra", 2)):
        s = do.render_sample(cat, "test", defect, index, image_size=96, seed=0)
        for arr in (s.image, s.mask, s.labels, s.instances):
            h.update(arr.tobytes())
    assert h.hexdigest() == GOLDEN


GOLDEN = "2b18b118e510a66e7f2f96f1b87f17b8fd54ecc94da23ab360a2d681748fd0cb"


def test_second_call_is_a_noop_and_new_params_regenerate(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    small = {**SMALL, "image_size": 64}
    do.generate_objects(root, seed=0, **small)
    (root / "my_notes.txt").write_text("keep me")
    (root / "pcb" / "train" / "good").mkdir(parents=True)
    (root / "pcb" / "train" / "good" / "000.png").write_bytes(b"not ours")
    before = _mtimes(root)
    again = do.generate_objects(root, seed=0, **small)
    assert again["regenerated"] is False
    assert _mtimes(root) == before

    changed = do.generate_objects(root, seed=0, **{**small, "image_size": 72})
    assert changed["regenerated"] is True
    with Image.open(root / "breakfast" / "test" / "swapped" / "000.png") as im:
        assert im.size == (72, 72)
    assert do.load_parts(root / "breakfast" / "parts" / "test" / "swapped" / "000.npz")[0].shape == (72, 72)
    assert json.loads((root / do.MARKER_NAME).read_text())["params"]["image_size"] == 72
    assert (root / "my_notes.txt").read_text() == "keep me"
    assert (root / "pcb" / "train" / "good" / "000.png").read_bytes() == b"not ours"

    # Fewer images than before: stale files of owned categories are removed, not left behind.
    do.generate_objects(root, seed=0, **{**small, "n_train": 1, "categories": ("tray",)})
    assert [p.name for p in (root / "tray" / "train" / "good").iterdir()] == ["000.png"]
    assert [p.name for p in (root / "tray" / "parts" / "train" / "good").iterdir()] == ["000.npz"]
    assert not (root / "breakfast").exists()


def test_interrupted_run_is_redone(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    small = {**SMALL, "image_size": 64}
    do.generate_objects(root, seed=0, **small)
    (root / do.MARKER_NAME).unlink()  # as if killed before the marker was written
    (root / "tray" / "parts" / "train" / "good" / "001.npz").unlink()
    (root / do._PARTIAL_NAME).write_text(json.dumps({"params": {"categories": list(do.CATEGORIES)}}))
    out = do.generate_objects(root, seed=0, **small)
    assert out["regenerated"] is True
    assert (root / "tray" / "parts" / "train" / "good" / "001.npz").is_file()
    assert (root / do.MARKER_NAME).is_file() and not (root / do._PARTIAL_NAME).exists()


def test_refuses_to_delete_category_folders_it_does_not_own(tmp_path: Path) -> None:
    precious = tmp_path / "tray" / "train" / "good" / "000.png"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"real data")
    with pytest.raises(FileExistsError):
        do.generate_objects(tmp_path, **SMALL)
    assert precious.read_bytes() == b"real data"
    assert not (tmp_path / do.MARKER_NAME).exists()


def test_lives_beside_the_textures_domain(tmp_path: Path) -> None:
    """Both generators own only what their own marker lists, so neither touches the other's data."""
    tiny = {"image_size": 64, "n_train": 1, "n_test_good": 1, "n_test_defect_per_type": 1}
    dd.generate_textures(tmp_path, categories=("brick",), **tiny)
    textures = _mtimes(tmp_path)
    do.generate_objects(tmp_path, **tiny)
    do.generate_objects(tmp_path, **{**tiny, "seed": 1})  # a regeneration, too
    assert {k: v for k, v in _mtimes(tmp_path).items() if k in textures} == textures
    assert dd.generate_textures(tmp_path, categories=("brick",), **tiny)["regenerated"] is False


@pytest.mark.parametrize(
    "kwargs",
    [{"categories": ("brick",)}, {"image_size": 32}, {"seed": -1}, {"n_train": -1}, {"categories": ()},
     {"categories": ("tray", "tray")}],
)
def test_rejects_bad_parameters(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        do.generate_objects(tmp_path, **{**SMALL, **kwargs})
    assert not list(tmp_path.iterdir())


def test_cli_generates_and_prints_summary(tmp_path: Path) -> None:
    repo_root = Path(do.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    args = "--seed 5 --image-size 64 --n-train 2 --n-test-good 1 --n-test-defect-per-type 1".split()
    cmd = [sys.executable, "-m", "anomalymoe.platform.data.demo.objects", "--out", str(tmp_path / "cli"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["params"]["seed"] == 5 and summary["params"]["image_size"] == 64
    assert summary["n_images"] == len(do.CATEGORIES) * (2 + 1 + len(do.DEFECT_TYPES))
    assert summary["categories"]["tray"]["test"]["misplaced"] == 1
    out = tmp_path / "cli"
    assert len(list(out.rglob("*.png"))) == summary["n_images"] + summary["n_masks"]
    assert len(list(out.rglob("*.npz"))) == summary["n_part_files"] == summary["n_images"]
    assert (out / do.MARKER_NAME).is_file() and not (out / dd.MARKER_NAME).exists()
