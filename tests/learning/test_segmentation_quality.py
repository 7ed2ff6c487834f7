"""Unsupervised component masks cover the objects' parts: with the offline DINOv2-S backbone, the kept
cluster that best matches each ground-truth part type overlaps it with IoU >= 0.6 (mean over part types)."""

import numpy as np
import pytest
from PIL import Image

from anomalymoe.models.backbone import Backbone
from anomalymoe.models.config import BackboneConfig
from anomalymoe.platform.data import resolve_data
from anomalymoe.platform.demo_objects import generate_objects, load_parts
from anomalymoe.platform.segmentation import SegmentParams, best_match_iou, label_map_uri, segment_manifest

pytestmark = pytest.mark.learning


def test_kept_clusters_cover_the_parts(tmp_path):
    root = tmp_path / "objects"
    generate_objects(root, n_train=24, n_test_good=2, n_test_defect_per_type=1, seed=0)
    df, _ = resolve_data(f"objects={root}")
    backbone = Backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="offline:dinov2_vits14",
                                       img_size=224))
    df, kept = segment_manifest(backbone, df, params=SegmentParams(k=6), progress=False)
    scores = {}
    for cat in ("tray", "breakfast"):
        rows = df[(df.category == cat) & (df.split == "train")]
        pred = np.stack([np.asarray(Image.open(label_map_uri(u))) for u in rows.uri])
        gt = np.stack([load_parts(root / cat / "parts" / "train" / "good" / (u.rsplit("/", 1)[1][:-4] + ".npz"))[0]
                       for u in rows.uri])
        ious = best_match_iou(pred, gt, kept[f"objects/{cat}"])
        scores[cat] = float(np.mean(list(ious.values())))
        print(cat, {k: round(v, 3) for k, v in ious.items()}, "mean", round(scores[cat], 3))
        assert len(ious) == 3  # three part types per category
    assert all(s >= 0.6 for s in scores.values()), scores
