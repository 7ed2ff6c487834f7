"""`anomalymoe.platform.data.storage` on local paths, URI arithmetic, client settings and error mapping (no server;
the S3 behaviour is proven against SeaweedFS in tests/integration/test_storage.py)."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest
from botocore import exceptions as bex

from anomalymoe.platform.data import storage
from anomalymoe.platform.data.storage import join, parent

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_aws(monkeypatch):
    """Credentials and endpoint in the env so no test ever looks up real credentials or reaches AWS."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "ANOMALYMOE_S3_ENDPOINT", "AWS_PROFILE",
                "AWS_SESSION_TOKEN", "ANOMALYMOE_S3_MAX_ATTEMPTS", "AWS_MAX_ATTEMPTS", "ANOMALYMOE_MULTIPART_MB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


# ------------------------------------------------------------------------------------------------ URIs
@pytest.mark.parametrize(("base", "parts", "want"), [
    ("s3://b", ("x",), "s3://b/x"),
    ("s3://b/", ("/x/", "y"), "s3://b/x/y"),
    ("s3://b/p", ("a//b", "c/"), "s3://b/p/a/b/c/"),
    ("s3://b/p/", ("", "/", "k.txt"), "s3://b/p/k.txt"),
    ("s3://b", (), "s3://b"),
    ("s3://", ("b", "k"), "s3://b/k"),
    ("/data", ("/abs", "f.png"), "/data/abs/f.png"),  # unlike os.path.join, '/abs' does not drop the base
    ("/", ("x",), "/x"),
    ("rel/dir/", ("f",), "rel/dir/f"),
    ("", ("a", "b"), "a/b"),
    ("file:///tmp", ("a",), "file:///tmp/a"),
    ("file:///", ("a",), "file:///a"),
    (Path("/tmp"), ("a",), "/tmp/a"),
])
def test_join(base, parts, want):
    assert join(base, *parts) == want


@pytest.mark.parametrize(("uri", "want"), [
    ("s3://b/a/b.txt", "s3://b/a"),
    ("s3://b/a/", "s3://b"),
    ("s3://b/a", "s3://b"),
    ("s3://b", "s3://b"),
    ("s3://b/", "s3://b"),
    ("/a/b", "/a"),
    ("/a/b/", "/a"),
    ("/a", "/"),
    ("/", "/"),
    ("a", "."),
    ("a/b", "a"),
    ("file:///tmp/x", "file:///tmp"),
    ("file:///tmp", "file:///"),
])
def test_parent(uri, want):
    assert parent(uri) == want


def test_join_parent_round_trip():
    for uri in ("s3://bucket/a/b/c.png", "/x/y/z.png", "file:///x/y.png", "rel/a.png"):
        assert join(parent(uri), uri.rsplit("/", 1)[1]) == uri


def test_is_s3():
    assert storage.is_s3("s3://b/k") and storage.is_s3("S3://B/k")
    assert not storage.is_s3("/s3://b") and not storage.is_s3("file:///x") and not storage.is_s3(Path("s3:/b"))


def test_malformed_s3_uris_are_clear():
    with pytest.raises(storage.StorageError, match="malformed S3 URI"):
        storage.read_bytes("s3://")
    with pytest.raises(storage.StorageError, match="names a bucket or folder"):
        storage.read_bytes("s3://bucket/folder/")


def test_error_classes_are_also_builtins():
    assert issubclass(storage.NotFound, FileNotFoundError) and issubclass(storage.NotFound, storage.StorageError)
    assert issubclass(storage.AccessDenied, PermissionError)
    assert issubclass(storage.Unreachable, ConnectionError)
    e = storage.NotFound("s3://b/k does not exist")
    assert str(e) == "s3://b/k does not exist"


# ------------------------------------------------------------------------------------------------ local files
def test_local_round_trip_creates_parents(tmp_path):
    uri = str(tmp_path / "a" / "b" / "c.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "héllo")
    assert storage.read_text(uri) == "héllo" and storage.read_bytes(uri) == "héllo".encode()
    assert storage.exists(uri) and storage.exists(str(tmp_path / "a"))
    storage.delete(uri)
    storage.delete(uri)  # gone already: fine, as on S3
    assert not storage.exists(uri)


def test_file_uris(tmp_path):
    target = tmp_path / "with space" / "x.bin"
    uri = "file://" + str(target).replace(" ", "%20")
    storage.write_bytes(uri, b"1")
    assert target.read_bytes() == b"1"
    assert storage.read_bytes(f"file://localhost{target.as_posix().replace(' ', '%20')}") == b"1"
    assert storage.list_files("file://" + str(tmp_path).replace(" ", "%20")) == [uri]
    with pytest.raises(storage.StorageError, match="another host"):
        storage.read_bytes("file://elsewhere/x")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    dest = tmp_path / "model.json"
    dest.write_text("old")
    dest.chmod(0o640)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(storage.StorageError, match="No space left"):
        storage.write_text(str(dest), "new")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # the temp file was removed
    monkeypatch.undo()
    storage.write_text(str(dest), "new")
    assert dest.read_text() == "new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640  # an overwrite keeps the file's mode
    fresh = tmp_path / "fresh.txt"
    storage.write_text(str(fresh), "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_local_errors(tmp_path):
    with pytest.raises(storage.NotFound, match="missing.txt does not exist"):
        storage.read_bytes(str(tmp_path / "missing.txt"))
    with pytest.raises(storage.StorageError, match="is a folder"):
        storage.read_bytes(str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.StorageError, match="a file is in the way"):
        storage.write_text(str(tmp_path / "file" / "below.txt"), "y")
    with pytest.raises(storage.NotFound):
        storage.local_copy(str(tmp_path / "missing.bin"))
    with pytest.raises(storage.NotFound, match="nothing.bin does not exist"):
        storage.upload_file(tmp_path / "nothing.bin", str(tmp_path / "dest.bin"))
    with pytest.raises(storage.NotFound):
        storage.download_file(str(tmp_path / "nothing.bin"), tmp_path / "dest.bin")


def test_local_permission_denied(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("x")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # root ignores chmod, so simulate the OS refusing
    with pytest.raises(storage.AccessDenied, match="permission denied reading") as err:
        storage.read_bytes(str(f))
    assert isinstance(err.value, PermissionError)


def test_local_listing(tmp_path):
    for rel in ("cat/train/good/1.png", "cat/train/good/2.PNG", "cat/train/good/n.txt", "cat/top.png",
                "cat/.top.png.x1.amoe-tmp", "catalog.png"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    cat = str(tmp_path / "cat")
    assert storage.list_files(cat) == sorted(join(cat, r) for r in
                                             ("train/good/1.png", "train/good/2.PNG", "train/good/n.txt", "top.png"))
    assert storage.list_files(cat, suffixes=(".png",)) == [join(cat, "top.png"), join(cat, "train/good/1.png"),
                                                            join(cat, "train/good/2.PNG")]
    assert storage.list_files(cat, suffixes=".txt") == [join(cat, "train/good/n.txt")]
    assert storage.list_files(cat, recursive=False) == [join(cat, "top.png")]
    assert storage.list_files(cat + "/", recursive=False) == [join(cat, "top.png")]
    assert storage.list_files(str(tmp_path / "no-such-dir")) == []


def test_local_upload_download_and_local_copy(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1000))
    storage.upload_file(src, str(tmp_path / "up" / "a.bin"))
    storage.download_file(str(tmp_path / "up" / "a.bin"), tmp_path / "down" / "b.bin")
    assert (tmp_path / "down" / "b.bin").read_bytes() == src.read_bytes()
    storage.upload_file(src, str(src))  # onto itself: a no-op, not a truncation
    assert len(src.read_bytes()) == 1000
    assert storage.local_copy(str(src)) == src
    assert storage.local_copy("file://" + str(src)) == src


# ------------------------------------------------------------------------------------------------ S3 client
def test_s3_client_settings_and_cache(fake_aws, monkeypatch):
    client = storage.s3_client()
    assert storage.s3_client() is client  # cached
    cfg = client.meta.config
    # total_max_attempts counts the first try; botocore's "max_attempts" would count retries only (3 -> 4 tries)
    assert cfg.retries == {"mode": "standard", "total_max_attempts": 3}
    assert cfg.connect_timeout == 2 and cfg.read_timeout == 20
    assert cfg.s3["addressing_style"] == "path"
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "other")
    assert storage.s3_client() is not client  # credentials changed: a new client
    monkeypatch.setenv("ANOMALYMOE_S3_MAX_ATTEMPTS", "5")
    assert storage.s3_client().meta.config.retries["total_max_attempts"] == 5


def test_endpoint_precedence(monkeypatch):
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "ANOMALYMOE_S3_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("ANOMALYMOE_S3_ENDPOINT", "http://c")
    assert storage.s3_endpoint() == "http://c"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://b")
    assert storage.s3_endpoint() == "http://b"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://a")
    assert storage.s3_endpoint() == "http://a"


def test_multipart_threshold(monkeypatch):
    monkeypatch.delenv("ANOMALYMOE_MULTIPART_MB", raising=False)
    assert storage.multipart_threshold() == 64 * storage.MiB
    monkeypatch.setenv("ANOMALYMOE_MULTIPART_MB", "5")
    assert storage.multipart_threshold() == 5 * storage.MiB
    monkeypatch.setenv("ANOMALYMOE_MULTIPART_MB", "1")
    assert storage.multipart_threshold() == 5 * storage.MiB  # S3's smallest part
    cfg = storage._transfer_config(8)
    assert cfg.multipart_threshold == 8 * storage.MiB and cfg.multipart_chunksize == 8 * storage.MiB
    monkeypatch.setenv("ANOMALYMOE_MULTIPART_MB", "lots")
    with pytest.raises(storage.StorageError, match="ANOMALYMOE_MULTIPART_MB"):
        storage.multipart_threshold()


# ------------------------------------------------------------------------------------------------ error mapping
def _client_error(code: str, status: int) -> bex.ClientError:
    return bex.ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")


@pytest.mark.parametrize(("exc", "cls", "text"), [
    (_client_error("NoSuchKey", 404), storage.NotFound, "s3://bk/k.txt does not exist"),
    (_client_error("404", 404), storage.NotFound, "s3://bk/k.txt does not exist"),
    (_client_error("NoSuchBucket", 404), storage.NotFound, "bucket 'bk' does not exist"),
    (_client_error("InvalidAccessKeyId", 403), storage.AccessDenied, "AWS_ACCESS_KEY_ID"),
    (_client_error("SignatureDoesNotMatch", 403), storage.AccessDenied, "AWS_SECRET_ACCESS_KEY"),
    (_client_error("AccessDenied", 403), storage.AccessDenied, "bucket policy"),
    (_client_error("SlowDown", 503), storage.Unreachable, "kept failing"),
    (_client_error("InternalError", 500), storage.Unreachable, "after 3 tries"),
    (_client_error("InvalidRange", 416), storage.StorageError, "InvalidRange"),
    (bex.NoCredentialsError(), storage.AccessDenied, "no usable AWS credentials"),
    (bex.EndpointConnectionError(endpoint_url="http://x"), storage.Unreachable, "cannot reach S3 endpoint"),
    (bex.ConnectTimeoutError(endpoint_url="http://x"), storage.Unreachable, "cannot reach S3 endpoint"),
])
def test_error_mapping(fake_aws, exc, cls, text):
    err = storage._map_s3(exc, "s3://bk/k.txt", "reading")
    assert type(err) is cls and text in str(err) and err.original is exc


def test_upload_failed_error_is_unwrapped(fake_aws):
    from boto3.exceptions import S3UploadFailedError

    try:
        try:
            raise _client_error("NoSuchBucket", 404)
        except bex.ClientError as e:
            raise S3UploadFailedError(f"Failed to upload: {e}")  # noqa: B904 - what boto3 does
    except S3UploadFailedError as wrapped:
        err = storage._map_s3(wrapped, "s3://bk/k.txt", "uploading to")
    assert isinstance(err, storage.NotFound) and "bucket 'bk' does not exist" in str(err)


def test_wrapper_retries_only_broken_streams(fake_aws, monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def denied():
        calls.append(1)
        raise _client_error("AccessDenied", 403)

    with pytest.raises(storage.AccessDenied) as err:
        storage._s3(denied, "s3://bk/k", "reading")
    assert len(calls) == 1 and err.value.__suppress_context__

    calls.clear()

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise bex.ResponseStreamingError(error="connection reset")
        return b"ok"

    assert storage._s3(flaky, "s3://bk/k", "reading") == b"ok" and len(calls) == 3

    def always_broken():
        raise bex.ResponseStreamingError(error="connection reset")

    with pytest.raises(storage.Unreachable):
        storage._s3(always_broken, "s3://bk/k", "reading")

    def bug():
        raise ValueError("our own bug")

    with pytest.raises(ValueError, match="our own bug"):  # not disguised as a storage error
        storage._s3(bug, "s3://bk/k", "reading")


def test_hung_endpoint_is_unreachable_within_bounded_time(fake_aws, monkeypatch):
    """A server that accepts connections but never answers: read timeouts, retried, then Unreachable."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.getsockname()[1]}")
        monkeypatch.setenv("ANOMALYMOE_S3_READ_TIMEOUT", "0.5")
        sent = []
        storage.s3_client().meta.events.register("before-send.s3.*", lambda request, **_: sent.append(1))
        t0 = time.monotonic()
        with pytest.raises(storage.Unreachable, match="after 3 tries"):
            storage.read_bytes("s3://bk/k")
        assert time.monotonic() - t0 < 10
        assert len(sent) == 3  # the message's "3 tries" is what happened


def test_refreshable_cloud_credentials_are_not_frozen_into_checkpoint_storage(monkeypatch):
    """An IAM role's STS token expires (typically within an hour): it is no longer frozen into the checkpoint
    filesystem (pyarrow's own chain refreshes it on every worker); static keys still are handed over."""
    import boto3
    from botocore.credentials import Credentials, RefreshableCredentials

    from anomalymoe.platform.cluster import ray as ray_cluster

    seen = {}

    class FakeFS:
        def __init__(self, **kw):
            seen.clear()
            seen.update(kw)

    import pyarrow.fs

    monkeypatch.setattr(pyarrow.fs, "S3FileSystem", FakeFS)
    role = RefreshableCredentials("ASIA1", "tok-secret", "sess", expiry_time=__import__("datetime").datetime(
        2030, 1, 1, tzinfo=__import__("datetime").timezone.utc), refresh_using=lambda: {}, method="assume-role")
    monkeypatch.setattr(boto3.Session, "get_credentials", lambda self: role)
    ray_cluster.storage_config("s3://bucket/runs")
    assert "access_key" not in seen and "secret_key" not in seen
    monkeypatch.setattr(boto3.Session, "get_credentials", lambda self: Credentials("AKIA1", "static", method="env"))
    ray_cluster.storage_config("s3://bucket/runs")
    assert seen["access_key"] == "AKIA1" and seen["secret_key"] == "static"
