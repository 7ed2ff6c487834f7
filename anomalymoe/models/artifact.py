"""The model artifact (DESIGN.md §5): a directory that training writes and serving loads.

    model.safetensors   trainable weights (experts + router); never a pickle
    config.json         full model config + its hash + the backbone reference (name, weights URI, sha256)
    calibration.json    normalisation and thresholds fitted on normal images, category prototypes
    parts.safetensors   optional: the per-category part segmentation the model derives component masks with
    metrics.json        optional evaluation results

The backbone is referenced, not copied: loading rebuilds it from the URI and refuses weights whose
sha256 differs from the one recorded at training time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anomalymoe.models.config import ModelConfig, dict_hash
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.parts import Parts
from anomalymoe.models.scoring import Calibration

FORMAT = "anomalymoe-artifact/1"


class ArtifactError(ValueError):
    """An artifact that is incomplete, of another format, or does not fit its config."""


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_artifact(model: AnomalyMoE, directory: str | Path, metrics: dict | None = None,
                  extra: dict | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    tmp = d / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": FORMAT, "config_hash": cfg.config_hash()})
    os.replace(tmp, d / "model.safetensors")
    _write_json(d / "config.json", {
        "format": FORMAT,
        "config_hash": cfg.config_hash(),
        "model": cfg.to_dict(),
        "backbone": {"name": cfg.backbone.name, "weights": cfg.backbone.weights,
                     "sha256": cfg.backbone.weights_sha256},
        "num_trainable_tensors": len(state),
        **(extra or {}),
    })
    _write_json(d / "calibration.json", model.calibration.to_dict())
    if model.parts:
        model.parts.save(d / "parts.safetensors.tmp")
        os.replace(d / "parts.safetensors.tmp", d / "parts.safetensors")
    elif (d / "parts.safetensors").exists():
        (d / "parts.safetensors").unlink()
    if metrics is not None:
        _write_json(d / "metrics.json", metrics)
    return d


def load_artifact(directory: str | Path, device: str | torch.device = "cpu") -> AnomalyMoE:
    """Load strictly onto `device` (weights are read on the CPU, then moved; CUDA gets the channels_last
    global experts, AnomalyMoE.to_device)."""
    d = Path(directory)
    for name in ("model.safetensors", "config.json", "calibration.json"):
        if not (d / name).is_file():
            raise ArtifactError(f"{d} is not a model artifact: {name} is missing")
    try:
        meta = json.loads((d / "config.json").read_text())
        calibration = Calibration.from_dict(json.loads((d / "calibration.json").read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{d}: config.json or calibration.json is unreadable: {e}") from e
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{d}: unsupported artifact format {meta.get('format')!r} (expected {FORMAT})")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, ValidationError) as e:
        raise ArtifactError(f"{d}/config.json holds no valid model config: {e}") from e
    # the hash of the config as stored: an artifact written before a config field was added (filled in with its
    # default now) still loads
    if dict_hash(meta["model"]) != meta.get("config_hash"):
        raise ArtifactError(f"{d}/config.json was edited: its hash does not match its contents")
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        weights_hash = (f.metadata() or {}).get("config_hash")
    if weights_hash != meta["config_hash"]:
        raise ArtifactError(f"{d}/model.safetensors was written for config {weights_hash}, "
                            f"config.json is {meta['config_hash']}: files from different models")
    model = AnomalyMoE(cfg)
    state = load_file(str(d / "model.safetensors"), device="cpu")
    own = model.trainable_state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state)
                   if own[k].shape != state[k].shape or own[k].dtype != state[k].dtype)
    if missing or unexpected or wrong:
        raise ArtifactError(
            f"{d}/model.safetensors does not fit its config: missing keys {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' …' if len(unexpected) > 10 else ''}, shape/dtype mismatches (key, file, model) "
            f"{[(k, tuple(state[k].shape), str(state[k].dtype), tuple(own[k].shape)) for k in wrong[:10]]}"
        )
    model.load_state_dict(state, strict=False)  # strictness checked above; the backbone comes from its URI
    model.calibration = calibration
    if (d / "parts.safetensors").is_file():
        try:
            model.parts = Parts.load(d / "parts.safetensors")
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{d}/parts.safetensors is unreadable: {e}") from e
        dims = {k: c.centers.shape[1] for k, c in model.parts.categories.items()}
        want = model.backbone.embed_dim + (3 if model.parts.params.color_weight > 0 else 0)
        if any(v != want for v in dims.values()):
            raise ArtifactError(f"{d}/parts.safetensors has centres of width {sorted(set(dims.values()))}, the "
                                f"backbone gives {want}: parts of another backbone")
    return model.to_device(device).eval()


def read_metrics(directory: str | Path) -> dict | None:
    p = Path(directory) / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else None
