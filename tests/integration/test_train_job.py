"""jobs/train.py on a real local Ray head (`ray start --head`): submitted through the job API with a real MLflow
server (artifacts in SeaweedFS) and checkpoints in S3; a training worker killed mid-run; the driver killed and
the command rerun; 1 worker vs 2 with the same global batch. The model is the tiny test config on a small
generated textures set, so each run takes tens of seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anomalymoe.platform.cluster.local.proc import cmdline, pids_matching

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "preset: test-tiny\ntrain: {batch_size: 4, lr: 0.002, warmup_steps: 1}\n"
STEPS, EVERY = 24, 6


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    from anomalymoe.platform.data.demo.textures import generate_textures

    root = tmp_path_factory.mktemp("train-data")
    generate_textures(root / "textures", n_train=12, n_test_good=3, n_test_defect_per_type=1, image_size=64,
                      categories=("brick",))
    (root / "cfg.yaml").write_text(CONFIG)
    return root / "textures", root / "cfg.yaml"


def train_args(data: tuple[Path, Path], name: str, storage: str, out: Path, *, workers: int = 2,
               steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    return ["jobs/train.py", "--config", str(data[1]), "--data", f"textures={data[0]}", "--workers", str(workers),
            "--steps", str(steps), "--checkpoint-every", str(EVERY), "--log-every", "1", "--name", name,
            "--storage", storage, "--output", str(out), "--experiment", "itest", *extra]


def driver_env(head, tmp: Path) -> dict[str, str]:
    """A driver on this machine connected to the head; MLflow in a sqlite file of the test."""
    return {**os.environ, "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "disabled",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}


def summary_of(log_text: str) -> dict:
    """The job's one-line JSON summary (worker log lines may follow it in the job logs)."""
    lines = [ln for ln in log_text.splitlines() if ln.startswith("SUMMARY ")]
    assert lines, log_text[-4000:]
    return json.loads(lines[-1].removeprefix("SUMMARY "))


def run_driver(args: list[str], env: dict[str, str], log: Path, timeout: float = 400) -> dict:
    with log.open("w") as f:
        r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout)
    text = log.read_text()
    assert r.returncode == 0, text[-4000:]
    return summary_of(text)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until the first checkpoint is written *and registered*: two steps after it (a kill while it is still being
    written would rightly restart from step 0)."""
    deadline = time.monotonic() + timeout
    while not (any(run_dir.glob("checkpoint_*/weights.safetensors"))
               and f"[train] step {EVERY + 2}/" in log.read_text()):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.2)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(ray_head, tiny_data, tmp_path_factory) -> tuple[dict, Path]:
    """An uninterrupted 2-worker run: what the interrupted runs must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "out"
    summary = run_driver(train_args(tiny_data, "ref", str(tmp / "runs"), out, extra=("--no-register",)),
                         driver_env(ray_head, tmp), tmp / "log")
    return summary, out


def test_submitted_job_tracks_checkpoints_and_registers(ray_head, mlflow_uri, s3, s3_prefix, tiny_data, tmp_path):
    """`ray job submit --working-dir .` equivalent through the job API: 2 workers, checkpoints in S3, a real
    MLflow server; the run, its params/tags/metrics/artifacts and a registered version with alias exist."""
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from anomalymoe.platform.data import storage

    out = tmp_path / "out"
    client = JobSubmissionClient(ray_head.dashboard)
    args = train_args(tiny_data, "submitted", s3_prefix + "runs", out, steps=12)
    job = client.submit_job(entrypoint="python " + " ".join(args),
                            runtime_env={"working_dir": str(ROOT),
                                         "env_vars": {**s3.env(), "MLFLOW_TRACKING_URI": mlflow_uri}})
    deadline = time.monotonic() + 400
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-4000:]
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "[train] step 12/12" in logs and "img/s" in logs and "ETA" in logs  # progress readable in job logs
    # a user's dataset without jobs/segment.py output: the job fits each category's part segmentation and says so
    assert "[parts] textures/brick: no segmentation from jobs/segment.py" in logs and "fitting 6 clusters" in logs
    summary = summary_of(logs)
    assert summary["steps"] == 12 and set(summary["versions"]) == {"textures"}

    # checkpoints went to S3 (the last two kept)
    ckpts = {u.rsplit("/", 2)[-2] for u in storage.list_files(s3_prefix + "runs/submitted/")
             if u.endswith("weights.safetensors")}
    assert len(ckpts) == 2 and all(c.startswith("checkpoint_") for c in ckpts)

    c = MlflowClient(mlflow_uri)
    run = c.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "submitted"
    assert run.data.params["model.backbone.name"] == "test_tiny_vit" and run.data.params["train.steps"] == "12"
    assert run.data.params["job.workers"] == "2"
    for tag in ("config_hash", "manifest_hash", "git_sha"):
        assert len(run.data.tags[tag]) >= 7, tag
    loss = c.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in loss}) == list(range(1, 13))  # rank 0 logged every step
    for key in ("patch", "global", "esb", "eir", "grad_norm", "images_per_s", "use_patch", "val_score",
                "test_image_auroc", "test_textures_pixel_auroc"):
        assert key in run.data.metrics, key
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/calibration.json", "model/metrics.json",
            "model/parts.safetensors"} <= arts  # the segmentation travels with the model
    assert "eval/report.json" in {a.path for a in c.list_artifacts(run.info.run_id, "eval")}
    v = c.get_model_version_by_alias("anomalymoe-textures", "challenger")
    assert v.run_id == run.info.run_id and str(v.version) == summary["versions"]["textures"]
    assert v.tags["config_hash"] == run.data.tags["config_hash"] and v.tags["run_name"] == "submitted"
    assert float(v.tags["test_image_auroc"]) == pytest.approx(run.data.metrics["test_image_auroc"], abs=1e-6)
    # the registered artifact is the model the job wrote
    from anomalymoe.platform.tracking.registry import download

    got = download("models:/anomalymoe-textures@challenger", tmp_path / "dl")
    assert (got / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()

    # promote it (no champion yet: artifact, calibration and smoke gates), then the champion loaded from the
    # registry scores the test split exactly as logged at registration
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    r = subprocess.run([sys.executable, "jobs/promote.py", "--domain", "textures"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "promoted" in r.stdout, r.stdout + r.stderr
    assert c.get_model_version_by_alias("anomalymoe-textures", "champion").version == v.version
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", "models:/anomalymoe-textures@champion",
                        "--data", f"textures={tiny_data[0]}", "--out", str(tmp_path / "again")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = c.download_artifacts(run.info.run_id, "eval/report.json", str(tmp_path / "logged"))
    assert (tmp_path / "again" / "report.json").read_text() == Path(logged).read_text()


def test_killed_worker_resumes_from_last_checkpoint(ray_head, tiny_data, tmp_path, reference):
    """SIGKILL one training worker after the first checkpoint: Ray Train restarts the worker group from the
    latest checkpoint, the run ends at exactly STEPS steps, and its model equals the uninterrupted run's."""
    ref_summary, ref_out = reference
    out, log = tmp_path / "out", tmp_path / "log"
    args = train_args(tiny_data, "killed", str(tmp_path / "runs"), out, extra=("--no-register",))
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=driver_env(ray_head, tmp_path), stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_checkpoint(tmp_path / "runs" / "killed", proc, log)
        workers = [p for p in pids_matching("RayTrainWorker") if any("RayTrainWorker" in a for a in cmdline(p))]
        assert workers, "no training worker process found"
        os.kill(workers[-1], signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "resumed from step" in text, text[-4000:]
    resumed_at = int(text.split("resumed from step ")[1].split()[0])
    assert resumed_at % EVERY == 0 and 0 < resumed_at < STEPS
    summary = summary_of(text)
    assert summary["steps"] == STEPS
    # same data stream, RNGs re-derived at every checkpoint boundary: the resumed model is the uninterrupted one
    ref_w, got_w = weights(ref_out), weights(out)
    assert ref_w.keys() == got_w.keys()
    worst = max((ref_w[k].float() - got_w[k].float()).abs().max().item() for k in ref_w)
    assert worst < 1e-5, worst
    for k in ("test_image_auroc", "test_pixel_auroc", "val_score"):
        assert summary["metrics"][k] == pytest.approx(ref_summary["metrics"][k], abs=1e-4), k


def test_image_level_labels_train_evaluate_and_promote(ray_head, tiny_data, tmp_path):
    """A dataset in the MVTec layout without ground_truth/ (one label per image, no pixel masks, the common case in a
    plant): the job trains on it, says per category what it uses, reports image metrics and the pixel metrics as not
    covered (with counts and the reason), registers; promotion's gates compare two versions on what both have."""
    import shutil

    root = tmp_path / "image-level"
    shutil.copytree(tiny_data[0], root)
    for gt in root.glob("*/ground_truth"):
        shutil.rmtree(gt)
    env = driver_env(ray_head, tmp_path)

    def train(name: str, seed: int) -> tuple[dict, str]:
        args = ["jobs/train.py", "--config", str(tiny_data[1]), "--data", f"textures={root}", "--workers", "1",
                "--steps", "4", "--seed", str(seed), "--name", name, "--storage", str(tmp_path / "runs"),
                "--output", str(tmp_path / name), "--experiment", "itest"]
        return run_driver(args, env, tmp_path / f"{name}.log"), (tmp_path / f"{name}.log").read_text()

    summary, text = train("image-level", 0)
    assert ("[data] textures/brick: train 10 normal, calibration 2 normal, test 3 normal + 4 flagged (0 with pixel "
            "masks)") in text
    assert "[data] WARNING textures/brick: its threshold is fitted on 2 held-out normal images" in text
    report = json.loads((tmp_path / "image-level" / "eval" / "report.json").read_text())
    brick = report["categories"]["textures/brick"]
    assert 0.0 <= brick["image_auroc"] <= 1.0 and brick["pixel_auroc"] is None and brick["aupro"] is None
    counts = (brick["num_images"], brick["num_anomalous"], brick["pixel_images"], brick["pixel_anomalous"])
    assert counts == (7, 4, 3, 0)  # image metrics on all 7 test images, pixel metrics only on the 3 normal ones
    assert "need masks" in brick["pixel_note"] and "need masks" in report["domains"]["textures"]["pixel_note"]
    assert "| images | pixel |" in (tmp_path / "image-level" / "eval" / "metrics.md").read_text()

    def promote(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "jobs/promote.py", "--domain", "textures", *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    r = promote()
    assert r.returncode == 0 and "promoted" in r.stdout, r.stdout + r.stderr
    summary2, _ = train("image-level-2", 1)
    r = promote("--data", f"textures={root}", "--tolerance", "1")  # both evaluated now on the same images
    assert "pixel_auroc not compared: undefined on this data" in r.stdout, r.stdout + r.stderr
    assert "promoted" in r.stdout and summary2["versions"]["textures"] in r.stdout

    # and the champion is served over HTTP: a flagged image of the image-level set gets a scored answer
    import ray
    import requests
    from ray import serve

    from anomalymoe.platform.cluster.local.proc import free_port
    from anomalymoe.serve.app import deploy, wait_ready
    from anomalymoe.serve.config import DomainConfig, ServeConfig
    from anomalymoe.serve.tenants import TenantStore

    key = TenantStore(str(tmp_path / "tenants.json")).add("plant", ["textures"])
    cfg = ServeConfig(port=free_port(), tenants_uri=str(tmp_path / "tenants.json"),
                      domains=[DomainConfig(domain="textures", scorer_cpus=0.5, torch_threads=1)])
    flagged = next(p for p in sorted(root.glob("brick/test/*/*.png")) if p.parent.name != "good")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        ray.init(address=ray_head.address, log_to_driver=False)
        try:
            pinned = deploy(cfg, log_level="WARNING")
            assert pinned["textures"]["version"] == summary2["versions"]["textures"]  # the champion just promoted
            wait_ready(cfg, timeout=180)
            resp = requests.post(f"http://{cfg.host}:{cfg.port}/v1/textures/score?category=brick",
                                 data=flagged.read_bytes(), headers={"Authorization": f"Bearer {key}",
                                                                     "Content-Type": "image/png"}, timeout=120)
        finally:
            serve.shutdown()
            ray.shutdown()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"]["version"] == summary2["versions"]["textures"] and body["category"] == "textures/brick"
    assert isinstance(body["score"], float) and isinstance(body["is_anomaly"], bool)


def _strips(root: Path, n_train: int = 12, n_good: int = 3, n_bad: int = 4, size: tuple[int, int] = (128, 32)) -> None:
    """A long part in the MVTec layout: 4:1 grey strips (stripes + noise), test defects a dark blob with its mask."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size

    def strip() -> np.ndarray:
        x = np.arange(w)[None, :]
        a = 140 + 40 * np.sin(x / 5.0 + rng.uniform(0, 6)) + rng.normal(0, 6, (h, w))
        return np.clip(a, 0, 255).astype(np.uint8)

    for split, n in (("train", n_train), ("test", n_good)):
        (root / "strip" / split / "good").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(strip(), "L").save(root / "strip" / split / "good" / f"{i:03d}.png")
    (root / "strip" / "test" / "blob").mkdir(parents=True)
    (root / "strip" / "ground_truth" / "blob").mkdir(parents=True)
    for i in range(n_bad):
        a, m = strip(), np.zeros((h, w), np.uint8)
        x0 = int(rng.integers(4, w - 16))
        a[8:20, x0 : x0 + 12], m[8:20, x0 : x0 + 12] = 20, 255
        Image.fromarray(a, "L").save(root / "strip" / "test" / "blob" / f"{i:03d}.png")
        Image.fromarray(m, "L").save(root / "strip" / "ground_truth" / "blob" / f"{i:03d}_mask.png")


def test_wide_images_keep_their_shape_through_training_evaluation_and_the_service(ray_head, tmp_path):
    """A 4:1 part letterboxed per category (model.input.categories in the config): the job says so and fits its
    parts on letterboxed images; the evaluation scores the image's pixels only (the black bands are not counted);
    the service scores it exactly as the evaluation did, with or without ?category= (an inferred category framed
    otherwise is scored again through its own frame), and returns the map at the image's own 128 x 32."""
    import base64
    import csv
    import io

    from PIL import Image

    root = tmp_path / "plant"
    _strips(root)
    cfg = tmp_path / "wide.yaml"
    cfg.write_text(CONFIG + "model: {input: {categories: {plant/strip: {aspect: letterbox}}}}\n")
    env = driver_env(ray_head, tmp_path)
    out = tmp_path / "wide"
    args = ["jobs/train.py", "--config", str(cfg), "--data", f"plant={root}", "--workers", "1", "--steps", "4",
            "--name", "wide", "--storage", str(tmp_path / "runs"), "--output", str(out), "--experiment", "itest",
            "--no-register"]
    run_driver(args, env, tmp_path / "wide.log")
    text = (tmp_path / "wide.log").read_text()
    assert "[data] plant/strip: aspect letterbox, intensity type" in text
    assert "[parts] plant/strip: no segmentation from jobs/segment.py for its frame (letterbox" in text
    report = json.loads((out / "eval" / "report.json").read_text())
    strip = report["categories"]["plant/strip"]
    # 56 x 14 pixels of each of the 7 test images (3 normal + 4 with masks): the image, not the 56 x 56 square
    assert strip["pixel_images"] == 7 and strip["pixels"] == 7 * 56 * 14
    assert strip["pixel_auroc"] is not None and strip["image_auroc"] is not None
    assert list((out / "eval" / "panels" / "plant" / "strip").glob("*.png"))
    with open(out / "eval" / "scores.csv") as f:
        evaluated = {Path(r["uri"]).name + r["defect"]: float(r["score"]) for r in csv.DictReader(f)}

    import ray
    import requests
    from ray import serve

    from anomalymoe.platform.cluster.local.proc import free_port
    from anomalymoe.serve.app import deploy, wait_ready
    from anomalymoe.serve.config import DomainConfig, ServeConfig
    from anomalymoe.serve.tenants import TenantStore

    key = TenantStore(str(tmp_path / "tenants.json")).add("plant", ["plant"])
    scfg = ServeConfig(port=free_port(), tenants_uri=str(tmp_path / "tenants.json"),
                       domains=[DomainConfig(domain="plant", model=str(out / "model"), scorer_cpus=0.5,
                                             torch_threads=1)])
    flagged = root / "strip" / "test" / "blob" / "001.png"
    url = f"http://{scfg.host}:{scfg.port}/v1/plant/score"
    head = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
    ray.init(address=ray_head.address, log_to_driver=False)
    try:
        deploy(scfg, log_level="WARNING")
        wait_ready(scfg, timeout=180)
        named = requests.post(f"{url}?category=strip&map=true", data=flagged.read_bytes(), headers=head, timeout=120)
        inferred = requests.post(url, data=flagged.read_bytes(), headers=head, timeout=120)
    finally:
        serve.shutdown()
        ray.shutdown()
    assert named.status_code == 200 and inferred.status_code == 200, (named.text, inferred.text)
    body = named.json()
    assert body["score"] == pytest.approx(evaluated["001.pngblob"], rel=1e-4, abs=1e-5)
    assert inferred.json()["category"] == "plant/strip" and inferred.json()["category_inference"]["inferred"]
    assert inferred.json()["score"] == pytest.approx(body["score"], rel=1e-4, abs=1e-5)
    amap = body["anomaly_map"]
    assert (amap["width"], amap["height"], amap["size"]) == (128, 32, 56)
    assert Image.open(io.BytesIO(base64.b64decode(amap["png_base64"]))).size == (128, 32)


def test_killed_driver_rerun_with_same_name_resumes(ray_head, tiny_data, tmp_path, reference):
    """Kill the driver (the `python jobs/train.py` process) after a checkpoint; the same command again resumes
    that run: same MLflow run, training continues from the checkpoint and ends at STEPS."""
    ref_summary, ref_out = reference
    out = tmp_path / "out"
    args = train_args(tiny_data, "driver", str(tmp_path / "runs"), out, extra=("--no-register",))
    env = driver_env(ray_head, tmp_path)
    log1 = tmp_path / "log1"
    with log1.open("w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_checkpoint(tmp_path / "runs" / "driver", proc, log1)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    first_run = log1.read_text().split(" run ", 2)[-1].split()[0]
    deadline = time.monotonic() + 60  # Ray ends a dead driver's workers; let it finish before rerunning
    while [p for p in pids_matching("RayTrainWorker") if any("RayTrainWorker" in a for a in cmdline(p))]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    summary = run_driver(args, env, tmp_path / "log2")
    text = (tmp_path / "log2").read_text()
    assert "resumed from step" in text and "[mlflow] resuming run" in text, text[-4000:]
    assert int(text.split("resumed from step ")[1].split()[0]) >= EVERY
    assert summary["steps"] == STEPS and summary["run_id"] == first_run
    worst = max((a.float() - b.float()).abs().max().item()
                for a, b in zip(weights(ref_out).values(), weights(out).values(), strict=True))
    assert worst < 1e-5, worst


def test_one_and_two_workers_give_matching_loss_curves(ray_head, tiny_data, tmp_path, reference):
    """Same global batch (4): 1 worker with 4 images per step vs 2 workers with 2 each see the same images per
    step; the loss curves agree within a tolerance (batch statistics such as ESB are per rank, and the ranks'
    noise streams differ)."""
    ref_summary, ref_out = reference
    run_driver(train_args(tiny_data, "one", str(tmp_path / "runs"), tmp_path / "one", workers=1,
                          extra=("--no-register",)), driver_env(ray_head, tmp_path), tmp_path / "log")

    def curve(out: Path) -> dict[int, float]:
        return {int(r["step"]): r["loss"] for r in json.loads((out / "history.json").read_text())}

    one, two = curve(tmp_path / "one"), curve(ref_out)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    diff = [abs(one[s] - two[s]) for s in one]
    rel = sorted(d / max(abs(two[s]), 1e-6) for d, s in zip(diff, one, strict=True))
    span = max(two.values()) - min(two.values())
    # measured: median 2 % and mean |diff| 2 % of the curve's range; a single step may differ more where one
    # expert's routing flips (the tiny random-backbone model's router is near a tie)
    assert rel[len(rel) // 2] < 0.10, rel
    assert sum(diff) / len(diff) < 0.05 * span, (diff, span)
    assert one[STEPS] < one[1] and two[STEPS] < two[1]  # both learn


def test_tune_runs_trials_stops_some_early_and_registers_the_best(ray_head, tiny_data, tmp_path):
    """jobs/tune.py: 4 trials (each a Ray Train run), ASHA stops at least one at a validation rung, MLflow holds a
    parent run with one child per trial, and the best finished trial's model is registered with its config."""
    from mlflow import MlflowClient

    env = driver_env(ray_head, tmp_path)
    summary = run_driver(["jobs/tune.py", "--config", str(tiny_data[1]), "--data", f"textures={tiny_data[0]}",
                          "--steps", "16", "--trials", "4", "--name", "search", "--storage", str(tmp_path / "runs"),
                          "--output", str(tmp_path / "out"), "--experiment", "itune"], env, tmp_path / "log",
                         timeout=900)
    assert summary["trials"] == 4 and summary["stopped_early"] >= 1, summary
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = c.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == summary["best_trial"]
    assert "best_val_score" in parent.data.metrics
    exp = parent.info.experiment_id
    children = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    stopped = [r for r in children if r.data.tags.get("stopped_early") == "true"]
    assert len(stopped) == summary["stopped_early"] and all(r.info.status == "KILLED" for r in stopped)
    best = next(r for r in children if r.data.tags["trial_id"] == summary["best_trial"])
    assert best.info.status == "FINISHED" and best.data.metrics["step"] == 16  # ran every step
    assert best.data.params["train.lr"] == str(summary["best_config"]["train.lr"])
    assert {"loss", "val_score", "test_image_auroc"} <= set(best.data.metrics)
    v = c.get_model_version_by_alias("anomalymoe-textures", "challenger")
    assert v.run_id == best.info.run_id and str(v.version) == summary["versions"]["textures"]
    assert v.tags["tune_parent_run"] == parent.info.run_id
    assert float(v.tags["tune.train.lr"]) == pytest.approx(summary["best_config"]["train.lr"])
    cfg = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["model"]
    for key, value in summary["best_config"].items():  # the registered model is built with the best config
        section, name = key.split(".")
        if section != "train" and not key.startswith("router.top_k"):
            assert cfg[section][name] == value, key
    trials = (tmp_path / "out" / "trials.csv").read_text().splitlines()
    assert len(trials) == 5 and "val_score" in trials[0]


def _restart_mlflow(state: Path, port: int):
    """The same server (database, artifacts, port) again; the killed one's port may linger a moment."""
    from anomalymoe.platform.cluster.local.mlflow import LocalMLflow
    from anomalymoe.platform.cluster.local.proc import LocalServerError

    deadline = time.monotonic() + 60
    while True:
        try:
            return LocalMLflow(state, port, tie_to_parent=True).start()
        except LocalServerError:
            assert time.monotonic() < deadline, "MLflow could not be restarted on its port"
            time.sleep(1)


def _wait_for_line(log: Path, proc: subprocess.Popen, needle: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"no {needle!r} in the job log"
        time.sleep(0.2)


def _steps_seen(log: Path) -> int:
    import re

    found = re.findall(r"\[train\] step (\d+)/", log.read_text())
    return int(found[-1]) if found else 0


def test_mlflow_killed_during_training(ray_head, tiny_data, tmp_path):
    """The MLflow server is SIGKILLed mid-run and comes back later: training goes on meanwhile (rank 0's logger
    queues, never waits), the job retries its MLflow calls, and once MLflow is back the run is complete — every
    step's metrics (queued or backfilled from the checkpointed history), the artifacts, FINISHED, a registered
    version. If MLflow stays away past ANOMALYMOE_MLFLOW_WAIT_S the job fails with a message that says nothing is
    lost and how to finish, and the model is on disk."""
    from mlflow import MlflowClient

    from anomalymoe.platform.cluster.local.mlflow import LocalMLflow

    server = LocalMLflow(tmp_path / "mlflow", tie_to_parent=True).start()
    port, steps = server.port, 30
    env = {**driver_env(ray_head, tmp_path), "MLFLOW_TRACKING_URI": server.uri, "ANOMALYMOE_MLFLOW_WAIT_S": "300"}
    log, out = tmp_path / "log", tmp_path / "out"
    args = train_args(tiny_data, "outage", str(tmp_path / "runs"), out, workers=1, steps=steps)
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    back = None
    try:
        _wait_for_line(log, proc, "[train] step 3/")
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, no goodbye
        killed_at = _steps_seen(log)
        t0 = time.monotonic()
        while _steps_seen(log) < killed_at + 5 and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        trained_while_down = _steps_seen(log) - killed_at
        back = _restart_mlflow(tmp_path / "mlflow", port)
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    print(f"MLflow killed at step {killed_at}; {trained_while_down} steps trained while it was down")
    assert trained_while_down >= 5, text[-3000:]  # training did not wait for MLflow
    assert "MLflow unreachable" in text
    summary = summary_of(text)
    c = MlflowClient(back.uri)
    run = c.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert {m.step for m in c.get_metric_history(run.info.run_id, "loss")} == set(range(1, steps + 1))
    assert "model/model.safetensors" in {a.path for a in c.list_artifacts(run.info.run_id, "model")}
    v = c.get_model_version_by_alias("anomalymoe-textures", "challenger")
    assert v.run_id == run.info.run_id and str(v.version) == str(summary["versions"]["textures"])

    # MLflow gone for good: a loud failure after the wait, nothing lost
    env["ANOMALYMOE_MLFLOW_WAIT_S"] = "8"
    out2 = tmp_path / "out2"
    args = train_args(tiny_data, "gone", str(tmp_path / "runs"), out2, workers=1, steps=6)
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for_line(log, proc, "[train] step 2/")
        os.killpg(back.pid, signal.SIGKILL)
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 1 and "Nothing is lost" in text and "--name gone" in text, text[-3000:]
    assert (out2 / "model" / "model.safetensors").is_file() and (out2 / "eval" / "report.json").is_file()
