"""Process plumbing shared by the local-stack servers (S3, MLflow, Ray head): free ports on 127.0.0.1, pid
files that are checked against the live process's command line (pids get reused), and a clean stop that ends
only what this state directory started."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from anomalymoe.paths import REPO_ROOT

HOST = "127.0.0.1"


class LocalServerError(RuntimeError):
    """A local server could not be started, found or stopped; the message says why and what to do."""


def port_free(port: int) -> bool:
    if not 0 < port < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


# Ray's worker processes take ports 10002-19999 on demand (its min/max_worker_port defaults): stay above them.
PORTS_FROM = 20000


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for clients' source ports (Linux: net.ipv4.ip_local_port_range; 32768-60999 if unread)."""
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(taken: set[int] | None = None, need_plus_10000: bool = False) -> int:
    """A free port from 20000 up to the start of the ephemeral range; optionally with port+10000 free too (kept
    below the ephemeral range as well where the range leaves room).

    Below the ephemeral range because a port in it can be taken between our choice and the server's bind by any
    client's outgoing connection, or by the readiness probe itself: connecting to a port in that range where
    nothing listens yet can connect the socket to itself (TCP simultaneous open), and the probe then reads its own
    request back as the answer (`BadStatusLine: GET /health HTTP/1.1`) and holds the port the server wants."""
    taken = taken or set()
    top = ephemeral_ports()[0] - (10000 if need_plus_10000 else 0)
    if top - PORTS_FROM < 1000:  # a machine whose ephemeral range starts low: the old range, probed as before
        top = 55000
    rng = random.SystemRandom()
    for _ in range(500):
        p = rng.randrange(PORTS_FROM, top)
        if p in taken or (need_plus_10000 and p + 10000 in taken):
            continue
        if port_free(p) and (not need_plus_10000 or port_free(p + 10000)):
            return p
    raise LocalServerError(f"no free TCP port found on {HOST}")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not a running server.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def pids_matching(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (e.g. a state directory path)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            if any(needle in a for a in cmdline(int(d.name))) and alive(int(d.name)):
                out.append(int(d.name))
    return sorted(out)


def terminate(pids: list[int], timeout: float = 15.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; with ``group`` each pid's whole process group (its workers)."""
    def send(sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    if any(alive(p) for p in pids):
        send(signal.SIGKILL)
        while any(alive(p) for p in pids):
            time.sleep(0.05)


class ManagedServer:
    """One server process owned through a pid file in ``state_dir``: ``start`` attaches to the copy already
    running instead of starting a second one, ``stop`` ends only the process (group) named in the pid file and
    only after ``_is_ours`` recognises its command line. Subclasses give the command, the check and readiness,
    and where they need them the hooks ``_prepare`` (before launch) and ``_cleanup`` (after stop).
    ``tie_to_parent`` makes the kernel stop the server if this Python process dies (tests: no leaked servers)."""

    name = "server"  # stem of its files in state_dir: <name>.log, <name>.pid
    title = ""  # its name in messages (default: name)
    port_key = "port"  # the key of its (main) port in server.json
    port_setting = ""  # how a user picks another port, quoted when the port is taken
    error: type[LocalServerError] = LocalServerError  # what start raises
    poll_seconds = 0.2  # how often start asks _ready

    def __init__(self, state_dir: str | os.PathLike[str], port: int | None = None, *, tie_to_parent: bool = False,
                 start_timeout: float = 60.0) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.requested_port = port
        self.tie_to_parent = tie_to_parent
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.pid: int | None = None
        self.start_seconds: float | None = None
        self.info: dict[str, Any] = {}  # what _prepare/_command chose besides the port (saved in server.json)
        self._not_ready: object = None  # why _ready last said no, if it says (quoted when start-up times out)
        self._proc: subprocess.Popen | None = None

    @property
    def label(self) -> str:
        return self.title or self.name

    # ---------------------------------------------------------------- to override
    def _prepare(self, port: int) -> None:
        """Before a launch on ``port``: choose further ports (into ``self.info``), write config files."""

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _is_ours(self, argv: list[str]) -> bool:
        raise NotImplementedError

    def _ready(self) -> bool:
        """True once it answers; it may leave the reason for a False in ``self._not_ready``."""
        raise NotImplementedError

    def _http_status(self, url: str, timeout: float = 2.0) -> int | None:
        """The status a GET of ``url`` answers with (error statuses included), or None with the reason in
        ``self._not_ready``: refused, timed out, or an answer that is not HTTP (see ``free_port``)."""
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, http.client.HTTPException) as e:
            self._not_ready = e
            return None

    def _cleanup(self) -> None:
        """After ``stop`` (whether or not one was running): remove what the server leaves behind."""

    def env(self) -> dict[str, str]:
        """Environment variables that point clients at this server (the CLI's `env` command prints them)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- state
    @property
    def log_file(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def server_file(self) -> Path:
        return self.state_dir / "server.json"

    def read_server(self) -> dict[str, Any]:
        try:
            return json.loads(self.server_file.read_text())
        except (OSError, ValueError):
            return {}

    def running_pid(self) -> int | None:
        """Pid of this state dir's live server, else None (and a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if alive(pid) and self._is_ours(cmdline(pid)):
            return pid
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        return None

    def status(self) -> dict[str, Any]:
        pid = self.running_pid()
        out: dict[str, Any] = {"running": pid is not None, "state_dir": str(self.state_dir), "log": str(self.log_file)}
        if pid is not None:
            out.update(pid=pid, port=self.read_server().get(self.port_key))
        return out

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        """Start (or attach to the running copy) and return once it answers."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        pid = self.running_pid()
        if pid is not None:
            server = self.read_server()
            port = server.get(self.port_key)
            if self.requested_port is not None and port != self.requested_port:
                raise self.error(f"{self.label} for {self.state_dir} already runs on port {port} (pid {pid}); "
                                 f"stop it before starting on port {self.requested_port}")
            self.pid, self.port = pid, port
            self.info = {k: v for k, v in server.items() if k not in (self.port_key, "pid")}
            self._wait(time.monotonic() + self.start_timeout)
            return self
        port = self.requested_port
        if port is None:
            old = self.read_server().get(self.port_key)
            port = old if isinstance(old, int) and port_free(old) else free_port()
        elif not port_free(port):
            hint = f" ({self.port_setting})" if self.port_setting else ""
            raise self.error(f"port {port} on {HOST} is already in use by another process: stop it or "
                             f"choose another port for {self.label}{hint}")
        self._prepare(port)
        cmd = self._command(port)
        if self.tie_to_parent and shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start {self.name} port {port}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=self._env(), cwd=self.state_dir, start_new_session=True,
                                          close_fds=True)
        self.pid, self.port = self._proc.pid, port
        self.pid_file.write_text(f"{self.pid}\n")
        self.server_file.write_text(json.dumps({**self.info, self.port_key: port, "pid": self.pid}, indent=1))
        try:
            self._wait(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait(self, deadline: float) -> None:
        self._not_ready = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise self.error(f"{self.label} exited with code {self._proc.returncode} during start-up; "
                                 f"log {self.log_file}:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(self.poll_seconds)
        why = f" ({self._not_ready})" if self._not_ready is not None else ""
        raise self.error(f"{self.label} on port {self.port} did not become ready within "
                         f"{self.start_timeout:.0f} s{why}; log {self.log_file}:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop this state dir's server and its workers (its process group); False if none was running."""
        pid = self.pid if self._proc is not None and self._proc.poll() is None else self.running_pid()
        stopped = False
        if pid is not None:
            terminate([pid], timeout, group=True)
            stopped = True
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=1)
            self._proc = None
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        self._cleanup()
        self.pid = None
        return stopped

    def detach(self) -> None:
        """Leave the server running when this process exits (CLI start)."""
        if self._proc is not None:
            self._proc.returncode = 0  # no "still running" warning at exit

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_state_root() -> Path:
    root = os.environ.get("ANOMALYMOE_LOCAL_STACK")
    return Path(root) if root else REPO_ROOT / ".local-stack"



def run_cli(make: Callable[[], ManagedServer], command: str, started: Callable[[Any, str], str],
            then: Callable[[Any], object] | None = None) -> int:
    """start|stop|status|env for a local server (the infra/local/*.sh scripts). ``make`` builds the server (it
    may raise LocalServerError for bad settings); ``then`` runs once it answers (e.g. create buckets);
    ``started`` words the start line ("already running" or "started in N s" is passed in). Exit codes: 0 ok,
    1 error, 3 not running."""
    try:
        server = make()
        if command == "start":
            already = server.running_pid()
            server.start()
            if then is not None:
                then(server)
            server.detach()
            print(started(server, "already running" if already else f"started in {server.start_seconds:.1f} s"))
            return 0
        if command == "stop":
            print("stopped" if server.stop() else f"not running ({server.state_dir})")
            return 0
        st = server.status()
        if command == "status":
            where = st.get("endpoint") or f"port {st.get('port')}"
            print(f"running, pid {st['pid']}, {where}" if st["running"] else "not running",
                  f"(state {st['state_dir']}, log {st['log']})")
            return 0 if st["running"] else 3
        if not st["running"]:
            print(f"local {server.label} is not running ({server.state_dir}): start it first", file=sys.stderr)
            return 3
        server.port = st["port"]
        server.info = {k: v for k, v in server.read_server().items() if k not in (server.port_key, "pid")}
        for k, v in server.env().items():
            print(f"export {k}={v}")
        return 0
    except LocalServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
