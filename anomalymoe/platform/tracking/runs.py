"""A training run in MLflow: the run itself (created, or resumed by name), the logger rank 0 uses while training
(never blocks training: metrics are queued and retried in the background), the driver's retry of its MLflow calls
after training, and the backfill of the steps MLflow missed from the checkpointed history."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomalymoe.paths import REPO_ROOT

log = logging.getLogger(__name__)


def fail_fast_mlflow_http() -> None:
    """MLflow's HTTP client retries a refused connection for minutes by default (7 tries, exponential backoff),
    blocking the caller; our callers retry themselves, on their own schedule. A user's own setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class MLflowLogger:
    """Rank 0's metric logging, off the training loop: `log` only queues; a background thread sends the queue every
    few seconds and keeps it while MLflow is unreachable (one warning per outage), so a dead or slow MLflow server
    never stalls training. `close` makes a bounded last attempt; the driver backfills whatever is still missing
    from the history every checkpoint carries (finish)."""

    def __init__(self, spec: dict, interval: float = 2.0):
        import threading

        self.client, self.run_id, self.pending = None, spec.get("run_id"), []
        self.interval, self.down_since = interval, None
        self._lock, self._stop = threading.Lock(), threading.Event()
        if not self.run_id:
            return
        fail_fast_mlflow_http()
        from mlflow import MlflowClient

        self.client = MlflowClient(spec["tracking_uri"])
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]

    def flush(self) -> bool:
        with self._lock:
            batch = list(self.pending)
        try:
            for i in range(0, len(batch), 500):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 500])
        except Exception as e:  # noqa: BLE001 - MLflow/HTTP errors vary; keep the points, retry later
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("MLflow unreachable (%s): training goes on, %d metric points kept and retried",
                            str(e)[:200], len(batch))
            return False
        with self._lock:
            self.pending = self.pending[len(batch):]
        if self.down_since is not None:
            log.warning("MLflow reachable again after %.0f s: %d queued metric points sent",
                        time.monotonic() - self.down_since, len(batch))
            self.down_since = None
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.pending:
                self.flush()

    def close(self, timeout: float = 30.0) -> None:
        if self.client is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self.pending and not self.flush() and time.monotonic() < deadline:
            time.sleep(2.0)
        if self.pending:
            log.warning("%d metric points not sent to MLflow; the driver logs them from the run's history",
                        len(self.pending))


# ------------------------------------------------------------------------------------------ driver side
def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_run(experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
    """The MLflow run of this training run: an unfinished run of the same name is resumed (same run id)."""
    from mlflow.entities import Param, RunTag

    from anomalymoe.platform.tracking import registry

    c = registry.client()
    exp = registry.experiment_id(experiment)
    found = c.search_runs([exp], filter_string=f"tags.mlflow.runName = '{run_name}'", max_results=5)
    live = [r for r in found if r.info.status != "FINISHED"]
    if live:
        run_id = live[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        print(f"[mlflow] resuming run {run_id} ({run_name})", flush=True)
        return run_id
    run_id = c.create_run(exp, run_name=run_name, tags=tags).info.run_id
    items = [Param(k[:250], v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100], tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [])
    return run_id


class MLflowUnavailable(RuntimeError):
    """MLflow stayed unreachable past the wait; the message says where the results are and how to finish."""


class MLflowRetry:
    """Runs an MLflow call, retrying with backoff while the server is unreachable or failing (5xx), for at most
    ANOMALYMOE_MLFLOW_WAIT_S (default 600 s) in all; a 4xx answer is an error at once."""

    def __init__(self, out: Path, run_name: str):
        fail_fast_mlflow_http()
        self.out, self.run_name = out, run_name
        self.deadline = time.monotonic() + float(os.environ.get("ANOMALYMOE_MLFLOW_WAIT_S", "600"))

    def __call__(self, fn, what: str):
        from mlflow.exceptions import MlflowException

        delay = 2.0
        while True:
            try:
                return fn()
            except MlflowException as e:
                status = e.get_http_status_code() if hasattr(e, "get_http_status_code") else 500
                transient = status >= 500 or status == 429 or "Max retries" in str(e) or "onnection" in str(e)
                if not transient:
                    raise
                err = e
            except OSError as e:  # connection refused/reset below MLflow's client
                err = e
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise MLflowUnavailable(
                    f"MLflow stayed unreachable ({str(err)[:200]}) while logging the {what}. Nothing is lost: the "
                    f"model, its evaluation and the history are in {self.out}, the checkpoints in the run storage. "
                    f"Rerun the same command (--name {self.run_name}) once MLflow is back: training resumes at its "
                    "last step and only this logging and registration is redone.") from None
            print(f"[mlflow] {what}: MLflow unreachable ({str(err)[:120]}); retrying in {delay:.0f} s "
                  f"(gives up in {left:.0f} s)", flush=True)
            time.sleep(min(delay, max(left, 0.1)))
            delay = min(2 * delay, 30.0)


def backfill_history(c, run_id: str, history: list[dict]) -> int:
    """Log the history points (every report of rank 0, carried in the checkpoints) that the run does not have yet:
    the ones rank 0 could not send while MLflow was down, or lost with a killed worker. Returns how many steps."""
    from mlflow.entities import Metric

    have = {m.step for m in c.get_metric_history(run_id, "loss")}
    missing = [h for h in history if "step" in h and int(h["step"]) not in have]
    now = int(time.time() * 1000)
    points = [Metric(k, float(v), now, int(h["step"])) for h in missing for k, v in h.items()
              if k != "step" and isinstance(v, int | float) and np.isfinite(v)]
    for i in range(0, len(points), 500):
        c.log_batch(run_id, metrics=points[i : i + 500])
    if missing:
        print(f"[mlflow] logged {len(missing)} reported steps the run did not have yet", flush=True)
    return len(missing)


def flatten_params(prefix: str, d: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(d, dict):
        for k, v in d.items():
            flatten_params(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(d) if isinstance(d, list | tuple) else str(d)
    return out
