"""Distributed training on Ray Train (V2 API): the per-worker loop, and the driver that wraps it in an MLflow run,
then calibrates, evaluates, saves and registers the model.

Data parallel, with our own gradient averaging (distributed.average_gradients) instead of DDP's wrapper: the
experts are sparse, so a rank may have no gradient for an expert another rank used; averaging fills zeros
and keeps every rank's parameters identical. Each step's global batch is fixed by (data, seed, global batch)
(pipeline.step_rows) and rank r decodes its slice through Ray Data (pipeline.ray_rows), so 1 and 2 workers
see the same images per step and a resumed run continues the same stream.

Checkpoints (checkpoint.save_training_state: trainable weights, both optimisers, step, every RNG, configs) go
to the run's storage (local or s3://) every `checkpoint_every` steps through ``ray.train.report``. A restarted
worker group (FailureConfig retries) or a rerun with the same run name and storage resumes from the latest
one; the step-indexed data stream makes the resumed run end at exactly the configured step."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from anomalymoe.models.config import ModelConfig
from anomalymoe.models.model import AnomalyMoE
from anomalymoe.models.parts import Parts
from anomalymoe.models.precision import describe
from anomalymoe.platform.data import storage
from anomalymoe.platform.data.manifest import manifest_hash
from anomalymoe.platform.data.pipeline import (
    Framing,
    category_batches,
    load_rows,
    prefetch,
    ray_rows,
    row_keys,
    step_rows,
    to_batch,
    to_device,
)
from anomalymoe.platform.train.checkpoint import load_training_state, load_weights, save_training_state
from anomalymoe.platform.train.trainer import TrainConfig, Trainer, seed_everything

log = logging.getLogger(__name__)

from anomalymoe.paths import REPO_ROOT  # noqa: E402

HISTORY = "history.json"
LOGGED = ("loss", "patch", "global", "component", "esb", "eir", "estimator_nll", "grad_norm", "lr")


@dataclass
class LoopConfig:
    """What every worker needs (plain data: Ray ships it to the workers)."""

    model: dict
    train: dict
    rows: pd.DataFrame  # normal training rows (the calibration hold-out already removed)
    kept: dict[str, list[int]] = field(default_factory=dict)
    parts: dict = field(default_factory=dict)  # the model's part segmentation (models/parts.Parts.state())
    val_rows: pd.DataFrame | None = None  # held-out normal rows for validation (rank 0)
    alpha: float = 0.0
    checkpoint_every: int = 50
    val_every: int = 0  # 0: validate only at the end
    log_every: int = 10
    loader: str = "ray"  # "ray": Ray Data decode tasks; "local": in-process (tests, debugging)
    threads: int = 0
    mlflow: dict = field(default_factory=dict)  # {"tracking_uri", "run_id"}: rank 0 logs metrics there
    run_name: str = ""


# ------------------------------------------------------------------------------------------ worker side
def _batches(cfg: LoopConfig, tcfg: TrainConfig, frame: Framing, start: int, rank: int, world: int):
    """(images, masks, "domain/category" keys) for steps start, start+1, ... on this rank; one Ray Dataset per
    epoch's remainder."""
    local = tcfg.batch_size // world
    per_epoch = max(1, len(cfg.rows) // tcfg.batch_size)
    step = start
    while step < tcfg.steps:
        stop = min(tcfg.steps, (step // per_epoch + 1) * per_epoch)
        rows = step_rows(cfg.rows, step, tcfg.batch_size, seed=tcfg.seed, alpha=cfg.alpha, rank=rank, world=world,
                         stop=stop)
        if cfg.loader == "local":
            # decode threads + two batches ahead: one PNG at a time kept a GPU waiting (issue 12)
            yield from prefetch(((*load_rows(rows.iloc[i : i + local], frame, cfg.kept, threads=cfg.threads),
                                  row_keys(rows.iloc[i : i + local])) for i in range(0, len(rows), local)), depth=2)
        else:  # decode tasks take no CPU of their own: the training workers hold the CPUs they run on
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False  # job logs: our own progress lines
            ds = ray_rows(rows, frame, read_concurrency=max(2, cfg.threads), num_cpus=0)
            for b in ds.iter_batches(batch_size=local, batch_format="pandas", prefetch_batches=2, drop_last=False):
                yield (*to_batch(b, cfg.kept), row_keys(b))
        step = stop


def _fail_fast_mlflow_http() -> None:
    """MLflow's HTTP client retries a refused connection for minutes by default (7 tries, exponential backoff),
    blocking the caller; our callers retry themselves, on their own schedule. A user's own setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class _MLflowLogger:
    """Rank 0's metric logging, off the training loop: `log` only queues; a background thread sends the queue every
    few seconds and keeps it while MLflow is unreachable (one warning per outage), so a dead or slow MLflow server
    never stalls training. `close` makes a bounded last attempt; the driver backfills whatever is still missing
    from the history every checkpoint carries (finish)."""

    def __init__(self, spec: dict, interval: float = 2.0):
        import threading

        self.client, self.run_id, self.pending = None, spec.get("run_id"), []
        self.interval, self.down_since = interval, None
        self._lock, self._stop = threading.Lock(), threading.Event()
        if not self.run_id:
            return
        _fail_fast_mlflow_http()
        from mlflow import MlflowClient

        self.client = MlflowClient(spec["tracking_uri"])
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]

    def flush(self) -> bool:
        with self._lock:
            batch = list(self.pending)
        try:
            for i in range(0, len(batch), 500):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 500])
        except Exception as e:  # noqa: BLE001 - MLflow/HTTP errors vary; keep the points, retry later
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("MLflow unreachable (%s): training goes on, %d metric points kept and retried",
                            str(e)[:200], len(batch))
            return False
        with self._lock:
            self.pending = self.pending[len(batch):]
        if self.down_since is not None:
            log.warning("MLflow reachable again after %.0f s: %d queued metric points sent",
                        time.monotonic() - self.down_since, len(batch))
            self.down_since = None
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.pending:
                self.flush()

    def close(self, timeout: float = 30.0) -> None:
        if self.client is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self.pending and not self.flush() and time.monotonic() < deadline:
            time.sleep(2.0)
        if self.pending:
            log.warning("%d metric points not sent to MLflow; the driver logs them from the run's history",
                        len(self.pending))


def _reseed(trainer: Trainer, seed: int, rank: int, step: int) -> None:
    """Every RNG from (seed, rank, step), at each checkpoint boundary: ranks draw independent dropout and jitter
    noise, and a run resumed from the checkpoint at `step` draws exactly what the uninterrupted run drew (the
    checkpoint's own RNG state is rank 0's only)."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    seed_everything(s)
    trainer.generator.manual_seed(s)


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    import ray.train

    from anomalymoe.platform.train.distributed import average_gradients, mean_over_ranks

    cfg: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tcfg = TrainConfig(**cfg.train)
    if tcfg.batch_size % world:
        raise ValueError(f"batch size {tcfg.batch_size} must be divisible by the {world} workers")
    seed_everything(tcfg.seed)  # the same initial weights on every rank
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the global experts' convs: cuDNN picks its kernels per shape once
    model = AnomalyMoE(ModelConfig.from_dict(cfg.model))
    model.parts = Parts.from_state(cfg.parts)  # component masks from the model's own backbone pass
    model.to_device(device)
    # bf16 autocast on CUDA, float32 on CPUs (precision.py); gradients averaged on the device (NCCL or gloo)
    trainer = Trainer(model, tcfg, grad_sync=average_gradients if world > 1 else None)
    ckpt = ray.train.get_checkpoint()
    history: list[dict] = []  # rank 0's reports, carried in every checkpoint (so a resumed run has all of them)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            load_training_state(d, trainer)
            history = read_history(d)
        if rank == 0:
            print(f"[train] resumed from step {trainer.step_num} ({ckpt.path})", flush=True)
    frame = Framing.for_model(model.cfg)
    mlf = _MLflowLogger(cfg.mlflow) if rank == 0 else None
    start_step, t_start, n_imgs = trainer.step_num, time.perf_counter(), 0
    times = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    it = _batches(cfg, tcfg, frame, trainer.step_num, rank, world)
    t_data = time.perf_counter()
    while trainer.step_num < tcfg.steps:
        if trainer.step_num % cfg.checkpoint_every == 0:
            _reseed(trainer, tcfg.seed, rank, trainer.step_num)
        images, masks, cats = next(it)
        times["data"] += time.perf_counter() - t_data
        images, masks = to_device((images, masks), device)
        rec = trainer.step(images, masks, cats)
        for k in ("forward", "backward", "optimizer"):
            times[k] += rec[f"time_{k}"]
        n_imgs += images.shape[0] * world
        step = trainer.step_num
        last = step == tcfg.steps
        if step % cfg.log_every and step % cfg.checkpoint_every and not last:
            t_data = time.perf_counter()
            continue
        keys = LOGGED + tuple(k for k in rec if k.startswith(("use_", "esb")) and k not in LOGGED)
        metrics = mean_over_ranks({k: rec[k] for k in keys if k in rec}, device)
        elapsed = time.perf_counter() - t_start
        metrics["images_per_s"] = n_imgs / max(elapsed, 1e-9)
        metrics.update({f"time_{k}": v / max(1, step - start_step) for k, v in times.items()})
        metrics["step"] = step
        if rank == 0 and cfg.val_rows is not None and len(cfg.val_rows) >= 2 and (
                last or (cfg.val_every and step % cfg.val_every == 0)):
            from anomalymoe.platform.train.validation import validate

            metrics.update(validate(model, lambda: category_batches(cfg.val_rows, frame, cfg.kept), seed=tcfg.seed))
        if rank == 0:
            eta = (tcfg.steps - step) * elapsed / max(1, step - start_step)
            parts = " ".join(f"{k}={metrics[k]:.4f}" for k in ("loss", "patch", "global", "component", "esb", "eir")
                             if k in metrics)
            val = f" val_score={metrics['val_score']:.3f}" if "val_score" in metrics else ""
            print(f"[train] step {step}/{tcfg.steps} {parts} grad_norm={metrics['grad_norm']:.3f} "
                  f"{metrics['images_per_s']:.1f} img/s ETA {eta:.0f}s{val}", flush=True)
            mlf.log({k: v for k, v in metrics.items() if k != "step"}, step)
            history.append(metrics)
        checkpoint = None
        with tempfile.TemporaryDirectory() as d:
            if rank == 0 and (step % cfg.checkpoint_every == 0 or last):
                save_training_state(d, trainer, extra={"run_name": cfg.run_name})
                (Path(d) / HISTORY).write_text(json.dumps(history) + "\n")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        t_data = time.perf_counter()
    if mlf is not None:
        mlf.close()


# ------------------------------------------------------------------------------------------ driver side
def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def storage_config(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a local dir as is; s3:// through the storage layer's pyarrow
    filesystem (the same endpoint and credential rules as every other S3 access: storage.pyarrow_filesystem)."""
    if not storage.is_s3(uri):
        return str(Path(uri).resolve()), None
    return uri.removeprefix("s3://").rstrip("/"), storage.pyarrow_filesystem()


def fit_on_ray(loop: LoopConfig, *, workers: int, storage_uri: str, gpu: bool = False, max_failures: int = 3,
               cpus_per_worker: float = 1.0):
    """Run train_loop on `workers` Ray Train workers; returns the Ray Train Result (its checkpoint = the final
    training state)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    path, fs = storage_config(storage_uri)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=loop.run_name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def read_history(directory: str | os.PathLike[str]) -> list[dict]:
    p = Path(directory) / HISTORY
    return json.loads(p.read_text()) if p.is_file() else []


def model_from_checkpoint(checkpoint, model_cfg: dict) -> tuple[AnomalyMoE, list[dict]]:
    """The trained model and the run's metric history (one row per report) from the final checkpoint."""
    model = AnomalyMoE(ModelConfig.from_dict(model_cfg))
    with checkpoint.as_directory() as d:
        load_weights(d, model)
        history = read_history(d)
    return model.eval(), history


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


def _flatten(prefix: str, d: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(d) if isinstance(d, list | tuple) else str(d)
    return out


def connect_ray(address: str | None) -> None:
    """Inside `ray job submit` the job's runtime env (working dir) already ships this code. A driver started by
    hand (a local Ray, or RAY_ADDRESS / --address of a head on this machine) points its workers at this
    checkout; on a multi-node cluster submit the job with --working-dir instead."""
    import ray

    if ray.is_initialized():
        return
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by the job supervisor of a submitted job
        ray.init(address=address or None)
        return
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # a local Ray keeps its dashboard: Ray Train's placement-group cleaner asks the state API (served by it) whether
    # a controller is gone, and without it the resources of a killed run (an ASHA-stopped trial) are never freed
    ray.init(address=address or None, runtime_env={"env_vars": {"PYTHONPATH": path}})


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


def _mlflow_run(spec: JobSpec, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
    """The MLflow run of this training run: an unfinished run of the same name is resumed (same run id)."""
    from mlflow.entities import Param, RunTag

    from anomalymoe.platform.tracking import registry

    c = registry.client()
    exp = registry.experiment_id(spec.experiment)
    found = c.search_runs([exp], filter_string=f"tags.mlflow.runName = '{run_name}'", max_results=5)
    live = [r for r in found if r.info.status != "FINISHED"]
    if live:
        run_id = live[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        print(f"[mlflow] resuming run {run_id} ({run_name})", flush=True)
        return run_id
    run_id = c.create_run(exp, run_name=run_name, tags=tags).info.run_id
    items = [Param(k[:250], v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100], tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [])
    return run_id


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
    call = _MLflowRetry(out, run_name)
    call(lambda: _backfill_history(c, run_id, history), "metric history")
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


class MLflowUnavailable(RuntimeError):
    """MLflow stayed unreachable past the wait; the message says where the results are and how to finish."""


class _MLflowRetry:
    """Runs an MLflow call, retrying with backoff while the server is unreachable or failing (5xx), for at most
    ANOMALYMOE_MLFLOW_WAIT_S (default 600 s) in all; a 4xx answer is an error at once."""

    def __init__(self, out: Path, run_name: str):
        _fail_fast_mlflow_http()
        self.out, self.run_name = out, run_name
        self.deadline = time.monotonic() + float(os.environ.get("ANOMALYMOE_MLFLOW_WAIT_S", "600"))

    def __call__(self, fn, what: str):
        from mlflow.exceptions import MlflowException

        delay = 2.0
        while True:
            try:
                return fn()
            except MlflowException as e:
                status = e.get_http_status_code() if hasattr(e, "get_http_status_code") else 500
                transient = status >= 500 or status == 429 or "Max retries" in str(e) or "onnection" in str(e)
                if not transient:
                    raise
                err = e
            except OSError as e:  # connection refused/reset below MLflow's client
                err = e
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise MLflowUnavailable(
                    f"MLflow stayed unreachable ({str(err)[:200]}) while logging the {what}. Nothing is lost: the "
                    f"model, its evaluation and the history are in {self.out}, the checkpoints in the run storage. "
                    f"Rerun the same command (--name {self.run_name}) once MLflow is back: training resumes at its "
                    "last step and only this logging and registration is redone.") from None
            print(f"[mlflow] {what}: MLflow unreachable ({str(err)[:120]}); retrying in {delay:.0f} s "
                  f"(gives up in {left:.0f} s)", flush=True)
            time.sleep(min(delay, max(left, 0.1)))
            delay = min(2 * delay, 30.0)


def _backfill_history(c, run_id: str, history: list[dict]) -> int:
    """Log the history points (every report of rank 0, carried in the checkpoints) that the run does not have yet:
    the ones rank 0 could not send while MLflow was down, or lost with a killed worker. Returns how many steps."""
    from mlflow.entities import Metric

    have = {m.step for m in c.get_metric_history(run_id, "loss")}
    missing = [h for h in history if "step" in h and int(h["step"]) not in have]
    now = int(time.time() * 1000)
    points = [Metric(k, float(v), now, int(h["step"])) for h in missing for k, v in h.items()
              if k != "step" and isinstance(v, int | float) and np.isfinite(v)]
    for i in range(0, len(points), 500):
        c.log_batch(run_id, metrics=points[i : i + 500])
    if missing:
        print(f"[mlflow] logged {len(missing)} reported steps the run did not have yet", flush=True)
    return len(missing)


def cpus_per_worker(workers: int) -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, workers))


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Train on Ray, then finish on the driver (calibrate, evaluate, save, log, register). Returns a summary."""
    from anomalymoe.platform.tracking import registry

    t0 = time.perf_counter()
    _fail_fast_mlflow_http()
    prep = prepare(spec)
    run_name = spec.name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(spec.output) if spec.output else REPO_ROOT / "outputs" / "train" / run_name
    params = _flatten("", {"model": prep.model_cfg, "train": spec.train.model_dump(mode="json"),
                           "job": {"data": spec.data, "workers": spec.workers, "holdout": spec.holdout,
                                   "alpha": spec.alpha, "storage": spec.storage}}, {})
    try:
        run_id = _mlflow_run(spec, run_name, prep.tags, params)
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
        _MLflowRetry(out, run_name)(lambda: c.set_terminated(run_id, "FINISHED"), "run status")
    except BaseException:
        try:
            c.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            log.warning("could not mark MLflow run %s failed", run_id)
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "summary.json", summary)
    return summary
