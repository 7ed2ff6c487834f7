"""The Ray Train worker side of a training run: the per-worker loop (train_loop), what it is given (LoopConfig),
how it is launched (fit_on_ray), and reading its results back (history, the model from a checkpoint).

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
from anomalymoe.platform.cluster.ray import storage_config
from anomalymoe.platform.data.pipeline import (
    category_batches,
    load_rows,
    prefetch,
    ray_rows,
    row_keys,
    step_rows,
    to_batch,
    to_device,
)
from anomalymoe.platform.data.transforms import Framing
from anomalymoe.platform.tracking.runs import MLflowLogger
from anomalymoe.platform.train.checkpoint import load_training_state, load_weights, save_training_state
from anomalymoe.platform.train.trainer import TrainConfig, Trainer, seed_everything

log = logging.getLogger(__name__)


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


def _reseed(trainer: Trainer, seed: int, rank: int, step: int) -> None:
    """Every RNG from (seed, rank, step), at each checkpoint boundary: ranks draw independent dropout and jitter
    noise, and a run resumed from the checkpoint at `step` draws exactly what the uninterrupted run drew (the
    checkpoint's own RNG state is rank 0's only)."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    seed_everything(s)
    trainer.generator.manual_seed(s)


def _quiet_reports() -> None:
    """Ray Train logs each report's whole metrics dict at INFO, from a logger named by its file's path (outside
    `ray.train`, so its LoggingConfig does not reach it); the step line already says what matters."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    import ray.train

    from anomalymoe.platform.train.distributed import average_gradients, mean_over_ranks

    _quiet_reports()
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
    mlf = MLflowLogger(cfg.mlflow) if rank == 0 else None
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
            # each line of the job log once: Ray Train's print patch logs every print of a worker and, its stdout
            # being Ray's, prints it again
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
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


def cpus_per_worker(workers: int) -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, workers))
