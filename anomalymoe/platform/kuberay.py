"""KubeRay manifests for a real cluster, rendered from typed configs so they cannot drift from each other:

    configmap.yaml              MLflow tracking URI, S3 endpoint and region (what every pod gets as env)
    secret.yaml                 S3 keys (placeholders: fill in, or create the Secret from your vault)
    rayjob-train.yaml           RayJob: python jobs/train.py --workers N on a head + CPU worker group
    rayjob-train-gpu.yaml       the same on a GPU worker group: --workers <one per GPU> --gpu
    rayjob-tune.yaml            RayJob: python jobs/tune.py on the CPU worker group
    rayjob-tune-gpu.yaml        the same on the GPU worker group (plus `tune_gpu_args`)
    rayservice-<domain>.yaml    one RayService per domain; serveConfigV2 = anomalymoe.serve.config.render() of the
                                domain's slice of the ServeConfig (the document `serve deploy` takes); CPU scorers
    rayservice-<domain>-gpu.yaml  the same from the GPU ServeConfig (`serve_config_gpu`: scorer_gpus > 0, larger
                                batches) on GPU workers

The CPU and GPU variants are alternatives: apply the one your nodes fit. GPU pods carry `nvidia.com/gpu`
limits, `num-gpus` in rayStartParams and the GPU node selector and tolerations (NVIDIA's device plugin and GPU
feature discovery conventions; change them for your cloud). Every manifest uses the same image (built from
infra/docker/Dockerfile: torch's CUDA build, so one image serves both) and carries the configs' hashes as
annotations. Render with::

    python -m anomalymoe.platform.kuberay --config infra/k8s/cluster.yaml --out infra/k8s/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..serve.config import REPO_ROOT, NoAliasDumper, ServeConfig, load_config, render

API = "ray.io/v1"
RAY_VERSION = "2.60.0"
CONFIGMAP, SECRET = "anomalymoe-settings", "anomalymoe-s3"
DERIVED_TRAIN_ARGS = ("--workers", "--gpu", "--no-gpu")  # set from the worker group of each variant


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pods(_Strict):
    cpu: str = "4"
    memory: str = "16Gi"
    gpu: int = Field(0, ge=0, description="nvidia.com/gpu per pod")


class WorkerGroup(_Strict):
    name: str = "workers"
    replicas: int = Field(2, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=1)
    pods: Pods = Pods(cpu="8", memory="32Gi")


class Toleration(_Strict):
    """A Kubernetes toleration for GPU pods (GPU node pools are commonly tainted so only GPU work lands there)."""

    key: str = "nvidia.com/gpu"
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class ClusterConfig(_Strict):
    """The settings an operator changes; everything else is derived."""

    namespace: str = "anomalymoe"
    image: str = "registry.example.com/anomalymoe:0.1.0"
    mlflow_tracking_uri: str = "http://mlflow.anomalymoe.svc:5000"
    s3_endpoint: str = "https://s3.example.com"
    s3_region: str = "us-east-1"
    head: Pods = Pods()
    workers: WorkerGroup = Field(WorkerGroup(name="cpu-workers"), description="CPU training and tuning")
    gpu_workers: WorkerGroup = Field(WorkerGroup(name="gpu-workers", pods=Pods(cpu="8", memory="64Gi", gpu=1)),
                                     description="GPU training and tuning (the -gpu RayJobs)")
    serve_workers: WorkerGroup = Field(WorkerGroup(name="cpu-workers", replicas=1, min_replicas=1, max_replicas=8,
                                                   pods=Pods(cpu="8", memory="16Gi")),
                                       description="CPU scorers (rayservice-<domain>.yaml)")
    serve_gpu_workers: WorkerGroup = Field(WorkerGroup(name="gpu-workers", replicas=1, min_replicas=1,
                                                       max_replicas=4, pods=Pods(cpu="8", memory="32Gi", gpu=1)),
                                           description="GPU scorers (rayservice-<domain>-gpu.yaml)")
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"},
                                              description="nodeSelector of GPU pods (GPU feature discovery's label)")
    gpu_tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration()],
                                              description="tolerations of GPU pods")
    train_args: list[str] = Field(default_factory=lambda: [
        "--data", "s3://datasets/catalog.yaml", "--storage", "s3://runs/checkpoints"],
        description="jobs/train.py arguments of both train RayJobs but --workers/--gpu (derived from the worker "
                    "group: one Train worker per pod, or per GPU)")
    train_cpu_args: list[str] = Field(default_factory=lambda: ["--steps", "10000", "--name", "anomalymoe-main"],
                                      description="added to train_args in rayjob-train.yaml (config cpu-small)")
    train_gpu_args: list[str] = Field(default_factory=lambda: ["--config", "reference", "--name", "anomalymoe-gpu"],
                                      description="added to train_args in rayjob-train-gpu.yaml: the reference "
                                                  "recipe (configs/reference.yaml), its own run name")
    tune_args: list[str] = Field(default_factory=lambda: [
        "--data", "s3://datasets/catalog.yaml", "--trials", "16", "--steps", "2000", "--storage", "s3://runs/tune"])
    tune_gpu_args: list[str] = Field(default_factory=lambda: ["--config", "reference", "--gpu"],
                                     description="added to tune_args in rayjob-tune-gpu.yaml (one GPU per trial)")
    serve_config: str = Field("infra/serve/cluster.yaml", description="ServeConfig YAML, relative to the repo root")
    serve_config_gpu: str = Field("infra/serve/cluster-gpu.yaml",
                                  description="ServeConfig YAML of the GPU RayServices (every scorer_gpus > 0)")

    @model_validator(mode="after")
    def _groups(self) -> ClusterConfig:
        for cpu, gpu in (("workers", "gpu_workers"), ("serve_workers", "serve_gpu_workers")):
            if getattr(self, cpu).pods.gpu:
                raise ValueError(f"{cpu} is the CPU group: put GPUs in {gpu}")
            if not getattr(self, gpu).pods.gpu:
                raise ValueError(f"{gpu}.pods.gpu must be >= 1")
        derived = sorted({a.split("=")[0] for a in (*self.train_args, *self.train_cpu_args, *self.train_gpu_args)}
                         & set(DERIVED_TRAIN_ARGS))
        if derived:
            raise ValueError(f"train_args must not set {derived}: each RayJob derives them from its worker group")
        return self

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _container(cfg: ClusterConfig, name: str, pods: Pods) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": pods.cpu, "memory": pods.memory}
    if pods.gpu:
        limits["nvidia.com/gpu"] = pods.gpu
    return {"name": name, "image": cfg.image, "imagePullPolicy": "IfNotPresent",
            "envFrom": [{"configMapRef": {"name": CONFIGMAP}}, {"secretRef": {"name": SECRET}}],
            "env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}],  # the cluster network is the boundary
            "resources": {"requests": dict(limits), "limits": dict(limits)}}


def _pod_spec(cfg: ClusterConfig, name: str, pods: Pods) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [_container(cfg, name, pods)]}
    if pods.gpu:  # land on (tainted) GPU nodes
        if cfg.gpu_node_selector:
            spec["nodeSelector"] = dict(cfg.gpu_node_selector)
        if cfg.gpu_tolerations:
            spec["tolerations"] = [t.model_dump(exclude_none=True) for t in cfg.gpu_tolerations]
    return spec


def _cluster_spec(cfg: ClusterConfig, w: WorkerGroup) -> dict[str, Any]:
    head_pod = _pod_spec(cfg, "ray-head", cfg.head)
    head_pod["containers"][0]["ports"] = [
        {"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},  # the head schedules no work
            "template": {"spec": head_pod}}
    # KubeRay would infer num-gpus from the limit; said explicitly so the Ray resources are visible here
    start = {"num-gpus": str(w.pods.gpu)} if w.pods.gpu else {}
    return {"rayVersion": RAY_VERSION, "headGroupSpec": head, "workerGroupSpecs": [{
        "groupName": w.name, "replicas": w.replicas, "minReplicas": w.min_replicas, "maxReplicas": w.max_replicas,
        "rayStartParams": start, "template": {"spec": _pod_spec(cfg, "ray-worker", w.pods)}}]}


def _meta(cfg: ClusterConfig, name: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.namespace, "labels": {"app.kubernetes.io/part-of": "anomalymoe"},
            "annotations": {"anomalymoe.io/cluster-config-hash": cfg.config_hash(), **(extra or {})}}


def _rayjob(cfg: ClusterConfig, name: str, script: str, args: list[str], w: WorkerGroup) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "RayJob", "metadata": _meta(cfg, name),
            "spec": {"entrypoint": " ".join(["python", script, *args]),
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
                     "submissionMode": "K8sJobMode", "rayClusterSpec": _cluster_spec(cfg, w)}}


def train_workers(w: WorkerGroup) -> list[str]:
    """jobs/train.py's --workers (and --gpu) for a worker group: one Ray Train worker per GPU, else per pod."""
    if w.pods.gpu:
        return ["--workers", str(w.replicas * w.pods.gpu), "--gpu"]
    return ["--workers", str(max(1, w.replicas))]


def _rayservice(cfg: ClusterConfig, serve: ServeConfig, domain: str, w: WorkerGroup, suffix: str = ""
                ) -> dict[str, Any]:
    one = serve.model_copy(update={"domains": [serve.domain(domain)], "host": "0.0.0.0"})
    doc = render(one)
    return {"apiVersion": API, "kind": "RayService",
            "metadata": _meta(cfg, f"anomalymoe-{domain}{suffix}",
                              {"anomalymoe.io/serve-config-hash": one.config_hash()}),
            "spec": {"serveConfigV2": yaml.dump(doc, Dumper=NoAliasDumper, sort_keys=False),
                     "rayClusterConfig": _cluster_spec(cfg, w)}}


def _check_devices(serve: ServeConfig, w: WorkerGroup, what: str) -> None:
    """A scorer that asks for a GPU on a CPU cluster never schedules; one without a GPU on a GPU cluster wastes it."""
    for d in serve.domains:
        if (d.scorer_gpus > 0) != (w.pods.gpu > 0) or d.scorer_gpus > w.pods.gpu:
            raise ValueError(f"{what}: domain {d.domain} has scorer_gpus {d.scorer_gpus:g} but its worker group "
                             f"{w.name!r} has {w.pods.gpu} GPU per pod")


def render_all(cfg: ClusterConfig, serve: ServeConfig, serve_gpu: ServeConfig | None = None
               ) -> dict[str, dict[str, Any]]:
    """file name → manifest. `serve_gpu`: the GPU RayServices' ServeConfig (None: no GPU RayServices)."""
    _check_devices(serve, cfg.serve_workers, cfg.serve_config)
    out: dict[str, dict[str, Any]] = {
        "configmap.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(cfg, CONFIGMAP),
                           "data": {"MLFLOW_TRACKING_URI": cfg.mlflow_tracking_uri,
                                    "AWS_ENDPOINT_URL": cfg.s3_endpoint, "AWS_DEFAULT_REGION": cfg.s3_region}},
        "secret.yaml": {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(cfg, SECRET),
                        "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME"}},
        "rayjob-train.yaml": _rayjob(cfg, "anomalymoe-train", "jobs/train.py",
                                     [*cfg.train_args, *cfg.train_cpu_args, *train_workers(cfg.workers)],
                                     cfg.workers),
        "rayjob-train-gpu.yaml": _rayjob(cfg, "anomalymoe-train-gpu", "jobs/train.py",
                                         [*cfg.train_args, *cfg.train_gpu_args, *train_workers(cfg.gpu_workers)],
                                         cfg.gpu_workers),
        "rayjob-tune.yaml": _rayjob(cfg, "anomalymoe-tune", "jobs/tune.py", cfg.tune_args, cfg.workers),
        "rayjob-tune-gpu.yaml": _rayjob(cfg, "anomalymoe-tune-gpu", "jobs/tune.py",
                                        [*cfg.tune_args, *cfg.tune_gpu_args], cfg.gpu_workers),
    }
    services = [(f"rayservice-{d.domain}.yaml", _rayservice(cfg, serve, d.domain, cfg.serve_workers))
                for d in serve.domains]
    if serve_gpu is not None:
        _check_devices(serve_gpu, cfg.serve_gpu_workers, cfg.serve_config_gpu)
        services += [(f"rayservice-{d.domain}-gpu.yaml",
                      _rayservice(cfg, serve_gpu, d.domain, cfg.serve_gpu_workers, "-gpu")) for d in serve_gpu.domains]
    for name, manifest in services:
        if name in out:  # e.g. a CPU domain "x-gpu" beside a GPU domain "x"
            raise ValueError(f"two manifests would be written to {name}: rename a domain")
        out[name] = manifest
    return out


class _Dumper(NoAliasDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, readable in the manifest."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def dump(manifest: dict[str, Any]) -> str:
    return ("# Rendered by anomalymoe/platform/kuberay.py from infra/k8s/cluster.yaml; do not edit.\n"
            + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False))


def load_cluster(path: str | Path) -> ClusterConfig:
    return ClusterConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def serve_configs(cfg: ClusterConfig) -> tuple[ClusterConfig, ServeConfig, ServeConfig]:
    """The cluster config with the CPU and GPU ServeConfigs it names: render_all's arguments."""
    return cfg, load_config(REPO_ROOT / cfg.serve_config), load_config(REPO_ROOT / cfg.serve_config_gpu)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomalymoe.platform.kuberay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO_ROOT / "infra" / "k8s" / "cluster.yaml")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "infra" / "k8s")
    a = p.parse_args(argv)
    cfg = load_cluster(a.config)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, manifest in render_all(*serve_configs(cfg)).items():
        (a.out / name).write_text(dump(manifest))
        print(f"wrote {a.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
