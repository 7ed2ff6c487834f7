"""Integration fixtures: real servers on 127.0.0.1, one per test session, stopped by the fixture that started them.

Each server has its own section; add new ones (Ray, MLflow, Serve) as further sections below. Servers are
session-scoped (start-up costs seconds); anything that changes process state (env vars) is applied per test,
because pytest runs tests/integration before tests/unit and a session-wide AWS_ENDPOINT_URL would leak into
unit tests (moto only intercepts AWS hostnames, so their boto3 calls would go to SeaweedFS instead).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# ------------------------------------------------------------------------------------------------ S3 (SeaweedFS)
S3_TEST_BUCKET = "anomalymoe-test"
# Variables that would point boto3 elsewhere than the test server: cleared while a test uses `s3`.
_S3_ENV_CLEAR = ("AWS_ENDPOINT_URL_S3", "ANOMALYMOE_S3_ENDPOINT", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


@dataclass
class S3Fixture:
    """What a test needs of the session's S3 server."""

    server: Any  # anomalymoe.platform.cluster.local.s3.SeaweedS3
    bucket: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def env(self) -> dict[str, str]:
        """AWS_ENDPOINT_URL / keys / region for this server (pass to subprocesses, Ray runtime_env, MLflow)."""
        return self.server.env()

    def client(self) -> Any:
        """A boto3 client with this server's credentials, independent of the process env."""
        return self.server.client()

    def uri(self, *parts: str) -> str:
        from anomalymoe.platform.data.storage import join

        return join(f"s3://{self.bucket}", *parts)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Fixture]:
    """SeaweedFS on a free port in a tmp dir, random credentials, bucket `anomalymoe-test`; stopped at session end
    (also when a test fails; ``tie_to_parent``: also if pytest itself is killed).

    The AWS env vars point at it during every test that uses this fixture (directly or through another
    fixture), see ``_s3_env``; session-scoped fixtures that start subprocesses should pass ``s3.env()``.
    """
    from anomalymoe.platform.cluster.local.s3 import LocalS3Error, SeaweedS3, weed_binary

    try:
        weed_binary()
    except LocalS3Error as e:
        pytest.fail(f"integration tests need SeaweedFS: {e}")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), access_key=f"amoe-{secrets.token_hex(4)}",
                       secret_key=secrets.token_urlsafe(24), tie_to_parent=True)
    try:
        server.start()
        server.create_bucket(S3_TEST_BUCKET)
        yield S3Fixture(server=server, bucket=S3_TEST_BUCKET)
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _s3_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the AWS env vars at the session's server for tests that use `s3`; restored after each test."""
    if "s3" not in request.fixturenames:
        return
    server: S3Fixture = request.getfixturevalue("s3")
    for var in _S3_ENV_CLEAR:
        monkeypatch.delenv(var, raising=False)
    for var, value in server.env().items():
        monkeypatch.setenv(var, value)


@pytest.fixture
def s3_prefix(s3: S3Fixture, request: pytest.FixtureRequest) -> str:
    """A fresh ``s3://anomalymoe-test/<test>-<id>/`` so tests never see each other's keys."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return s3.uri(f"{name}-{uuid.uuid4().hex[:8]}/")


# ------------------------------------------------------------------------------------------------ MLflow
MLFLOW_ARTIFACT_BUCKET = "mlflow-test"


@pytest.fixture(scope="session")
def mlflow_server(s3: S3Fixture, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real MLflow server (sqlite backend, artifacts proxied into SeaweedFS) for the session."""
    from anomalymoe.platform.cluster.local.mlflow import LocalMLflow

    s3.server.create_bucket(MLFLOW_ARTIFACT_BUCKET)
    server = LocalMLflow(tmp_path_factory.mktemp("mlflow"), artifacts=f"s3://{MLFLOW_ARTIFACT_BUCKET}/artifacts",
                         s3_env=s3.env(), tie_to_parent=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_uri(mlflow_server: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLFLOW_TRACKING_URI points at the session's server during the test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server.uri


# ------------------------------------------------------------------------------------------------ Ray head
@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A local `ray start --head` (2 CPUs, auth disabled) for the session; stopped with all its processes."""
    from anomalymoe.platform.cluster.local.ray_head import LocalRay

    head = LocalRay(tmp_path_factory.mktemp("ray-head"), num_cpus=2, tie_to_parent=True)
    try:
        head.start()
        yield head
    finally:
        head.stop()
