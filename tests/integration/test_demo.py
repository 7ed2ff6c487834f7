"""The README's first command's job (jobs/demo.py) end to end on the tiny config, as a user runs it: demo data,
segmented parts, the Ray Train job, evaluation, MLflow run + registered versions (the demo's own local store),
promotion, the scoring service on Ray Serve, images scored over HTTP, and the report; a second run reuses the
data and the trained run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run(out: Path, steps: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    return subprocess.run([sys.executable, "jobs/demo.py", "--out", str(out), "--preset", "test-tiny", "--steps",
                           steps, "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env)


def summary_of(r: subprocess.CompletedProcess) -> dict:
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert line, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads(line[-1].removeprefix("SUMMARY "))


def test_demo_end_to_end_and_rerun(tmp_path):
    r = run(tmp_path, "2")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    s = summary_of(r)
    for n in range(1, 8):
        assert f"[{n}/7]" in r.stdout  # every stage says what it does
    assert s["http_ok"] and set(s["versions"]) == {"textures", "objects"} and all(s["promoted"].values())
    report = json.loads((tmp_path / "train" / "eval" / "report.json").read_text())
    assert set(report["categories"]) == {"textures/brick", "textures/grass", "textures/gravel", "objects/tray",
                                         "objects/breakfast"}
    assert set(report["domains"]["objects"]["groups"]) == {"component", "logical"}
    assert set(report["categories"]["objects/tray"]["defects"]) == {
        "wrong_shape", "wrong_color", "missing", "extra", "swapped", "misplaced"}
    panels = list((tmp_path / "train" / "eval" / "panels").glob("*/*/*.png"))
    assert len(panels) >= 5 and all(p.stat().st_size > 1000 for p in panels)
    for name in ("model.safetensors", "config.json", "calibration.json", "metrics.json", "parts.safetensors"):
        assert (tmp_path / "train" / "model" / name).is_file()
    from anomalymoe.models.parts import Parts

    # the training job fitted every category's part segmentation and the model carries it (no label maps written)
    parts = Parts.load(tmp_path / "train" / "model" / "parts.safetensors")
    assert set(parts.categories) == set(report["categories"])
    # objects carry a part bank fitted on their training images (40 minus the 20% calibration hold-out), one row per
    # part slot; textures have no parts and no bank
    for key, cp in parts.categories.items():
        assert (cp.bank is not None) == key.startswith("objects/"), key
        if cp.bank is not None:
            assert tuple(cp.bank.shape[:2]) == (32, len(cp.kept))
    assert "[parts] part bank (what each part looks like on normal training images): objects/breakfast 32" in r.stdout
    assert not list((tmp_path / "data").glob("*/*/components"))
    html = Path(s["report"]).read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "image_auroc" in html and "routing.png" in html and "Scored over HTTP" in md and "| textures | brick/" in md
    overlays = list((tmp_path / "report").glob("http_*.png"))
    assert len(overlays) == 6 and all(p.stat().st_size > 1000 for p in overlays)  # 3 images per domain, with maps
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()  # its own registry

    r2 = run(tmp_path, "2")
    assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
    assert "(reused)" in r2.stdout and "reusing run" in r2.stdout
    s2 = summary_of(r2)
    assert s2["versions"] == s["versions"] and s2["http_ok"]
