"""jobs/evaluate.py on a 2,000-image manifest stays under 4 GiB RSS, and its memory does not grow with the
number of images (metrics are streamed; 256x256 maps)."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from anomalymoe.models.artifact import save_artifact
from anomalymoe.models.config import presets
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.platform.data.demo.textures import generate_textures
from anomalymoe.platform.data.manifest import build_manifest_from_mvtec, write_manifest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

PEAK_RSS = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def _evaluate(model_dir: Path, manifest: Path, out: Path) -> tuple[float, dict]:
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, "jobs/evaluate.py", "--model", str(model_dir), "--data",
                        str(manifest), "--out", str(out), "--batch-size", "16", "--panels", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    peak = float(r.stdout.strip().splitlines()[-1].split()[-1])
    return peak, json.loads((out / "report.json").read_text())


def test_two_thousand_images_stay_bounded(tmp_path):
    root = tmp_path / "textures"
    generate_textures(root, n_train=4, n_test_good=267, n_test_defect_per_type=100, seed=1)
    df = build_manifest_from_mvtec(str(root), "textures", "demo_textures")
    test = df[df.split == "test"]
    assert len(test) == 2001
    write_manifest(test, str(tmp_path / "all.parquet"))
    write_manifest(test.iloc[::8], str(tmp_path / "eighth.parquet"))
    cfg = presets()["test-tiny"].model_copy(deep=True)
    cfg.scoring.map_size = 256  # full-size maps: what the accumulators have to digest
    save_artifact(AnomalyMoE(cfg), tmp_path / "model")

    small_peak, _ = _evaluate(tmp_path / "model", tmp_path / "eighth.parquet", tmp_path / "ev_small")
    peak, report = _evaluate(tmp_path / "model", tmp_path / "all.parquet", tmp_path / "ev_all")
    print(f"peak RSS: {small_peak:.0f} MB for {len(test) // 8} images, {peak:.0f} MB for {len(test)}")
    assert report["num_images"] == 2001
    assert peak < 4096
    assert peak - small_peak < 300, (small_peak, peak)  # 8x the images, (almost) the same memory
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 < 4096
