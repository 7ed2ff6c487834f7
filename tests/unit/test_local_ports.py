"""Ports and readiness probes of the local servers (platform/cluster/local/proc.py), without starting one.

CI once lost 14 tests to one MLflow start: the chosen port lay in the kernel's ephemeral range, the readiness probe
connected to itself while nothing listened yet and read its own request back (`BadStatusLine: GET /health
HTTP/1.1`), which escaped the probe as an error instead of meaning "not ready yet"."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import threading
import urllib.error
from collections.abc import Iterator

import pytest

from anomalymoe.platform.cluster.local.proc import HOST, PORTS_FROM, ManagedServer, ephemeral_ports, free_port


def test_free_ports_lie_below_the_ephemeral_range() -> None:
    lo, _ = ephemeral_ports()
    roomy = lo - PORTS_FROM >= 11000  # else free_port falls back to 20000-54999 (a range that starts low)
    for _ in range(200):
        p, q = free_port(), free_port(need_plus_10000=True)
        assert PORTS_FROM <= p < (lo if roomy else 55000)
        assert PORTS_FROM <= q < (lo - 10000 if roomy else 55000)


def test_free_port_honours_taken() -> None:
    first = free_port()
    for _ in range(50):
        assert free_port({first}) != first


class _Probe(ManagedServer):
    name = "probe"


@pytest.fixture()
def probe(tmp_path) -> _Probe:
    return _Probe(tmp_path)


@contextlib.contextmanager
def _echo_once() -> Iterator[int]:
    """A listener that answers one request with the request itself, as a socket connected to itself does."""
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            request = conn.recv(4096)
            conn.sendall(request)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    t.join(5)
    srv.close()


def test_an_answer_that_is_not_http_means_not_ready(probe: _Probe) -> None:
    with _echo_once() as port:
        assert probe._http_status(f"http://{HOST}:{port}/health") is None
    assert isinstance(probe._not_ready, http.client.HTTPException)
    assert "GET /health" in str(probe._not_ready)


def test_a_refused_connection_means_not_ready(probe: _Probe) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind((HOST, 0))
        port = s.getsockname()[1]
        assert probe._http_status(f"http://{HOST}:{port}/", timeout=1) is None
    assert isinstance(probe._not_ready, urllib.error.URLError)
    assert isinstance(probe._not_ready.reason, ConnectionRefusedError)


def test_error_statuses_are_answers(probe: _Probe) -> None:
    class Forbidden(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_error(403)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer((HOST, 0), Forbidden)
    t = threading.Thread(target=srv.handle_request, daemon=True)
    t.start()
    try:
        assert probe._http_status(f"http://{HOST}:{srv.server_port}/") == 403
        assert probe._not_ready is None
    finally:
        t.join(5)
        srv.server_close()
