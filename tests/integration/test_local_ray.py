"""The local Ray head: a real `ray start --head` on 127.0.0.1 (auth disabled), a real job submitted through its
job API, a second start attaching, and a stop that leaves none of its processes (without `ray stop`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from anomalymoe.platform.cluster.local.proc import pids_matching
from anomalymoe.platform.cluster.local.ray_head import LocalRay

pytestmark = pytest.mark.integration


def test_head_runs_a_submitted_job_and_stops_cleanly(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    head = LocalRay(tmp_path / "ray", num_cpus=2, tie_to_parent=True).start()
    try:
        again = LocalRay(tmp_path / "ray").start()  # attaches: same process, same addresses
        assert (again.pid, again.port, again.dashboard) == (head.pid, head.port, head.dashboard)
        client = JobSubmissionClient(head.dashboard)
        job = client.submit_job(entrypoint="python -c \"import ray; ray.init(); "
                                           "print('cpus', ray.cluster_resources()['CPU'])\"")
        deadline = time.monotonic() + 180
        while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, client.get_job_logs(job)
            time.sleep(1)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
        assert "cpus 2.0" in logs
    finally:
        assert LocalRay(tmp_path / "ray").stop()
    assert pids_matching(str(head.temp_dir)) == []  # gcs, raylet, dashboard and workers are all gone
    assert not LocalRay(tmp_path / "ray").status()["running"]


def test_script_start_status_env_stop(tmp_path):
    """infra/local/ray.sh as a user runs it: start detaches, status/env see it, a second start attaches, stop
    ends it."""
    import os
    import subprocess

    from anomalymoe.platform.cluster.local.proc import free_port

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ANOMALYMOE_LOCAL_STACK": str(tmp_path / "stack"), "ANOMALYMOE_RAY_PORT": str(free_port())}

    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["infra/local/ray.sh", *args], cwd=root, env=env, capture_output=True, text=True,
                              timeout=240)

    try:
        r = sh("start", "--num-cpus", "1")
        assert r.returncode == 0 and "started in" in r.stdout, r.stderr
        assert "already running" in sh("start").stdout
        assert sh("status").returncode == 0
        exports = sh("env").stdout
        assert "export RAY_ADDRESS=http://127.0.0.1:" in exports and "RAY_AUTH_MODE=disabled" in exports
    finally:
        assert sh("stop").stdout.strip() == "stopped"
    st = sh("status")
    assert st.returncode == 3 and "not running" in st.stdout
    assert pids_matching(str(LocalRay(tmp_path / "stack" / "ray").temp_dir)) == []
