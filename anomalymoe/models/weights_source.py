"""How a remote weights URI (``s3://…``) becomes a local file. The model imports nothing of the platform: the
platform's storage layer registers its fetcher here when it is imported (anomalymoe.platform.data.storage: the S3
endpoint settings, retries and the ETag-keyed cache every other download uses), so there is one S3 download."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

FETCHERS: dict[str, Callable[[str], Path]] = {}


def register(prefix: str, fetch: Callable[[str], Path]) -> None:
    FETCHERS[prefix] = fetch


def fetch(uri: str) -> Path | None:
    """The local copy of `uri` from the fetcher registered for its prefix; None when none is."""
    for prefix, fn in FETCHERS.items():
        if uri.startswith(prefix):
            return Path(fn(uri))
    return None
