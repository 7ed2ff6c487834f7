"""`anomalymoe.platform.evaluation.evaluate` on the tiny random model and a small textures + objects test set: the
report's shape, reproducibility from a saved artifact, the files a person looks at, and that nothing is fitted."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from anomalymoe.models.artifact import load_artifact, save_artifact
from anomalymoe.models.backbone import Backbone
from anomalymoe.models.calibration import fit_calibration
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform.data.demo.objects import DEFECT_GROUPS, generate_objects
from anomalymoe.platform.data.demo.textures import generate_textures
from anomalymoe.platform.data.pipeline import load_rows
from anomalymoe.platform.data.segmentation import SegmentParams, segment_manifest
from anomalymoe.platform.data.sources import resolve_data
from anomalymoe.platform.evaluation.evaluate import METRIC_KEYS, _json_safe, evaluate, metrics_table, write_report

pytestmark = pytest.mark.unit

METRICS = {"image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "f1_max"}
TEXTURE_DEFECTS = {"hole", "paste", "scratch", "stain"}


def same(a, b, path="") -> None:
    """Exact equality of two report trees, NaN equal to NaN."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def build_setup(root: Path):
    """Generated data, segmented; a seeded tiny model calibrated on the normal training images.
    Returns (model, test manifest, kept)."""
    generate_textures(root / "textures", n_train=3, n_test_good=2, n_test_defect_per_type=1, image_size=64,
                      categories=("brick",))
    generate_objects(root / "objects", n_train=3, n_test_good=2, n_test_defect_per_type=1, image_size=64,
                     categories=("tray",))
    df, _ = resolve_data([f"textures={root / 'textures'}", f"objects={root / 'objects'}"])
    torch.manual_seed(0)
    model = AnomalyMoE(_tiny())
    g = torch.Generator().manual_seed(1)
    for p in model.router.parameters():  # spread the routing so several experts are used
        p.data = torch.randn(p.shape, generator=g) * 3.0
    model.eval()
    df, kept = segment_manifest(Backbone(model.cfg.backbone), df, params=SegmentParams(k=3, per_image=8, out_size=56),
                                progress=False)
    train = df[df["split"] == "train"]
    images, masks = load_rows(train, model.cfg.backbone.img_size, kept)
    fit_calibration(model, [(images, masks, train["category"].tolist())])
    return model, df[df["split"] == "test"].reset_index(drop=True), kept


def _tiny():
    from anomalymoe.models.config import presets

    return presets()["test-tiny"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model, test, kept = build_setup(root)
    cal_before = copy.deepcopy(model.calibration.to_dict())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    out = root / "report"
    report = evaluate(model, test, batch_size=5, out_dir=out, kept=kept, panels_per_category=3, progress=False)
    return {"root": root, "model": model, "test": test, "kept": kept, "report": report, "out": out,
            "cal_before": cal_before, "state_before": state_before}


def test_report_structure(setup):
    r, test = setup["report"], setup["test"]
    assert {"mean", "domains", "categories"} <= set(r)
    assert r["num_images"] == len(test)
    assert set(r["categories"]) == {"textures/brick", "objects/tray"}
    assert set(r["domains"]) == {"textures", "objects"}
    obj, tex = r["categories"]["objects/tray"], r["categories"]["textures/brick"]
    assert set(obj["defects"]) == set(DEFECT_GROUPS) and set(tex["defects"]) == TEXTURE_DEFECTS
    assert set(obj["groups"]) == {"component", "logical"} and tex["groups"] == {}
    assert set(r["domains"]["objects"]["groups"]) == {"component", "logical"}
    assert r["domains"]["textures"]["groups"] == {}
    leaves = [r["mean"], r["domains"]["objects"]["groups"]["logical"]]
    for c in (obj, tex):
        leaves += [c, *c["defects"].values(), *c["groups"].values()]
    for leaf in leaves:
        assert METRICS <= set(leaf), set(leaf)
        for k in METRICS:
            assert isinstance(leaf[k], float) and (math.isnan(leaf[k]) or 0.0 <= leaf[k] <= 1.0), (k, leaf[k])
    # each defect sub-report is "this defect vs the category's normal images"
    n_good = int(((test["category"] == "tray") & (test["label"] == 0)).sum())
    assert obj["num_images"] == int((test["category"] == "tray").sum())
    assert all(d["num_images"] == n_good + 1 and d["num_anomalous"] == 1 for d in obj["defects"].values())
    assert obj["groups"]["logical"]["num_anomalous"] == 4 and obj["groups"]["component"]["num_anomalous"] == 2
    # means are means
    for k in METRIC_KEYS:
        vals = [c[k] for c in (obj, tex) if not math.isnan(c[k])]
        if vals:
            assert r["mean"][k] == pytest.approx(sum(vals) / len(vals))
    for k in METRIC_KEYS:  # one category per domain: the domain mean is that category
        same(r["domains"]["objects"][k], obj[k], k)
    counts = r["routing"]["counts"]
    assert set(counts) == {"textures", "objects"} and len(r["routing"]["experts"]) == 9
    assert sum(counts["objects"]) >= n_good  # every image selects at least one expert


def test_evaluating_the_same_artifact_twice_is_identical(setup, tmp_path):
    art = save_artifact(setup["model"], tmp_path / "artifact")
    a = evaluate(load_artifact(art), setup["test"], batch_size=5, kept=setup["kept"], progress=False)
    b = evaluate(load_artifact(art), setup["test"], batch_size=5, kept=setup["kept"], progress=False)
    same(a, b)
    same(a, setup["report"])  # and the loaded artifact scores as the model it was saved from
    # another batch size: the same numbers up to float summation order (no per-batch statistics)
    c = evaluate(load_artifact(art), setup["test"], batch_size=3, kept=setup["kept"], progress=False)
    for key in ("textures/brick", "objects/tray"):
        for k in METRIC_KEYS:
            assert c["categories"][key][k] == pytest.approx(a["categories"][key][k], abs=1e-3, nan_ok=True), k
    on_disk = json.loads((setup["out"] / "report.json").read_text())
    same(on_disk, json.loads(json.dumps(setup["report"], default=float)))


def test_evaluation_fits_nothing(setup):
    model = setup["model"]
    assert model.calibration.fitted
    same(model.calibration.to_dict(), setup["cal_before"])
    after = model.state_dict()
    assert set(after) == set(setup["state_before"])
    assert all(torch.equal(after[k], v) for k, v in setup["state_before"].items())
    assert not model.training


def test_files_written(setup):
    out, test = setup["out"], setup["test"]
    for name in ("report.json", "metrics.md", "scores.csv", "routing.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["uri"] for r in rows] == test["uri"].tolist()
    assert {"score", "normalized_score", "threshold", "is_anomaly", "level_patch", "experts"} <= set(rows[0])
    assert all(not math.isnan(float(r["threshold"])) for r in rows)  # calibrated per category
    for dom, cat, defects in (("objects", "tray", set(DEFECT_GROUPS)), ("textures", "brick", TEXTURE_DEFECTS)):
        panels = sorted((out / "panels" / dom / cat).glob("*.png"))
        got = {p.stem.rsplit("_", 1)[0] for p in panels}
        assert len(panels) == 3, panels  # one per defect type (and good), at most panels_per_category
        assert got <= defects | {"good"} and len(got) == len(panels)
        with Image.open(panels[0]) as im:
            assert im.size[0] > im.size[1] > 100
    hists = sorted(p.name for p in (out / "histograms").glob("*.png"))
    assert hists == ["objects_tray.png", "textures_brick.png"]
    md = (out / "metrics.md").read_text()
    assert md == metrics_table(setup["report"])


def test_metrics_table_and_write_report(tmp_path):
    nan = float("nan")
    leaf = {k: 0.5 for k in METRIC_KEYS}
    report = {
        "mean": {**leaf, "image_auroc": nan},
        "domains": {"objects": {**leaf, "groups": {"logical": leaf}}},
        "categories": {"objects/tray": {**leaf, "defects": {"missing": leaf}, "groups": {"logical": leaf}}},
        "routing": {"experts": ["patch0", "global0"], "counts": {"objects": [3, 1]}},
        "num_images": 4,
    }
    md = metrics_table(report)
    lines = md.strip().splitlines()
    assert lines[0].split("|")[2].strip() == METRIC_KEYS[0]
    assert any(line.startswith("| objects/tray |") for line in lines)
    assert any("objects/tray · logical" in line for line in lines)
    assert any(line.startswith("| **objects** · logical |") for line in lines)
    assert lines[-1].startswith("| **all** (mean) | – | 0.500")
    write_report(tmp_path / "r", report, [])
    assert (tmp_path / "r" / "metrics.md").read_text() == md
    assert (tmp_path / "r" / "routing.png").is_file() and not (tmp_path / "r" / "scores.csv").exists()
    text = (tmp_path / "r" / "report.json").read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json is not strict JSON: {c}"))
    assert back["mean"]["image_auroc"] is None  # an undefined metric is null, not NaN
    same(back, _json_safe(report))


def test_ground_truth_goes_through_the_models_crop(tmp_path):
    """With a resize + centre crop, a defect wholly in the cropped-off border is not in the ground truth (the
    model never saw those pixels), and one at the centre stays where the image's centre goes."""
    from anomalymoe.platform.data.transforms import Frame
    from anomalymoe.platform.evaluation.evaluate import _gt_masks

    m = torch.zeros(64, 64, dtype=torch.uint8)
    m[:4, :] = 255  # border band: resize 64 -> 32 makes it 2 px, the crop to 28 removes 2 px per side
    Image.fromarray(m.numpy()).save(tmp_path / "border.png")
    m[:] = 0
    m[28:36, 28:36] = 255
    Image.fromarray(m.numpy()).save(tmp_path / "centre.png")
    import pandas as pd

    rows = pd.DataFrame({"mask_uri": [str(tmp_path / "border.png"), str(tmp_path / "centre.png"), None],
                         "cat_key": ["d/c"] * 3})
    sizes = [(64, 64)] * 3
    gt = _gt_masks(rows, Frame(28, resize=32), sizes)
    assert gt.shape == (3, 28, 28)
    assert not gt[0].any() and not gt[2].any()
    ys, xs = torch.nonzero(gt[1], as_tuple=True)
    assert (ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()) == (12, 15, 12, 15)
    assert _gt_masks(rows, Frame(28), sizes).sum(dim=(1, 2))[0] > 0  # without the crop the band is there


def test_ray_data_loader_gives_the_same_report(setup):
    """Decoding through Ray Data tasks (images and component label maps) changes nothing in the numbers."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r = evaluate(setup["model"], setup["test"], batch_size=5, kept=setup["kept"], progress=False, loader="ray")
    finally:
        if started:
            ray.shutdown()
    same(r, setup["report"])
    with pytest.raises(ValueError, match="loader"):
        evaluate(setup["model"], setup["test"], kept=setup["kept"], progress=False, loader="threads")


def test_image_level_labels_get_image_metrics_and_pixel_metrics_where_masks_are(setup):
    model, test, kept = setup["model"], setup["test"], setup["kept"]
    full = setup["report"]["categories"]
    flagged = test["label"] == 1
    image_only = test.assign(mask_uri=test["mask_uri"].where(~flagged, None), has_mask=flagged.map({True: False,
                                                                                                   False: None}))
    r = evaluate(model, image_only, batch_size=5, kept=kept, panels_per_category=0, progress=False)
    for key, c in r["categories"].items():
        same(c["image_auroc"], full[key]["image_auroc"], key)  # image metrics: every image, as with masks
        assert math.isnan(c["pixel_auroc"]) and math.isnan(c["aupro"]), key
        assert c["pixel_anomalous"] == 0 and c["pixel_images"] == c["num_images"] - c["num_anomalous"]
        assert "need masks" in c["pixel_note"]
    assert "need masks" in r["domains"]["objects"]["pixel_note"]
    # the written report says null, with the reason, and how many images each metric covers
    safe = _json_safe(r)
    assert safe["categories"]["objects/tray"]["pixel_auroc"] is None
    assert "| images | pixel |" in metrics_table(r)
    # half of the flagged rows with masks: pixel metrics over those (and every normal image) only
    rows = test.index[flagged]
    half = test.assign(mask_uri=test["mask_uri"].where(~test.index.isin(rows[::2]), None))
    rh = evaluate(model, half, batch_size=5, kept=kept, panels_per_category=0, progress=False)
    tray = rh["categories"]["objects/tray"]
    n_flagged_tray = int((flagged & (test["category"] == "tray")).sum())
    n_masked_tray = int((half["mask_uri"].notna() & flagged & (test["category"] == "tray")).sum())
    assert tray["pixel_anomalous"] == n_masked_tray < n_flagged_tray and not math.isnan(tray["pixel_auroc"])
    assert "pixel_note" not in tray
