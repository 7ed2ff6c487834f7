"""`anomalymoe.platform.data.segmentation`: the pieces (features, k-means, assignment, guided filter, background vote,
masks) and the per-category batch job (files beside the data, idempotent, resumable) on the tiny random ViT."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomalymoe.models import parts
from anomalymoe.models.backbone import Backbone
from anomalymoe.platform.data import segmentation as seg
from anomalymoe.platform.data.demo.objects import generate_objects
from anomalymoe.platform.data.segmentation import (
    ClusterStats,
    SegmentParams,
    assign,
    best_match_iou,
    category_dir,
    component_masks,
    coreset_patches,
    fit_centers,
    guided_filter,
    label_map_uri,
    load_kept,
    patch_features,
    segment_category,
    segment_manifest,
)
from anomalymoe.platform.data.sources import resolve_data, storage

pytestmark = pytest.mark.unit

PARAMS = SegmentParams(k=3, per_image=16, out_size=32)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    from anomalymoe.models.config import presets

    return Backbone(presets()["test-tiny"].backbone)


def _objects(root: Path, categories=("tray",)) -> pd.DataFrame:
    generate_objects(root / "objects", n_train=4, n_test_good=1, n_test_defect_per_type=1, image_size=64,
                     categories=categories)
    df, kept = resolve_data(f"objects={root / 'objects'}")
    assert kept == {}  # nothing segmented yet
    return df


# ------------------------------------------------------------------------------------------ URIs
@pytest.mark.parametrize("root", ["/data/sets/objects", "s3://bucket/some/prefix/objects"])
def test_label_map_uri_and_category_dir(root):
    img = f"{root}/tray/test/wrong_shape/007.jpg"
    assert label_map_uri(img) == f"{root}/tray/components/test/wrong_shape/007.png"
    assert label_map_uri(f"{root}/tray/train/good/a.b.png") == f"{root}/tray/components/train/good/a.b.png"
    assert category_dir(img) == f"{root}/tray"


# ------------------------------------------------------------------------------------------ pieces
def test_patch_features_and_coreset(backbone):
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))  # resized to 56 inside
    feats = patch_features(backbone, images)
    assert feats.shape == (2, backbone.embed_dim, 4, 4)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    with_colour = patch_features(backbone, images, color_weight=2.0)
    assert with_colour.shape == (2, backbone.embed_dim + 3, 4, 4)
    assert torch.allclose(with_colour.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    a = coreset_patches(feats[:1], 5, np.random.default_rng(1))
    assert a.shape == (5, backbone.embed_dim)
    assert np.array_equal(a, coreset_patches(feats[:1], 5, np.random.default_rng(1)))
    assert coreset_patches(feats[:1], 100, np.random.default_rng(1)).shape == (16, backbone.embed_dim)  # capped
    # greedy k-centre: no sample is picked twice, and they are spread (min pairwise distance > 0)
    assert len({tuple(r) for r in a}) == 5


def test_fit_centers_unit_norm_and_seeded():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.05, (30, 4)) for c in np.eye(4)[:3] * 3])
    c = fit_centers(blobs, 3, seed=0)
    assert c.shape == (3, 4) and c.dtype == np.float32
    assert np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    assert np.array_equal(c, fit_centers(blobs, 3, seed=0))
    assert sorted(np.argmax(c, axis=1).tolist()) == [0, 1, 2]  # one centre per blob


def test_guided_filter_keeps_the_guides_edge():
    s, r = 32, 3
    step = torch.zeros(1, 1, s, s)
    step[..., s // 2 :] = 1.0
    box = parts._box(step, r)
    guided = guided_filter(step, step, r=r, eps=1e-3)
    assert guided.shape == step.shape
    edge = slice(s // 2 - r, s // 2 + r)
    box_err = (box - step)[..., edge].abs().max().item()
    gf_err = (guided - step)[..., edge].abs().max().item()
    assert box_err > 0.3 and gf_err < 0.05, (box_err, gf_err)
    # a noisy soft map: noise in flat regions is smoothed, the edge stays where the guide has it
    noisy = step + 0.1 * torch.randn(step.shape, generator=torch.Generator().manual_seed(0))
    out = guided_filter(step, noisy, r=r, eps=1e-3)
    flat = (..., slice(None), slice(0, s // 2 - r - 1))
    assert out[flat].std() < 0.6 * noisy[flat].std()
    assert torch.equal(out[0, 0] > 0.5, step[0, 0] > 0.5)
    assert (out - step)[..., edge].abs().max() < 0.5 * (parts._box(noisy, r) - step)[..., edge].abs().max()


def test_assign_labels_in_range_and_follow_the_features():
    c = torch.eye(4)[:3]  # 3 centres in a 4-d feature space
    feats = torch.zeros(2, 4, 4, 4)
    feats[:, 0, :, :2] = 1  # left half: cluster 0
    feats[:, 1, :2, 2:] = 1  # top right: cluster 1
    feats[:, 2, 2:, 2:] = 1  # bottom right: cluster 2
    want = torch.ones(16, 16, dtype=torch.uint8)
    want[:8, 8:] = 2
    want[8:, 8:] = 3
    images = want[None, None].float().expand(2, 3, 16, 16) / 3  # image edges where the parts meet
    for refine in (False, True):
        lab = assign(feats, c, images, 16, refine=refine)
        assert lab.shape == (2, 16, 16) and lab.dtype == torch.uint8
        assert torch.equal(lab[0], want) and torch.equal(lab[1], want), refine
    rnd = F.normalize(torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    cen = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    lab = assign(rnd, cen, torch.rand(3, 3, 40, 40), 40)
    assert lab.shape == (3, 40, 40) and int(lab.min()) >= 1 and int(lab.max()) <= 5


def test_cluster_stats_votes_border_cluster_as_background():
    s = 32
    lab = np.ones((4, s, s), dtype=np.uint8)  # value 1 (cluster 0): everywhere, corners included
    lab[:, 10:22, 10:22] = 2  # cluster 1: a central part
    lab[:, 16, 16] = 3  # cluster 2: one pixel, negligible; cluster 3 (value 4) never appears
    st = ClusterStats(4)
    st.update(lab)
    assert st.images == 4
    assert st.border_votes.tolist() == [4, 0, 0, 0]
    assert st.kept() == [1]
    halves = ClusterStats(4)
    halves.update(lab[:2])
    other = ClusterStats(4)
    other.update(lab[2:])
    halves.merge(other)
    assert halves.images == 4 and np.array_equal(halves.border_votes, st.border_votes)
    assert np.allclose(halves.area, st.area) and halves.kept() == [1]
    assert ClusterStats(3).kept() == [0, 1, 2]  # nothing seen: keep all
    everywhere = ClusterStats(2)
    everywhere.update(np.ones((2, s, s), dtype=np.uint8))
    assert everywhere.kept() == [1] or everywhere.kept() == [0]  # never an empty list
    assert len(everywhere.kept()) == 1


def test_component_masks_and_best_match_iou():
    lab = np.array([[1, 1, 3], [1, 3, 3], [1, 1, 1]], dtype=np.uint8)
    m = component_masks(lab, [0, 1, 2])
    assert m.shape == (3, 3, 3) and m.dtype == torch.bool  # slot i is always kept cluster i
    assert torch.equal(m[0], torch.from_numpy(lab == 1)) and torch.equal(m[2], torch.from_numpy(lab == 3))
    assert not m[1].any()  # cluster 1 (value 2) is absent: an empty slot, not a dropped one
    assert component_masks(lab, [0, 1, 2], drop_empty=True).shape == (2, 3, 3)
    assert component_masks(lab, []).shape == (0, 3, 3)
    gt = (lab == 3).astype(np.uint8)[None] * 7  # part type 7 where cluster 2 is
    assert best_match_iou(lab[None], gt, [0, 2]) == {7: 1.0}
    assert best_match_iou(lab[None], gt, [0]) == {7: 0.0}


# ------------------------------------------------------------------------------------------ the batch job
class Counter:
    """Wraps the expensive steps to count how much work a run does."""

    def __init__(self, monkeypatch):
        self.images = self.assigned = self.fits = 0
        self.outputs: dict[int, np.ndarray] = {}
        pf, asg, fc = seg.patch_features, seg.assign, seg.fit_centers

        def patch_features_(bb, images, *a, **k):
            self.images += images.shape[0]
            return pf(bb, images, *a, **k)

        def assign_(feats, *a, **k):
            self.assigned += feats.shape[0]
            out = asg(feats, *a, **k)
            for lab in out.numpy():
                self.outputs[len(self.outputs)] = lab
            return out

        def fit_centers_(*a, **k):
            self.fits += 1
            return fc(*a, **k)

        monkeypatch.setattr(seg, "patch_features", patch_features_)
        monkeypatch.setattr(seg, "assign", assign_)
        monkeypatch.setattr(seg, "fit_centers", fit_centers_)


def _decode(uri: str) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        return np.asarray(im), f"{im.format}/{im.mode}"


def test_segment_category_writes_beside_the_data_and_is_idempotent(tmp_path, backbone, monkeypatch):
    df = _objects(tmp_path)
    n, n_train = len(df), int((df["split"] == "train").sum())
    writes: list[str] = []
    write_bytes = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (writes.append(str(uri)), write_bytes(uri, data)))
    count = Counter(monkeypatch)
    kept, info = segment_category(backbone, df, PARAMS, batch_size=4, progress=False)
    comp = tmp_path / "objects" / "tray" / "components"
    assert count.fits == 1 and count.assigned == n and count.images == n_train + n
    # one lossless PNG label map per row, at <cat>/components/<split>/<defect>/<stem>.png
    maps = sorted(str(p) for p in comp.rglob("*.png"))
    assert maps == sorted(label_map_uri(u) for u in df["uri"])
    for u in df["uri"]:
        rel = Path(u).relative_to(tmp_path / "objects" / "tray")
        assert Path(label_map_uri(u)) == comp / rel.parent / (rel.stem + ".png")
    decoded = {u: _decode(label_map_uri(u)) for u in df["uri"]}
    assert {fmt for _, fmt in decoded.values()} == {"PNG/L"}
    assert all(a.shape == (32, 32) and a.min() >= 1 and a.max() <= PARAMS.k for a, _ in decoded.values())
    assert sorted(a.tobytes() for a, _ in decoded.values()) == sorted(a.tobytes() for a in count.outputs.values())
    # centres and their parameters; clusters.json last
    centers = np.load(comp / "centers.npy")
    assert centers.shape == (PARAMS.k, backbone.embed_dim + (3 if PARAMS.color_weight else 0))  # + mean colour
    assert np.allclose(np.linalg.norm(centers, axis=1), 1, atol=1e-5)
    assert json.loads((comp / "centers.json").read_text()) == PARAMS.key(backbone.cfg.weights_sha256)
    done = json.loads((comp / "clusters.json").read_text())
    assert done["kept"] == kept == info["kept"] and done["k"] == PARAMS.k and done["images_voted"] == n_train
    assert done["params"] == PARAMS.key(None)
    assert writes[-1] == str(comp / "clusters.json") and writes.count(str(comp / "clusters.json")) == 1
    assert set(kept) <= set(range(PARAMS.k)) and kept
    # the manifest picks the finished category up
    df2, kept2 = resolve_data(f"objects={tmp_path / 'objects'}")
    assert kept2 == {"objects/tray": kept} and len(df2) == n  # label maps are not mistaken for images
    assert df2["component_mask_uri"].tolist() == [label_map_uri(u) for u in df2["uri"]]
    # a rerun does no work at all
    before = {p: p.stat().st_mtime_ns for p in comp.rglob("*")}
    count2 = Counter(monkeypatch)
    writes.clear()
    assert segment_category(backbone, df, PARAMS, progress=False) == (kept, info)
    assert (count2.images, count2.assigned, count2.fits) == (0, 0, 0) and writes == []
    assert {p: p.stat().st_mtime_ns for p in comp.rglob("*")} == before


def test_segment_category_resumes_after_a_kill(tmp_path, backbone, monkeypatch):
    df = _objects(tmp_path)
    kept, _ = segment_category(backbone, df, PARAMS, progress=False)
    comp = tmp_path / "objects" / "tray" / "components"
    centers = (comp / "centers.npy").read_bytes()
    maps = {u: Path(label_map_uri(u)).read_bytes() for u in df["uri"]}
    # a run killed in the middle of the label maps: no clusters.json, some maps missing
    (comp / "clusters.json").unlink()
    gone = [df["uri"].iloc[i] for i in (1, 5, len(df) - 1)]
    for u in gone:
        Path(label_map_uri(u)).unlink()
    untouched = {u: Path(label_map_uri(u)).stat().st_mtime_ns for u in df["uri"] if u not in gone}
    count = Counter(monkeypatch)
    kept2, info2 = segment_category(backbone, df, PARAMS, progress=False)
    assert count.fits == 0, "the centres must be reused"
    assert count.assigned == len(gone) and count.images == len(gone), "only the missing maps are recomputed"
    assert (comp / "centers.npy").read_bytes() == centers
    assert {u: Path(label_map_uri(u)).stat().st_mtime_ns for u in untouched} == untouched
    assert {u: Path(label_map_uri(u)).read_bytes() for u in df["uri"]} == maps  # deterministic, same bytes
    assert kept2 == kept and (comp / "clusters.json").exists()
    # killed before the centres' parameters were written: centres refitted (same seed -> same centres)
    (comp / "clusters.json").unlink()
    (comp / "centers.json").unlink()
    count = Counter(monkeypatch)
    segment_category(backbone, df, PARAMS, progress=False)
    assert count.fits == 1 and np.array_equal(np.load(comp / "centers.npy"), np.load(io.BytesIO(centers)))


def test_changing_k_refits(tmp_path, backbone, monkeypatch):
    df = _objects(tmp_path)
    segment_category(backbone, df, PARAMS, progress=False)
    comp = tmp_path / "objects" / "tray" / "components"
    count = Counter(monkeypatch)
    p4 = SegmentParams(**{**PARAMS.__dict__, "k": 4})
    kept, info = segment_category(backbone, df, p4, progress=False)
    assert count.fits == 1
    assert np.load(comp / "centers.npy").shape == (4, backbone.embed_dim + (3 if p4.color_weight else 0))
    assert json.loads((comp / "centers.json").read_text())["k"] == 4
    done = json.loads((comp / "clusters.json").read_text())
    assert done["k"] == 4 and done["params"] == p4.key(None) and len(done["border_votes"]) == 4
    assert set(kept) <= set(range(4))


def test_changing_k_recomputes_the_label_maps(tmp_path, backbone, monkeypatch):
    df = _objects(tmp_path)
    segment_category(backbone, df, PARAMS, progress=False)
    count = Counter(monkeypatch)
    p4 = SegmentParams(**{**PARAMS.__dict__, "k": 4, "out_size": 48})
    segment_category(backbone, df, p4, progress=False)
    sizes = {_decode(label_map_uri(u))[0].shape for u in df["uri"]}
    assert count.assigned == len(df), f"{count.assigned} of {len(df)} maps recomputed; map sizes {sizes}"
    assert sizes == {(48, 48)}


def test_segment_manifest_per_category_k_and_load_kept(tmp_path, backbone):
    df = _objects(tmp_path, categories=("tray", "breakfast"))
    out, kept = segment_manifest(backbone, df, {"tray": 2, "objects/breakfast": 4}, PARAMS, progress=False)
    assert set(kept) == {"objects/tray", "objects/breakfast"}
    ks = {c: json.loads((tmp_path / "objects" / c / "components" / "clusters.json").read_text())["k"]
          for c in ("tray", "breakfast")}
    assert ks == {"tray": 2, "breakfast": 4}
    assert out["component_mask_uri"].tolist() == [label_map_uri(u) for u in out["uri"]]
    assert out["uri"].tolist() == df["uri"].tolist() and df["component_mask_uri"].isna().all()  # input unchanged
    assert load_kept(df) == kept
    assert all(storage.exists(u) for u in out["component_mask_uri"])


def test_same_data_elsewhere_segments_identically(tmp_path, backbone):
    """Copying a dataset (another folder, or to S3) must not change its clusters: nothing may be seeded by
    where the data lives."""
    a = _objects(tmp_path / "a")
    b = _objects(tmp_path / "somewhere" / "else")
    kept_a, info_a = segment_category(backbone, a, PARAMS, progress=False)
    kept_b, info_b = segment_category(backbone, b, PARAMS, progress=False)
    comp_a, comp_b = (p / "objects" / "tray" / "components" for p in (tmp_path / "a", tmp_path / "somewhere" / "else"))
    assert np.array_equal(np.load(comp_a / "centers.npy"), np.load(comp_b / "centers.npy"))
    for ua, ub in zip(a["uri"], b["uri"], strict=True):
        assert Path(label_map_uri(ua)).read_bytes() == Path(label_map_uri(ub)).read_bytes(), ua
    assert kept_a == kept_b and info_a == info_b
