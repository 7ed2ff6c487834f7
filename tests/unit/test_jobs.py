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
    r = run(f"jobs/{script}", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout


def test_benchmark_model_json_contract():
    r = run("jobs/benchmark.py", "model", "--preset", "test-tiny", "--reps", "1", "--train-reps", "1", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("config", "params", "sparse_img_per_s", "dense_img_per_s", "sparse_over_dense",
                "train_step_sparse_s", "train_step_dense_s", "max_abs_diff", "peak_rss_mb"):
        assert key in res, key
    assert res["max_abs_diff"] < 1e-5
    assert res["sparse_img_per_s"] > 0 and res["dense_img_per_s"] > 0


def test_evaluate_refuses_broken_data_with_one_report(tmp_path):
    from anomalymoe.models.anomalymoe import AnomalyMoE
    from anomalymoe.models.artifact import save_artifact
    from anomalymoe.models.config import presets
    from anomalymoe.platform.demo_data import generate_textures

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


def _train_spec(*argv: str):
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import train  # jobs/train.py
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    captured = {}

    def fake_run(spec):  # only the spec-building is under test here; the run itself is an integration test
        captured["spec"] = spec
        return {"output": "x", "run_id": "r"}

    orig = train.run_job
    train.run_job = fake_run
    try:
        train.main(list(argv))
    finally:
        train.run_job = orig
    return captured["spec"]


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


@pytest.mark.parametrize("text, message", [
    ("preset: nope\n", "preset"),
    ("trian: {steps: 3}\n", "unknown sections"),
    ("preset: test-tiny\ntrain: {lr_scale: {decoder: 2}}\n", "bad configuration"),
    ("preset: test-tiny\njob: {wokers: 2}\n", "bad configuration"),
])
def test_train_rejects_bad_config_with_one_line(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    r = run("jobs/train.py", "--config", str(cfg), timeout=120)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_train_missing_data_is_one_clear_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: test-tiny\n")
    r = run("jobs/train.py", "--config", str(cfg), "--data", str(tmp_path / "nowhere"), timeout=120)
    assert r.returncode != 0 and "no such dataset root" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
