"""AnomalyMoE model parts on a seeded tiny random ViT (seconds, no servers)."""

import copy
import statistics

import pytest
import torch

from anomalymoe.models.calibration import fit_calibration
from anomalymoe.models.config import LEVELS, ModelConfig, RouterConfig
from anomalymoe.models.experts.component import component_features
from anomalymoe.models.experts.global_ import GlobalExpert
from anomalymoe.models.experts.patch import LinearAttention, PatchExpert
from anomalymoe.models.losses import CLUBEstimator, esb_loss, hard_mining_cosine
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.unit


def _spread_router(model: AnomalyMoE, seed: int = 1) -> None:
    """The reference init (std 0.01) routes every image alike; spread it so samples differ."""
    g = torch.Generator().manual_seed(seed)
    for p in model.router.parameters():
        p.data = torch.randn(p.shape, generator=g) * 3.0


def _batch(b=6, size=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g)
    images = images * torch.linspace(0.1, 1.0, b)[:, None, None, None]  # distinct CLS tokens
    masks = []
    for i in range(b):
        k = i % 3  # 0, 1 or 2 components; one image has none
        masks.append((torch.rand(k, size, size, generator=g) > 0.6) if k else None)
    masks[1] = torch.zeros(0, size, size, dtype=torch.bool)  # explicit zero-count tensor
    return images, masks


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(0)
    m = AnomalyMoE(tiny_cfg)
    _spread_router(m)
    return m


def _dense_twin(model: AnomalyMoE) -> AnomalyMoE:
    twin = copy.deepcopy(model)
    twin.cfg = model.cfg.model_copy(update={"execution": "dense"})
    return twin


def test_sparse_and_dense_agree_on_selected_experts(model):
    images, masks = _batch()
    model.eval()
    dense = _dense_twin(model).eval()
    with torch.no_grad():
        s = model(images, masks)
        d = dense(images, masks)
    assert torch.equal(s.routing.mask, d.routing.mask)
    assert len({tuple(r) for r in s.routing.mask.int().tolist()}) > 1, "test needs varied routing"
    diffs = []
    for j, po in s.patch.items():
        for a, b in zip(po.de, d.patch[j].de, strict=True):
            diffs.append((a - b[po.idx]).abs().max())
    for j, go in s.global_.items():
        dg = d.global_[j]
        diffs += [(go.ae - dg.ae[go.idx]).abs().max(), (go.student - dg.student[go.idx]).abs().max()]
    for j, co in s.component.items():
        diffs.append((co.recon - d.component[j].recon[co.cidx]).abs().max())
    assert diffs and max(float(x) for x in diffs) < 1e-5
    # sparse runs only the routed experts; dense runs all of them on every sample
    assert sum(po.idx.numel() for po in s.patch.values()) == int(s.routing.level("patch")[1].sum())
    assert all(po.idx.numel() == images.shape[0] for po in d.patch.values()) and len(d.patch) == model.cfg.patch.num
    ps, pd = model.predict(images, masks), dense.predict(images, masks)
    assert (ps.anomaly_map - pd.anomaly_map).abs().max() < 1e-5
    assert (ps.score - pd.score).abs().max() < 1e-5


def test_unrouted_experts_get_no_gradient(model):
    images, masks = _batch()
    model.train()
    out = model(images, masks, images_ae=images.flip(-1))
    model.losses(out)["loss"].backward()
    used = out.routing.mask.any(0)
    sl = out.routing.level_slices
    experts = {"patch": model.patch_experts, "global": model.global_experts, "component": model.component_experts}
    checked_unused = checked_used = 0
    for lv, mods in experts.items():
        for j, mod in enumerate(mods):
            grads = [p.grad for p in mod.parameters()]
            if not used[sl[lv].start + j]:
                assert all(g is None for g in grads), f"{lv} expert {j} was not routed but got a gradient"
                checked_unused += 1
            elif lv != "component" or out.component:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{lv} expert {j} got no gradient"
                checked_used += 1
    assert checked_unused > 0 and checked_used > 0
    assert model.router.gate[0].weight.grad.abs().sum() > 0


def test_esb_load_term_has_router_gradient():
    torch.manual_seed(0)
    logits = torch.randn(16, 9, requires_grad=True)
    mask = torch.zeros(16, 9, dtype=torch.bool).scatter(1, logits.topk(3, 1).indices, True)
    out = esb_loss(logits, mask, w_load=1.0, w_importance=0.0, w_z=0.0)
    out["esb"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 1e-6
    # load = E * sum f_j P_j equals 1 at perfectly uniform routing and probabilities
    uni = torch.zeros(18, 6, requires_grad=True)
    umask = torch.zeros(18, 6, dtype=torch.bool)
    for i in range(18):
        umask[i, i % 6] = True
    assert abs(float(esb_loss(uni, umask, 1, 0, 0)["esb_load"]) - 1.0) < 1e-6


def test_esb_z_loss_is_logsumexp_squared():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    z = esb_loss(logits, torch.ones_like(logits, dtype=torch.bool), 0, 0, 1)["esb_z"]
    assert torch.allclose(z, torch.logsumexp(logits, 1).pow(2).mean())


def test_club_log_likelihood_includes_logvar():
    torch.manual_seed(0)
    est = CLUBEstimator(8)
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    mu, logvar = est.mu_logvar(x)
    expected = (-((mu - y) ** 2) / logvar.exp() - logvar).sum(1).mean()
    assert torch.allclose(est.log_likelihood(x, y), expected)
    # the -logvar term makes the variance head feel a push *down* when predictions are good
    est.zero_grad()
    (-est.log_likelihood(x, mu.detach())).backward()
    assert est.p_logvar[2].bias.grad.sum() > 0


def test_estimator_step_does_not_rerun_the_model(model):
    images, masks = _batch()
    calls = {"router": 0}
    model.router.register_forward_hook(lambda *a: calls.__setitem__("router", calls["router"] + 1))
    tr = Trainer(model, TrainConfig(steps=5, warmup_steps=1))
    model.cfg.loss.lambda_eir = 1.0
    rec = tr.step(images, masks)
    assert calls["router"] == 1
    assert rec["estimator_nll"] != 0.0, "the estimator should have trained on this step's pairs"
    ref = Trainer(model, TrainConfig(steps=5, warmup_steps=1), reference_mode=True)
    calls["router"] = 0
    ref.step(images, masks)
    assert calls["router"] == 2  # the reference's second full forward, kept only for benchmarks


def test_estimator_learns_on_detached_features(model):
    images, masks = _batch()
    model.train()
    model.cfg.loss.lambda_eir = 1.0
    out = model(images, masks, images_ae=images)
    assert out.eir_pairs, "two active experts per level expected with spread routing"
    loss = model.mi_estimator.learning_loss(out.eir_pairs)
    loss.backward()
    assert all(p.grad is None for p in model.patch_experts.parameters())
    for lv in out.eir_pairs:
        assert all(p.grad is not None for p in model.mi_estimator.club[lv].parameters())


def test_hard_mining_scales_easy_point_gradients():
    torch.manual_seed(0)
    en = [torch.randn(2, 4, 5, 5)]
    de = [torch.randn(2, 4, 5, 5, requires_grad=True)]
    plain = hard_mining_cosine(en, [de[0]], p=0.0, factor=1.0)
    mined = hard_mining_cosine(en, [de[0]], p=0.9, factor=0.1)
    assert torch.allclose(plain, mined)  # the value is unchanged
    g_plain = torch.autograd.grad(plain.sum(), de[0])[0]
    g_mined = torch.autograd.grad(mined.sum(), de[0])[0]
    ratio = (g_mined.norm(dim=1) / g_plain.norm(dim=1).clamp_min(1e-12)).flatten()
    hard = (ratio - 1).abs() < 1e-5
    easy = (ratio - 0.1).abs() < 1e-5
    assert bool((hard | easy).all()) and int(hard.sum()) == 5  # top 10% of 50 points


def test_per_level_router_uses_every_level(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"router": RouterConfig(hidden=32, mode="per_level", top_k_per_level=2)})
    torch.manual_seed(0)
    m = AnomalyMoE(cfg).eval()
    r = m.router(torch.randn(7, m.backbone.embed_dim))
    for lv in LEVELS:
        w, mk = r.level(lv)
        assert (mk.sum(1) == 2).all()
        assert torch.allclose(w.sum(1), torch.ones(7))
    assert r.logits.shape == (7, 9)


def test_joint_router_topk(model):
    r = model.router(torch.randn(5, model.backbone.embed_dim))
    assert (r.mask.sum(1) == 3).all()
    assert torch.allclose(r.weights.sum(1), torch.ones(5))
    assert (r.weights[~r.mask] == 0).all() and (r.weights >= 0).all()


def test_component_features_any_count():
    fmap = torch.randn(3, 4, 4, 4)
    masks = [torch.ones(2, 16, 16), None, torch.zeros(0, 16, 16)]
    feats, owner, valid = component_features(fmap, masks, dilation=1)
    assert feats.shape == (2, 4) and owner.tolist() == [0, 0] and valid.tolist() == [True, True]
    assert torch.allclose(feats[0], fmap[0].mean((1, 2)), atol=1e-6)
    empty, own, val = component_features(fmap, [None, None, None], 5)
    assert empty.shape == (0, 4) and own.numel() == 0 and val.numel() == 0
    # an empty slot stays a row (slot identity) with a zero feature, flagged invalid
    slots = torch.zeros(2, 16, 16)
    slots[0, :8] = 1
    f2, _, v2 = component_features(fmap, [slots, None, None], dilation=1)
    assert v2.tolist() == [True, False] and (f2[1] == 0).all()


def test_linear_attention_eps_prevents_nan():
    attn = LinearAttention(8, 2, eps=1e-6)
    with torch.no_grad():
        attn.qkv.weight.fill_(-1e4)
        attn.qkv.bias.fill_(-1e4)  # elu(-big)+1 == 0 -> normaliser 0 without eps
    assert torch.isfinite(attn(torch.ones(1, 4, 8))).all()


def test_reference_shapes_and_sizes():
    """At the reference shape (ViT-B, 392 px) each expert has the reference's parameter count."""
    cfg = ModelConfig()
    pe = PatchExpert(768, 12, 2, cfg.patch)
    ge = GlobalExpert(768, 392, 14, cfg.global_)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(n(pe) / 61.43e6 - 1) < 0.01
    assert abs(n(ge.autoencoder) / 5.57e6 - 1) < 0.01 and abs(n(ge.student) / 7.94e6 - 1) < 0.01
    ae, st = ge(torch.randn(1, 3, 392, 392))
    assert ae.shape == st.shape == (1, 768, 28, 28)
    ge224 = GlobalExpert(384, 224, 14, cfg.global_)
    ae, st = ge224(torch.randn(1, 3, 224, 224))
    assert ae.shape == st.shape == (1, 384, 16, 16)


def test_eval_is_deterministic_and_calibration_uses_normals(model):
    images, masks = _batch()
    p1, p2 = model.predict(images, masks), model.predict(images, masks)
    assert torch.equal(p1.anomaly_map, p2.anomaly_map)
    assert torch.isnan(p1.normalized_score).all()  # uncalibrated: no threshold yet
    cats = ["a", "b"] * 3
    cal = fit_calibration(model, [(images, masks, cats)])
    assert set(cal.scores) == {"a", "b", "_default"} and set(cal.levels) <= set(LEVELS)
    p = model.predict(images, masks, cats)
    for c in ("a", "b"):
        rows = [i for i, x in enumerate(cats) if x == c]
        s = p.normalized_score[rows]
        assert float(s.median()) == pytest.approx(0.0, abs=1e-5)
    assert torch.isfinite(p.threshold).all()


def test_fusion_rules(model):
    images, masks = _batch()
    maps = {}
    for rule in ("mean", "max", "routing"):
        model.cfg.scoring.fusion = rule
        maps[rule] = model.predict(images, masks).anomaly_map
    assert not torch.allclose(maps["mean"], maps["max"])
    assert (maps["max"] >= maps["mean"] - 1e-5).all()  # smoothing is linear and positive: max >= mean


def test_router_never_picks_experts_without_input(model):
    images, _ = _batch()
    with torch.no_grad():
        out = model.eval()(images, None)  # no component masks at all
    _, comp_mask = out.routing.level("component")
    assert not comp_mask.any()
    assert (out.routing.mask.sum(1) == model.cfg.router.top_k).all()  # the slots went to usable experts
    assert torch.allclose(out.routing.weights.sum(1), torch.ones(images.shape[0]))


def test_hard_mining_p_warmup():
    from anomalymoe.models.losses import hard_mining_p

    assert hard_mining_p(0, 0.9, 0) == 0.9  # reference: fixed p
    assert hard_mining_p(0, 0.9, 1000) == 0.0  # Dinomaly: ramp from 0
    assert hard_mining_p(500, 0.9, 1000) == pytest.approx(0.45)
    assert hard_mining_p(5000, 0.9, 1000) == 0.9


def _slot_model(tiny_cfg) -> AnomalyMoE:
    cfg = tiny_cfg.model_copy(update={"router": RouterConfig(hidden=32, mode="per_level", top_k_per_level=1)})
    torch.manual_seed(0)
    return AnomalyMoE(cfg).eval()


def _slot_masks(n: int, size: int = 56, empty_second: bool = False) -> list[torch.Tensor]:
    """Two part slots per image: a left box and a right box (the right one optionally missing)."""
    out = []
    for _ in range(n):
        m = torch.zeros(2, size, size, dtype=torch.bool)
        m[0, 10:30, 5:20] = True
        if not empty_second:
            m[1, 10:30, 35:50] = True
        out.append(m)
    return out


def test_missing_part_scores_high_over_the_whole_image(tiny_cfg):
    """An empty slot is a missing part: it is never fed to an expert, scores MISSING_PART_SCORE, and since the
    absence has no pixels its score covers the whole component map (a present part only covers its mask)."""
    from anomalymoe.models.model import MISSING_PART_SCORE

    m = _slot_model(tiny_cfg)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    masks = [_slot_masks(1)[0], _slot_masks(1, empty_second=True)[0]]
    out = m(images, masks, compute_targets=False)
    assert out.comp_valid.tolist() == [True, True, True, False]
    assert all(3 not in co.cidx.tolist() for co in out.component.values())  # no expert saw the empty slot
    scores, used = m.component_scores(out)
    assert used.all() and scores[3] == MISSING_PART_SCORE
    assert (scores[:3] != MISSING_PART_SCORE).all()
    maps, present = m.level_maps(out, 56)
    comp = maps["component"]
    assert present[:, 2].all()
    assert (comp[0][~(masks[0].any(0))] == 0).all()  # complete image: nothing outside its parts
    assert (comp[1] >= MISSING_PART_SCORE).all()  # missing part: everywhere
    p = m.predict(images, masks)
    assert [t.shape[0] for t in p.component_scores] == [2, 2]
    assert p.component_scores[1][1] == MISSING_PART_SCORE


def test_component_slots_are_normalised_per_category_on_normal_images(tiny_cfg):
    m = _slot_model(tiny_cfg)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 3, 56, 56, generator=g), _slot_masks(4), ["a", "a", "b", "b"]) for _ in range(2)]
    raw = {"a": [[], []], "b": [[], []]}
    for images, masks, cats in batches:
        with torch.no_grad():
            s, _ = m.component_scores(m(images, masks, compute_targets=False))
        for i, c in enumerate(cats):
            raw[c][0].append(float(s[2 * i]))
            raw[c][1].append(float(s[2 * i + 1]))
    streamed = fit_calibration(m, lambda: iter(batches))  # a callable is streamed twice
    held = fit_calibration(m, batches)  # an iterable is held in memory: same result
    assert streamed == held
    cal = m.calibration
    assert set(cal.components) == {"a", "b"} and all(len(v) == 2 for v in cal.components.values())
    for c in ("a", "b"):
        for slot in (0, 1):
            norm = cal.components[c][slot]
            assert norm.low == pytest.approx(statistics.median(raw[c][slot]), rel=1e-5)
            assert norm.high > norm.low
    # predict reports slot-normalised scores: (raw - low) / (high - low)
    images, masks, cats = batches[0]
    p = m.predict(images, masks, cats)
    with torch.no_grad():
        s, _ = m.component_scores(m(images, masks, compute_targets=False))
    for i, c in enumerate(cats):
        for slot in (0, 1):
            n = cal.components[c][slot]
            want = (float(s[2 * i + slot]) - n.low) / (n.high - n.low)
            assert float(p.component_scores[i][slot]) == pytest.approx(want, rel=1e-4, abs=1e-5)
    # switching slot normalisation off gives raw scores again
    m.cfg.scoring.component_slot_norm = False
    assert torch.allclose(m.predict(images, masks, cats).component_scores[0], s[:2])


def test_missing_part_counts_only_for_slots_normal_images_always_have(tiny_cfg):
    """Calibration records how often each slot is present on normal images. A slot every normal image has
    scores high when missing; a slot that normal images sometimes lack (segmentation noise) scores 0."""
    m = _slot_model(tiny_cfg)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(6, 3, 56, 56, generator=g)
    always = _slot_masks(6)
    flaky = _slot_masks(3) + _slot_masks(3, empty_second=True)  # slot 1 absent from half the normal images
    test_img = torch.rand(1, 3, 56, 56, generator=g)
    lacking = _slot_masks(1, empty_second=True)

    fit_calibration(m, [(images, always, ["a"] * 6)])
    assert [n.presence for n in m.calibration.components["a"]] == [1.0, 1.0]
    reliable = m.predict(test_img, lacking, ["a"]).component_scores[0][1]
    assert reliable >= m.cfg.scoring.missing_part_score  # far above the slot's normal range (high = 1)

    fit_calibration(m, [(images, flaky, ["a"] * 6)])
    assert [n.presence for n in m.calibration.components["a"]] == [1.0, 0.5]
    p = m.predict(test_img, lacking, ["a"])
    assert p.component_scores[0][1] == 0.0
    assert m.calibration.to_dict()["components"]["a"][1]["presence"] == 0.5


def test_lr_scale_per_parameter_group(model):
    images, masks = _batch()
    tr = Trainer(model, TrainConfig(steps=10, batch_size=6, lr=1e-3, warmup_steps=0,
                                    lr_scale={"component": 2.5, "router": 0.5}))
    tr.step(images, masks)
    lrs = {g["name"]: g["lr"] for g in tr.opt.param_groups}
    assert lrs["component"] == pytest.approx(2.5 * lrs["patch"]) and lrs["router"] == pytest.approx(0.5 * lrs["patch"])
    assert lrs["global"] == lrs["patch"]
    with pytest.raises(ValueError, match="lr_scale"):
        TrainConfig(lr_scale={"decoder": 2.0})


def test_component_init_choice_changes_nothing_else(tiny_cfg):
    """PyTorch-default init for the component MLPs (the default) vs the reference's std-0.01: only the component
    experts differ; every other module draws the same random numbers."""
    nets = {}
    for init in ("pytorch", "reference"):
        cfg = tiny_cfg.model_copy(deep=True)
        cfg.component.init = init
        torch.manual_seed(0)
        nets[init] = AnomalyMoE(cfg)
    a, b = (n.state_dict() for n in nets.values())
    for k in a:
        if k.startswith("component_experts."):
            continue
        assert torch.equal(a[k], b[k]), k
    w_py = nets["pytorch"].component_experts[0].encoder[0].weight
    w_ref = nets["reference"].component_experts[0].encoder[0].weight
    assert w_ref.abs().max() <= 0.03 and w_py.std() > 3 * w_ref.std()


def test_fit_within_a_time_budget_sets_the_run_length_after_its_probe(tiny_cfg):
    """fit(budget_s=): the probe steps measure the rate, then the run (and its schedule) is cut to what fits; a
    budget too small for more gives probe + 1 steps."""
    from anomalymoe.platform.train.trainer import fit

    torch.manual_seed(0)
    model = AnomalyMoE(tiny_cfg)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=10**6, batch_size=2, warmup_steps=1)
    history = fit(model, lambda: iter([(images, None)] * 4), cfg, progress=False, budget_s=1e-9, probe=3)
    assert len(history) == 4
    assert history[-1]["lr"] < history[1]["lr"]  # the schedule spans the 4 steps, not a million
    assert cfg.steps == 10**6  # the caller's config is not changed
