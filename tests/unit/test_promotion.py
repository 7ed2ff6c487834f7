"""Promotion gates on a file-backed MLflow registry with real (tiny) model artifacts: a first version becomes
champion, an uncalibrated one is refused, the worse of two evaluated models is refused against the better, a
version evaluated on other data is refused without --data, and the champion reproduces its logged scores."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anomalymoe.models.artifact import save_artifact
from anomalymoe.models.calibration import fit_calibration
from anomalymoe.models.config import presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform import promotion
from anomalymoe.platform.data.demo.textures import generate_textures
from anomalymoe.platform.data.pipeline import load_rows
from anomalymoe.platform.data.sources import resolve_data
from anomalymoe.platform.evaluation.evaluate import evaluate
from anomalymoe.platform.tracking import registry

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("promo") / "textures"
    generate_textures(root, n_train=4, n_test_good=3, n_test_defect_per_type=1, image_size=64, categories=("brick",))
    df, kept = resolve_data([f"textures={root}"])
    return root, df


@pytest.fixture
def store(tmp_path, monkeypatch):
    (tmp_path / "db").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    return tmp_path


def make_model(df, seed: int, calibrate: bool = True) -> AnomalyMoE:
    torch.manual_seed(seed)
    model = AnomalyMoE(presets()["test-tiny"]).eval()
    if calibrate:
        train = df[df["split"] == "train"]
        images, masks = load_rows(train, model.cfg.backbone.img_size)
        fit_calibration(model, [(images, masks, (train["domain"] + "/" + train["category"]).tolist())])
    return model


def register(store, model, df, name: str, manifest: str = "m1") -> tuple[str, dict | None]:
    import mlflow

    test = df[df["split"] == "test"]
    report = evaluate(model, test, progress=False) if model.calibration.scores else None
    art = save_artifact(model, store / name, metrics=report)
    mlflow.set_tracking_uri(registry.tracking_uri())
    with mlflow.start_run(experiment_id=registry.experiment_id("promo")) as run:
        mlflow.log_artifacts(str(art), artifact_path=registry.ARTIFACT_PATH)
    return registry.register(run.info.run_id, "textures", {"manifest_hash": manifest}), report


def test_gates(store, data):
    root, df = data
    a, b = make_model(df, 0), make_model(df, 1)
    va, ra = register(store, a, df, "a")
    vb, rb = register(store, b, df, "b")
    # the first version: no champion yet, so only artifact, calibration and smoke gates matter
    better, worse = (va, vb) if ra["domains"]["textures"]["image_auroc"] >= rb["domains"]["textures"]["image_auroc"] \
        else (vb, va)
    rep = promotion.promote("textures", better)
    assert rep.passed, rep.text()
    assert [g.name for g in rep.gates] == ["artifact", "calibration", "smoke inference", "not worse than champion",
                                           "champion unchanged"]
    assert str(registry.version_of("textures", registry.CHAMPION).version) == better
    # an uncalibrated artifact is refused at the calibration gate; the champion stays
    vu, _ = register(store, make_model(df, 2, calibrate=False), df, "u")
    rep = promotion.promote("textures", vu)
    assert not rep.passed and not next(g for g in rep.gates if g.name == "calibration").passed
    assert str(registry.version_of("textures", registry.CHAMPION).version) == better
    # the worse model vs the better champion, both evaluated now on the same test split
    ia = {va: ra, vb: rb}
    rep = promotion.promote("textures", worse, data=[f"textures={root}"])
    gate = rep.gates[-1]
    w, c = ia[worse]["domains"]["textures"], ia[better]["domains"]["textures"]
    should_pass = all(w[k] >= c[k] for k in promotion.COMPARED if not math.isnan(c[k]))
    assert gate.passed == should_pass, (gate, w, c)
    assert rep.metrics["candidate"]["image_auroc"] == pytest.approx(w["image_auroc"])  # evaluated now = logged
    if not should_pass:
        assert "worse on" in gate.reason and str(registry.version_of("textures", "champion").version) == better
    # with a tolerance as large as any gap it passes
    assert promotion.check("textures", worse, data=[f"textures={root}"], tol=1.0).passed
    # without --data: registered metrics compare only on the same manifest
    vo, _ = register(store, make_model(df, 3), df, "o", manifest="other")
    rep = promotion.check("textures", vo)
    assert not rep.passed and "different evaluation sets" in rep.gates[-1].reason


def test_champion_reproduces_logged_scores_exactly(store, data):
    root, df = data
    v, report = register(store, make_model(df, 0), df, "a")
    assert promotion.promote("textures", v).passed
    d = registry.download("models:/anomalymoe-textures@champion", store / "dl")
    from anomalymoe.models.artifact import load_artifact

    again = evaluate(load_artifact(d), df[df["split"] == "test"], progress=False)
    assert json.dumps(again, sort_keys=True, default=str) == json.dumps(report, sort_keys=True, default=str)


def test_promote_job_refuses_with_reasons(store, data):
    import subprocess
    import sys
    from pathlib import Path

    root, df = data
    register(store, make_model(df, 0, calibrate=False), df, "u")
    r = subprocess.run([sys.executable, "jobs/promote.py", "--domain", "textures"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert r.returncode == 1, r.stderr
    assert "[FAIL] calibration" in r.stdout and "refused" in r.stdout
    out = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("SUMMARY "))
    assert out["promoted"] is False and out["version"] == "1"
    r = subprocess.run([sys.executable, "jobs/promote.py", "--domain", "nowhere"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert r.returncode != 0 and "no alias 'challenger'" in r.stderr and "Traceback" not in r.stderr


def test_the_metrics_gate_compares_what_both_sides_have():
    nan = float("nan")
    # image-level labels only: pixel metrics undefined on both sides, image AUROC decides
    g = promotion._metrics_gate({"image_auroc": 0.9, "pixel_auroc": nan}, {"image_auroc": 0.8, "pixel_auroc": nan},
                                0.0, "here")
    assert g.passed and "pixel_auroc not compared" in g.reason
    g = promotion._metrics_gate({"image_auroc": 0.7, "pixel_auroc": nan}, {"image_auroc": 0.8, "pixel_auroc": nan},
                                0.0, "here")
    assert not g.passed and "image_auroc 0.7000 < 0.8000" in g.reason
    # a metric the champion has and the candidate lacks on the same data fails; nothing in common fails
    g = promotion._metrics_gate({"image_auroc": 0.9, "pixel_auroc": nan}, {"image_auroc": 0.8, "pixel_auroc": 0.9},
                                0.0, "here")
    assert not g.passed and "pixel_auroc undefined for the candidate" in g.reason
    g = promotion._metrics_gate({"image_auroc": nan}, {"image_auroc": nan}, 0.0, "here")
    assert not g.passed and "no metric defined for both" in g.reason


def test_promotion_is_a_compare_and_set_on_the_champion(store, data, monkeypatch):
    """Two promotions at once both passed their gates against the same champion and the later write won, even if
    worse, with `previous_champion` naming the wrong version. Now the one whose champion moved while its gates ran
    is refused, and the champion and its tag are the first one's."""
    root, df = data
    v0, _ = register(store, make_model(df, 0), df, "a")
    v1, _ = register(store, make_model(df, 1), df, "b")
    v2, _ = register(store, make_model(df, 2), df, "c")
    assert promotion.promote("textures", v0).passed
    real_check = promotion.check

    def racing(domain, version, *a, **kw):
        rep = real_check(domain, version, *a, **kw)
        if version == v2:  # while v2's gates ran against v0, another promotion moved the champion to v1
            monkeypatch.setattr(promotion, "check", real_check)
            assert promotion.promote("textures", v1, tol=1.0).passed
        return rep

    monkeypatch.setattr(promotion, "check", racing)
    rep = promotion.promote("textures", v2, tol=1.0)
    assert not rep.passed and rep.gates[-1].name == "champion unchanged"
    assert f"moved from {v0} to {v1}" in rep.gates[-1].reason
    assert str(registry.version_of("textures", registry.CHAMPION).version) == v1
    assert registry.client().get_model_version(registry.model_name("textures"), v1).tags["previous_champion"] == v0
