"""Part masks inside the model (models/parts.py), where parts normally are (models/layout.py), category inference
(scoring.Calibration.infer_categories), fusion weights fitted on synthetic defects (calibration.fit_level_weights) and
the synthetic logical defects themselves (platform/validation.logical_defects)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from anomalymoe.models import layout
from anomalymoe.models.artifact import load_artifact, save_artifact
from anomalymoe.models.calibration import fit_calibration, fit_level_weights, fit_part_bank
from anomalymoe.models.config import LEVELS, ScoringConfig, presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.parts import CategoryParts, PartParams, Parts, bank_scores, resize_labels, slot_masks
from anomalymoe.models.scoring import Calibration, LevelNorm
from anomalymoe.platform.train.validation import logical_defects, synthetic_defects


@pytest.mark.parametrize("src,dst", [(256, 224), (256, 56), (448, 392), (300, 255), (224, 392)])
def test_resize_labels_is_pillows_nearest(src, dst):
    rng = np.random.default_rng(src + dst)
    lab = rng.integers(1, 7, (src, src), dtype=np.uint8)
    want = np.asarray(Image.fromarray(lab, mode="L").resize((dst, dst), Image.NEAREST))
    assert np.array_equal(resize_labels(torch.from_numpy(lab)[None], dst)[0].numpy(), want)


def test_slot_masks_keep_slot_order_and_empty_slots():
    lab = torch.tensor([[1, 1, 3], [3, 4, 4], [1, 1, 1]], dtype=torch.uint8)
    m = slot_masks(lab, [2, 0, 4])  # clusters 3, 1, 5 (values 3, 1, 5)
    assert m.shape == (3, 3, 3)
    assert torch.equal(m[0], lab == 3) and torch.equal(m[1], lab == 1) and not m[2].any()  # slot 2 empty: missing
    assert slot_masks(lab, []).shape == (0, 3, 3)


def _tiny_with_parts(seed: int = 0) -> AnomalyMoE:
    torch.manual_seed(seed)
    model = AnomalyMoE(presets()["test-tiny"]).eval()
    c = model.backbone.embed_dim + 3
    g = torch.Generator().manual_seed(seed)
    model.parts = Parts(PartParams(out_size=64), {
        "d/a": CategoryParts(torch.nn.functional.normalize(torch.randn(4, c, generator=g), dim=1), [0, 2, 3]),
        "d/b": CategoryParts(torch.nn.functional.normalize(torch.randn(3, c, generator=g), dim=1), [1]),
    })
    return model


def test_model_derives_masks_for_covered_categories_and_given_masks_win():
    model = _tiny_with_parts()
    images = torch.rand(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    given = torch.zeros(2, 56, 56, dtype=torch.bool)
    with torch.no_grad():
        out = model(images, [None, None, given, None], compute_targets=False, categories=["d/a", "d/b", "d/a", None])
    assert out.masks[0].shape == (3, 56, 56) and out.masks[1].shape == (1, 56, 56)
    assert out.masks[2] is given  # explicit masks are used as given
    assert out.masks[3] is None  # no category: no parts, no component level
    # slots of one image partition the kept clusters' pixels: no pixel is in two slots
    assert int(out.masks[0].sum(0).max()) <= 1
    # the same images without categories: no masks at all (the component experts sit out)
    with torch.no_grad():
        bare = model(images, None, compute_targets=False)
    assert all(m is None for m in bare.masks)


def test_parts_survive_the_artifact_and_predictions_match(tmp_path):
    model = _tiny_with_parts()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(4, 3, 56, 56, generator=g), None, ["d/a", "d/a", "d/b", "d/b"]) for _ in range(2)]
    fit_calibration(model, batches)
    save_artifact(model, tmp_path / "m")
    loaded = load_artifact(tmp_path / "m")
    assert set(loaded.parts.categories) == {"d/a", "d/b"} and loaded.parts.params == model.parts.params
    for k, c in model.parts.categories.items():
        assert torch.equal(loaded.parts.categories[k].centers, c.centers) and loaded.parts.categories[k].kept == c.kept
    images = torch.rand(3, 3, 56, 56, generator=g)
    p1, p2 = model.predict(images, None, ["d/a", "d/b", "d/a"]), loaded.predict(images, None, ["d/a", "d/b", "d/a"])
    assert torch.equal(p1.score, p2.score) and torch.equal(p1.anomaly_map, p2.anomaly_map)
    assert p1.present[:, LEVELS.index("component")].all()  # every image scored with its component level
    # a parts file for another backbone is refused with a clear error
    bad = Parts(PartParams(), {"d/a": CategoryParts(torch.ones(2, 7), [0])})
    bad.save(tmp_path / "m" / "parts.safetensors")
    with pytest.raises(ValueError, match="parts of another backbone"):
        load_artifact(tmp_path / "m")


@pytest.mark.filterwarnings("error::UserWarning")  # torch's "non-writable NumPy array" warning
def test_parts_state_with_read_only_arrays_round_trips_into_own_tensors():
    """What the training driver hands each Ray worker (Parts.state() through the object store: read-only arrays)."""
    g = torch.Generator().manual_seed(0)
    parts = Parts(PartParams(out_size=64), {"d/a": CategoryParts(torch.randn(4, 6, generator=g), [0, 2],
                                                                 bank=torch.randn(3, 2, 6, generator=g).half())})
    state = parts.state()
    before = parts.categories["d/a"].centers.clone()
    for arr in (state["categories"]["d/a"]["centers"], state["categories"]["d/a"]["bank"]):
        arr.setflags(write=False)
    back = Parts.from_state(state)
    cat = back.categories["d/a"]
    assert torch.equal(cat.centers, parts.categories["d/a"].centers) and cat.kept == [0, 2]
    assert torch.equal(cat.bank, parts.categories["d/a"].bank)
    cat.centers += 1  # its own memory: writable, and the state (and the tensors it came from) untouched
    assert np.array_equal(state["categories"]["d/a"]["centers"], before.numpy())


def test_an_artifact_written_before_a_config_field_existed_still_loads(tmp_path):
    model = _tiny_with_parts()
    save_artifact(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    del meta["model"]["scoring"]["fit_level_weights"]  # as written by an older version
    from anomalymoe.models.config import dict_hash

    meta["config_hash"] = dict_hash(meta["model"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": meta["format"],
                                                                          "config_hash": meta["config_hash"]})
    assert load_artifact(tmp_path / "m").cfg.scoring.fit_level_weights  # the new field's default
    meta["model"]["scoring"]["top_ratio"] = 0.5  # an edit without a new hash is still refused
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="was edited"):
        load_artifact(tmp_path / "m")


# ------------------------------------------------------------------------------------------------ part bank
def test_bank_scores_are_the_distance_to_the_nearest_normal_part_of_the_same_slot():
    e = torch.eye(4)
    bank = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[2], torch.zeros(4)])]).half()  # [N=2, K=2, C=4]
    # slot 0 saw e0 and e2, slot 1 only e1 (its second image lacked the slot: that zero row never matches)
    s = bank_scores(bank, torch.stack([e[2] * 3, e[2]]))
    assert s[0] == pytest.approx(0.0, abs=1e-6)  # like a normal instance of its slot (scale does not matter)
    assert s[1] == pytest.approx(1.0, abs=1e-6)  # what only another slot looks like: far from slot 1's parts
    assert torch.isnan(bank_scores(torch.zeros(2, 1, 4).half(), e[:1]))[0]  # no image had the slot: no score
    # many images of a category at once give exactly what each alone gives (the service batches differently from
    # jobs/evaluate.py, and a slot's narrow normal range magnifies any rounding difference)
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(64, 3, 96, generator=g), dim=2).half()
    feats = torch.randn(9, 3, 96, generator=g)
    together = bank_scores(bank, feats)
    assert together.shape == (9, 3)
    assert torch.equal(together, torch.stack([bank_scores(bank, f) for f in feats]))


def _coloured(colour: tuple[float, float, float], n: int, seed: int) -> torch.Tensor:
    """Grey images with one square part of `colour`, jittered by a pixel or two."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, 3, 56, 56), 0.5)
    for i in range(n):
        y, x = (int(v) for v in torch.randint(18, 22, (2,), generator=g))
        out[i, :, y : y + 14, x : x + 14] = torch.tensor(colour)[:, None, None]
    return out + 0.01 * torch.rand(out.shape, generator=g)


def test_part_bank_flags_a_recoloured_part_and_survives_the_artifact(tmp_path):
    model = _tiny_with_parts()
    model.cfg.scoring.fit_level_weights = False
    masks = [torch.stack([_square(20, 20, 56, 14)])] * 8  # one slot: the square
    train, held = _coloured((0.8, 0.1, 0.1), 8, 0), _coloured((0.8, 0.1, 0.1), 8, 1)
    kept = fit_part_bank(model, [(train, masks, ["d/x"] * 8)])
    assert kept == {}  # "d/x" is not a category the segmentation covers: no bank
    model.parts.categories["d/x"] = CategoryParts(model.parts.categories["d/a"].centers.clone(), [0])
    assert fit_part_bank(model, [(train, masks, ["d/x"] * 8)], max_images=5) == {"d/x": 5}
    assert model.parts.categories["d/x"].bank.shape == (5, 1, model.backbone.embed_dim + 3)
    cal = fit_calibration(model, [(held, masks, ["d/x"] * 8)])
    slot = cal.components["d/x"][0]
    assert math.isfinite(slot.bank_low) and slot.bank_high > slot.bank_low
    normal, blue = _coloured((0.8, 0.1, 0.1), 4, 2), _coloured((0.1, 0.2, 0.8), 4, 2)
    p_ok = model.predict(normal, masks[:4], ["d/x"] * 4)
    p_bad = model.predict(blue, masks[:4], ["d/x"] * 4)
    ok, bad = torch.cat(p_ok.component_scores), torch.cat(p_bad.component_scores)
    print("part-bank appearance: normal", ok.tolist(), "recoloured", bad.tolist())
    assert float(bad.min()) > 3 * max(float(ok.max()), 1.0)  # far outside the slot's normal range
    # "experts" scores with the component experts alone: the same model, another appearance score
    model.cfg.scoring.part_appearance = "experts"
    assert not torch.allclose(torch.cat(model.predict(blue, masks[:4], ["d/x"] * 4).component_scores), bad)
    model.cfg.scoring.part_appearance = "bank"
    # the artifact carries the bank and the bank's normal range: the same answers after loading
    save_artifact(model, tmp_path / "m")
    loaded = load_artifact(tmp_path / "m")
    assert torch.equal(loaded.parts.categories["d/x"].bank, model.parts.categories["d/x"].bank)
    assert loaded.calibration.components["d/x"][0] == slot
    assert torch.equal(torch.cat(loaded.predict(blue, masks[:4], ["d/x"] * 4).component_scores), bad)
    # a bank that does not match the category's slots is refused with a clear error
    model.parts.categories["d/x"].bank = torch.zeros(3, 2, 4).half()
    model.parts.save(tmp_path / "m" / "parts.safetensors")
    with pytest.raises(ValueError, match="part bank has shape"):
        Parts.load(tmp_path / "m" / "parts.safetensors")


# ------------------------------------------------------------------------------------------------ layout
def _square(y: int, x: int, size: int = 64, side: int = 10) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y : y + side, x : x + side] = True
    return m


def test_layout_scores_a_moved_or_missing_part_where_it_is_and_should_be():
    rng = np.random.default_rng(0)
    normal = [torch.stack([_square(10 + int(rng.integers(-2, 3)), 10 + int(rng.integers(-2, 3)))]) for _ in range(12)]
    fitted = layout.fit_layouts({"c": [layout.coverage(m) for m in normal]}, quantile=0.99)["c"]
    priors, norms = layout.layout_rows({"c": fitted}, ["c"], [1])
    z_ok, _ = layout.score_and_region(normal[0], priors, norms, 64)
    moved = torch.stack([_square(45, 45)])
    z_moved, region = layout.score_and_region(moved, priors, norms, 64)
    z_gone, region_gone = layout.score_and_region(torch.zeros(1, 64, 64, dtype=torch.bool), priors, norms, 64)
    print("layout z: normal", float(z_ok), "moved", float(z_moved), "missing", float(z_gone))
    assert float(z_ok) <= 1.0 and float(z_moved) > 3 and float(z_gone) > 1
    assert region[0, 50, 50] and region[0, 15, 15]  # lit where it is now and where it should be
    assert region_gone[0, 15, 15] and not region_gone[0, 50, 50]  # a missing part: where it should be only
    # a row without a layout (another category) never scores
    priors2, norms2 = layout.layout_rows({"c": fitted}, ["other"], [1])
    assert float(layout.score_and_region(moved, priors2, norms2, 64)[0]) == 0.0


# ------------------------------------------------------------------------------------------------ categories
def test_category_inference_picks_the_nearest_prototype_among_candidates():
    cal = Calibration(prototypes={"d/a": {"vector": [1.0, 0.0, 0.0], "floor": 0.9},
                                  "d/b": {"vector": [0.0, 1.0, 0.0], "floor": 0.9},
                                  "e/c": {"vector": [0.0, 0.0, 1.0], "floor": 0.9}})
    emb = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.97], [0.0, 0.0, 1.0]])
    cats, info = cal.infer_categories(emb, [None, None, "d/a"])
    assert cats == ["d/a", "e/c", "d/a"] and info[2] is None  # a given category is kept
    assert info[0]["inferred"] and info[0]["confidence"] > 0.9 and info[0]["margin"] > 0.5
    assert info[0]["in_distribution"] and info[1]["in_distribution"] is not False  # 0.97 / |.| >= 0.9
    cats, info = cal.infer_categories(emb, None, candidates=["d/a", "d/b"])  # the request's domain only
    assert cats[1] == "d/b" and not info[1]["in_distribution"]  # nearest of the two, but unlike either
    assert Calibration().infer_categories(emb, None) == ([None] * 3, [None] * 3)  # no prototypes: nothing inferred


# ------------------------------------------------------------------------------------------------ fusion weights
def test_fitted_weights_drop_a_level_that_only_adds_noise():
    g = torch.Generator().manual_seed(0)
    cfg = ScoringConfig(smooth_kernel=1)
    cal = Calibration(levels={lv: LevelNorm() for lv in LEVELS})

    def maps(defect: bool) -> dict[str, torch.Tensor]:
        m = {lv: torch.rand(16, 16, generator=g) * 0.2 for lv in LEVELS}
        # an untrained level: loud spikes anywhere, as likely on normal as on defective images
        m["global"].view(-1)[torch.randint(0, 256, (3,), generator=g)] = 20.0 * torch.rand(3, generator=g)
        if defect:
            m["component"][4:8, 4:8] += 1.0  # only the component level sees the defect
        return m

    present = torch.ones(3, dtype=torch.bool)
    normal = [(maps(False), present, "c") for _ in range(8)]
    bad = [(maps(True), present, "c") for _ in range(8)]
    w = fit_level_weights(normal, bad, cal, cfg)["c"]
    assert w[LEVELS.index("global")] == 0.0 and w[LEVELS.index("component")] > 0
    assert fit_level_weights(normal[:2], bad[:2], cal, cfg) == {}  # too few images: the config's weights


# ------------------------------------------------------------------------------------------------ synthetic defects
def test_logical_defects_change_only_inside_their_masks_and_are_seeded():
    images = torch.full((3, 3, 64, 64), 0.5)
    masks = []
    for i in range(3):
        m = torch.stack([_square(8, 8, side=12), _square(40, 8 + 4 * i, side=10)])
        images[i, 0][m[0]] = 0.9
        images[i, 2][m[1]] = 0.9
        masks.append(m)
    bad, gt, kinds = logical_defects(images, masks, seed=3)
    again, gt2, kinds2 = logical_defects(images, masks, seed=3)
    assert torch.equal(bad, again) and torch.equal(gt, gt2) and kinds == kinds2
    assert set(kinds) <= {"remove", "duplicate", "move", "recolour"}
    changed = (bad != images).any(1)
    assert changed.any() and not (changed & ~gt).any()  # every changed pixel is inside the defect's mask
    # no usable part: a pasted local defect instead; the calibration's maker alternates local / logical
    _, _, k = logical_defects(images[:1], [None], seed=0)
    assert k == ["local"]
    mixed = synthetic_defects(0)(images, masks, 0)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)


# ------------------------------------------------------------------------------------------------ explanations
def test_the_answer_names_the_part_slot_and_the_overlay_outlines_the_parts():
    import base64
    import io
    import time

    from anomalymoe.platform.data.transforms import Framing
    from anomalymoe.serve.inference import Loaded, outlines, score_batch

    model = _tiny_with_parts()
    g = torch.Generator().manual_seed(3)
    fit_calibration(model, [(torch.rand(4, 3, 56, 56, generator=g), None, ["d/a"] * 4)])
    loaded = Loaded(model, "anomalymoe-d", "1", "local", Framing.for_model(model.cfg))
    arr = (torch.rand(56, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    body = score_batch(loaded, [{"data": buf.getvalue(), "category": "a", "map": True, "enqueued": time.time()}],
                       "d")[0]
    part = body["levels"]["component"]["part"]
    assert 0 <= part["slot"] < 3 and part["cluster"] == model.parts.categories["d/a"].kept[part["slot"]]
    assert part["driven_by"] in ("appearance", "layout") and isinstance(part["missing"], bool)
    assert part["score"] == pytest.approx(max(part["appearance_score"], part["layout_score"]))
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["anomaly_map"]["png_base64"]))))
    magenta = (overlay == (255, 0, 255)).all(-1)
    with torch.no_grad():
        masks = model(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, None, compute_targets=False,
                      categories=["d/a"]).masks[0]
    edge = outlines(masks, 56)[part["slot"]].numpy()
    assert np.array_equal(magenta, edge)  # the driving part's outline in magenta, exactly where its edge is
    assert not outlines(torch.zeros(1, 8, 8, dtype=torch.bool), 8).any()
