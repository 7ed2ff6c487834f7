"""KubeRay manifests for a real cluster, rendered from typed configs so they cannot drift from each other:

    configmap.yaml              MLflow tracking URI, S3 endpoint and region (what every pod gets as env)
    secret-train.yaml           the training identity's S3 keys: read datasets, write runs and models
    secret-serve.yaml           the serving identity's S3 keys: read models and the tenant store, nothing else
                                (placeholders: fill in from your vault; with `train_service_account` /
                                `serve_service_account` set, pods use a cloud role instead: IRSA / workload
                                identity, refreshed credentials, no key at all). Tenant changes are the operators'
                                (jobs/serve.py tenants, outside the cluster), so no pod can write the store.
    secret-ray-token.yaml       the Ray auth token: every Ray pod runs with RAY_AUTH_MODE=token, so the dashboard
                                and the job API refuse anyone without it
    networkpolicy.yaml          Ray pods accept traffic from each other, and from outside only on Serve's port
    rayjob-train.yaml           RayJob: python jobs/train.py --workers N on a head + CPU worker group
    rayjob-train-gpu.yaml       the same on a GPU worker group: --workers <one per GPU> --gpu
    rayjob-tune.yaml            RayJob: python jobs/tune.py on the CPU worker group
    rayjob-tune-gpu.yaml        the same on the GPU worker group (plus `tune_gpu_args`)
    rayservice.yaml             one RayService (one Ray cluster) serving every domain: serveConfigV2 =
                                anomalymoe.serve.config.render() of the ServeConfig (the document `serve deploy`
                                takes), so tenants' rate limits and /metrics are per service, as on a local Ray;
                                each domain pinned to a model version (`serve_pins`, or `--pin` to resolve the
                                champions now): a restarted replica serves what was pushed, never a newer alias
    rayservice-gpu.yaml         the same from the GPU ServeConfig (`serve_config_gpu`: scorer_gpus > 0, larger
                                batches) on GPU workers

Every Ray cluster has the in-tree autoscaler on: worker groups grow from min_replicas to max_replicas with demand
(Serve's replica autoscaling, queued Train workers) and shrink when idle.

The CPU and GPU variants are alternatives: apply the one your nodes fit. GPU pods carry `nvidia.com/gpu`
limits, `num-gpus` in rayStartParams and the GPU node selector and tolerations (NVIDIA's device plugin and GPU
feature discovery conventions; change them for your cloud). Every manifest uses the same image (built from
infra/docker/Dockerfile: torch's CUDA build, so one image serves both) and carries the configs' hashes as
annotations. Render with::

    python -m anomalymoe.deploy.kuberay --config infra/k8s/cluster.yaml --out infra/k8s/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from anomalymoe.serve.config import REPO_ROOT, NoAliasDumper, ServeConfig, load_config, render
from anomalymoe.strict import Strict

API = "ray.io/v1"
RAY_VERSION = "2.60.0"
CONFIGMAP, TRAIN_SECRET, SERVE_SECRET, TOKEN_SECRET = ("anomalymoe-settings", "anomalymoe-s3-train",
                                                       "anomalymoe-s3-serve", "anomalymoe-ray-token")
PART_OF = {"app.kubernetes.io/part-of": "anomalymoe"}
SERVE_PORT = 8000
DERIVED_TRAIN_ARGS = ("--workers", "--gpu", "--no-gpu")  # set from the worker group of each variant


class Pods(Strict):
    cpu: str = "4"
    memory: str = "16Gi"
    gpu: int = Field(0, ge=0, description="nvidia.com/gpu per pod")


class WorkerGroup(Strict):
    name: str = "workers"
    replicas: int = Field(2, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=1)
    pods: Pods = Pods(cpu="8", memory="32Gi")


class Toleration(Strict):
    """A Kubernetes toleration for GPU pods (GPU node pools are commonly tainted so only GPU work lands there)."""

    key: str = "nvidia.com/gpu"
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class ClusterConfig(Strict):
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
                                       description="CPU scorers (rayservice.yaml)")
    serve_gpu_workers: WorkerGroup = Field(WorkerGroup(name="gpu-workers", replicas=1, min_replicas=1,
                                                       max_replicas=4, pods=Pods(cpu="8", memory="32Gi", gpu=1)),
                                           description="GPU scorers (rayservice-gpu.yaml)")
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
    serve_pins: dict[str, str] = Field(default_factory=dict, description="domain -> model version the RayServices "
                                       "serve (`--pin` resolves each domain's alias now); a domain without one is "
                                       "refused")
    train_service_account: str | None = Field(None, description="Kubernetes service account of training pods, "
                                              "bound to a cloud role (no key Secret then)")
    serve_service_account: str | None = Field(None, description="the same for serving pods")
    serve_from: dict[str, str] = Field(default_factory=dict, description="namespaceSelector labels allowed to "
                                       "reach Serve's port (empty: any namespace, e.g. behind an ingress)")
    autoscaler_idle_timeout_s: int = Field(60, ge=0, description="an idle worker pod is removed after this")

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


Role = Literal["train", "serve"]


def _token_env() -> list[dict[str, Any]]:
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "token"}}}]


def _container(cfg: ClusterConfig, name: str, pods: Pods, role: Role) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": pods.cpu, "memory": pods.memory}
    if pods.gpu:
        limits["nvidia.com/gpu"] = pods.gpu
    env_from: list[dict[str, Any]] = [{"configMapRef": {"name": CONFIGMAP}}]
    if _account(cfg, role) is None:  # keys only where no cloud role is bound
        env_from.append({"secretRef": {"name": TRAIN_SECRET if role == "train" else SERVE_SECRET}})
    return {"name": name, "image": cfg.image, "imagePullPolicy": "IfNotPresent", "envFrom": env_from,
            "env": _token_env(), "resources": {"requests": dict(limits), "limits": dict(limits)}}


def _account(cfg: ClusterConfig, role: Role) -> str | None:
    return cfg.train_service_account if role == "train" else cfg.serve_service_account


def _pod_template(cfg: ClusterConfig, name: str, pods: Pods, role: Role) -> dict[str, Any]:
    return {"metadata": {"labels": {**PART_OF, "anomalymoe.io/role": role}},
            "spec": _pod_spec(cfg, name, pods, role)}


def _pod_spec(cfg: ClusterConfig, name: str, pods: Pods, role: Role) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [_container(cfg, name, pods, role)]}
    if _account(cfg, role):
        spec["serviceAccountName"] = _account(cfg, role)
    if pods.gpu:  # land on (tainted) GPU nodes
        if cfg.gpu_node_selector:
            spec["nodeSelector"] = dict(cfg.gpu_node_selector)
        if cfg.gpu_tolerations:
            spec["tolerations"] = [t.model_dump(exclude_none=True) for t in cfg.gpu_tolerations]
    return spec


def _cluster_spec(cfg: ClusterConfig, w: WorkerGroup, role: Role) -> dict[str, Any]:
    head_pod = _pod_template(cfg, "ray-head", cfg.head, role)
    head_pod["spec"]["containers"][0]["ports"] = [
        {"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}]
    # the dashboard listens on the pod network for KubeRay and the job submitter; RAY_AUTH_MODE=token makes it and
    # the job API refuse callers without the token, and networkpolicy.yaml keeps other pods off it
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},  # the head schedules no work
            "template": head_pod}
    # KubeRay would infer num-gpus from the limit; said explicitly so the Ray resources are visible here
    start = {"num-gpus": str(w.pods.gpu)} if w.pods.gpu else {}
    return {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": cfg.autoscaler_idle_timeout_s,
                                  "env": _token_env()},
            "headGroupSpec": head, "workerGroupSpecs": [{
                "groupName": w.name, "replicas": w.replicas, "minReplicas": w.min_replicas,
                "maxReplicas": w.max_replicas, "rayStartParams": start,
                "template": _pod_template(cfg, "ray-worker", w.pods, role)}]}


def _meta(cfg: ClusterConfig, name: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.namespace, "labels": dict(PART_OF),
            "annotations": {"anomalymoe.io/cluster-config-hash": cfg.config_hash(), **(extra or {})}}


def _rayjob(cfg: ClusterConfig, name: str, script: str, args: list[str], w: WorkerGroup) -> dict[str, Any]:
    # the submitter pod talks to the job API: it needs the token too
    submitter = {"metadata": {"labels": {**PART_OF, "anomalymoe.io/role": "train"}},
                 "spec": {"restartPolicy": "Never", "containers": [
                     {"name": "ray-job-submitter", "image": cfg.image, "env": _token_env()}]}}
    return {"apiVersion": API, "kind": "RayJob", "metadata": _meta(cfg, name),
            "spec": {"entrypoint": " ".join(["python", script, *args]),
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
                     "submissionMode": "K8sJobMode", "submitterPodTemplate": submitter,
                     "rayClusterSpec": _cluster_spec(cfg, w, "train")}}


def train_workers(w: WorkerGroup) -> list[str]:
    """jobs/train.py's --workers (and --gpu) for a worker group: one Ray Train worker per GPU, else per pod."""
    if w.pods.gpu:
        return ["--workers", str(w.replicas * w.pods.gpu), "--gpu"]
    return ["--workers", str(max(1, w.replicas))]


def service_pins(cfg: ClusterConfig, serve: ServeConfig) -> dict[str, dict[str, str]]:
    """domain -> the pinned {"uri", "version", "alias"} the RayService deploys; a domain without a pin is refused:
    an unpinned alias is resolved by each replica when it starts, so a restarted replica could serve a version
    nobody pushed."""
    from anomalymoe.platform.tracking.registry import model_name

    missing = [d.domain for d in serve.domains if d.model is None and d.domain not in cfg.serve_pins]
    if missing:
        raise ValueError(f"domains {missing} have no pinned version (serve_pins in the cluster config, or render "
                         "with --pin to resolve each domain's alias now)")
    return {d.domain: {"uri": f"models:/{model_name(d.domain)}/{cfg.serve_pins[d.domain]}",
                       "version": str(cfg.serve_pins[d.domain]), "alias": d.model_uri}
            for d in serve.domains if d.domain in cfg.serve_pins}


def _rayservice(cfg: ClusterConfig, serve: ServeConfig, w: WorkerGroup, suffix: str = "") -> dict[str, Any]:
    every = serve.model_copy(update={"host": "0.0.0.0"})
    doc = render(every, service_pins(cfg, every))
    return {"apiVersion": API, "kind": "RayService",
            "metadata": _meta(cfg, f"anomalymoe{suffix}", {"anomalymoe.io/serve-config-hash": every.config_hash()}),
            "spec": {"serveConfigV2": yaml.dump(doc, Dumper=NoAliasDumper, sort_keys=False),
                     "rayClusterConfig": _cluster_spec(cfg, w, "serve")}}


def _network_policy(cfg: ClusterConfig) -> dict[str, Any]:
    """Ray pods talk to each other on any port; from elsewhere only Serve's port is open (GCS, the dashboard and
    the job API stay inside)."""
    outside: dict[str, Any] = {"namespaceSelector": {"matchLabels": dict(cfg.serve_from)}} if cfg.serve_from \
        else {"namespaceSelector": {}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(cfg, "anomalymoe-ray"),
            "spec": {"podSelector": {"matchLabels": dict(PART_OF)}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": dict(PART_OF)}}]},
                                 {"from": [outside], "ports": [{"protocol": "TCP", "port": SERVE_PORT}]}]}}


def _secret(cfg: ClusterConfig, name: str, note: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(cfg, name, {"anomalymoe.io/grants": note}), "stringData": data}


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
    keys = {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME"}
    out: dict[str, dict[str, Any]] = {
        "configmap.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(cfg, CONFIGMAP),
                           "data": {"MLFLOW_TRACKING_URI": cfg.mlflow_tracking_uri,
                                    "AWS_ENDPOINT_URL": cfg.s3_endpoint, "AWS_DEFAULT_REGION": cfg.s3_region}},
        "secret-ray-token.yaml": _secret(cfg, TOKEN_SECRET, "Ray token auth (openssl rand -hex 32)",
                                         {"token": "REPLACE_ME"}),
        "networkpolicy.yaml": _network_policy(cfg),
        "rayjob-train.yaml": _rayjob(cfg, "anomalymoe-train", "jobs/train.py",
                                     [*cfg.train_args, *cfg.train_cpu_args, *train_workers(cfg.workers)],
                                     cfg.workers),
        "rayjob-train-gpu.yaml": _rayjob(cfg, "anomalymoe-train-gpu", "jobs/train.py",
                                         [*cfg.train_args, *cfg.train_gpu_args, *train_workers(cfg.gpu_workers)],
                                         cfg.gpu_workers),
        "rayjob-tune.yaml": _rayjob(cfg, "anomalymoe-tune", "jobs/tune.py", cfg.tune_args, cfg.workers),
        "rayjob-tune-gpu.yaml": _rayjob(cfg, "anomalymoe-tune-gpu", "jobs/tune.py",
                                        [*cfg.tune_args, *cfg.tune_gpu_args], cfg.gpu_workers),
        "rayservice.yaml": _rayservice(cfg, serve, cfg.serve_workers),
    }
    if cfg.train_service_account is None:
        out["secret-train.yaml"] = _secret(cfg, TRAIN_SECRET, "S3: read datasets; read and write runs, checkpoints "
                                           "and model artifacts (docs/operations.md has the policy)", dict(keys))
    if cfg.serve_service_account is None:
        out["secret-serve.yaml"] = _secret(cfg, SERVE_SECRET, "S3: read model artifacts and the tenant store; "
                                           "nothing else (docs/operations.md has the policy)", dict(keys))
    if serve_gpu is not None:
        _check_devices(serve_gpu, cfg.serve_gpu_workers, cfg.serve_config_gpu)
        out["rayservice-gpu.yaml"] = _rayservice(cfg, serve_gpu, cfg.serve_gpu_workers, "-gpu")
    return out


class _Dumper(NoAliasDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, readable in the manifest."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def dump(manifest: dict[str, Any]) -> str:
    return ("# Rendered by anomalymoe/deploy/kuberay.py from infra/k8s/cluster.yaml; do not edit.\n"
            + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False))


def load_cluster(path: str | Path) -> ClusterConfig:
    return ClusterConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def serve_configs(cfg: ClusterConfig) -> tuple[ClusterConfig, ServeConfig, ServeConfig]:
    """The cluster config with the CPU and GPU ServeConfigs it names: render_all's arguments."""
    return cfg, load_config(REPO_ROOT / cfg.serve_config), load_config(REPO_ROOT / cfg.serve_config_gpu)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomalymoe.deploy.kuberay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO_ROOT / "infra" / "k8s" / "cluster.yaml")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "infra" / "k8s")
    p.add_argument("--pin", action="store_true", help="pin every domain to the version its alias names in MLflow "
                                                      "now (MLFLOW_TRACKING_URI), over serve_pins")
    a = p.parse_args(argv)
    cfg = load_cluster(a.config)
    if a.pin:
        from anomalymoe.serve.app import pins

        _, serve, serve_gpu = serve_configs(cfg)
        now = {d: p["version"] for sv in (serve, serve_gpu) for d, p in pins(sv).items()}
        cfg = cfg.model_copy(update={"serve_pins": {**cfg.serve_pins, **now}})
        print(f"pinned {now}")
    a.out.mkdir(parents=True, exist_ok=True)
    for name, manifest in render_all(*serve_configs(cfg)).items():
        (a.out / name).write_text(dump(manifest))
        print(f"wrote {a.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
