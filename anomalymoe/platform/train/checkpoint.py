"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory (what Ray Train persists to the run's storage, local or S3)::

    weights.safetensors   trainable weights + the EIR estimator (never the frozen backbone: config names it)
    state.pt              both optimisers, the step, every RNG (torch, the jitter generator, python, numpy)
    train.json            step, model config (+ hash), train config, and what the caller adds (run name, ...)

``state.pt`` holds only tensors and plain Python values and is read with ``torch.load(weights_only=True)``:
loading a checkpoint never unpickles code. Resuming restores the RNG streams too, so a resumed run draws the
same dropout masks, jitter and EIR pairs as an uninterrupted one (test_checkpoint.py checks bit-equality)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from anomalymoe.platform.train.trainer import Trainer

WEIGHTS, STATE, META = "weights.safetensors", "state.pt", "train.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing parts or belongs to another model config."""


def _model_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in trainer.model.state_dict().items()
            if not k.startswith("backbone.")}


def _rng_state(trainer: Trainer) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - third-party code may use it
    return {"torch": torch.get_rng_state(), "trainer": trainer.generator.get_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached]}


def _set_rng_state(trainer: Trainer, st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    trainer.generator.set_state(st["trainer"])
    random.setstate(_tuples(st["python"]))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def save_training_state(directory: str | os.PathLike[str], trainer: Trainer, extra: dict[str, Any] | None = None
                        ) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = trainer.model.cfg
    save_file(_model_tensors(trainer), str(d / WEIGHTS), metadata={"config_hash": cfg.config_hash()})
    torch.save({"opt": trainer.opt.state_dict(), "est_opt": trainer.est_opt.state_dict(), "step": trainer.step_num,
                "rng": _rng_state(trainer)}, d / STATE)
    meta = {"step": trainer.step_num, "config_hash": cfg.config_hash(), "model": cfg.to_dict(),
            "train": trainer.cfg.model_dump(mode="json"), **(extra or {})}
    (d / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return d


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        return json.loads((Path(directory) / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory} is not a training checkpoint (no readable {META}): {e}") from e


def load_weights(directory: str | os.PathLike[str], model) -> dict[str, Any]:
    """Only the weights of a checkpoint into ``model`` (an AnomalyMoE of the same config); returns its meta."""
    d = Path(directory)
    meta = read_meta(d)
    want = model.cfg.config_hash()
    if meta.get("config_hash") != want:
        raise CheckpointError(f"checkpoint {d} is for model config {meta.get('config_hash')}, this run is {want}: "
                              "resume with the same config, or start a new run name")
    missing = [f for f in (WEIGHTS, STATE) if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {d} lacks {', '.join(missing)}")
    tensors = load_file(str(d / WEIGHTS))
    own = model.state_dict()
    expected = {k for k in own if not k.startswith("backbone.")}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors))[:5], sorted(set(tensors) - expected)[:5]
        raise CheckpointError(f"checkpoint {d} weights do not match the model: missing {missing}, "
                              f"unexpected {unexpected}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
    return meta


def load_training_state(directory: str | os.PathLike[str], trainer: Trainer) -> dict[str, Any]:
    """Restore weights, optimisers, step and RNG streams into ``trainer`` (built with the same config)."""
    d = Path(directory)
    meta = load_weights(d, trainer.model)
    st = torch.load(d / STATE, weights_only=True)
    trainer.opt.load_state_dict(st["opt"])
    trainer.est_opt.load_state_dict(st["est_opt"])
    trainer.step_num = int(st["step"])
    _set_rng_state(trainer, st["rng"])
    return meta
