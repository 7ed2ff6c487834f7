"""KubeRay manifests for a real cluster, rendered from typed configs so they cannot drift from each other:

    configmap.yaml          MLflow tracking URI, S3 endpoint and region (what every pod gets as env)
    secret.yaml             S3 keys (placeholders: fill in, or create the Secret from your vault)
    rayjob-train.yaml       RayJob: python jobs/train.py on a head + GPU/CPU worker group
    rayjob-tune.yaml        RayJob: python jobs/tune.py
    rayservice-<domain>.yaml  one RayService per domain; serveConfigV2 = anomalymoe.serve.config.render() of the
                            domain's slice of the ServeConfig (the document `serve deploy` takes)

Every manifest uses the same image (built from infra/docker/Dockerfile) and carries the configs' hashes as
annotations. Render with::

    python -m anomalymoe.platform.kuberay --config infra/k8s/cluster.yaml --out infra/k8s/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..serve.config import REPO_ROOT, NoAliasDumper, ServeConfig, load_config, render

API = "ray.io/v1"
RAY_VERSION = "2.60.0"
CONFIGMAP, SECRET = "anomalymoe-settings", "anomalymoe-s3"


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
    pods: Pods = Pods(cpu="8", memory="32Gi", gpu=1)


class ClusterConfig(_Strict):
    """The settings an operator changes; everything else is derived."""

    namespace: str = "anomalymoe"
    image: str = "registry.example.com/anomalymoe:0.1.0"
    mlflow_tracking_uri: str = "http://mlflow.anomalymoe.svc:5000"
    s3_endpoint: str = "https://s3.example.com"
    s3_region: str = "us-east-1"
    head: Pods = Pods()
    workers: WorkerGroup = WorkerGroup()  # training and tuning
    serve_workers: WorkerGroup = WorkerGroup(name="cpu-workers", replicas=1, min_replicas=1, max_replicas=8,
                                             pods=Pods(cpu="8", memory="16Gi", gpu=0))  # scorers run on CPU
    train_args: list[str] = Field(default_factory=lambda: [
        "--data", "s3://datasets/catalog.yaml", "--workers", "2", "--gpu", "--steps", "10000",
        "--storage", "s3://runs/checkpoints", "--name", "anomalymoe-main"])
    tune_args: list[str] = Field(default_factory=lambda: [
        "--data", "s3://datasets/catalog.yaml", "--trials", "16", "--steps", "2000", "--storage", "s3://runs/tune"])
    serve_config: str = Field("infra/serve/cluster.yaml", description="ServeConfig YAML, relative to the repo root")

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


def _cluster_spec(cfg: ClusterConfig, w: WorkerGroup) -> dict[str, Any]:
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},  # the head schedules no work
            "template": {"spec": {"containers": [{
                **_container(cfg, "ray-head", cfg.head),
                "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                          {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]}]}}}
    return {"rayVersion": RAY_VERSION, "headGroupSpec": head, "workerGroupSpecs": [{
        "groupName": w.name, "replicas": w.replicas, "minReplicas": w.min_replicas, "maxReplicas": w.max_replicas,
        "rayStartParams": {}, "template": {"spec": {"containers": [_container(cfg, "ray-worker", w.pods)]}}}]}


def _meta(cfg: ClusterConfig, name: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.namespace, "labels": {"app.kubernetes.io/part-of": "anomalymoe"},
            "annotations": {"anomalymoe.io/cluster-config-hash": cfg.config_hash(), **(extra or {})}}


def _rayjob(cfg: ClusterConfig, name: str, script: str, args: list[str]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "RayJob", "metadata": _meta(cfg, name),
            "spec": {"entrypoint": " ".join(["python", script, *args]),
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
                     "submissionMode": "K8sJobMode", "rayClusterSpec": _cluster_spec(cfg, cfg.workers)}}


def _rayservice(cfg: ClusterConfig, serve: ServeConfig, domain: str) -> dict[str, Any]:
    one = serve.model_copy(update={"domains": [serve.domain(domain)], "host": "0.0.0.0"})
    doc = render(one)
    return {"apiVersion": API, "kind": "RayService",
            "metadata": _meta(cfg, f"anomalymoe-{domain}", {"anomalymoe.io/serve-config-hash": one.config_hash()}),
            "spec": {"serveConfigV2": yaml.dump(doc, Dumper=NoAliasDumper, sort_keys=False),
                     "rayClusterConfig": _cluster_spec(cfg, cfg.serve_workers)}}


def render_all(cfg: ClusterConfig, serve: ServeConfig) -> dict[str, dict[str, Any]]:
    """file name → manifest."""
    out: dict[str, dict[str, Any]] = {
        "configmap.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(cfg, CONFIGMAP),
                           "data": {"MLFLOW_TRACKING_URI": cfg.mlflow_tracking_uri,
                                    "AWS_ENDPOINT_URL": cfg.s3_endpoint, "AWS_DEFAULT_REGION": cfg.s3_region}},
        "secret.yaml": {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(cfg, SECRET),
                        "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME"}},
        "rayjob-train.yaml": _rayjob(cfg, "anomalymoe-train", "jobs/train.py", cfg.train_args),
        "rayjob-tune.yaml": _rayjob(cfg, "anomalymoe-tune", "jobs/tune.py", cfg.tune_args),
    }
    for d in serve.domains:
        out[f"rayservice-{d.domain}.yaml"] = _rayservice(cfg, serve, d.domain)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomalymoe.platform.kuberay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO_ROOT / "infra" / "k8s" / "cluster.yaml")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "infra" / "k8s")
    a = p.parse_args(argv)
    cfg = load_cluster(a.config)
    serve = load_config(REPO_ROOT / cfg.serve_config)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, manifest in render_all(cfg, serve).items():
        (a.out / name).write_text(dump(manifest))
        print(f"wrote {a.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
