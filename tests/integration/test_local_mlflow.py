"""The local MLflow server: real process, sqlite registry, artifacts proxied into the real S3 server."""

from __future__ import annotations

import urllib.request

import pytest

from anomalymoe.platform.cluster.local.mlflow import LocalMLflow
from anomalymoe.platform.cluster.local.proc import LocalServerError, pids_matching

pytestmark = pytest.mark.integration


def test_run_artifacts_land_in_s3_and_registry_works(mlflow_uri, s3, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    with urllib.request.urlopen(mlflow_uri + "/health", timeout=5) as r:
        assert r.status == 200
    (tmp_path / "report.json").write_text('{"auroc": 0.9}')
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("local-mlflow-test")
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.002)
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_artifact(str(tmp_path / "report.json"), artifact_path="eval")
    # the artifact went through the server into the S3 bucket
    keys = [o["Key"] for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket="mlflow-test")
            for o in page.get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/eval/report.json") for k in keys), keys
    client = MlflowClient(mlflow_uri)
    name = "anomalymoe-local-mlflow-test"
    client.create_registered_model(name)
    v = client.create_model_version(name, f"runs:/{run.info.run_id}/eval", run.info.run_id)
    client.set_registered_model_alias(name, "challenger", v.version)
    assert client.get_model_version_by_alias(name, "challenger").version == v.version


def test_start_twice_attaches_and_stop_leaves_nothing(mlflow_server, tmp_path):
    state = tmp_path / "ml"
    a = LocalMLflow(state, tie_to_parent=True).start()
    try:
        b = LocalMLflow(state).start()  # a second start attaches: same pid, same port
        assert (b.pid, b.port) == (a.pid, a.port)
        with pytest.raises(LocalServerError, match="already runs on port"):
            LocalMLflow(state, port=a.port + 1).start()
    finally:
        assert LocalMLflow(state).stop()  # a fresh object finds it through the pid file
    assert pids_matching(str(state)) == []  # the server and its workers are gone
    assert LocalMLflow(state).status()["running"] is False
    assert not LocalMLflow(state).stop()
