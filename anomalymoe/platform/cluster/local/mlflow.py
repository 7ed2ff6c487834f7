"""A real MLflow tracking + registry server on 127.0.0.1 for tests and the local stack.

sqlite backend store in the state dir; artifacts proxied by the server (clients upload through it and need
no S3 credentials) into the local S3 server when one is given, else into a folder of the state dir. One
worker and job execution off (DESIGN.md §3: ≈430 MiB, healthy in ~20 s on 2 cores).

CLI (what ``infra/local/mlflow.sh`` wraps)::

    python -m anomalymoe.platform.cluster.local.mlflow start|stop|status|env [--state-dir DIR] [--port 5000]
        [--artifacts s3://bucket/prefix]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from anomalymoe.platform.cluster.local.proc import HOST, LocalServerError, ManagedServer, default_state_root, run_cli

DEFAULT_PORT = 5000
# Server-side S3 settings it must not inherit from the caller unless we set them (artifacts go where we say).
_S3_ENV = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_DEFAULT_REGION")


class LocalMLflow(ManagedServer):
    """``artifacts``: an ``s3://bucket/prefix`` (then ``s3_env`` gives the server its endpoint and keys) or None
    for ``<state_dir>/artifacts``."""

    name = "mlflow"

    def __init__(self, state_dir: str | os.PathLike[str], port: int | None = None, *, artifacts: str | None = None,
                 s3_env: dict[str, str] | None = None, tie_to_parent: bool = False, start_timeout: float = 120.0):
        super().__init__(state_dir, port, tie_to_parent=tie_to_parent, start_timeout=start_timeout)
        if artifacts is not None and not artifacts.startswith("s3://"):
            raise LocalServerError(f"MLflow artifacts must be an s3:// URI or None (a local folder), got {artifacts}")
        if artifacts is not None and not s3_env:
            raise LocalServerError("artifacts in S3 need s3_env (AWS_ENDPOINT_URL and keys of the S3 server)")
        self.artifacts = artifacts
        self.s3_env = dict(s3_env or {})

    @property
    def db(self) -> Path:
        return self.state_dir / "mlflow.db"

    @property
    def uri(self) -> str:
        if self.port is None:
            raise LocalServerError(f"MLflow in {self.state_dir} is not started: call start() first")
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """What clients need: the tracking URI (artifacts go through the server)."""
        return {"MLFLOW_TRACKING_URI": self.uri}

    def _command(self, port: int) -> list[str]:
        dest = self.artifacts or (self.state_dir / "artifacts").as_uri()
        return [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", dest]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _S3_ENV and not k.startswith("MLFLOW_TRACKING")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        if self.artifacts:
            env.update(self.s3_env)
            if "AWS_ENDPOINT_URL" in self.s3_env:
                env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_env["AWS_ENDPOINT_URL"]
        return env

    def _is_ours(self, argv: list[str]) -> bool:
        return "mlflow" in " ".join(argv[:4]) and "server" in argv and f"sqlite:///{self.db}" in argv

    def _ready(self) -> bool:
        return self._http_status(f"http://{HOST}:{self.port}/health") == 200


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomalymoe.platform.cluster.local.mlflow",
                                description="Run an MLflow tracking and registry server on 127.0.0.1.")
    p.add_argument("command", choices=("start", "stop", "status", "env"))
    p.add_argument("--state-dir", type=Path, default=default_state_root() / "mlflow",
                   help="sqlite db, log and pid file (default: $ANOMALYMOE_LOCAL_STACK/mlflow)")
    p.add_argument("--port", type=int, default=int(os.environ.get("ANOMALYMOE_MLFLOW_PORT", DEFAULT_PORT)))
    p.add_argument("--artifacts", default=os.environ.get("ANOMALYMOE_MLFLOW_ARTIFACTS"),
                   help="s3://bucket/prefix for artifacts (keys from AWS_* in the environment); "
                        "default: a folder in the state dir")
    a = p.parse_args(argv)
    s3_env = {k: os.environ[k] for k in _S3_ENV if k in os.environ and k != "MLFLOW_S3_ENDPOINT_URL"}
    return run_cli(lambda: LocalMLflow(a.state_dir, a.port, artifacts=a.artifacts, s3_env=s3_env), a.command,
                   lambda s, how: f"MLflow at {s.uri} ({how}, pid {s.pid}); db {s.db}, log {s.log_file}")


if __name__ == "__main__":
    sys.exit(main())
