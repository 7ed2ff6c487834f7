"""A training job, the driver's side: the JobSpec (what to train, on what, where), preparing the data and parts,
running the worker loop (train/loop.py) on Ray Train inside an MLflow run (tracking/runs.py), and the finish:
calibrate, evaluate, save, log, register.
How the workers train, checkpoint and resume: train/loop.py."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from anomalymoe.models.config import ModelConfig
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.precision import describe
from anomalymoe.paths import REPO_ROOT
from anomalymoe.platform.cluster.ray import connect_ray
from anomalymoe.platform.data.manifest import manifest_hash
from anomalymoe.platform.data.pipeline import category_batches, to_device
from anomalymoe.platform.data.transforms import Framing
from anomalymoe.platform.tracking.runs import (
    MLflowRetry,
    MLflowUnavailable,
    backfill_history,
    fail_fast_mlflow_http,
    flatten_params,
    git_sha,
    mlflow_run,
)
from anomalymoe.platform.train.loop import (
    HISTORY,
    LoopConfig,
    cpus_per_worker,
    fit_on_ray,
    model_from_checkpoint,
)
from anomalymoe.platform.train.trainer import TrainConfig, seed_everything

log = logging.getLogger(__name__)



def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


# ------------------------------------------------------------------------------------------ the job
@dataclass
class JobSpec:
    """A training job as jobs/train.py's flags describe it."""

    model: ModelConfig
    train: TrainConfig
    data: list[str] = field(default_factory=lambda: ["demo"])
    domains: list[str] | None = None
    workers: int = 1
    gpu: bool = False
    storage: str = str(REPO_ROOT / "outputs" / "ray_runs")
    output: str | None = None
    experiment: str = "anomalymoe"
    name: str | None = None
    checkpoint_every: int = 50
    val_every: int = 0
    log_every: int = 10
    holdout: float = 0.2
    alpha: float = 0.0
    loader: str = "ray"
    max_failures: int = 3
    skip_bad_rows: bool = False
    segment_k: int = 6
    register: bool = True
    address: str | None = None
    demo_root: str = str(REPO_ROOT / "outputs" / "demo" / "data")


def _prepare_data(spec: JobSpec, model: AnomalyMoE):
    from anomalymoe.platform.data.manifest import ensure_valid
    from anomalymoe.platform.data.pipeline import holdout_split
    from anomalymoe.platform.data.segmentation import SegmentParams, prepare_parts
    from anomalymoe.platform.data.sources import (
        check_calibration_split,
        describe_categories,
        describe_framing,
        resolve_data,
    )

    df, kept = resolve_data(spec.data, demo_root=spec.demo_root, seed=spec.train.seed, domains=spec.domains)
    df = ensure_valid(df, skip_bad_rows=spec.skip_bad_rows, required_splits=("train",))
    framing = Framing.for_model(model.cfg)
    for line in describe_framing(model.cfg, df):
        print(line, flush=True)
    # Every category gets its part segmentation inside the model (loaded from jobs/segment.py's output, else fitted
    # here); the model then derives component masks from its own backbone pass on every path, so no label maps are
    # read: `kept` stays only for categories it does not cover (none, once every category is prepared).
    model.parts = prepare_parts(model.backbone, df, SegmentParams(k=spec.segment_k, seed=spec.train.seed),
                                log=lambda m: print(m, flush=True), framing=framing)
    kept = {k: v for k, v in kept.items() if not model.parts.covers(k)}
    normal = df[(df["split"] == "train") & (df["label"] == 0)]
    train, held = holdout_split(normal, spec.holdout, seed=spec.train.seed)
    if train.empty:
        raise ValueError("no training images left after the calibration hold-out")
    for line in describe_categories(df, train, held):
        print(line, flush=True)
    for warning in check_calibration_split(normal, held, spec.holdout):
        print(f"[data] WARNING {warning}", flush=True)
    return df, kept, train.reset_index(drop=True), held.reset_index(drop=True)


@dataclass
class Prepared:
    """The driver's side of a run before training: its model copy, data and the tags every run logs."""

    model: AnomalyMoE
    model_cfg: dict
    df: pd.DataFrame
    kept: dict
    train: pd.DataFrame
    held: pd.DataFrame
    domains: list[str]
    tags: dict[str, str]


def prepare(spec: JobSpec) -> Prepared:
    seed_everything(spec.train.seed)
    model = AnomalyMoE(spec.model)  # the driver's copy: segmentation (demo), then the final weights
    model_cfg = model.cfg.to_dict()  # with the backbone's weight hash filled in
    df, kept, train, held = _prepare_data(spec, model)
    domains = sorted(train["domain"].unique())
    tags = {"config_hash": model.cfg.config_hash(), "manifest_hash": manifest_hash(df), "git_sha": git_sha(),
            "domains": ",".join(domains), "workers": str(spec.workers)}
    return Prepared(model, model_cfg, df, kept, train, held, domains, tags)


def loop_config(spec: JobSpec, prep: Prepared, run_name: str, run_id: str | None, threads: int,
                model_cfg: dict | None = None, train: dict | None = None) -> LoopConfig:
    from anomalymoe.platform.tracking import registry

    return LoopConfig(model=model_cfg or prep.model_cfg, train=train or spec.train.model_dump(mode="json"),
                      rows=prep.train, kept=prep.kept, parts=prep.model.parts.state(),
                      val_rows=prep.held if len(prep.held) >= 2 else None,
                      alpha=spec.alpha, checkpoint_every=spec.checkpoint_every, val_every=spec.val_every,
                      log_every=spec.log_every, loader=spec.loader, threads=threads, run_name=run_name,
                      mlflow={"tracking_uri": registry.tracking_uri(), "run_id": run_id} if run_id else {})


def finish_device(gpu: bool) -> torch.device:
    """Where the driver calibrates and evaluates: its GPU when the job trains on GPUs and the driver has one (the
    model is then calibrated in bf16, the precision it is served in on a GPU), else the CPU, said in the log."""
    if gpu and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    if gpu:
        print("[calibrate] this driver has no GPU: calibration and evaluation run on its CPU (give the Ray head a GPU "
              "to run them there)", flush=True)
    return torch.device("cpu")


def finish(prep: Prepared, model: AnomalyMoE, history: list[dict], run_id: str, run_name: str, out: Path, *,
           steps: int, register: bool, extra_tags: dict[str, str] | None = None, t0: float | None = None,
           device: str | torch.device = "cpu") -> dict[str, Any]:
    """After training (driver): calibrate on the held-out normals, evaluate the test split, save the artifact, log
    metrics and artifacts to the MLflow run, register a version per domain (alias challenger). Returns a summary.
    Calibration and evaluation run on `device` (finish_device)."""
    from mlflow.entities import Metric

    from anomalymoe.models.artifact import save_artifact
    from anomalymoe.platform.evaluation.evaluate import evaluate, metrics_table
    from anomalymoe.platform.tracking import registry
    from anomalymoe.platform.train.validation import bank_batches, calibrate

    c = registry.client()
    frame = Framing.for_model(model.cfg)
    dev = torch.device(device)
    model.parts = prep.model.parts  # the segmentation the workers trained with: the artifact carries it
    model.to_device(dev)

    print(f"[calibrate] on {len(prep.held)} held-out normal images ({dev})", flush=True)
    calibrate(model, lambda: (to_device(b, dev) for b in category_batches(prep.held, frame, prep.kept)),
              reference=bank_batches(prep.train, frame, prep.kept, dev))
    banks = {k: v.bank.shape[0] for k, v in model.parts.categories.items() if v.bank is not None}
    if banks:
        print("[parts] part bank (what each part looks like on normal training images): "
              + ", ".join(f"{k} {n} images" for k, n in sorted(banks.items())), flush=True)
    test = prep.df[prep.df["split"] == "test"]
    report = None
    if not test.empty:
        print(f"[evaluate] {len(test)} test images", flush=True)
        report = evaluate(model, test, out_dir=out / "eval", kept=prep.kept, progress=False)
        print(metrics_table(report), flush=True)
    # the device and precision the calibration was fitted in: scoring elsewhere (jobs/evaluate.py, a GPU scorer)
    # says so when it differs
    save_artifact(model, out / "model", metrics=report,
                  extra={"calibrated_on": describe(dev, model.inference_precision)})
    write_json(out / HISTORY, history)
    final = {k: float(v) for k, v in (history[-1] if history else {}).items() if isinstance(v, int | float)}
    if report is not None:
        final.update({f"test_{k}": float(v) for k, v in report["mean"].items() if isinstance(v, float) and v == v})
        for d, r in report.get("domains", {}).items():
            final.update({f"test_{d}_{k}": float(v) for k, v in r.items() if isinstance(v, float) and v == v})
    if t0 is not None:
        final["run_seconds"] = time.perf_counter() - t0  # start to evaluated model
    # everything is on disk now (nothing is lost if MLflow is away); MLflow calls wait for the server to come back
    call = MLflowRetry(out, run_name)
    call(lambda: backfill_history(c, run_id, history), "metric history")
    now = int(time.time() * 1000)
    call(lambda: c.log_batch(run_id, metrics=[Metric(k, v, now, steps) for k, v in final.items() if np.isfinite(v)]),
         "final metrics")
    call(lambda: c.log_artifacts(run_id, str(out / "model"), registry.ARTIFACT_PATH), "model artifact")
    if (out / "eval").is_dir():
        call(lambda: c.log_artifacts(run_id, str(out / "eval"), "eval"), "evaluation report")
    call(lambda: c.log_artifact(run_id, str(out / HISTORY)), "history")
    versions = {}
    if register:
        vtags = {**prep.tags, **(extra_tags or {}), "run_name": run_name, "steps": str(steps),
                 **{k: f"{v:.6f}" for k, v in final.items() if k.startswith(("test_", "val_"))}}
        for d in prep.domains:
            versions[d] = call(lambda d=d: registry.register(run_id, d, vtags), f"registration of {d}")
            print(f"[registry] {registry.model_name(d)} version {versions[d]} -> alias {registry.CHALLENGER}",
                  flush=True)
    summary = {"run_name": run_name, "run_id": run_id, "versions": versions, "output": str(out),
               "steps": int(final.get("step", steps)), "metrics": final}
    write_json(out / "summary.json", summary)
    return summary


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Train on Ray, then finish on the driver (calibrate, evaluate, save, log, register). Returns a summary."""
    from anomalymoe.platform.tracking import registry

    t0 = time.perf_counter()
    fail_fast_mlflow_http()
    prep = prepare(spec)
    run_name = spec.name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(spec.output) if spec.output else REPO_ROOT / "outputs" / "train" / run_name
    params = flatten_params("", {"model": prep.model_cfg, "train": spec.train.model_dump(mode="json"),
                           "job": {"data": spec.data, "workers": spec.workers, "holdout": spec.holdout,
                                   "alpha": spec.alpha, "storage": spec.storage}}, {})
    try:
        run_id = mlflow_run(spec.experiment, run_name, prep.tags, params)
    except Exception as e:  # noqa: BLE001 - MlflowException, connection errors: nothing has started yet
        raise MLflowUnavailable(f"MLflow at {registry.tracking_uri()} cannot open the run ({str(e)[:300]}); "
                                "nothing was started") from None
    print(f"[train] run {run_name}: {len(prep.train)} training images ({', '.join(prep.domains)}), "
          f"{len(prep.held)} held out; {spec.workers} worker(s), {spec.train.steps} steps, global batch "
          f"{spec.train.batch_size}; checkpoints -> {spec.storage}/{run_name}; MLflow {registry.tracking_uri()} "
          f"run {run_id}", flush=True)
    connect_ray(spec.address)
    cpus = cpus_per_worker(spec.workers)
    c = registry.client()
    try:
        result = fit_on_ray(loop_config(spec, prep, run_name, run_id, cpus), workers=spec.workers,
                            storage_uri=spec.storage, gpu=spec.gpu, max_failures=spec.max_failures,
                            cpus_per_worker=cpus)
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}")
        model, history = model_from_checkpoint(result.checkpoint, prep.model_cfg)
        summary = finish(prep, model, history, run_id, run_name, out, steps=spec.train.steps,
                         register=spec.register, t0=t0, device=finish_device(spec.gpu))
        MLflowRetry(out, run_name)(lambda: c.set_terminated(run_id, "FINISHED"), "run status")
    except BaseException:
        try:
            c.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            log.warning("could not mark MLflow run %s failed", run_id)
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "summary.json", summary)
    return summary


def reusable_summary(output: str | Path, run_name: str) -> dict[str, Any] | None:
    """The summary.json a finished run `run_name` left in `output`, when its registered versions are still in the
    registry (a job run again with the same setting can reuse it instead of training again); else None."""
    from anomalymoe.platform.tracking import registry

    p = Path(output) / "summary.json"
    if not p.is_file():
        return None
    s = json.loads(p.read_text())
    if s.get("run_name") != run_name or not s.get("versions"):
        return None
    c = registry.client()
    try:
        for d, v in s["versions"].items():
            c.get_model_version(registry.model_name(d), str(v))
    except Exception:  # noqa: BLE001 - a missing version (or store) means: train again
        return None
    return s
