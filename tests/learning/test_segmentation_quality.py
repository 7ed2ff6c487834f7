"""Unsupervised component masks cover the objects' parts: with the offline DINOv2-S backbone, the kept
cluster that best matches each ground-truth part type overlaps it with IoU >= 0.6 (mean over part types). The model
derives the same masks from its own backbone pass as the label maps jobs/segment.py writes, and infers every test
image's category from its CLS token."""

import numpy as np
import pytest
from PIL import Image

from anomalymoe.models.backbone import Backbone
from anomalymoe.models.config import BackboneConfig
from anomalymoe.platform.data.demo.objects import generate_objects, load_parts
from anomalymoe.platform.data.segmentation import SegmentParams, best_match_iou, label_map_uri, segment_manifest
from anomalymoe.platform.data.sources import resolve_data

pytestmark = pytest.mark.learning


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg") / "objects"
    generate_objects(root, n_train=24, n_test_good=2, n_test_defect_per_type=1, seed=0)
    df, _ = resolve_data(f"objects={root}")
    backbone = Backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="offline:dinov2_vits14",
                                       img_size=224))
    df, kept = segment_manifest(backbone, df, params=SegmentParams(k=6), progress=False)
    return root, df, kept, backbone


def test_kept_clusters_cover_the_parts(segmented):
    root, df, kept, backbone = segmented
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


def test_model_derives_the_label_maps_and_infers_the_category(segmented):
    """Masks derived inside the model (its own backbone pass, models/parts.py) equal the label maps jobs/segment.py
    wrote, slot for slot (IoU >= 0.95 asked; the same computation gives 1.0); the training job's in-memory fit gives
    the same centres and parts; and with prototypes fitted at calibration every test image (normal, logical,
    component) is assigned its own category."""
    import torch

    from anomalymoe.models.config import presets
    from anomalymoe.models.model import AnomalyMoE
    from anomalymoe.platform.data.pipeline import load_rows, row_keys
    from anomalymoe.platform.data.segmentation import fit_parts, prepare_parts
    from anomalymoe.platform.data.transforms import Frame

    root, df, kept, backbone = segmented
    params = SegmentParams(k=6)
    model = AnomalyMoE(presets()["cpu-small"], backbone=backbone).eval()
    model.parts = prepare_parts(backbone, df, params, log=lambda m: None)  # loads what segment_manifest wrote
    for key, sub in df.groupby(df["domain"] + "/" + df["category"]):
        fitted = fit_parts(backbone, sub, params)
        assert torch.equal(fitted.centers, model.parts.categories[key].centers)
        assert fitted.kept == model.parts.categories[key].kept == kept[key]
    frame = Frame.for_backbone(model.cfg.backbone)
    test = df[df["split"] == "test"]
    images, stored = load_rows(test, frame, kept)
    with torch.no_grad():
        derived = model(images, None, compute_targets=False, categories=row_keys(test)).masks
    ious = []
    for d, m in zip(derived, stored, strict=True):
        assert d.shape == m.shape
        inter, union = (d & m).flatten(1).sum(1), (d | m).flatten(1).sum(1)
        ious += (inter[union > 0] / union[union > 0]).tolist()
    print("derived vs stored masks: min IoU", min(ious), "over", len(ious), "slots")
    assert min(ious) >= 0.95



def test_category_inference_names_every_demo_test_image(segmented, tmp_path):
    """Prototypes fitted at calibration on normal training images of both demo domains (five categories) name the
    category of every test image, normal or defective, among all five."""
    import pandas as pd
    import torch

    from anomalymoe.models.calibration import fit_calibration
    from anomalymoe.models.config import presets
    from anomalymoe.models.model import AnomalyMoE
    from anomalymoe.platform.data.demo.textures import generate_textures
    from anomalymoe.platform.data.pipeline import load_rows, row_keys
    from anomalymoe.platform.data.transforms import Frame

    _, objects, _, backbone = segmented
    generate_textures(tmp_path / "textures", n_train=8, n_test_good=2, n_test_defect_per_type=2, seed=0)
    textures, _ = resolve_data(f"textures={tmp_path / 'textures'}")
    df = pd.concat([objects, textures], ignore_index=True)
    model = AnomalyMoE(presets()["cpu-small"], backbone=backbone).eval()
    frame = Frame.for_backbone(model.cfg.backbone)
    train = df[df["split"] == "train"].groupby(["domain", "category"]).head(8)
    fit_calibration(model, [(load_rows(train.iloc[i : i + 8], frame)[0], None, row_keys(train.iloc[i : i + 8]))
                            for i in range(0, len(train), 8)])
    test = df[df["split"] == "test"]
    got, info = [], []
    for i in range(0, len(test), 16):
        with torch.no_grad():
            p = model.predict(load_rows(test.iloc[i : i + 16], frame)[0], None, None)
        got += p.categories
        info += p.category_info
    wrong = [(k, g) for k, g in zip(row_keys(test), got, strict=True) if k != g]
    print(f"category inference: {len(test)} test images, {len(wrong)} wrong; confidence min "
          f"{min(i['confidence'] for i in info):.3f}, margin min {min(i['margin'] for i in info):.3f}")
    assert not wrong and len(set(got)) == 5
    assert all(i["inferred"] for i in info)
