"""`anomalymoe.platform.train.validation`: synthetic defects are seeded, exact and visible; validation scores held-out
normals against their defective copies without touching the test split or the model's calibration."""

from __future__ import annotations

import copy

import pytest
import torch

from anomalymoe.models.config import presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform.train.validation import paste_defects, split_batches, validate

pytestmark = pytest.mark.unit


def _images(n: int, size: int = 56) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g)


def test_paste_defects_are_seeded_exact_and_change_only_the_mask():
    imgs = _images(4)
    bad, masks = paste_defects(imgs, seed=3)
    bad2, masks2 = paste_defects(imgs, seed=3)
    assert torch.equal(bad, bad2) and torch.equal(masks, masks2)
    assert not torch.equal(paste_defects(imgs, seed=4)[1], masks)
    for i in range(4):
        area = masks[i].float().mean().item()
        assert 0.08**2 * 0.9 <= area <= 0.25**2 * 1.1
        outside = ~masks[i]
        assert torch.equal(bad[i][:, outside], imgs[i][:, outside])  # nothing outside the mask changes
        assert (bad[i][:, masks[i]] - imgs[i][:, masks[i]]).abs().mean() > 0.02  # inside it does
    # the index offset keeps defects of later batches distinct from the first batch's
    assert not torch.equal(paste_defects(imgs, seed=3, first_index=4)[1], masks)


def test_split_batches_halves_by_image():
    batches = [(_images(3), [None] * 3, ["a"] * 3), (_images(2), None, ["b"] * 2)]
    a, b = split_batches(batches, seed=0)
    assert sum(x[0].shape[0] for x in a) == 2 and sum(x[0].shape[0] for x in b) == 3
    with pytest.raises(ValueError, match="at least 2"):
        split_batches([(_images(1), None, ["a"])], seed=0)


def test_validate_restores_calibration_and_reports_scores():
    torch.manual_seed(0)
    model = AnomalyMoE(presets()["test-tiny"]).eval()
    before = copy.deepcopy(model.calibration.to_dict())
    r = validate(model, [(_images(6), None, ["d/c"] * 6)], seed=0)
    assert set(r) == {"val_image_auroc", "val_pixel_auroc", "val_score"}
    assert all(0.0 <= v <= 1.0 for v in r.values())
    assert r["val_score"] == pytest.approx((r["val_image_auroc"] + r["val_pixel_auroc"]) / 2)
    assert model.calibration.to_dict() == before
    assert validate(model, lambda: [(_images(6), None, ["d/c"] * 6)], seed=0) == r  # deterministic
