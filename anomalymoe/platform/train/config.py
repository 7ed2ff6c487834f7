"""What a training job trains: a config file layered with command-line flags into a JobSpec, the one implementation
behind jobs/train.py, jobs/tune.py and jobs/demo.py (so a flag or a config key means the same in each).

A config is a YAML file with four sections (the shipped ones live in <repo>/configs/)::

    preset: cpu-small      # required: a model preset of anomalymoe.models.config.presets()
    model: {...}           # overrides of that preset, deep-merged (ModelConfig fields)
    train: {...}           # TrainConfig fields, plus `warmup_ratio` (below)
    job: {...}             # JobSpec fields: data, workers, gpu, checkpoint_every, ...

`--config` takes a path or a bare name (`reference` = <repo>/configs/reference.yaml; `--preset NAME` says the same);
with neither, configs/cpu-small.yaml (the CPU demo). Layers, later wins::

    model preset (presets()) < the config's own sections < command-line flags

TrainConfig / JobSpec field defaults fill only what no layer sets: no job-level defaults sit on top of a config,
so a config trains with exactly the values it states.

Warm-up: `train.warmup_steps` is a number of steps; `train.warmup_ratio` a share of the final steps, so `--steps`
rescales it; with neither, it is 10% of the steps where steps are set (config or `--steps`; a fixed 100-step warm-up
would dwarf a short run), else TrainConfig's own. `--warmup-steps` beats all of these. A warm-up that came from the
config and is not shorter than the run (a short `--steps` on a config with a fixed warm-up) is cut to 10%, with a
warning.

Backbone weights: a config whose backbone has no weights (`weights` unset, null or '') is refused, since a random
ViT gives close to meaningless anomaly maps. Give a timm hub tag (`timm`, `hf-hub:…`, needs network), a local or
s3:// .safetensors file or `offline:dinov2_vits14`; or ask for a random backbone by name: `--weights random` /
`backbone.weights: random`. The unit-test backbone `test_tiny_vit` is random by construction and exempt."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from anomalymoe.models.config import ModelConfig, presets
from anomalymoe.paths import REPO_ROOT
from anomalymoe.platform.data.manifest import ManifestError
from anomalymoe.platform.data.storage import StorageError
from anomalymoe.platform.tracking.registry import RegistryError
from anomalymoe.platform.tracking.runs import MLflowUnavailable
from anomalymoe.platform.train.checkpoint import CheckpointError
from anomalymoe.platform.train.job import JobSpec
from anomalymoe.platform.train.trainer import TrainConfig

log = logging.getLogger(__name__)

CONFIGS_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = "cpu-small"  # the embedded default: `python jobs/train.py` with no flags trains the CPU demo
SECTIONS = ("preset", "model", "train", "job")
RANDOM_WEIGHTS = "random"  # backbone.weights asked for by name: a random-init backbone (translated to None)
UNIT_TEST_BACKBONE = "test_tiny_vit"  # random by construction: no weights asked for
WARMUP_SHARE = 0.1  # an unset warm-up is this share of the steps (the rule --steps has always followed)
MODEL_FLAGS = {"backbone": "name", "weights": "weights"}  # flag -> backbone field
INPUT_FLAGS = {"aspect": "aspect"}  # flag -> model.input field (InputConfig)
TRAIN_FLAGS = ("steps", "batch_size", "lr", "warmup_steps", "seed")
JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobSpec) if f.name not in ("model", "train"))


class ConfigError(ValueError):
    """A config or flag the job cannot use; the message is one line that says what to change."""


# a user's mistake or an unreachable service: the jobs print one line, no stack trace
USER_ERRORS = (ConfigError, FileNotFoundError, ManifestError, StorageError, CheckpointError, RegistryError,
               MLflowUnavailable)


def config_names() -> list[str]:
    """The shipped configs: <repo>/configs/<name>.yaml."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def config_path(ref: str | Path | None = None) -> Path:
    """A config reference as a file: a path, or a bare name of a shipped config; None = the default config."""
    ref = DEFAULT_CONFIG if ref is None else ref
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    bare = isinstance(ref, str) and "/" not in ref and "\\" not in ref and path.suffix not in (".yaml", ".yml")
    if bare and (CONFIGS_DIR / f"{ref}.yaml").is_file():
        return CONFIGS_DIR / f"{ref}.yaml"
    if bare:
        raise ConfigError(f"config {ref!r} is neither a file nor one of the shipped configs {config_names()} "
                          f"({CONFIGS_DIR})")
    raise ConfigError(f"config file {ref} does not exist")


def load_config(ref: str | Path | None = None) -> dict[str, Any]:
    """A config file's own sections, checked for shape (not yet layered)."""
    path = config_path(ref)
    try:
        conf = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"config {path}: a mapping of sections {list(SECTIONS)} is expected")
    unknown = set(conf) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"config {path}: unknown sections {sorted(unknown)} (allowed: {', '.join(SECTIONS)})")
    if "preset" not in conf:
        raise ConfigError(f"config {path}: no `preset:` (the model preset it starts from: one of {sorted(presets())})")
    if not isinstance(conf["preset"], str) or conf["preset"] not in presets():
        raise ConfigError(f"config {path}: preset {conf['preset']!r} is not one of {sorted(presets())}")
    for section in ("model", "train", "job"):
        conf[section] = conf.get(section) or {}
        if not isinstance(conf[section], dict):
            raise ConfigError(f"config {path}: section {section!r} must be a mapping")
    if "warmup_steps" in conf["train"] and "warmup_ratio" in conf["train"]:
        raise ConfigError(f"config {path}: give train.warmup_steps or train.warmup_ratio, not both")
    conf["source"] = str(path)
    return conf


def merge(base: dict, over: Mapping) -> dict:
    """`over` deep-merged into a copy of `base` (nested mappings merge; anything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _warmup(train: dict, conf_train: dict, flags: Mapping[str, Any]) -> Any:
    """The warm-up steps by the rule in the module docstring; None = TrainConfig's default. Values of the wrong type
    pass through untouched, for TrainConfig to refuse."""
    if flags.get("warmup_steps") is not None:
        return flags["warmup_steps"]
    steps = train.get("steps")
    if steps is not None and not _is_int(steps):
        return conf_train.get("warmup_steps")
    if "warmup_steps" in conf_train:
        warmup = conf_train["warmup_steps"]
        if steps is not None and _is_int(warmup) and warmup >= steps:
            cut = max(1, int(steps * WARMUP_SHARE))
            log.warning("the config's warm-up of %d steps is not shorter than the run's %d steps: cut to %d "
                        "(--warmup-steps sets it)", warmup, steps, cut)
            return cut
        return warmup
    if "warmup_ratio" not in conf_train and steps is None:
        return None
    ratio = conf_train.get("warmup_ratio", WARMUP_SHARE)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be a number in [0, 1), got {ratio!r}")
    total = steps if steps is not None else TrainConfig.model_fields["steps"].default
    return max(1, int(total * ratio + 1e-9))


def layer(ref: str | Path | None = None, flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config `ref` (a path or shipped name; None = the default) layered over its model preset, with the flags
    (flag name -> value; None = not given) on top. Returns plain data {preset, model, train, job, source}: the model
    as a full ModelConfig dict (backbone.weights may still be "random"), train and job holding only the keys some
    layer set. `to_spec` turns it into a JobSpec."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = set(flags) - set(MODEL_FLAGS) - set(INPUT_FLAGS) - set(TRAIN_FLAGS) - set(JOB_FIELDS)
    if unknown:
        raise ConfigError(f"unknown flags {sorted(unknown)}")
    conf = load_config(ref)
    model = merge(presets()[conf["preset"]].to_dict(), conf["model"])
    if not isinstance(model.get("backbone"), dict):
        raise ConfigError(f"config {conf['source']}: model.backbone must be a mapping")
    for flag, key in MODEL_FLAGS.items():
        if flag in flags:
            model["backbone"][key] = flags[flag]
    for flag, key in INPUT_FLAGS.items():
        if flag in flags:
            model.setdefault("input", {})[key] = flags[flag]
    train = {k: v for k, v in conf["train"].items() if k != "warmup_ratio"}
    train.update({k: flags[k] for k in TRAIN_FLAGS if k in flags and k != "warmup_steps"})
    warmup = _warmup(train, conf["train"], flags)
    if warmup is not None:
        train["warmup_steps"] = warmup
    job = dict(conf["job"])
    job.update({k: flags[k] for k in JOB_FIELDS if k in flags})
    return {"preset": conf["preset"], "model": model, "train": train, "job": job, "source": conf["source"]}


def _type_ok(value: Any, default: Any) -> bool:
    if value is None:
        return default is None
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    return True  # a field of another kind (or an optional one) is JobSpec's to check


def _check_job(job: dict[str, Any], source: str) -> dict[str, Any]:
    """The job section's keys and value types against JobSpec's fields (a plain dataclass checks nothing)."""
    fields = {f.name: f for f in dataclasses.fields(JobSpec) if f.name not in ("model", "train")}
    out = {}
    for k, v in job.items():
        if k not in fields:
            raise ConfigError(f"bad configuration ({source}): job.{k} is not a job setting (one of {sorted(fields)})")
        f = fields[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if k in ("data", "domains") and isinstance(v, str):
            v = [v]  # one dataset / domain may be given as a plain string
        if not _type_ok(v, default):
            raise ConfigError(f"bad configuration ({source}): job.{k} = {v!r} is not a {type(default).__name__}")
        out[k] = float(v) if isinstance(default, float) else v
    return out


def to_spec(conf: Mapping[str, Any]) -> JobSpec:
    """A layered config (`layer`) as a JobSpec; refuses a backbone without weights unless asked for by name."""
    model = copy.deepcopy(dict(conf["model"]))
    bb = model["backbone"]
    weights = bb.get("weights")
    if weights == RANDOM_WEIGHTS:
        bb["weights"] = None
    elif not weights and bb.get("name") != UNIT_TEST_BACKBONE:
        raise ConfigError(
            f"backbone {bb.get('name')} has no pretrained weights (backbone.weights = {weights!r} from "
            f"{conf.get('source', 'the config')} and the flags): give --weights or backbone.weights (a timm hub tag "
            "such as `timm`, a .safetensors path or s3:// URI, or offline:dinov2_vits14 for ViT-S/14), or ask for a "
            f"random backbone by name: --weights {RANDOM_WEIGHTS} / backbone.weights: {RANDOM_WEIGHTS}")
    source = conf.get("source", "the config")
    job = _check_job(dict(conf["job"]), source)
    try:
        return JobSpec(model=ModelConfig.from_dict(model), train=TrainConfig(**conf["train"]), **job)
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"bad configuration ({source}): {e}") from None


def build_spec(ref: str | Path | None = None, flags: Mapping[str, Any] | None = None) -> JobSpec:
    """The JobSpec of config `ref` (a path or shipped name; None = configs/cpu-small.yaml) under these flags."""
    return to_spec(layer(ref, flags))


def random_if_offline_missing(conf: dict[str, Any]) -> str | None:
    """For the demo, which must run on any machine: when the config asks for offline: weights whose package is not
    installed, train on a random backbone (asked for by name) and return the warning to print; None when the
    weights are there (a wrong name stays an error)."""
    weights = conf["model"]["backbone"]["weights"]
    if not (weights and weights.startswith("offline:")):
        return None
    from anomalymoe.models.backbone import resolve_weights_file

    try:
        resolve_weights_file(weights)
        return None
    except FileNotFoundError as e:
        conf["model"]["backbone"]["weights"] = RANDOM_WEIGHTS
        return (f"WARNING: offline DINOv2-S weights unavailable ({e}); training on a RANDOM backbone (asked for by "
                f"name: weights {RANDOM_WEIGHTS}): maps will be close to meaningless")


# ------------------------------------------------------------------------------------------ the jobs' flags
def add_config_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags every training job shares (their defaults: the config's)."""
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--config", help="YAML with preset / model / train / job sections: a path, or the name of a "
                                        f"shipped config (default: {DEFAULT_CONFIG}, configs/{DEFAULT_CONFIG}.yaml)")
    which.add_argument("--preset", choices=config_names(),
                       help="a shipped config (in <repo>/configs/) by name; the same as --config NAME")
    ap.add_argument("--steps", type=int, help="training steps (default: the config's)")
    ap.add_argument("--batch-size", type=int, help="global batch size, split over the workers (default: the config's)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the config's)")
    ap.add_argument("--warmup-steps", type=int,
                    help="linear warm-up steps (default: the config's; else 10%% of the steps)")
    ap.add_argument("--seed", type=int, help="(default: the config's)")
    ap.add_argument("--backbone", help="timm backbone name (overrides the config's)")
    ap.add_argument("--weights", help="backbone weights: a timm hub tag (timm, hf-hub:...), a .safetensors path or "
                                      f"s3:// URI, offline:dinov2_vits14, or '{RANDOM_WEIGHTS}' (random init, by name)")
    ap.add_argument("--aspect", choices=("squash", "letterbox"),
                    help="how non-square images become the square input, for every category (model.input.aspect; "
                         "per category: model.input.categories in the config). letterbox keeps the aspect ratio")


def config_ref(args: argparse.Namespace) -> str | None:
    return getattr(args, "config", None) or getattr(args, "preset", None)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The layering flags an argparse namespace holds (None = not given; `--no-register` = register: false)."""
    known = set(MODEL_FLAGS) | set(INPUT_FLAGS) | set(TRAIN_FLAGS) | set(JOB_FIELDS)
    flags = {k: v for k, v in vars(args).items() if k in known and v is not None}
    if getattr(args, "no_register", False):
        flags["register"] = False
    return flags
