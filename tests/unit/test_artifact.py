"""The model artifact: exact round trip, safetensors only, strict loading, backbone hash check."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anomalymoe.models.artifact import FORMAT, ArtifactError, load_artifact, read_metrics, save_artifact
from anomalymoe.models.backbone import Backbone, tensors_sha256
from anomalymoe.models.calibration import fit_calibration
from anomalymoe.models.config import ModelConfig, presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.scoring import Calibration

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning makes
    each forward ~50x slower; restore the session's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

FILES = ("model.safetensors", "config.json", "calibration.json")


def _spread_router(model: AnomalyMoE, seed: int = 1) -> None:
    """The reference init (std 0.01) routes every image alike; spread it so samples differ."""
    g = torch.Generator().manual_seed(seed)
    for p in model.router.parameters():
        p.data = torch.randn(p.shape, generator=g) * 3.0


def _batch(b: int = 6, size: int = 56, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g)
    images = images * torch.linspace(0.1, 1.0, b)[:, None, None, None]  # distinct CLS tokens
    masks: list[torch.Tensor | None] = []
    for i in range(b):
        k = i % 3  # 0, 1 or 2 components
        masks.append((torch.rand(k, size, size, generator=g) > 0.6) if k else None)
    masks[1] = torch.zeros(0, size, size, dtype=torch.bool)  # explicit zero-count tensor
    return images, masks


def _model(cfg: ModelConfig | None = None) -> AnomalyMoE:
    torch.manual_seed(0)
    m = AnomalyMoE(cfg if cfg is not None else presets()["test-tiny"])
    _spread_router(m)
    # make every trainable tensor (buffers included) distinctive, so a wrong or default load shows
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for k, v in m.trainable_state_dict().items():
            if v.is_floating_point() and not k.startswith("router."):
                v.add_(torch.randn(v.shape, generator=g) * 1e-3)
    return m


CATS = ["a", "b", "a", "b", "a", "b"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[AnomalyMoE, Path]:
    """A calibrated tiny model and its artifact (read-only: tests that break it work on a copy)."""
    model = _model()
    images, masks = _batch(seed=3)
    fit_calibration(model, [(images, masks, CATS)])
    d = save_artifact(model, tmp_path_factory.mktemp("artifact") / "run", metrics={"auroc": 0.5},
                      extra={"note": "unit"})
    return model, d


@pytest.fixture
def broken(saved, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(saved[1], d)
    return d


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_reproduces_predictions_exactly(saved):
    model, d = saved
    assert sorted(p.name for p in d.iterdir()) == sorted([*FILES, "metrics.json"])
    loaded = load_artifact(d)
    assert not loaded.training and loaded is not model
    images, masks = _batch(seed=0)
    for cats in (CATS, None):
        p1, p2 = model.predict(images, masks, cats), loaded.predict(images, masks, cats)
        assert len({tuple(r) for r in p1.routing.mask.int().tolist()}) > 1, "test needs varied routing"
        assert p1.present[:, 2].any(), "test needs the component level in use"
        assert torch.equal(p1.routing.mask, p2.routing.mask)
        assert torch.equal(p1.routing.weights, p2.routing.weights)
        assert torch.equal(p1.score, p2.score)
        assert torch.equal(p1.anomaly_map, p2.anomaly_map)
        assert torch.equal(p1.normalized_score, p2.normalized_score)
        assert torch.equal(p1.threshold, p2.threshold)
        assert torch.equal(p1.level_scores.nan_to_num(-1.0), p2.level_scores.nan_to_num(-1.0))
        assert torch.isfinite(p2.normalized_score).all() and torch.isfinite(p2.threshold).all()
    # the loaded calibration is the fitted one, value for value
    assert loaded.calibration == model.calibration and loaded.calibration.fitted
    # without its calibration the loaded model equals a freshly built uncalibrated twin (no thresholds)
    fresh, bare = _model().predict(images, masks), loaded.predict(images, masks, calibration=Calibration())
    assert torch.equal(fresh.anomaly_map, bare.anomaly_map) and torch.isnan(bare.threshold).all()
    assert not torch.equal(bare.anomaly_map, p2.anomaly_map)  # so the calibration did change the scores


def test_config_and_calibration_json(saved):
    model, d = saved
    meta = json.loads((d / "config.json").read_text())
    cfg = model.cfg
    assert meta["format"] == FORMAT == "anomalymoe-artifact/1"
    assert meta["config_hash"] == cfg.config_hash() == ModelConfig.from_dict(meta["model"]).config_hash()
    assert meta["model"] == cfg.to_dict() and "global" in meta["model"]
    assert meta["backbone"] == {"name": "test_tiny_vit", "weights": None, "sha256": None}
    assert meta["note"] == "unit"
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": FORMAT, "config_hash": cfg.config_hash()}
    assert meta["num_trainable_tensors"] == len(keys) == len(model.trainable_state_dict())
    cal = json.loads((d / "calibration.json").read_text())
    assert cal == model.calibration.to_dict()
    assert set(cal) == {"levels", "scores", "components", "prototypes", "layouts", "weights"}
    assert set(cal["scores"]) == {"a", "b", "_default"}
    assert set(cal["prototypes"]) == {"a", "b"}  # one CLS prototype per calibrated category
    # component slot norms per category: both categories have images with two slots
    assert {k: len(v) for k, v in cal["components"].items()} == {"a": 2, "b": 2}
    assert any(n["low"] > 0 and n["high"] > n["low"] for v in cal["components"].values() for n in v)
    assert Calibration.from_dict(cal) == model.calibration
    assert read_metrics(d) == {"auroc": 0.5}
    assert not list(d.glob("*.tmp"))


def test_weights_file_is_safetensors_without_backbone_or_estimator(saved):
    model, d = saved
    raw = (d / "model.safetensors").read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a raw pickle nor a torch.save zip
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n <= len(raw)
    header = json.loads(raw[8 : 8 + n])
    keys = set(header) - {"__metadata__"}
    assert keys == set(model.trainable_state_dict())
    full = set(model.state_dict())
    assert any(k.startswith("backbone.") for k in full) and any(k.startswith("mi_estimator.") for k in full)
    assert not [k for k in keys if k.startswith(("backbone.", "mi_estimator."))]
    assert any(k.startswith("router.") for k in keys)
    assert {k.split(".")[0] for k in keys} >= {"patch_experts", "global_experts", "component_experts"}
    for k, entry in header.items():
        if k != "__metadata__":
            assert list(entry["shape"]) == list(model.trainable_state_dict()[k].shape), k


# ---------------------------------------------------------------------------------------- strict load
def _edit_weights(d: Path, edit) -> None:
    path = d / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata=meta)


def test_missing_tensor_is_named(broken):
    key = "patch_experts.1.bottleneck.fc1.weight"
    state = load_file(str(broken / "model.safetensors"))
    key = key if key in state else sorted(k for k in state if k.startswith("patch_experts.1."))[0]
    _edit_weights(broken, lambda s: s.pop(key))
    with pytest.raises(ArtifactError, match="missing keys") as e:
        load_artifact(broken)
    assert repr(key) in str(e.value)


def test_unexpected_tensor_is_named(broken):
    _edit_weights(broken, lambda s: s.__setitem__("router.extra_gate", torch.zeros(2)))
    with pytest.raises(ArtifactError, match="unexpected keys") as e:
        load_artifact(broken)
    assert "'router.extra_gate'" in str(e.value)


def test_wrong_shape_is_named(broken):
    key = "router.gate.0.weight"

    def edit(s):
        assert key in s
        s[key] = torch.zeros(s[key].shape[0] + 1, s[key].shape[1])

    _edit_weights(broken, edit)
    with pytest.raises(ArtifactError, match="shape/dtype mismatches") as e:
        load_artifact(broken)
    assert repr(key) in str(e.value)


@pytest.mark.parametrize("name", FILES)
def test_missing_file_is_named(broken, name):
    (broken / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name} is missing"):
        load_artifact(broken)


def test_edited_config_is_refused(broken):
    meta = json.loads((broken / "config.json").read_text())
    meta["model"]["patch"]["num"] = 2
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="hash"):
        load_artifact(broken)
    # updating the hash as well gets past the hash check, but the weights were written for another config
    meta["config_hash"] = ModelConfig.from_dict(meta["model"]).config_hash()
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="different models"):
        load_artifact(broken)
    # and weights re-labelled for the new config still do not fit it: the keys are named
    state = load_file(str(broken / "model.safetensors"))
    save_file(state, str(broken / "model.safetensors"), metadata={"config_hash": meta["config_hash"]})
    with pytest.raises(ArtifactError, match=r"unexpected keys \['patch_experts\.2\."):
        load_artifact(broken)


@pytest.mark.parametrize("fmt", ["anomalymoe-artifact/0", None])
def test_wrong_format_is_refused(broken, fmt):
    meta = json.loads((broken / "config.json").read_text())
    if fmt is None:
        del meta["format"]
    else:
        meta["format"] = fmt
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unsupported artifact format"):
        load_artifact(broken)


def test_pristine_copy_loads(broken):
    """Control for the tests above: the untouched copy loads."""
    assert isinstance(load_artifact(broken), AnomalyMoE)


# -------------------------------------------------------------------------------------- backbone hash
def test_backbone_with_other_weights_is_refused(tmp_path):
    weights = tmp_path / "backbone.safetensors"
    base = presets()["test-tiny"]
    vit_sd = {k: v.clone().contiguous() for k, v in Backbone(base.backbone.model_copy(update={"seed": 1})).vit
              .state_dict().items()}
    save_file(vit_sd, str(weights))
    cfg = base.model_copy(deep=True)
    cfg.backbone.weights = str(weights)
    model = _model(cfg)
    digest = tensors_sha256(load_file(str(weights)))
    assert model.cfg.backbone.weights_sha256 == digest
    d = save_artifact(model, tmp_path / "art")
    meta = json.loads((d / "config.json").read_text())
    assert meta["backbone"] == {"name": "test_tiny_vit", "weights": str(weights), "sha256": digest}
    assert meta["model"]["backbone"]["weights_sha256"] == digest

    # same weights: loads, and the backbone really comes from the file
    ok = load_artifact(d)
    for k, v in vit_sd.items():
        assert torch.equal(ok.backbone.vit.state_dict()[k], v), k
    images, masks = _batch()
    assert torch.equal(ok.predict(images, masks).score, model.predict(images, masks).score)

    # different values in the same file: refused
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in vit_sd.items()}
    save_file(other, str(weights))
    assert tensors_sha256(load_file(str(weights))) != digest
    with pytest.raises(ValueError, match="sha256"):
        load_artifact(d)


def test_input_config_travels_with_the_artifact_and_hashes_as_before_when_unset(tmp_path):
    """InputConfig (aspect, intensity, per category) is part of the model: saved and loaded with it, so training,
    evaluation and serving frame each category alike. Unset, a config hashes exactly as before the field existed
    (an older artifact and a new one of the same config agree); bad keys and spans are refused."""
    from pydantic import ValidationError

    from anomalymoe.models.config import CategoryInput, InputConfig, dict_hash, presets
    from anomalymoe.platform.data.transforms import Frame, Framing

    base = presets()["test-tiny"]
    assert "input" not in base.to_dict()
    before = {k: v for k, v in base.model_dump(mode="json", by_alias=True).items() if k != "input"}
    assert base.config_hash() == dict_hash(before)
    cfg = base.model_copy(update={"input": InputConfig(intensity=(0.0, 4095.0), categories={
        "plant/strip": CategoryInput(aspect="letterbox"), "plant/xray": CategoryInput(intensity="image")})})
    assert cfg.config_hash() != base.config_hash()
    torch.manual_seed(0)
    model = AnomalyMoE(cfg).eval()
    save_artifact(model, tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert loaded.cfg.input == cfg.input and loaded.cfg.config_hash() == cfg.config_hash()
    framing = Framing.for_model(loaded.cfg)
    assert framing.for_key("plant/strip") == Frame(56, aspect="letterbox", intensity=(0.0, 4095.0))
    assert framing.for_key("plant/xray") == Frame(56, intensity="image")
    assert framing.for_key("plant/other") == Frame(56, intensity=(0.0, 4095.0))
    for bad in ({"categories": {"strip": {"aspect": "letterbox"}}}, {"intensity": [5, 5]},
                {"categories": {"a/b": {"aspect": "tile"}}}):
        with pytest.raises(ValidationError):
            InputConfig.model_validate(bad)
