"""The data path against a real S3 server (SeaweedFS): a dataset tree uploaded to S3 becomes a manifest, validates,
decodes, is segmented with label maps written back into S3, and evaluates exactly as its local copy does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from anomalymoe.models.backbone import Backbone
from anomalymoe.models.calibration import fit_calibration
from anomalymoe.models.config import presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform.data.demo.textures import generate_textures
from anomalymoe.platform.data.manifest import validate_manifest
from anomalymoe.platform.data.pipeline import load_rows
from anomalymoe.platform.data.segmentation import SegmentParams, label_map_uri, load_kept, segment_manifest
from anomalymoe.platform.data.sources import resolve_data, storage
from anomalymoe.platform.evaluation.evaluate import evaluate

pytestmark = pytest.mark.integration

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect_per_type": 1, "image_size": 64, "categories": ("brick",)}


def _upload_textures(local_root: Path, s3_prefix: str) -> str:
    """Generate a small textures tree locally and upload every file of it; returns the S3 root."""
    generate_textures(local_root, **SMALL)
    s3_root = storage.join(s3_prefix, "textures")
    files = [p for p in sorted(local_root.rglob("*")) if p.is_file()]
    for p in files:
        storage.upload_file(p, storage.join(s3_root, p.relative_to(local_root).as_posix()))
    assert len(storage.list_files(s3_root)) == len(files)
    return s3_root


def _relative(df: pd.DataFrame, root: str) -> pd.DataFrame:
    out = df.copy()
    for c in ("uri", "mask_uri"):
        out[c] = [u[len(root):] if isinstance(u, str) else None for u in out[c]]
    return out


def _same(a, b, path=""):
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def test_manifest_validate_load_and_segment_on_s3(s3, s3_prefix, tmp_path, monkeypatch):
    local_root = tmp_path / "textures"
    s3_root = _upload_textures(local_root, s3_prefix)
    df, kept = resolve_data(f"textures={s3_root}")
    local, _ = resolve_data(f"textures={local_root}")
    assert kept == {} and len(df) == len(local) == 3 + 2 + 4
    assert all(u.startswith(s3_root + "/brick/") for u in df["uri"])
    assert set(df["domain"]) == {"textures"} and set(df["dataset"]) == {"textures"}
    pd.testing.assert_frame_equal(_relative(df, s3_root), _relative(local, str(local_root)))
    report = validate_manifest(df)
    assert report.ok, report.summary()
    assert set(report.manifest["width"]) == {64} and set(report.manifest["height"]) == {64}

    images, masks = load_rows(df, 56)
    want, _ = load_rows(local, 56)
    assert images.shape == (len(df), 3, 56, 56) and torch.equal(images, want) and masks == [None] * len(df)

    backbone = Backbone(presets()["test-tiny"].backbone)
    params = SegmentParams(k=3, per_image=8, out_size=32)
    seg_df, seg_kept = segment_manifest(backbone, df, params=params, progress=False)
    comp = storage.join(s3_root, "brick", "components")
    for name in ("centers.npy", "centers.json", "clusters.json"):
        assert storage.exists(storage.join(comp, name)), name
    assert seg_df["component_mask_uri"].tolist() == [label_map_uri(u) for u in df["uri"]]
    assert all(u.startswith(comp + "/") and storage.exists(u) for u in seg_df["component_mask_uri"])
    assert set(seg_kept) == {"textures/brick"} and seg_kept["textures/brick"]
    assert load_kept(df) == seg_kept
    assert not any(p.name == "components" for p in local_root.rglob("*")), "nothing written to the local copy"

    # a fresh resolve picks the finished segmentation up from S3; label maps decode into masks
    again, again_kept = resolve_data(f"textures={s3_root}")
    assert again_kept == seg_kept and len(again) == len(df)  # label maps are not taken for images
    assert again["component_mask_uri"].tolist() == seg_df["component_mask_uri"].tolist()
    assert validate_manifest(again).ok
    _, masks = load_rows(again.head(3), 32, again_kept)
    for m in masks:
        assert m is not None and m.dtype == torch.bool and m.shape[1:] == (32, 32)
        # one mask per kept cluster (slot identity; a slot may be empty in one image), at least one part present
        assert m.shape[0] == len(seg_kept["textures/brick"]) and m.flatten(1).any(1).any()

    # a rerun against S3 does no work: no object is written
    assert len(storage.list_files(comp)) == len(df) + 3
    writes: list[str] = []
    write_bytes = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (writes.append(uri), write_bytes(uri, data)))
    assert segment_manifest(backbone, df, params=params, progress=False)[1] == seg_kept
    assert writes == []


def test_evaluate_from_s3_matches_local_copy(s3, s3_prefix, tmp_path):
    local_root = tmp_path / "textures"
    s3_root = _upload_textures(local_root, s3_prefix)
    remote, _ = resolve_data(f"textures={s3_root}")
    local, _ = resolve_data(f"textures={local_root}")
    cfg = presets()["test-tiny"]
    torch.manual_seed(0)
    model = AnomalyMoE(cfg).eval()
    train = local[local["split"] == "train"]
    images, masks = load_rows(train, cfg.backbone.img_size)
    fit_calibration(model, [(images, masks, train["category"].tolist())])

    def test_rows(df):
        return df[df["split"] == "test"].reset_index(drop=True)

    r_s3 = evaluate(model, test_rows(remote), batch_size=4, out_dir=tmp_path / "eval_s3", progress=False)
    r_local = evaluate(model, test_rows(local), batch_size=4, out_dir=tmp_path / "eval_local", progress=False)
    assert r_s3["num_images"] == 6 and set(r_s3["categories"]) == {"textures/brick"}
    assert not math.isnan(r_s3["categories"]["textures/brick"]["image_auroc"])
    _same(r_s3, r_local)
    s3_scores = pd.read_csv(tmp_path / "eval_s3" / "scores.csv")
    local_scores = pd.read_csv(tmp_path / "eval_local" / "scores.csv")
    assert s3_scores["uri"].str.startswith(s3_root).all()
    cols = [c for c in s3_scores.columns if c != "uri"]
    pd.testing.assert_frame_equal(s3_scores[cols], local_scores[cols])
    assert np.isfinite(s3_scores["score"]).all()
