"""`anomalymoe.platform.data.pipeline`: which rows an epoch sees (seeded, balanced), hold-out splits, decoding rows
into model input, and the Ray Data path yielding the same rows in the same order as the in-process one."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anomalymoe.models.config import BackboneConfig
from anomalymoe.platform.data.pipeline import (
    TRAIN_COLUMNS,
    epoch_indices,
    holdout_split,
    load_rows,
    local_epochs,
    prefetch,
    ray_epoch,
    ray_rows,
    step_rows,
    to_batch,
)
from anomalymoe.platform.data.transforms import Frame, decode_image, decode_rgb, to_rgb8

pytestmark = pytest.mark.unit


def _frame(sizes: dict[tuple[str, str], int]) -> pd.DataFrame:
    rows = [{"uri": f"/data/{d}/{c}/train/good/{i:03d}.png", "domain": d, "category": c, "split": "train",
             "label": 0, "defect": "good", "component_mask_uri": None}
            for (d, c), n in sizes.items() for i in range(n)]
    return pd.DataFrame(rows)


SKEWED = {("objects", "big"): 100, ("textures", "small"): 5}


# ------------------------------------------------------------------------------------------ epoch_indices
def test_epoch_indices_deterministic_per_seed_and_epoch():
    df = _frame({("a", "x"): 30, ("a", "y"): 12, ("b", "z"): 7})
    a = epoch_indices(df, 3, seed=11)
    assert np.array_equal(a, epoch_indices(df, 3, seed=11))
    assert np.array_equal(a, epoch_indices(df.copy(), 3, seed=11))  # a fresh copy (another rank) agrees
    assert len(a) == len(df) and a.min() >= 0 and a.max() < len(df)
    assert not np.array_equal(a, epoch_indices(df, 4, seed=11)), "another epoch must reshuffle"
    assert not np.array_equal(a, epoch_indices(df, 3, seed=12)), "another seed must draw differently"
    assert len(epoch_indices(df, 0, size=17)) == 17


def test_epoch_indices_empty_manifest_refused():
    with pytest.raises(ValueError, match="empty"):
        epoch_indices(_frame({}).reindex(columns=["uri", "domain", "category"]), 0)


def _per_category(df: pd.DataFrame, idx: np.ndarray) -> Counter:
    return Counter(df["category"].to_numpy()[idx])


def test_alpha_zero_draws_categories_equally():
    df = _frame(SKEWED)
    size = 20_000
    counts = _per_category(df, epoch_indices(df, 0, seed=0, alpha=0.0, size=size))
    # binomial(20000, 0.5): sd ~ 71; 4 % tolerance is > 10 sd
    assert counts["big"] + counts["small"] == size
    assert abs(counts["small"] / size - 0.5) < 0.04, counts
    # every small-category row is seen ~ size/2/5 times, i.e. heavily oversampled
    per_row = Counter(epoch_indices(df, 0, seed=0, alpha=0.0, size=size))
    small_rows = np.flatnonzero(df["category"] == "small")
    assert all(per_row[i] > 1500 for i in small_rows)


def test_alpha_one_draws_proportionally():
    df = _frame(SKEWED)
    size = 21_000
    counts = _per_category(df, epoch_indices(df, 1, seed=0, alpha=1.0, size=size))
    assert abs(counts["small"] / size - 5 / 105) < 0.01, counts
    assert abs(counts["big"] / size - 100 / 105) < 0.01, counts


def test_within_a_category_no_row_repeats_before_all_were_drawn():
    df = _frame(SKEWED)
    for alpha, size in ((0.0, 105), (0.0, 333), (1.0, 105), (0.5, 1000)):
        idx = epoch_indices(df, 2, seed=5, alpha=alpha, size=size)
        per_row = Counter(idx.tolist())
        for cat in ("big", "small"):
            rows = np.flatnonzero(df["category"] == cat)
            n = sum(per_row[i] for i in rows)
            # reshuffled cycles: every row drawn floor(n/len) or ceil(n/len) times
            got = {per_row[i] for i in rows}
            assert got <= {n // len(rows), -(-n // len(rows))}, (alpha, size, cat, got)
    # alpha=0 with size=len(df): the big category gets ~half the draws and none of its rows twice
    idx = epoch_indices(df, 0, seed=0, alpha=0.0)
    big = [i for i in idx.tolist() if df["category"].iat[i] == "big"]
    assert len(big) == len(set(big))


# ------------------------------------------------------------------------------------------ holdout_split
def test_holdout_split_per_category_seeded_disjoint_complete():
    df = _frame({("a", "x"): 10, ("a", "y"): 3, ("b", "z"): 1, ("b", "w"): 2}).sample(frac=1.0, random_state=0)
    train, held = holdout_split(df, 0.2, seed=4)
    assert set(train["uri"]).isdisjoint(held["uri"])
    assert sorted(train["uri"].tolist() + held["uri"].tolist()) == sorted(df["uri"])
    assert len(train) + len(held) == len(df)
    held_n = held.groupby("category").size().to_dict()
    assert held_n == {"x": 2, "y": 1, "w": 1}  # >= 1 where a category has >= 2 rows; none from a singleton
    again_t, again_h = holdout_split(df.sample(frac=1.0, random_state=1), 0.2, seed=4)  # row order irrelevant
    assert sorted(again_h["uri"]) == sorted(held["uri"]) and sorted(again_t["uri"]) == sorted(train["uri"])
    others = {tuple(sorted(holdout_split(df, 0.2, seed=s)[1]["uri"])) for s in range(5, 12)}
    assert len(others | {tuple(sorted(held["uri"]))}) > 1, "the seed must change the held-out rows"
    _, none_held = holdout_split(df, 0.0, seed=4)
    assert none_held.empty


def test_too_few_calibration_images_are_refused_or_warned_by_name():
    from anomalymoe.platform.data.sources import STABLE_CALIBRATION_IMAGES, check_calibration_split, describe_categories

    normal = _frame({("a", "x"): 60, ("a", "y"): 20, ("b", "z"): 5})
    train, held = holdout_split(normal, 0.2, seed=0)  # x: 12 held, y: 4, z: 1
    with pytest.raises(ValueError, match=r"b/z: 1 held-out normal image\(s\) of 5 \(--holdout 0.2\)") as e:
        check_calibration_split(normal, held, 0.2)
    assert "a/x" not in str(e.value) and "a/y" not in str(e.value)
    ok = normal[normal["category"] != "z"]
    train, held = holdout_split(ok, 0.2, seed=0)
    warnings = check_calibration_split(ok, held, 0.2)
    assert len(warnings) == 1 and warnings[0].startswith("a/y: its threshold is fitted on 4 held-out normal images")
    assert f"{STABLE_CALIBRATION_IMAGES}+" in warnings[0] and "1 in 5" in warnings[0]
    # the job's per-category line: what each metric will rest on
    test = pd.DataFrame({"uri": ["t1", "t2", "t3"], "domain": "a", "category": "x", "split": "test",
                         "label": [0, 1, 1], "mask_uri": [None, "m2", None]})
    lines = describe_categories(pd.concat([ok, test], ignore_index=True), train, held)
    assert lines[0] == ("[data] a/x: train 48 normal, calibration 12 normal, test 1 normal + 2 flagged "
                        "(1 with pixel masks)")


# ------------------------------------------------------------------------------------------ decoding
def _write_rgb(path: Path, size: int, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def test_load_rows_images_and_component_masks(tmp_path):
    s = 16
    arrs = [_write_rgb(tmp_path / f"cat/train/good/{i:03d}.png", s, i) for i in range(3)]
    lab = np.ones((s, s), dtype=np.uint8)  # cluster 0 (value 1): background
    lab[4:12, 4:8] = 2  # cluster 1
    lab[4:12, 8:12] = 4  # cluster 3; cluster 2 (value 3) appears nowhere
    lm = tmp_path / "cat/components/train/good/000.png"
    lm.parent.mkdir(parents=True)
    Image.fromarray(lab).save(lm)  # 2-D uint8: mode L
    rows = pd.DataFrame({
        "uri": [str(tmp_path / f"cat/train/good/{i:03d}.png") for i in range(3)],
        "domain": ["objects", "objects", "other"],
        "category": ["cat", "cat", "cat"],
        "component_mask_uri": [str(lm), None, str(lm)],  # row 2: its category has no kept list
    })
    images, masks = load_rows(rows, s, kept={"objects/cat": [1, 2, 3]})
    assert images.shape == (3, 3, s, s) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    for i, a in enumerate(arrs):
        assert torch.equal(images[i], torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1))
    assert masks[1] is None and masks[2] is None
    m = masks[0]
    assert m.dtype == torch.bool and m.shape == (3, s, s)  # kept 1, 2, 3: one slot each, in kept order
    assert torch.equal(m[0], torch.from_numpy(lab == 2)) and torch.equal(m[2], torch.from_numpy(lab == 4))
    assert not m[1].any()  # cluster 2 is absent from this image: an empty slot (a missing part)
    # a different model size: images resized, label map resized nearest (values stay labels, masks stay exact)
    images2, masks2 = load_rows(rows.iloc[:1], 2 * s, kept={"objects/cat": [1, 3]})
    assert images2.shape == (1, 3, 2 * s, 2 * s)
    assert torch.equal(masks2[0][0], torch.from_numpy(np.kron(lab == 2, np.ones((2, 2), bool))))
    assert torch.equal(masks2[0][1], torch.from_numpy(np.kron(lab == 4, np.ones((2, 2), bool))))
    # no kept lists at all: no masks
    assert load_rows(rows.iloc[:1], s)[1] == [None]
    # decoded in a thread pool: the same batch, in row order
    images_t, masks_t = load_rows(rows, s, kept={"objects/cat": [1, 2, 3]}, threads=3)
    assert torch.equal(images_t, images) and torch.equal(masks_t[0], m) and masks_t[1:] == [None, None]


# ------------------------------------------------------------------------------------------ Frame (resize + crop)
def _grid_image(n: int) -> np.ndarray:
    """n x n RGB whose red channel is the column and green the row: every pixel says where it came from."""
    yy, xx = np.mgrid[0:n, 0:n]
    return np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)


def test_frame_resizes_then_centre_crops_images_and_label_maps_alike(tmp_path):
    img, lab = tmp_path / "i.png", tmp_path / "l.png"
    Image.fromarray(_grid_image(64)).save(img)
    labels = np.ones((64, 64), np.uint8)  # value v = cluster v - 1
    labels[:8, :] = 2  # cluster 1: a top band, 4 px after the resize, all cut by the crop
    labels[30:34, 30:34] = 3  # cluster 2: a centre square: resize 32, crop 24 keeps it at the centre
    Image.fromarray(labels).save(lab)
    f = Frame(24, resize=32)
    x = load_rows(pd.DataFrame({"uri": [str(img)], "domain": ["d"], "category": ["c"],
                                "component_mask_uri": [str(lab)]}), f, kept={"d/c": [1, 2]})
    images, masks = x
    assert images.shape == (1, 3, 24, 24)
    # the centre crop of the 32 px resize: column 0 of the output is column 4 of the resize = source column ~8-9
    red = images[0, 0] * 255
    assert 7 <= red[12, 0] <= 10 and 53 <= red[12, -1] <= 56
    assert torch.allclose(images[0, 0], images[0, 0][0:1].expand(24, 24))  # red depends only on the column
    m = masks[0]
    assert m.shape == (2, 24, 24)
    assert not m[0].any()  # the top band lay wholly in the cropped-off border
    ys, xs = np.nonzero(m[1].numpy())
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (11, 12, 11, 12)  # the square, still at the centre
    # resize=None is a straight resize; an int means exactly that
    plain = load_rows(pd.DataFrame({"uri": [str(img)], "domain": ["d"], "category": ["c"]}), 24)[0]
    assert torch.equal(plain, load_rows(pd.DataFrame({"uri": [str(img)], "domain": ["d"], "category": ["c"]}),
                                        Frame(24))[0])
    assert not torch.equal(plain, images)


def test_frame_validation_and_scaling():
    with pytest.raises(ValueError, match="size <= resize"):
        Frame(32, resize=16)
    with pytest.raises(ValueError, match="resize"):
        BackboneConfig(img_size=224, resize=200)
    assert Frame.for_backbone(BackboneConfig(img_size=392, resize=448)) == Frame(392, 448)
    assert Frame.for_backbone(BackboneConfig(img_size=224)) == Frame(224)
    # ground truth read at half the model size keeps the same crop share (448/392)
    assert Frame(392, 448).scaled(196) == Frame(196, 224) and Frame(224).scaled(112) == Frame(112)
    assert Frame(392, 448).scaled(392) == Frame(392, 448)


@pytest.fixture
def image_frame(tmp_path) -> pd.DataFrame:
    """12 rows in two categories (8 + 4) of 20 px images (resized on load)."""
    rows = []
    for cat, n in (("a", 8), ("b", 4)):
        for i in range(n):
            p = tmp_path / cat / "train" / "good" / f"{i:03d}.png"
            _write_rgb(p, 20, 100 * ord(cat) + i)
            rows.append({"uri": str(p), "domain": "d", "category": cat, "component_mask_uri": None})
    return pd.DataFrame(rows)


def test_local_epochs_follow_epoch_indices(image_frame):
    df, size, bs = image_frame, 14, 4
    gen = local_epochs(df, size, bs, seed=3, alpha=0.0, epoch_size=10)
    for epoch in range(2):
        batches = list(next(gen))
        assert len(batches) == 10 // bs  # the incomplete last batch is dropped
        idx = epoch_indices(df, epoch, seed=3, alpha=0.0, size=10)
        want, _ = load_rows(df.iloc[idx[: len(batches) * bs]], size)
        got = torch.cat([b[0] for b in batches])
        assert got.shape == (8, 3, size, size)
        assert torch.equal(got, want)
        assert all(b[1] == [None] * bs for b in batches)


def test_local_epochs_decoded_ahead_in_threads_give_the_same_batches(image_frame):
    plain = list(next(local_epochs(image_frame, 14, 4, seed=3, epoch_size=12)))
    ahead = list(next(local_epochs(image_frame, 14, 4, seed=3, epoch_size=12, threads=2, depth=2)))
    assert len(plain) == len(ahead) == 3
    for (a, _, ka), (b, _, kb) in zip(plain, ahead, strict=True):
        assert torch.equal(a, b) and ka == kb  # the same images with the same "domain/category" keys


def test_prefetch_raises_the_producers_error_where_it_happened():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for x in prefetch(items(), depth=2):
            got.append(x)
    assert got == [1, 2]
    early = prefetch(iter(range(100)), depth=1)  # a consumer that stops early leaves no blocked producer
    assert next(early) == 0
    early.close()


# ------------------------------------------------------------------------------------------ Ray Data
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def test_ray_epoch_matches_in_process_order_and_pixels(local_ray, image_frame):
    df, size = image_frame, 14
    ds = ray_epoch(df, 1, size, seed=7, alpha=0.0, epoch_size=12)
    idx = epoch_indices(df, 1, seed=7, alpha=0.0, size=12)
    uris, imgs, order = [], [], []
    for batch in ds.iter_batches(batch_size=5, batch_format="pandas"):
        assert set(TRAIN_COLUMNS) <= set(batch.columns)
        uris += batch["uri"].tolist()
        order += batch["order"].tolist()
        imgs.append(to_batch(batch)[0])
    assert uris == df["uri"].iloc[idx].tolist()
    assert order == list(range(12))
    got = torch.cat(imgs)
    want, _ = load_rows(df.iloc[idx], size)
    assert got.shape == want.shape == (12, 3, size, size) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1 / 255 + 1e-6
    # a different epoch is a different order through Ray as well
    other = [u for b in ray_epoch(df, 2, size, seed=7, epoch_size=12).iter_batches(batch_format="pandas")
             for u in b["uri"]]
    assert other == df["uri"].iloc[epoch_indices(df, 2, seed=7, size=12)].tolist() and other != uris


def test_ray_epoch_decodes_in_parallel_blocks(local_ray, tmp_path):
    rows = []
    for i in range(40):
        p = tmp_path / f"{i:03d}.png"
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(p)
        rows.append({"uri": str(p), "domain": "d", "category": "c" if i < 30 else "e", "component_mask_uri": None})
    df = pd.DataFrame(rows)
    ds = ray_epoch(df, 0, 8, read_concurrency=2).materialize()
    uris = [u for b in ds.iter_batches(batch_format="pandas") for u in b["uri"]]
    assert uris == df["uri"].iloc[epoch_indices(df, 0)].tolist()  # order holds either way
    tasks = [line for line in ds.stats().splitlines() if "MapBatches(decode)" in line and "tasks executed" in line]
    assert ds.num_blocks() >= 2, tasks


def test_ray_rows_carry_component_masks_like_load_rows(local_ray, tmp_path):
    """Label maps are decoded in the Ray tasks through the model's crop; to_batch gives the masks load_rows gives."""
    rows = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        _write_rgb(p, 40, i)
        lab = np.ones((40, 40), np.uint8)
        lab[5 + i : 20, 10:30] = 2
        lab[25:35, 5:15 + i] = 3
        lp = tmp_path / f"{i}_lab.png"
        Image.fromarray(lab).save(lp)
        rows.append({"uri": str(p), "domain": "objects", "category": "tray",
                     "component_mask_uri": str(lp) if i != 3 else None})
    df = pd.DataFrame(rows)
    kept = {"objects/tray": [1, 2]}
    frame = Frame(28, resize=32)
    got_imgs, got_masks = [], []
    for b in ray_rows(df, frame, read_concurrency=1, block_rows=2).iter_batches(batch_size=3, batch_format="pandas"):
        i, m = to_batch(b, kept)
        got_imgs.append(i)
        got_masks += m
    want_imgs, want_masks = load_rows(df, frame, kept)
    assert torch.equal(torch.cat(got_imgs), want_imgs)
    assert got_masks[3] is None and want_masks[3] is None
    for g, w in zip(got_masks, want_masks, strict=True):
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w))


def test_step_rows_split_one_global_batch_across_ranks():
    df = _frame({("a", "x"): 30, ("a", "y"): 12, ("b", "z"): 7})
    per_epoch = len(df) // 8
    for step in (0, 3, per_epoch, 2 * per_epoch + 1):  # within the first epoch and past epoch ends
        whole = step_rows(df, step, 8, seed=5)
        assert len(whole) == 8
        halves = [step_rows(df, step, 8, seed=5, rank=r, world=2) for r in range(2)]
        assert pd.concat(halves)["uri"].tolist() == whole["uri"].tolist()
        quarters = [step_rows(df, step, 8, seed=5, rank=r, world=4) for r in range(4)]
        assert pd.concat(quarters)["uri"].tolist() == whole["uri"].tolist()
    # an epoch of steps is a permutation-based, balanced draw; the next epoch is another order
    e0 = pd.concat([step_rows(df, s, 8, seed=5) for s in range(per_epoch)])["uri"].tolist()
    e1 = pd.concat([step_rows(df, s, 8, seed=5) for s in range(per_epoch, 2 * per_epoch)])["uri"].tolist()
    assert len(e0) == per_epoch * 8 and e0 != e1
    assert step_rows(df, 2, 8, seed=6)["uri"].tolist() != step_rows(df, 2, 8, seed=5)["uri"].tolist()
    # a range of steps is those steps' rows in order, across the epoch boundary
    span = step_rows(df, per_epoch - 2, 8, seed=5, rank=1, world=2, stop=per_epoch + 2)
    assert span["uri"].tolist() == pd.concat(
        [step_rows(df, s, 8, seed=5, rank=1, world=2) for s in range(per_epoch - 2, per_epoch + 2)])["uri"].tolist()
    with pytest.raises(ValueError, match="divisible"):
        step_rows(df, 0, 8, world=3)
    tiny = _frame({("a", "x"): 3})  # fewer rows than one batch: rows repeat within the step
    assert len(step_rows(tiny, 0, 8)) == 8


# ------------------------------------------------------------------------------------------ pixels as they are
def _png_bytes(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, **kw).save(buf, "PNG")
    return buf.getvalue()


def test_16_bit_grey_scores_like_its_8_bit_twin():
    from anomalymoe.models.config import presets
    from anomalymoe.models.model import AnomalyMoE

    rng = np.random.default_rng(0)
    grey8 = (rng.random((96, 160)) * 255).astype(np.uint8)
    grey16 = grey8.astype(np.uint16) * 257  # the same picture at 16 bits (255 -> 65535)
    png16 = _png_bytes(grey16)
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")  # Pillow reads it as 16-bit integers
    a8, a16 = decode_rgb(_png_bytes(grey8), 64), decode_rgb(png16, 64)
    assert np.array_equal(a8, a16)  # not clipped to white: the same pixels as the 8-bit file
    assert abs(float(a16.mean()) - float(a8.mean())) < 1e-9 and float(a16.mean()) < 200
    torch.manual_seed(0)
    model = AnomalyMoE(presets()["test-tiny"]).eval()
    size = model.cfg.backbone.img_size
    imgs = torch.stack([decode_image(_png_bytes(grey8), size), decode_image(png16, size)])
    s = model.predict(imgs).score
    assert abs(float(s[0] - s[1])) <= 1e-3
    # a 12-bit sensor's range in a 16-bit container is scaled by the container's range, as stored (no stretching)
    dark = decode_rgb(_png_bytes((grey16 >> 4).astype(np.uint16)), 64)
    assert int(dark.max()) <= 16


def test_exif_orientation_is_applied():
    rng = np.random.default_rng(1)
    upright = (rng.random((40, 80, 3)) * 255).astype(np.uint8)  # wide
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a camera stores it: tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.size == (40, 80)  # tall as stored
        view = to_rgb8(im)
    assert view.size == (80, 40) and np.array_equal(np.asarray(view), upright)


def test_configured_intensity_range_and_the_images_own_range():
    """A 12-bit sensor (values 1000..5000 in a 16-bit container): by its container's range it is nearly black; with
    its span configured (InputConfig.intensity) or by its own min..max it fills 0..255, as its 8-bit rendering
    does; values outside a configured span clip."""
    rng = np.random.default_rng(2)
    raw = rng.integers(1000, 5001, (48, 64)).astype(np.uint16)
    raw[0, 0], raw[0, 1] = 1000, 5000  # the span is reached
    want = np.clip(np.rint((raw.astype(np.float64) - 1000) * 255 / 4000), 0, 255).astype(np.uint8)
    data = _png_bytes(raw)
    by_type = decode_rgb(data, Frame(64))
    spanned = decode_rgb(data, Frame(64, intensity=(1000.0, 5000.0)))
    own = decode_rgb(data, Frame(64, intensity="image"))
    assert by_type.max() <= 20
    assert np.array_equal(spanned, own)
    assert np.array_equal(spanned, decode_rgb(_png_bytes(want), Frame(64)))
    narrow = decode_rgb(data, Frame(64, intensity=(2000.0, 3000.0)))
    assert narrow.min() == 0 and narrow.max() == 255  # outside the span: clipped, never wrapped
    # an 8-bit grey image keeps its values unless a span is configured
    grey = (rng.random((32, 32)) * 100).astype(np.uint8)
    assert np.array_equal(decode_rgb(_png_bytes(grey), 32)[..., 0], grey)
    assert decode_rgb(_png_bytes(grey), Frame(32, intensity="image")).max() == 255


def test_letterbox_keeps_a_wide_image_whole_and_in_shape():
    """A 4:1 image letterboxed into the square input: the whole image, unstretched, centred between black bands;
    its mask goes through the same box; restore() gives a map back at 4:1, the border dropped. squash stretches it."""
    wide = np.zeros((50, 200, 3), np.uint8)
    wide[:, :100] = (255, 0, 0)  # left half red, right half green
    wide[:, 100:] = (0, 255, 0)
    f = Frame(56, aspect="letterbox")
    assert f.content_box(200, 50) == (0, 21, 56, 35)  # 56 x 14: 4:1
    a = decode_rgb(_png_bytes(wide), f)
    assert a.shape == (56, 56, 3)
    assert not a[:21].any() and not a[35:].any()  # black bands
    assert (a[21:35, :27, 0] > 200).all() and (a[21:35, 29:, 1] > 200).all()  # the picture, unstretched
    squashed = decode_rgb(_png_bytes(wide), 56)
    assert (squashed[:, :27, 0] > 200).all()  # stretched over the whole height
    tall = Frame(56, aspect="letterbox").content_box(50, 200)
    assert tall == (21, 0, 35, 56)
    assert Frame(56, aspect="letterbox").content_box(80, 80) == (0, 0, 56, 56)
    # the resize + centre crop is a squash setting: letterbox keeps the whole image
    assert decode_rgb(_png_bytes(wide), Frame(56, 64, aspect="letterbox")).shape == (56, 56, 3)
    mask = np.zeros((50, 200), np.uint8)
    mask[:, 150:] = 255
    from anomalymoe.platform.data.transforms import decode_label_map

    m = decode_label_map(_png_bytes(mask), f)
    assert m[21:35, 43:].all() and not m[:, :40].any() and not m[:21].any()
    # a square label map stored by jobs/segment.py is first put back at the image's shape, then letterboxed
    square = np.asarray(Image.fromarray(mask).resize((32, 32), Image.NEAREST))
    assert np.array_equal(decode_label_map(_png_bytes(square), f, (200, 50)) > 0, m > 0)
    # back in the original geometry: 4:1, the right quarter hot
    heat = np.zeros((112, 112), np.uint8)
    heat[42:70, 84:] = 255
    back = np.asarray(f.restore(Image.fromarray(heat), 200, 50))
    assert back.shape == (50, 200) and back[:, 160:].min() > 200 and back[:, :140].max() == 0
    assert f.restore(Image.fromarray(heat), 4000, 1000).size == (1024, 256)  # capped at 1024 px, still 4:1
    # squash + crop: the cropped-off border comes back black around the scored centre
    crop = Frame(28, resize=32)
    ones = np.asarray(crop.restore(Image.fromarray(np.full((28, 28), 255, np.uint8)), 64, 64))
    assert ones.shape == (64, 64) and ones[32, 32] == 255 and ones[0, 0] < 64


def test_framing_picks_each_categorys_frame_in_every_loader(tmp_path):
    """InputConfig per category: load_rows and the Ray Data path frame each row by its category, and report each
    image's own size."""
    from anomalymoe.models.config import CategoryInput, InputConfig, ModelConfig
    from anomalymoe.platform.data.transforms import Framing

    cfg = ModelConfig(backbone=BackboneConfig(img_size=56, resize=64),
                      input=InputConfig(categories={"d/wide": CategoryInput(aspect="letterbox")}))
    framing = Framing.for_model(cfg)
    assert framing.for_key("d/wide") == Frame(56, 64, aspect="letterbox")
    assert framing.for_key("d/other") == framing.for_key(None) == Frame(56, 64)
    small = framing.scaled(28).for_key("d/wide")
    assert small.size == 28 and small.aspect == "letterbox"
    wide = (np.random.default_rng(3).random((30, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(wide).save(tmp_path / "w.png")
    rows = pd.DataFrame({"uri": [str(tmp_path / "w.png")] * 2, "domain": ["d", "d"], "category": ["wide", "other"],
                         "component_mask_uri": [None, None]})
    sizes: list = []
    images, _ = load_rows(rows, framing, sizes=sizes)
    assert sizes == [(120, 30), (120, 30)]
    assert float(images[0, :, :20].max()) == 0.0 and float(images[1, :, :20].max()) > 0  # letterboxed vs squashed
    assert torch.equal(images[0], decode_image((tmp_path / "w.png").read_bytes(), framing.for_key("d/wide")))
    pytest.importorskip("ray")
    batches = list(ray_rows(rows, framing, read_concurrency=1).iter_batches(batch_format="pandas"))
    got, _ = to_batch(pd.concat(batches))
    assert torch.equal(got, images)
    assert pd.concat(batches)["width"].tolist() == [120, 120]


def test_large_jpegs_decode_at_a_reduced_scale_with_their_own_size():
    """Draft mode: a JPEG far larger than the frame decodes at 1/2..1/8 scale in the DCT, within a few grey levels of
    the full decode; the size reported (letterbox box, the service's map) is the image's own, EXIF turn included."""
    rng = np.random.default_rng(4)
    small = (rng.random((100, 300, 3)) * 255).astype(np.uint8)
    big = Image.fromarray(small).resize((2400, 800), Image.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    from anomalymoe.platform.data.transforms import decode_sized

    f = Frame(56, aspect="letterbox")
    got, size = decode_sized(data, f)
    assert size == (2400, 800)
    with Image.open(io.BytesIO(data)) as im:
        full = np.asarray(f.apply(im.convert("RGB"), Image.BILINEAR), dtype=float)
    assert np.abs(got.astype(float) - full).mean() < 2.0 and np.abs(got.astype(float) - full).max() <= 16
    x0, y0, x1, y1 = f.content_box(2400, 800)
    assert not got[: y0].any() and got[y0:y1].any()  # the box of the original's shape
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, viewed tall
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92, exif=exif)
    assert decode_sized(buf.getvalue(), f)[1] == (800, 2400)
