"""One interface over ``s3://bucket/key`` URIs and local paths (plain or ``file://``).

Why: every job takes ``--data``/``--out`` as either a local folder or an S3 prefix, and users must get one clear
sentence when something is wrong (missing key or bucket, bad credentials, server down) rather than a botocore
traceback. Four error classes cover what a caller can act on; each is also the matching builtin
(``FileNotFoundError``, ``PermissionError``, ``ConnectionError``) so generic handlers keep working.

S3 endpoint and credentials come from the standard AWS settings (``AWS_ENDPOINT_URL[_S3]``, the credential
chain, ``AWS_REGION``/``AWS_DEFAULT_REGION``), with ``ANOMALYMOE_S3_ENDPOINT`` as a fallback endpoint. Tuning
by env: ``ANOMALYMOE_MULTIPART_MB`` (64), ``ANOMALYMOE_S3_MAX_ATTEMPTS`` (3), ``ANOMALYMOE_S3_CONNECT_TIMEOUT``
(2 s), ``ANOMALYMOE_S3_READ_TIMEOUT`` (20 s): with the defaults an unreachable endpoint fails in under ~10 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from anomalymoe.models import weights_source

__all__ = [
    "AccessDenied", "NotFound", "StorageError", "Unreachable", "delete", "download_file", "exists", "is_s3",
    "join", "list_files", "local_copy", "multipart_threshold", "parent", "read_bytes", "read_text",
    "s3_client", "s3_endpoint", "upload_file", "write_bytes", "write_text",
]

T = TypeVar("T")
MiB = 1024 * 1024
_TMP_SUFFIX = ".amoe-tmp"  # in-flight atomic writes; never listed
_MIN_PART = 5 * MiB  # S3's smallest multipart part


# ---------------------------------------------------------------------------------------------------- errors
class StorageError(Exception):
    """A storage operation failed; the message names the URI and what to do. ``original`` keeps the cause."""

    original: BaseException | None = None


class NotFound(StorageError, FileNotFoundError):
    """The key, bucket or local file does not exist."""


class AccessDenied(StorageError, PermissionError):
    """Credentials are missing, wrong, or not allowed to do this."""


class Unreachable(StorageError, ConnectionError):
    """The S3 endpoint did not answer (or kept failing) after the configured retries."""


class _Changed(StorageError):
    """The object was replaced between HEAD and GET (If-Match failed); internal, retried by local_copy."""


def _err(cls: type[StorageError], message: str, original: BaseException | None = None) -> StorageError:
    e = cls(message)
    e.original = original
    return e


# ---------------------------------------------------------------------------------------------------- URIs
def is_s3(uri: str | os.PathLike[str]) -> bool:
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


def _split_scheme(uri: str) -> tuple[str, str]:
    """('s3://' | 'file://' | '', the rest)."""
    if is_s3(uri):
        return "s3://", uri[5:]
    if uri[:7].lower() == "file://":
        return "file://", uri[7:]
    return "", uri


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise _err(StorageError, f"malformed S3 URI {uri!r}: expected s3://bucket/key")
    return bucket, key


def _object(uri: str) -> tuple[str, str]:
    """Bucket and key of a URI that must name one object (not a bucket or a 'folder')."""
    bucket, key = _bucket_key(uri)
    if not key or key.endswith("/"):
        raise _err(StorageError, f"{uri} names a bucket or folder, not an object: give s3://bucket/path/to/file")
    return bucket, key


def _local(uri: str | os.PathLike[str]) -> Path:
    uri = os.fspath(uri)
    scheme, rest = _split_scheme(uri)
    if scheme == "file://":
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise _err(StorageError, f"{uri}: file:// URIs on another host ({parsed.netloc}) are not supported")
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(rest).expanduser()


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or S3 URI with single slashes; a trailing '/' on the last part stays.

    Parts are relative even if they start with '/' (unlike os.path.join, which would drop ``base``).
    """
    base = os.fspath(base)
    clean = [re.sub("/+", "/", p).strip("/") for p in map(os.fspath, parts)]
    clean = [c for c in clean if c]
    if not clean:
        return base
    scheme, rest = _split_scheme(base)
    tail = "/".join(clean) + ("/" if os.fspath(parts[-1]).endswith("/") else "")
    head = rest.rstrip("/")
    if head:
        return f"{scheme}{head}/{tail}"
    if rest.startswith("/"):  # the root: "/", "file:///"
        return f"{scheme}/{tail}"
    return f"{scheme}{tail}"


class UnsafePath(StorageError, ValueError):
    """A path part from outside data (an S3 key, a CSV column, a name) that would leave its root."""


def safe_join(base: str | os.PathLike[str], *parts: str) -> str:
    """`join` for parts that come from outside data (S3 key names, CSV columns, catalog or tenant names): each must
    be a relative path that stays under `base`. A '..' segment, an absolute part ('/…', which pathlib would put at
    the root), a backslash (a Windows separator: 'a\\..\\b') or a NUL is refused with UnsafePath, never
    normalised away: data that tries it is wrong or hostile, and the caller should say so."""
    base = os.fspath(base)
    for p in map(os.fspath, parts):
        segs = p.split("/")
        if "\x00" in p or "\\" in p or p.startswith("/") or ".." in segs:
            raise _err(UnsafePath, f"{p!r} would leave {base} (absolute, '..', a backslash or a NUL in a path part "
                                   "taken from data); refusing it")
    return join(base, *parts)


def parent(uri: str | os.PathLike[str]) -> str:
    """The containing folder/prefix. A bucket root and '/' are their own parents (like ``Path('/').parent``)."""
    uri = os.fspath(uri)
    scheme, rest = _split_scheme(uri)
    stripped = rest.rstrip("/")
    if scheme == "s3://":
        return f"s3://{stripped.rsplit('/', 1)[0]}" if "/" in stripped else f"s3://{stripped}"
    if not stripped:
        return f"{scheme}/" if rest.startswith("/") else (f"{scheme}." if not scheme else uri)
    up = posixpath.dirname(stripped)
    if not up:
        return f"{scheme}/" if stripped.startswith("/") else "."
    return f"{scheme}{up}"


# ---------------------------------------------------------------------------------------------------- S3 client
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise _err(StorageError, f"{name}={raw!r} is not a number: fix or unset it") from None


def _max_attempts() -> int:
    return max(1, int(_env_float("ANOMALYMOE_S3_MAX_ATTEMPTS", _env_float("AWS_MAX_ATTEMPTS", 3))))


def s3_endpoint() -> str | None:
    """The S3 endpoint URL in effect, or None for AWS itself."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "ANOMALYMOE_S3_ENDPOINT"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def s3_client() -> Any:
    """A boto3 S3 client, cached per (endpoint, process, credential env): clients are thread-safe but not fork-safe.

    Retries: botocore "standard" mode (5xx, throttling, connection errors; never 4xx). Small connect/read
    timeouts so a dead endpoint fails fast instead of hanging a job.
    """
    endpoint = s3_endpoint()
    attempts = _max_attempts()
    connect = _env_float("ANOMALYMOE_S3_CONNECT_TIMEOUT", 2.0)
    read = _env_float("ANOMALYMOE_S3_READ_TIMEOUT", 20.0)
    key = (endpoint, os.getpid(), attempts, connect, read, *(os.environ.get(v) for v in _CRED_ENV))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = new_s3_client(endpoint, attempts=attempts, connect_timeout=connect, read_timeout=read)
            if len(_CLIENTS) > 16:
                _CLIENTS.clear()
            _CLIENTS[key] = client
    return client


def new_s3_client(endpoint: str | None, *, access_key: str | None = None, secret_key: str | None = None,
                  region: str | None = None, attempts: int = 3, connect_timeout: float = 2.0,
                  read_timeout: float = 20.0) -> Any:
    """The one way a boto3 S3 client is built: botocore "standard" retries, short timeouts, and for S3-compatible
    servers path-style buckets with checksums only where the API needs them. Credentials from the AWS chain unless
    given (a local server's own keys). `s3_client()` caches these per settings; the local SeaweedFS manager builds
    its own with its keys."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or session.region_name
    extra: dict[str, Any] = {}
    if endpoint:
        extra = {"s3": {"addressing_style": "path"}, "request_checksum_calculation": "when_required",
                 "response_checksum_validation": "when_required"}
    config = Config(retries={"mode": "standard", "total_max_attempts": attempts}, connect_timeout=connect_timeout,
                    read_timeout=read_timeout, max_pool_connections=32, **extra)
    keys = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key} if access_key else {}
    try:
        return session.client("s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=config, **keys)
    except ValueError as e:
        raise _err(StorageError, f"invalid S3 endpoint {endpoint!r} ({e}): fix AWS_ENDPOINT_URL", e) from None


STATIC_CREDENTIALS = ("env", "explicit", "shared-credentials-file", "config-file")  # botocore methods that never expire


def pyarrow_filesystem() -> Any:
    """A pyarrow S3 filesystem with the same settings as `s3_client()` (endpoint, region; Ray Train's checkpoint
    storage). Static keys (env, a credentials file) are handed over; refreshable ones (an IAM role, assume-role,
    web identity, SSO: STS tokens that expire, typically within an hour) are not frozen into it: pyarrow's own AWS
    chain resolves and refreshes them in every process that uses it, so a long run outlives its first token."""
    import boto3
    import pyarrow.fs

    creds = boto3.Session().get_credentials()
    kw: dict[str, Any] = {}
    if creds is not None and getattr(creds, "method", "") in STATIC_CREDENTIALS:
        c = creds.get_frozen_credentials()
        kw.update(access_key=c.access_key, secret_key=c.secret_key, session_token=c.token)
    endpoint = s3_endpoint()
    if endpoint:
        kw["endpoint_override"] = endpoint
        kw["scheme"] = "https" if endpoint.startswith("https") else "http"
    kw["region"] = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return pyarrow.fs.S3FileSystem(**kw)


def multipart_threshold() -> int:
    """Bytes above which uploads go multipart (``ANOMALYMOE_MULTIPART_MB``, default 64 MiB)."""
    return max(_MIN_PART, int(_env_float("ANOMALYMOE_MULTIPART_MB", 64) * MiB))


def _transfer_config(multipart_mb: float | None = None) -> Any:
    from boto3.s3.transfer import TransferConfig

    threshold = max(_MIN_PART, int(multipart_mb * MiB)) if multipart_mb is not None else multipart_threshold()
    chunk = int(_env_float("ANOMALYMOE_MULTIPART_CHUNK_MB", 0) * MiB) or min(threshold, 16 * MiB)
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=max(_MIN_PART, chunk),
                          max_concurrency=8)


# ---------------------------------------------------------------------------------------------------- S3 errors
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "InvalidSecurity",
           "RequestTimeTooSkewed", "AuthorizationHeaderMalformed"}
_BUSY = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable",
         "InternalError", "RequestTimeout", "503", "500", "502", "504"}


def _endpoint_name() -> str:
    try:
        return s3_client().meta.endpoint_url
    except Exception:  # noqa: BLE001 - only used to word an error message
        return s3_endpoint() or "the AWS S3 endpoint"


def _client_error(exc: BaseException) -> BaseException:
    """boto3's transfer manager hides the ClientError inside S3UploadFailedError's context: dig it out."""
    from botocore.exceptions import ClientError

    seen = exc
    for _ in range(5):
        if isinstance(seen, ClientError):
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return exc


def _map_s3(exc: BaseException, uri: str, doing: str) -> StorageError:
    """One clear sentence per failure class; never retried here (botocore already retried what is transient)."""
    from botocore import exceptions as bex

    exc = _client_error(exc)
    endpoint = _endpoint_name()
    bucket = uri[5:].partition("/")[0]
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = err.get("Message", "")
        if code == "NoSuchBucket":
            return _err(NotFound, f"bucket {bucket!r} does not exist at {endpoint} ({doing} {uri}): "
                                  "create it or fix the URI", exc)
        if code in _NOT_FOUND or status == 404:
            return _err(NotFound, f"{uri} does not exist ({doing} it at {endpoint}): check the path, or write it "
                                  "first", exc)
        if code in _DENIED or status == 403:
            why = {"InvalidAccessKeyId": "the access key id is not known to the server; check AWS_ACCESS_KEY_ID "
                                         "or AWS_PROFILE",
                   "SignatureDoesNotMatch": "the secret key does not match the access key; check "
                                            "AWS_SECRET_ACCESS_KEY",
                   "ExpiredToken": "the session token has expired; refresh the credentials",
                   "RequestTimeTooSkewed": "this machine's clock is off; fix the clock"}.get(
                code, "the credentials are not allowed to do this; check the credentials and the bucket policy")
            return _err(AccessDenied, f"access denied {doing} {uri} at {endpoint} ({code}): {why}", exc)
        if code in _BUSY or (isinstance(status, int) and status >= 500):
            return _err(Unreachable, f"S3 endpoint {endpoint} kept failing ({status} {code}) after {_max_attempts()} "
                                     f"tries {doing} {uri}: retry later or check the server", exc)
        if code == "PreconditionFailed" or status == 412:
            return _err(_Changed, f"{uri} changed while {doing} it: retry", exc)
        return _err(StorageError, f"S3 error {doing} {uri} at {endpoint}: {code} {msg}".rstrip(), exc)
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return _err(AccessDenied, f"no usable AWS credentials {doing} {uri}: set AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)", exc)
    if isinstance(exc, bex.ConnectionError | bex.ConnectionClosedError | bex.ReadTimeoutError) or (
            type(exc).__name__ == "RetriesExceededError"):  # s3transfer: a download's streams kept breaking
        return _err(Unreachable, f"cannot reach S3 endpoint {endpoint} after {_max_attempts()} tries ({doing} {uri}): "
                                 "is the server running and AWS_ENDPOINT_URL right?", exc)
    if isinstance(exc, bex.ParamValidationError):
        return _err(StorageError, f"invalid S3 request {doing} {uri}: {exc}", exc)
    return _err(StorageError, f"S3 error {doing} {uri} at {endpoint}: {type(exc).__name__}: {exc}", exc)


def _s3(fn: Callable[[], T], uri: str, doing: str) -> T:
    """Run an S3 call, mapping errors. Only a broken response *body* is retried here: botocore retries requests,
    not a stream that dies after the headers arrived. NotFound/AccessDenied are never retried."""
    from botocore import exceptions as bex

    attempts = _max_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except (bex.ResponseStreamingError, bex.IncompleteReadError):
            if attempt == attempts:
                raise _map_s3(bex.ConnectionClosedError(endpoint_url=_endpoint_name()), uri, doing) from None
            time.sleep(min(4.0, 0.25 * 2**attempt))
        except Exception as e:  # noqa: BLE001 - ClientError, BotoCoreError, S3UploadFailedError
            if type(e).__module__.split(".")[0] not in ("botocore", "boto3", "s3transfer", "urllib3"):
                raise
            raise _map_s3(e, uri, doing) from None
    raise AssertionError("unreachable")


def _bucket_missing(bucket: str, uri: str, doing: str) -> bool:
    """After an ambiguous HEAD 404: does the bucket exist at all?"""
    from botocore.exceptions import ClientError

    try:
        s3_client().head_bucket(Bucket=bucket)
        return False
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return True
        raise _map_s3(e, uri, doing) from None


def _head(uri: str, doing: str) -> dict[str, Any]:
    """HEAD an object; a 404 says whether the key or the whole bucket is missing."""
    bucket, key = _object(uri)
    try:
        return _s3(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri, doing)
    except NotFound:
        if _s3(lambda: _bucket_missing(bucket, uri, doing), uri, doing):
            raise _err(NotFound, f"bucket {bucket!r} does not exist at {_endpoint_name()} ({doing} {uri}): "
                                 "create it or fix the URI") from None
        raise


# ---------------------------------------------------------------------------------------------------- local I/O
def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


_UMASK = _umask()  # read once at import: os.umask is process-global and not thread-safe to probe later


def _map_os(exc: OSError, uri: str, doing: str) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        return _err(NotFound, f"{uri} does not exist ({doing} it): check the path", exc)
    if isinstance(exc, PermissionError):
        return _err(AccessDenied, f"permission denied {doing} {uri}: check the file and folder permissions", exc)
    if isinstance(exc, IsADirectoryError):
        return _err(StorageError, f"{uri} is a folder, not a file ({doing} it)", exc)
    if isinstance(exc, NotADirectoryError | FileExistsError):
        return _err(StorageError, f"a file is in the way of the folders of {uri} ({doing} it)", exc)
    return _err(StorageError, f"{doing} {uri} failed: {exc.strerror or exc}", exc)


def _atomic_local(dest: Path, fill: Callable[[Any], None], uri: str, doing: str) -> None:
    """Write via a temp file in the same folder + fsync + os.replace: readers never see a partial file."""
    tmp: str | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=_TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = dest.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        tmp = None
    except StorageError:
        raise  # already worded (and NotFound/AccessDenied are OSErrors too)
    except OSError as e:
        raise _map_os(e, uri, doing) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------- API
def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = _object(uri)
        return _s3(lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read(), uri, "reading")
    try:
        return _local(uri).read_bytes()
    except OSError as e:
        raise _map_os(e, uri, "reading") from None


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole object/file. Local writes are atomic and create parent folders; S3 PUTs are atomic anyway."""
    uri = os.fspath(uri)
    data = bytes(data)
    if is_s3(uri):
        bucket, key = _object(uri)
        if len(data) > multipart_threshold():
            import io

            _s3(lambda: s3_client().upload_fileobj(io.BytesIO(data), bucket, key, Config=_transfer_config()),
                uri, "writing")
        else:
            _s3(lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data), uri, "writing")
        return
    _atomic_local(_local(uri), lambda f: f.write(data), uri, "writing")


def read_text(uri: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_text(uri: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def exists(uri: str | os.PathLike[str]) -> bool:
    """True for an existing file/object or a non-empty folder/prefix.

    A missing *bucket* raises NotFound rather than answering False: a mistyped bucket must not look like
    "not written yet" (a resume check would silently start over). ``s3://bucket`` alone answers False.
    """
    uri = os.fspath(uri)
    if not is_s3(uri):
        try:
            return _local(uri).exists()
        except OSError as e:
            raise _map_os(e, uri, "checking") from None
    bucket, key = _bucket_key(uri)
    client = s3_client()
    if not key:
        return not _s3(lambda: _bucket_missing(bucket, uri, "checking"), uri, "checking")
    if not key.endswith("/"):
        try:
            _s3(lambda: client.head_object(Bucket=bucket, Key=key), uri, "checking")
            return True
        except NotFound:
            pass
    prefix = key.rstrip("/") + "/"  # a "folder": any key below it (also tells a missing bucket apart)
    page = _s3(lambda: client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1), uri, "checking")
    return page.get("KeyCount", len(page.get("Contents", []))) > 0


def _suffix_filter(suffixes: Iterable[str] | None) -> Callable[[str], bool]:
    if suffixes is None:
        return lambda name: True
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    wanted = tuple(s.lower() for s in suffixes)
    return lambda name: name.lower().endswith(wanted)


def list_files(prefix: str | os.PathLike[str], suffixes: tuple[str, ...] | None = None,
               recursive: bool = True) -> list[str]:
    """Sorted full URIs of the files under a folder/prefix, optionally only those ending in ``suffixes``.

    ``prefix`` is a folder on both sides (``s3://b/data/cat`` lists ``data/cat/…``, not ``data/catalog.csv``);
    suffixes match case-insensitively (``.PNG`` files are still images). A missing folder/prefix lists as empty;
    a missing bucket raises NotFound. S3 listing pages through any number of keys.
    """
    prefix = os.fspath(prefix)
    keep = _suffix_filter(suffixes)
    if is_s3(prefix):
        bucket, key = _bucket_key(prefix)
        kp = key if not key or key.endswith("/") else key + "/"

        def run() -> list[str]:
            args: dict[str, Any] = {"Bucket": bucket, "Prefix": kp}
            if not recursive:
                args["Delimiter"] = "/"
            out = []
            for page in s3_client().get_paginator("list_objects_v2").paginate(**args):
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if not k.endswith("/") and keep(k):
                        out.append(f"s3://{bucket}/{k}")
            return out

        return sorted(_s3(run, prefix, "listing"))
    root = _local(prefix)
    if not root.is_dir():
        return []
    found: list[str] = []
    try:
        if recursive:
            for d, _dirs, files in os.walk(root, followlinks=True):
                rel = Path(d).relative_to(root).as_posix()
                found += [f if rel == "." else f"{rel}/{f}" for f in files]
        else:
            found = [e.name for e in os.scandir(root) if e.is_file()]
    except OSError as e:
        raise _map_os(e, prefix, "listing") from None
    found = [f for f in found if not f.endswith(_TMP_SUFFIX) and keep(f)]
    if _split_scheme(prefix)[0] == "file://":  # answer in the caller's form: a file:// URI is percent-encoded
        found = [urllib.parse.quote(f) for f in found]
    return sorted(join(prefix, f) for f in found)


def upload_file(local_path: str | os.PathLike[str], uri: str | os.PathLike[str], *,
                multipart_mb: float | None = None) -> None:
    """Copy a local file to ``uri``; S3 goes multipart above ``multipart_mb`` (default ``multipart_threshold()``)."""
    src = os.fspath(local_path)
    uri = os.fspath(uri)
    if not os.path.isfile(src):
        raise _err(NotFound, f"{src} does not exist or is not a file (uploading it to {uri}): check the path")
    if is_s3(uri):
        bucket, key = _object(uri)
        _s3(lambda: s3_client().upload_file(src, bucket, key, Config=_transfer_config(multipart_mb)),
            uri, "uploading to")
        return
    dest = _local(uri)
    if dest.exists() and os.path.samefile(src, dest):
        return

    def copy(f: Any) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 4 * MiB)

    _atomic_local(dest, copy, uri, "writing")


def download_file(uri: str | os.PathLike[str], local_path: str | os.PathLike[str]) -> None:
    """Copy ``uri`` to a local file atomically (parallel ranged GETs for big S3 objects)."""
    uri = os.fspath(uri)
    dest = Path(os.fspath(local_path)).expanduser()
    if is_s3(uri):
        bucket, key = _object(uri)
        _head(uri, "downloading")  # a clear NotFound (key vs bucket) before creating anything

        def fetch(f: Any) -> None:
            _s3(lambda: s3_client().download_fileobj(bucket, key, f, Config=_transfer_config()), uri, "downloading")

        _atomic_local(dest, fetch, str(dest), "writing")
        return
    src = _local(uri)
    if not src.is_file():
        raise _map_os(FileNotFoundError(2, "not a file") if not src.exists() else IsADirectoryError(21, "folder"),
                      uri, "downloading")
    if dest.exists() and os.path.samefile(src, dest):
        return

    def copy(f: Any) -> None:
        try:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 4 * MiB)
        except OSError as e:
            raise _map_os(e, uri, "reading") from None

    _atomic_local(dest, copy, str(dest), "writing")


def delete(uri: str | os.PathLike[str]) -> None:
    """Delete one file/object; deleting what is already gone is fine (as on S3). A missing bucket is NotFound."""
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = _object(uri)
        _s3(lambda: s3_client().delete_object(Bucket=bucket, Key=key), uri, "deleting")
        return
    try:
        _local(uri).unlink(missing_ok=True)
    except OSError as e:
        raise _map_os(e, uri, "deleting") from None


def _default_cache() -> Path:
    return Path(os.environ.get("ANOMALYMOE_CACHE") or Path.home() / ".cache" / "anomalymoe") / "s3"


def local_copy(uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local path with the content of ``uri``: local paths as they are; S3 objects downloaded once into a cache
    keyed by URI + ETag, so a changed object is fetched again and an unchanged one costs one HEAD.

    The download is pinned to the ETag it was keyed by (GET If-Match), so the cache never mixes versions.
    Older versions of the same URI are removed from the cache.
    """
    uri = os.fspath(uri)
    if not is_s3(uri):
        path = _local(uri)
        if not path.exists():
            raise _err(NotFound, f"{uri} does not exist: check the path")
        return path
    bucket, key = _object(uri)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache()
    slot = root / hashlib.sha256(uri.encode()).hexdigest()[:24]
    for _ in range(3):
        head = _head(uri, "reading")
        etag = str(head.get("ETag", ""))
        entry = slot / (re.sub(r"[^A-Za-z0-9-]", "", etag) or "noetag") / posixpath.basename(key)
        if entry.is_file() and entry.stat().st_size == head.get("ContentLength", entry.stat().st_size):
            return entry

        def fetch(f: Any, etag: str = etag) -> None:
            def run() -> None:
                f.seek(0)
                f.truncate()
                args = {"IfMatch": etag} if etag else {}
                body = s3_client().get_object(Bucket=bucket, Key=key, **args)["Body"]
                shutil.copyfileobj(body, f, MiB)

            _s3(run, uri, "downloading")

        try:
            _atomic_local(entry, fetch, str(entry), "caching")
        except _Changed:
            continue  # replaced between HEAD and GET: look again
        for old in slot.iterdir():
            if old != entry.parent and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return entry
    raise _err(StorageError, f"{uri} kept changing while it was downloaded: retry when writers are done")


# backbone weights in S3 come through here too (one download path: endpoint settings, retries, the ETag cache)
weights_source.register("s3://", local_copy)
