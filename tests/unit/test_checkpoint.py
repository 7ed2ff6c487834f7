"""Training checkpoints: a run stopped, saved and resumed in a fresh process state continues bit-identically."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anomalymoe.models.config import RouterConfig
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform.train.checkpoint import (
    CheckpointError,
    load_training_state,
    read_meta,
    save_training_state,
)
from anomalymoe.platform.train.trainer import TrainConfig, Trainer, seed_everything

pytestmark = pytest.mark.unit


def _batches(n: int = 6, b: int = 4, size: int = 56):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        images = torch.rand(b, 3, size, size, generator=g)
        masks = [torch.rand(2, size, size, generator=g) > 0.5 for _ in range(b)]
        out.append((images, masks))
    return out


def _trainer(tiny_cfg, seed: int) -> Trainer:
    cfg = tiny_cfg.model_copy(update={"router": RouterConfig(hidden=32, mode="per_level", top_k_per_level=1)})
    seed_everything(seed)
    return Trainer(AnomalyMoE(cfg), TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, seed=0))


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.model.state_dict().items() if not k.startswith("backbone.")}


def test_resume_continues_bit_identically(tiny_cfg, tmp_path):
    batches = _batches()
    straight = _trainer(tiny_cfg, seed=0)
    losses_straight = [straight.step(*b)["loss"] for b in batches]

    first = _trainer(tiny_cfg, seed=0)
    for b in batches[:3]:
        first.step(*b)
    save_training_state(tmp_path / "ckpt", first, extra={"run": "unit"})
    # scramble every RNG stream and build the model from another seed: the checkpoint must restore all of it
    random.seed(99)
    np.random.seed(99)  # noqa: NPY002
    resumed = _trainer(tiny_cfg, seed=123)
    assert not all(torch.equal(a, b) for a, b in zip(_weights(resumed).values(), _weights(first).values(),
                                                         strict=True))
    meta = load_training_state(tmp_path / "ckpt", resumed)
    assert meta["step"] == 3 and meta["run"] == "unit" and resumed.step_num == 3
    losses_resumed = [resumed.step(*b)["loss"] for b in batches[3:]]
    assert losses_resumed == losses_straight[3:]
    for (k, a), b in zip(_weights(straight).items(), _weights(resumed).values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_files_and_refusals(tiny_cfg, tmp_path):
    t = _trainer(tiny_cfg, seed=0)
    t.step(*_batches(1)[0])
    d = save_training_state(tmp_path / "c", t)
    assert sorted(p.name for p in d.iterdir()) == ["state.pt", "train.json", "weights.safetensors"]
    meta = read_meta(d)
    assert meta["config_hash"] == t.model.cfg.config_hash() and meta["train"]["lr"] == 1e-3
    keys = load_file(str(d / "weights.safetensors")).keys()
    assert not any(k.startswith("backbone.") for k in keys) and any(k.startswith("mi_estimator.") for k in keys)
    # another model config is refused with a clear message
    other = tiny_cfg.model_copy(update={"router": RouterConfig(hidden=32, mode="joint", top_k=2)})
    with pytest.raises(CheckpointError, match="model config"):
        load_training_state(d, Trainer(AnomalyMoE(other), TrainConfig(steps=6)))
    (d / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="lacks state.pt"):
        load_training_state(d, _trainer(tiny_cfg, seed=0))
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        read_meta(tmp_path / "nothing")
