"""Tenants and their API keys: one JSON document where the platform keeps its config (a local path or s3://).

    {"version": 1, "tenants": {"acme": {"domains": ["textures"], "rate": {"per_second": 5, "burst": 10},
                                        "variants": {"textures": "models:/anomalymoe-textures/4"},
                                        "keys": [{"id": "3f9a…", "sha256": "…", "created": "…", "revoked": null}]}}}

A key is ``amk_<id>_<secret>`` (id: 8 hex, secret: 32 random bytes). Only the key's SHA-256 is stored: the
secret has 256 bits of entropy, so a slow password hash would add latency and no safety. A key is looked up by
its id and its hash compared with `hmac.compare_digest` (constant time). The plaintext key is shown once, by
`add`/`rotate`. The serving replicas re-read the document every few seconds (`TenantCache`), so a new tenant or
a revoked key takes effect without a restart."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..platform import storage
from .config import RateLimit

log = logging.getLogger(__name__)
PREFIX = "amk_"


class TenantError(ValueError):
    """A tenant store operation that cannot be done (unknown tenant, duplicate, bad document)."""


@dataclass(frozen=True)
class Tenant:
    name: str
    domains: tuple[str, ...]
    rate: RateLimit | None
    variants: dict[str, str]

    def allows(self, domain: str) -> bool:
        return "*" in self.domains or domain in self.domains


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def key_id(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX):].split("_", 1)
    if len(parts) != 2 or len(parts[0]) != 8 or not parts[1]:
        return None
    return parts[0]


class TenantStore:
    """Read-modify-write of the document (the CLI's side). Writes are atomic (storage.write_bytes)."""

    def __init__(self, uri: str):
        self.uri = uri

    def load(self) -> dict[str, Any]:
        if not storage.exists(self.uri):
            return {"version": 1, "tenants": {}}
        return parse(storage.read_bytes(self.uri), self.uri)

    def _save(self, doc: dict[str, Any]) -> None:
        if not storage.is_s3(self.uri):
            from pathlib import Path

            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(self.uri, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    def add(self, name: str, domains: list[str], rate: RateLimit | None = None,
            variants: dict[str, str] | None = None) -> str:
        """A new tenant with one key; returns the plaintext key (shown once)."""
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise TenantError(f"tenant name {name!r}: use letters, digits, '-', '_' or '.'")
        if not domains:
            raise TenantError("a tenant needs at least one domain (or '*')")
        doc = self.load()
        if name in doc["tenants"]:
            raise TenantError(f"tenant {name!r} exists: use `rotate` for a new key")
        doc["tenants"][name] = {"domains": sorted(set(domains)), "rate": rate.model_dump() if rate else None,
                                "variants": dict(variants or {}), "keys": [], "created": _now()}
        key = self._new_key(doc["tenants"][name])
        self._save(doc)
        return key

    def rotate(self, name: str, revoke_old: bool = False) -> str:
        """A further key for `name` (old keys stay valid unless `revoke_old`: rotate without downtime)."""
        doc = self.load()
        t = self._tenant(doc, name)
        if revoke_old:
            for k in t["keys"]:
                k["revoked"] = k.get("revoked") or _now()
        key = self._new_key(t)
        self._save(doc)
        return key

    def revoke(self, ref: str) -> list[str]:
        """Revoke a key (by key id or the key itself) or every key of a tenant (by name); returns the key ids."""
        doc = self.load()
        kid = key_id(ref) or ref
        hit = []
        for name, t in doc["tenants"].items():
            for k in t["keys"]:
                if (name == ref or k["id"] == kid) and not k.get("revoked"):
                    k["revoked"] = _now()
                    hit.append(k["id"])
        if not hit:
            raise TenantError(f"no active key or tenant {ref!r}")
        self._save(doc)
        return hit

    def listing(self) -> list[dict[str, Any]]:
        """Tenants with their key ids and states (never hashes)."""
        return [{"tenant": n, "domains": t["domains"], "rate": t.get("rate"), "variants": t.get("variants", {}),
                 "keys": [{"id": k["id"], "created": k["created"], "revoked": k.get("revoked")} for k in t["keys"]]}
                for n, t in sorted(self.load()["tenants"].items())]

    @staticmethod
    def _tenant(doc: dict[str, Any], name: str) -> dict[str, Any]:
        if name not in doc["tenants"]:
            raise TenantError(f"no tenant {name!r}")
        return doc["tenants"][name]

    @staticmethod
    def _new_key(t: dict[str, Any]) -> str:
        used = {k["id"] for k in t["keys"]}
        kid = secrets.token_hex(4)
        while kid in used:
            kid = secrets.token_hex(4)
        key = f"{PREFIX}{kid}_{secrets.token_urlsafe(32)}"
        t["keys"].append({"id": kid, "sha256": _hash(key), "created": _now(), "revoked": None})
        return key


def parse(data: bytes, uri: str = "<tenants>") -> dict[str, Any]:
    try:
        doc = json.loads(data)
        if not isinstance(doc.get("tenants"), dict):
            raise ValueError("no 'tenants' object")
        return doc
    except (ValueError, AttributeError) as e:
        raise TenantError(f"{uri} is not a tenant document: {e}") from e


class KeyIndex:
    """key id → (tenant, sha256, revoked) built from one document; `authenticate` is what the ingress calls."""

    def __init__(self, doc: dict[str, Any]):
        self.tenants: dict[str, Tenant] = {}
        self.keys: dict[str, tuple[str, str, bool]] = {}
        for name, t in doc.get("tenants", {}).items():
            rate = RateLimit.model_validate(t["rate"]) if t.get("rate") else None
            self.tenants[name] = Tenant(name, tuple(t.get("domains", ())), rate, dict(t.get("variants") or {}))
            for k in t.get("keys", []):
                self.keys[k["id"]] = (name, k["sha256"], bool(k.get("revoked")))

    def authenticate(self, key: str) -> tuple[Tenant | None, str]:
        """(tenant, "") for a valid key, else (None, why)."""
        kid = key_id(key)
        entry = self.keys.get(kid) if kid else None
        # compare against a dummy hash when the id is unknown: the time taken does not tell ids apart
        expected = entry[1] if entry else "0" * 64
        ok = hmac.compare_digest(_hash(key), expected)
        if not entry or not ok:
            return None, "unknown API key"
        if entry[2]:
            return None, "revoked API key"
        return self.tenants[entry[0]], ""


class TenantCache:
    """The serving side: the document re-read at most every `refresh_s` seconds (in the caller's thread; the
    ingress calls `refresh` from a background task). A store that cannot be read keeps the last good copy and
    logs; with no good copy ever read, every key is refused (fail closed)."""

    def __init__(self, uri: str, refresh_s: float = 2.0):
        self.uri, self.refresh_s = uri, refresh_s
        self.index = KeyIndex({})
        self.loaded_at = 0.0
        self.error: str | None = None
        self._digest = b""
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.loaded_at < self.refresh_s:
            return
        try:
            data = storage.read_bytes(self.uri) if storage.exists(self.uri) else b'{"tenants": {}}'
            digest = hashlib.sha256(data).digest()
            if digest != self._digest:
                index = KeyIndex(parse(data, self.uri))
                with self._lock:
                    self.index, self._digest = index, digest
            self.error = None
        except Exception as e:  # noqa: BLE001 - keep serving with the last good copy, say why
            if self.error != str(e):
                log.warning("tenant store %s unreadable, keeping the last good copy: %s", self.uri, e)
            self.error = str(e)
        self.loaded_at = time.monotonic()

    def authenticate(self, key: str) -> tuple[Tenant | None, str]:
        return self.index.authenticate(key)
