"""Hyper-parameter search on Ray Tune: each trial is a Ray Train run of the same worker loop as jobs/train.py
(reporting to Tune through TuneReportCallback), ASHA stops weak trials at validation rungs, Optuna's TPE proposes
configs when it is installed (random search otherwise). The objective is `val_score` on held-out normal images
and their synthetic-defect copies (validation.py), never the test split.

MLflow: the driver opens a parent run; every trial opens a child run (tag mlflow.parentRunId) that its rank 0
logs into; trials ASHA stopped are marked KILLED with tag stopped_early. The best finished trial's model is
calibrated, evaluated, logged to its child run and registered (alias challenger) with its config in the tags.

Search space (dotted keys into the model / train config):
  patch.num, global.num, component.num   experts per level
  router.mode                            joint | per_level
  router.top_k, router.top_k_per_level   experts per image (clipped to what exists)
  loss.lambda_esb, loss.lambda_eir       balancing and repulsion weights
  loss.esb_load                          weight of the load term, this model's stand-in for a capacity factor
                                         (routing is top-k per image; no expert has a capacity to overflow)
  train.lr                               peak learning rate
  patch.decoder_depth                    half or all of the preset's depth"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from anomalymoe.models.config import ModelConfig
from anomalymoe.paths import REPO_ROOT
from anomalymoe.platform.cluster.ray import connect_ray, storage_config
from anomalymoe.platform.tracking.runs import flatten_params
from anomalymoe.platform.train.job import JobSpec, finish, finish_device, loop_config, prepare, write_json
from anomalymoe.platform.train.loop import model_from_checkpoint, train_loop
from anomalymoe.platform.train.trainer import TrainConfig

log = logging.getLogger(__name__)

OBJECTIVE = "val_score"


def search_space(base_model: dict) -> dict[str, Any]:
    from ray import tune

    depth = int(base_model["patch"]["decoder_depth"])
    return {
        "patch.num": tune.choice([1, 2, 3]),
        "global.num": tune.choice([1, 2, 3]),
        "component.num": tune.choice([1, 2, 3]),
        "router.mode": tune.choice(["joint", "per_level"]),
        "router.top_k": tune.choice([1, 2, 3]),
        "router.top_k_per_level": tune.choice([1, 2]),
        "loss.lambda_esb": tune.loguniform(1e-3, 1e-1),
        "loss.lambda_eir": tune.loguniform(1e-5, 1e-3),
        "loss.esb_load": tune.uniform(0.5, 2.0),
        "train.lr": tune.loguniform(5e-4, 5e-3),
        "patch.decoder_depth": tune.choice(sorted({max(2, depth // 2), depth})),
    }


def apply_trial(model: dict, train: dict, config: dict[str, Any]) -> tuple[dict, dict]:
    """The model and train dicts with a trial's dotted overrides; top-k clipped to the experts that exist."""
    model, train = copy.deepcopy(model), copy.deepcopy(train)
    for key, value in config.items():
        section, _, name = key.partition(".")
        target = train if section == "train" else model.setdefault(section, {})
        target[name] = value
    nums = [model[lv]["num"] for lv in ("patch", "global", "component")]
    model["router"]["top_k"] = max(1, min(model["router"]["top_k"], sum(nums)))
    model["router"]["top_k_per_level"] = max(1, min(model["router"]["top_k_per_level"], min(n for n in nums if n)))
    ModelConfig.from_dict(model)  # fail here, in the trial, with the config's own message
    TrainConfig(**train)
    return model, train


@dataclasses.dataclass
class TrialBase:
    """What every trial needs (shipped to the trial actors)."""

    loop: Any  # train/loop.LoopConfig with the data; model/train/run fields are replaced per trial
    model: dict
    train: dict
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    storage_uri: str
    tune_name: str
    gpu: bool = False  # each trial's worker holds one GPU (NCCL, bf16 autocast)


def run_trial(config: dict[str, Any], base: TrialBase) -> None:
    """A Tune trial: a child MLflow run, then a 1-worker Ray Train run whose reports reach Tune."""
    import ray.train
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    model, train = apply_trial(base.model, base.train, config)
    c = MlflowClient(base.tracking_uri)
    name = f"{base.tune_name}-{trial_id}"
    run_id = c.create_run(base.experiment_id, run_name=name, tags={
        "mlflow.parentRunId": base.parent_run_id, "trial_id": trial_id, "tune": base.tune_name}).info.run_id
    c.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(config.items())])
    loop = dataclasses.replace(base.loop, model=model, train=train, run_name=name,
                               mlflow={"tracking_uri": base.tracking_uri, "run_id": run_id})
    path, fs = storage_config(base.storage_uri)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"loop": loop},
        torch_config=TorchConfig(backend="nccl" if base.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=base.gpu, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                       callbacks=[TuneReportCallback()]),
    )
    result = trainer.fit()
    if result.error is not None:
        c.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"trial {trial_id} failed: {result.error}")
    c.set_terminated(run_id, "FINISHED")


def run_tune(spec: JobSpec, *, trials: int, max_concurrent: int | None = None, grace: int | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Search, then finish the best trial's model like a training run. Returns a summary."""
    from mlflow.entities import Param, RunTag
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from anomalymoe.platform.tracking import registry

    t0 = time.perf_counter()
    prep = prepare(spec)
    name = spec.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(spec.output) if spec.output else REPO_ROOT / "outputs" / "tune" / name
    steps = spec.train.steps
    every = grace or max(1, steps // 4)  # validation (= ASHA rung, report and checkpoint) interval
    c = registry.client()
    exp = registry.experiment_id(spec.experiment)
    parent = c.create_run(exp, run_name=name, tags={**prep.tags, "tune": name}).info.run_id
    space = search_space(prep.model_cfg)
    params = {**flatten_params("", {"model": prep.model_cfg, "train": spec.train.model_dump(mode="json")}, {}),
              "tune.trials": str(trials), "tune.space": ",".join(space), "tune.rung_every": str(every)}
    items = [Param(k[:250], v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(parent, params=items[i : i + 100])
    connect_ray(spec.address)
    import ray
    import ray.train

    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0)) if spec.gpu else 0
    if spec.gpu and not gpus:  # GPU workers may still be joining (a RayJob starts with its head): wait, said once
        print("[tune] --gpu: no GPU in this Ray cluster yet; trials wait until GPU workers join", flush=True)
    # one CPU (and with --gpu one GPU) per trial's worker
    max_concurrent = max(1, min(trials, max_concurrent or cpus, max(gpus, 1) if spec.gpu else cpus))
    print(f"[tune] {name}: {trials} trials, at most {max_concurrent} at once, {steps} steps each, ASHA rungs every "
          f"{every} steps on {OBJECTIVE}; MLflow parent run {parent}", flush=True)
    tspec = dataclasses.replace(spec, val_every=every, log_every=every, checkpoint_every=every)
    base = TrialBase(loop=loop_config(tspec, prep, name, None, threads=1), model=prep.model_cfg,
                     train=spec.train.model_dump(mode="json"), experiment_id=exp, parent_run_id=parent,
                     tracking_uri=registry.tracking_uri(), storage_uri=f"{spec.storage.rstrip('/')}/{name}-trials",
                     tune_name=name, gpu=spec.gpu)
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(metric=OBJECTIVE, mode="max", seed=seed),
                                    max_concurrent=max_concurrent)
        algo = "optuna-tpe"
    except ImportError:
        search, algo = None, "random"
    path, fs = storage_config(spec.storage)
    tuner = tune.Tuner(
        # the trial actor only waits on its Train run: no CPU (a bundle may not be empty, so a token of memory)
        tune.with_resources(tune.with_parameters(run_trial, base=base), {"CPU": 0, "memory": 1 << 20}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="max", num_samples=trials, search_alg=search,
            max_concurrent_trials=None if search else max_concurrent,
            scheduler=ASHAScheduler(time_attr="step", max_t=steps, grace_period=every, reduction_factor=2)),
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=1),
    )
    try:
        grid = tuner.fit()
        rows, configs = [], {}
        for r in grid:
            m = r.metrics or {}
            configs[m.get("trial_id")] = dict(r.config or {})
            rows.append({"trial_id": m.get("trial_id"), "steps": int(m.get("step", 0)),
                         OBJECTIVE: m.get(OBJECTIVE), "error": str(r.error) if r.error else "",
                         "checkpoint_path": m.get("checkpoint_path"), **(r.config or {})})
        table = pd.DataFrame(rows).sort_values(OBJECTIVE, ascending=False, na_position="last")
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "trials.csv", index=False)
        print("[tune] trials:\n" + table.drop(columns=["checkpoint_path"]).to_string(index=False), flush=True)
        # Tune ends a trial by killing its actor (ASHA at a rung, and also at max_t, possibly before run_trial
        # closes its run): every child run's status is set here from what the trial reached
        for row in rows:
            found = c.search_runs([exp], filter_string=f"tags.trial_id = '{row['trial_id']}'", max_results=1)
            if not found:
                continue
            if row["error"]:
                c.set_terminated(found[0].info.run_id, "FAILED")
            elif row["steps"] < steps:
                c.set_tag(found[0].info.run_id, "stopped_early", "true")
                c.set_terminated(found[0].info.run_id, "KILLED")
            else:
                c.set_terminated(found[0].info.run_id, "FINISHED")
        done = table[(table["steps"] >= steps) & table["checkpoint_path"].notna() & (table["error"] == "")]
        if done.empty:
            raise RuntimeError("no trial finished all steps; see trials.csv")
        best = done.iloc[0]
        best_cfg = configs[best["trial_id"]]
        child = c.search_runs([exp], filter_string=f"tags.trial_id = '{best['trial_id']}'", max_results=1)[0]
        model_cfg, train_cfg = apply_trial(prep.model_cfg, spec.train.model_dump(mode="json"), best_cfg)
        ckpt = ray.train.Checkpoint(path=best["checkpoint_path"], filesystem=fs) if fs else \
            ray.train.Checkpoint(best["checkpoint_path"])
        model, history = model_from_checkpoint(ckpt, model_cfg)
        # the registered version's tags carry its config hash (from the trial's config) and its search values
        prep = dataclasses.replace(prep, tags={**prep.tags, "config_hash": model.cfg.config_hash()})
        summary = finish(prep, model, history, child.info.run_id, child.info.run_name, out, steps=steps,
                         register=spec.register, t0=t0, device=finish_device(spec.gpu),
                         extra_tags={"tune": name, "tune_parent_run": parent, "trial_id": str(best["trial_id"]),
                                     **{f"tune.{k}": str(v) for k, v in best_cfg.items()}})
        write_json(out / "best_config.json", {"search": best_cfg, "model": model_cfg, "train": train_cfg})
        c.log_artifact(parent, str(out / "trials.csv"))
        c.log_artifact(parent, str(out / "best_config.json"))
        c.log_batch(parent, tags=[RunTag("best_trial", str(best["trial_id"])), RunTag("search", algo)])
        c.log_metric(parent, f"best_{OBJECTIVE}", float(best[OBJECTIVE]))
        c.set_terminated(parent, "FINISHED")
    except BaseException:
        c.set_terminated(parent, "FAILED")
        raise
    stopped = int(((table["steps"] < steps) & (table["error"] == "")).sum())
    summary.update({"tune": name, "parent_run_id": parent, "trials": len(table), "stopped_early": stopped,
                    "best_trial": str(best["trial_id"]), "best_config": best_cfg, "search": algo,
                    "seconds": round(time.perf_counter() - t0, 1)})
    write_json(out / "summary.json", summary)
    return summary
