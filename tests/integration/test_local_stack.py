"""The whole local stack through the script users run (infra/local/stack.sh): S3 with its buckets, MLflow with
artifacts in that S3, a Ray head. Starting twice attaches (no second copy), the env it prints reaches all three,
and stopping leaves no process of it running."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from anomalymoe.platform.cluster.local.proc import cmdline, free_port, pids_matching

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "local" / "stack.sh"


def _run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"stack.sh {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_stack_start_twice_env_and_clean_stop(tmp_path):
    from anomalymoe.platform.cluster.local.ray_head import LocalRay
    from anomalymoe.platform.cluster.local.stack import LocalStack

    root = tmp_path / "stack"
    taken: set[int] = set()
    ports = {}
    for var in ("ANOMALYMOE_S3_PORT", "ANOMALYMOE_MLFLOW_PORT", "ANOMALYMOE_RAY_PORT"):
        ports[var] = free_port(taken)
        taken.add(ports[var])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))},
           "ANOMALYMOE_LOCAL_STACK": str(root), **{k: str(v) for k, v in ports.items()}}
    ray_tmp = str(LocalRay(root / "ray").temp_dir)

    def ours() -> list[int]:
        return sorted(set(pids_matching(str(root)) + pids_matching(ray_tmp)))

    def servers() -> list[int]:
        """The long-lived servers: SeaweedFS, Ray's GCS and raylet (by executable) and the MLflow server (python -m
        mlflow). Ray also starts and retires helper processes of its own at any time (their arguments name the raylet
        and the GCS too), so neither a count of every process nor a match on arguments is stable."""
        def is_server(argv: list[str]) -> bool:
            named = bool(argv) and Path(argv[0]).name in ("weed", "gcs_server", "raylet")
            return named or argv[1:3] == ["-m", "mlflow"]

        return sorted(p for p in ours() if is_server(cmdline(p)))

    try:
        first = _run(env, "start", "--num-cpus", "1")
        assert first.stdout.count("started") == 3, first.stdout
        main = servers()
        st = LocalStack(root).status()
        assert st == {"s3": True, "mlflow": True, "ray": True}
        assert _run(env, "status").returncode == 0
        second = _run(env, "start")
        assert second.stdout.count("already running") == 3, second.stdout
        main_pids = {s.running_pid() for s in (LocalStack(root).s3, LocalStack(root).ray)}
        assert main_pids <= set(ours()) and servers() == main  # attached: no second copy of any server
        exports = dict(line.removeprefix("export ").split("=", 1) for line in _run(env, "env").stdout.splitlines())
        assert exports["AWS_ENDPOINT_URL"].endswith(f":{ports['ANOMALYMOE_S3_PORT']}")
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['ANOMALYMOE_MLFLOW_PORT']}"
        with urllib.request.urlopen(f"{exports['MLFLOW_TRACKING_URI']}/health", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{exports['RAY_ADDRESS']}/api/version", timeout=10) as r:
            assert r.status == 200
        import boto3

        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        assert {"anomalymoe", "mlflow"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
        # MLflow stores artifacts in that S3 (proxied): log one and find it in the bucket
        code = ("import mlflow; mlflow.set_tracking_uri('{u}'); "
                "r = mlflow.start_run(); mlflow.log_text('hi', 'note.txt'); mlflow.end_run()").format(
                    u=exports["MLFLOW_TRACKING_URI"])
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env, capture_output=True)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith("note.txt") for k in keys), keys
    finally:
        stop = _run(env, "stop", check=False)
    assert stop.returncode == 0, stop.stderr
    assert ours() == [], f"left running: {ours()}"
    assert _run(env, "status", check=False).returncode == 3
