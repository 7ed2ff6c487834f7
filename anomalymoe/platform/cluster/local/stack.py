"""The whole local stack as one unit: SeaweedFS S3 (buckets created), an MLflow server (sqlite backend, artifacts
proxied into s3://mlflow/artifacts, one worker, job execution off) and a Ray head (auth disabled), all on
127.0.0.1, all under one state root (``$ANOMALYMOE_LOCAL_STACK``, default ``<repo>/.local-stack``) where each
keeps its log, pid file and data:

    .local-stack/s3/weed.log   .local-stack/mlflow/mlflow.log   .local-stack/ray/ray.log

`start` starts what is not running and attaches to what is (never a second copy), waiting for each to answer its
health check; `stop` ends, in reverse order, exactly the processes whose pid files this root holds (checked
against their command lines). CLI (what ``infra/local/stack.sh`` wraps)::

    python -m anomalymoe.platform.cluster.local.stack start|stop|status|env [--num-cpus N]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from anomalymoe.platform.cluster.local.mlflow import DEFAULT_PORT as MLFLOW_PORT
from anomalymoe.platform.cluster.local.mlflow import LocalMLflow
from anomalymoe.platform.cluster.local.proc import LocalServerError, default_state_root
from anomalymoe.platform.cluster.local.ray_head import DEFAULT_PORT as RAY_PORT
from anomalymoe.platform.cluster.local.ray_head import LocalRay
from anomalymoe.platform.cluster.local.s3 import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, SeaweedS3
from anomalymoe.platform.cluster.local.s3 import DEFAULT_PORT as S3_PORT

DATA_BUCKET = "anomalymoe"
MLFLOW_BUCKET = "mlflow"


@dataclass
class LocalStack:
    root: Path
    num_cpus: int | None = None
    tie_to_parent: bool = False

    def __post_init__(self):
        self.root = Path(self.root).expanduser().resolve()
        env = os.environ
        self.s3 = SeaweedS3(self.root / "s3", int(env.get("ANOMALYMOE_S3_PORT", S3_PORT)),
                            env.get("ANOMALYMOE_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY),
                            env.get("ANOMALYMOE_S3_SECRET_KEY", DEFAULT_SECRET_KEY), tie_to_parent=self.tie_to_parent)
        self.ray = LocalRay(self.root / "ray", int(env.get("ANOMALYMOE_RAY_PORT", RAY_PORT)), num_cpus=self.num_cpus,
                            tie_to_parent=self.tie_to_parent)
        self._mlflow: LocalMLflow | None = None

    @property
    def mlflow(self) -> LocalMLflow:
        """Needs the S3 server's endpoint (its port is only known once it runs)."""
        if self._mlflow is None:
            self._mlflow = LocalMLflow(self.root / "mlflow", int(os.environ.get("ANOMALYMOE_MLFLOW_PORT", MLFLOW_PORT)),
                                       artifacts=f"s3://{MLFLOW_BUCKET}/artifacts", s3_env=self.s3.env(),
                                       tie_to_parent=self.tie_to_parent)
        return self._mlflow

    def start(self, log=print) -> LocalStack:
        for name, server, then in (("S3", self.s3, self._buckets), ("MLflow", None, None), ("Ray", self.ray, None)):
            server = server or self.mlflow
            already = server.running_pid()
            server.start()
            if then:
                then()
            if not self.tie_to_parent:
                server.detach()
            log(f"[stack] {name}: {'already running' if already else 'started'} (pid {server.pid}); "
                f"log {server.log_file}")
        return self

    def _buckets(self) -> None:
        for b in (DATA_BUCKET, MLFLOW_BUCKET):
            self.s3.create_bucket(b)

    def stop(self, log=print) -> None:
        mlflow = LocalMLflow(self.root / "mlflow")  # stopping needs no S3 settings
        for name, server in (("Ray", self.ray), ("MLflow", mlflow), ("S3", self.s3)):
            log(f"[stack] {name}: {'stopped' if server.stop() else 'not running'}")

    def status(self) -> dict[str, bool]:
        mlflow = LocalMLflow(self.root / "mlflow")
        return {"s3": self.s3.running_pid() is not None, "mlflow": mlflow.running_pid() is not None,
                "ray": self.ray.running_pid() is not None}

    def env(self) -> dict[str, str]:
        """Everything a client needs: AWS_* for the S3 server, MLFLOW_TRACKING_URI, RAY_ADDRESS (job API)."""
        if not all(self.status().values()):
            raise LocalServerError(f"the local stack is not (fully) running ({self.root}): start it first")
        self.s3.port = int(self.s3.status()["endpoint"].rsplit(":", 1)[1])
        out = dict(self.s3.env())
        for server in (self.mlflow, self.ray):
            server.port = server.status()["port"]
            server.info = {k: v for k, v in server.read_server().items() if k not in ("port", "pid")}
            out.update(server.env())
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomalymoe.platform.cluster.local.stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("start", "stop", "status", "env"))
    p.add_argument("--root", type=Path, default=default_state_root(), help="state root (default: %(default)s)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    a = p.parse_args(argv)
    stack = LocalStack(a.root, num_cpus=a.num_cpus)
    try:
        if a.command == "start":
            stack.start()
            print('clients: eval "$(infra/local/stack.sh env)"')
        elif a.command == "stop":
            stack.stop()
        elif a.command == "status":
            st = stack.status()
            print("  ".join(f"{k}: {'running' if v else 'stopped'}" for k, v in st.items()))
            return 0 if all(st.values()) else 3
        else:
            for k, v in stack.env().items():
                print(f"export {k}={v}")
    except LocalServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
