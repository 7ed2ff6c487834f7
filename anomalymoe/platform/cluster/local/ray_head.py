"""A local Ray head on 127.0.0.1 for the local stack and the integration tests (``ray job submit`` target).

Ray 2.60 turns token auth on for ``ray start``; the local head runs with ``RAY_AUTH_MODE=disabled`` and binds
to 127.0.0.1 only. It runs as ``ray start --head --block`` in its own process group with its own short temp
dir, so stopping it ends exactly its processes (never ``ray stop``, which stops every Ray on the machine).

CLI (what ``infra/local/ray.sh`` wraps)::

    python -m anomalymoe.platform.cluster.local.ray_head start|stop|status|env [--state-dir DIR] [--port 6379]
        [--num-cpus N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from anomalymoe.platform.cluster.local.proc import (
    HOST,
    ManagedServer,
    default_state_root,
    free_port,
    pids_matching,
    run_cli,
    terminate,
)

DEFAULT_PORT = 6379


class LocalRay(ManagedServer):
    name = "ray"

    def __init__(self, state_dir: str | os.PathLike[str], port: int | None = None, *, num_cpus: int | None = None,
                 tie_to_parent: bool = False, start_timeout: float = 120.0):
        super().__init__(state_dir, port, tie_to_parent=tie_to_parent, start_timeout=start_timeout)
        self.num_cpus = num_cpus

    @property
    def temp_dir(self) -> Path:
        """Short and unique per state dir: Ray's unix socket paths must stay under 108 bytes."""
        return Path("/tmp") / f"amoe-ray-{hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:10]}"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{HOST}:{self.info['dashboard_port']}"

    def env(self) -> dict[str, str]:
        """What `ray job submit` and ray.init need: the job-API address and the auth mode."""
        return {"RAY_ADDRESS": self.dashboard, "RAY_AUTH_MODE": "disabled"}

    def _command(self, port: int) -> list[str]:
        dash = self.info["dashboard_port"] = free_port({port})
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
               f"--node-ip-address={HOST}", f"--dashboard-host={HOST}", f"--dashboard-port={dash}",
               "--include-dashboard=true", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        return cmd

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_AUTH_MODE"] = "disabled"
        # jobs submitted here run `python ...`: make that this environment's interpreter, not the system's
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _is_ours(self, argv: list[str]) -> bool:
        return any(a.endswith("/ray") or a == "ray" for a in argv[:2]) and f"--temp-dir={self.temp_dir}" in argv

    def _ready(self) -> bool:
        return "dashboard_port" in self.info and self._http_status(f"{self.dashboard}/api/version") == 200

    def stop(self, timeout: float = 30.0) -> bool:
        stopped = super().stop(timeout)
        leftovers = pids_matching(str(self.temp_dir))  # raylet/gcs/workers that left the group
        if leftovers:
            terminate(leftovers, timeout)
        return stopped or bool(leftovers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomalymoe.platform.cluster.local.ray_head",
                                description="Run a local Ray head on 127.0.0.1 (auth disabled, own temp dir).")
    p.add_argument("command", choices=("start", "stop", "status", "env"))
    p.add_argument("--state-dir", type=Path, default=default_state_root() / "ray")
    p.add_argument("--port", type=int, default=int(os.environ.get("ANOMALYMOE_RAY_PORT", DEFAULT_PORT)))
    p.add_argument("--num-cpus", type=int, default=None)
    a = p.parse_args(argv)
    return run_cli(lambda: LocalRay(a.state_dir, a.port, num_cpus=a.num_cpus), a.command,
                   lambda h, how: f"Ray head at {h.address}, jobs at {h.dashboard} ({how}, pid {h.pid}); "
                                  f"log {h.log_file}")


if __name__ == "__main__":
    sys.exit(main())
