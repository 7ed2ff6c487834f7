"""Tenants and their API keys, where the platform keeps its config (a local path or s3://).

The store is an append-only log of key operations, folded on read::

    <uri>                    optional base document (what older versions wrote; the fold starts from it)
    <uri>.log/<ns>-<rand>.json   one operation each, written once under a new name, never rewritten

    {"op": "add_tenant", "tenant": "acme", "domains": ["textures"], "rate": {"per_second": 5, "burst": 10},
     "variants": {"textures": "models:/anomalymoe-textures/4"}, "key": {"id": "3f9a…", "sha256": "…", "created": "…"}}
    {"op": "add_key", "tenant": "acme", "key": {…}, "revoke": ["3f9a…"]}      (rotate; revoke = rotate --revoke-old)
    {"op": "revoke", "revoke": ["3f9a…", …]}

Two writers never touch the same object, so no change can be lost (a read-modify-write of one document lost 4 of
8 concurrent `tenants add`, and a `revoke` racing an `add` was undone). Revocations are by key id and apply
whatever the order of the log; the other conflicts (two adds of one tenant, a key id already in use anywhere) are
decided by log order, first wins, and the writer reads the fold back after writing: a lost race is an error (or, for
a key id, a retry with a new id), never a key printed that does not work. Every operation is checked by one
function (`check_op`), the same in the CLI before it writes and in the replicas' fold: a bad record is skipped
with a logged reason and never freezes the changes after it.

A key is ``amk_<id>_<secret>`` (id: 8 hex, unique across tenants; secret: 32 random bytes). Only the key's SHA-256
is stored: the secret has 256 bits of entropy, so a slow password hash would add latency and no safety. A key is
looked up by its id and its hash compared with `hmac.compare_digest` (constant time). The plaintext key is shown
once, by `add`/`rotate`.

The serving replicas re-read the store every `tenants_refresh_s` (`TenantCache`, reading only new log entries),
so a new tenant or a revoked key takes effect without a restart. They fail closed: a store that does not exist is
an error (not "no tenants"), and a store that cannot be read for `tenants_max_stale_s` makes every request a 503
and readiness say why, so a revocation can never be missed for longer than that."""

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

from pydantic import ValidationError

from anomalymoe.platform.data import storage
from anomalymoe.serve.config import OPS_APP, RateLimit

log = logging.getLogger(__name__)
PREFIX = "amk_"
LOG_SUFFIX = ".log"
OPS = ("add_tenant", "add_key", "revoke")
ADMIN_DOMAIN = OPS_APP  # "ops", the ops app: a tenant with it may read /metrics and readiness details


class TenantError(ValueError):
    """A tenant store operation that cannot be done (unknown tenant, duplicate, bad document or record)."""


class StoreUnavailable(TenantError):
    """The store does not exist, or could not be read for longer than the allowed staleness (fail closed)."""


@dataclass(frozen=True)
class Tenant:
    name: str
    domains: tuple[str, ...]
    rate: RateLimit | None
    variants: dict[str, str]

    def allows(self, domain: str) -> bool:
        return "*" in self.domains or domain in self.domains

    @property
    def is_admin(self) -> bool:
        """May read the ops endpoints' details (/metrics, readiness with models): domain "ops" named explicitly
        ('*' does not include it; no scoring domain can be called "ops")."""
        return ADMIN_DOMAIN in self.domains


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def bearer(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value, else None."""
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def key_id(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX):].split("_", 1)
    if len(parts) != 2 or len(parts[0]) != 8 or not parts[1]:
        return None
    return parts[0]


def _name_ok(v: Any, extra: str) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 128 and all(c.isalnum() or c in extra for c in v)


def _is_hex(v: Any, n: int) -> bool:
    return isinstance(v, str) and len(v) == n and all(c in "0123456789abcdef" for c in v)


def check_tenant(name: Any, domains: Any, rate: Any, variants: Any) -> None:
    """A tenant's fields as a replica will read them (the CLI checks the same before writing)."""
    if not _name_ok(name, "-_.") or name in (".", ".."):
        raise TenantError(f"tenant name {name!r}: use letters, digits, '-', '_' or '.'")
    if not isinstance(domains, list) or not domains:
        raise TenantError("a tenant needs at least one domain (or '*')")
    for d in domains:
        if d != "*" and not _name_ok(d, "-_"):
            raise TenantError(f"domain {d!r}: use letters, digits, - or _ (or '*' for every domain)")
    if rate is not None:
        try:
            RateLimit.model_validate(rate)
        except ValidationError as e:
            raise TenantError(f"rate {rate!r}: {e.errors()[0]['msg']}") from None
    if not isinstance(variants, dict):
        raise TenantError(f"variants must map a domain to a model URI, got {variants!r}")
    for d, uri in variants.items():
        if not _name_ok(d, "-_"):
            raise TenantError(f"variant domain {d!r}: use letters, digits, - or _")
        if not isinstance(uri, str) or not uri.startswith(("models:/", "s3://", "/")):
            raise TenantError(f"variant for {d!r}: {uri!r} is not a model URI (models:/…, s3://… or an absolute path)")


def _check_key(k: Any) -> None:
    if not isinstance(k, dict) or not _is_hex(k.get("id"), 8) or not _is_hex(k.get("sha256"), 64):
        raise TenantError(f"key record {k!r}: needs an 8-hex id and a sha256")


def check_op(op: Any) -> None:
    """One log record as the fold will apply it; raises TenantError saying what is wrong."""
    if not isinstance(op, dict) or op.get("op") not in OPS:
        raise TenantError(f"not a tenant operation (op one of {OPS}): {str(op)[:200]}")
    revoke = op.get("revoke", [])
    if not isinstance(revoke, list) or not all(_is_hex(r, 8) for r in revoke):
        raise TenantError(f"revoke must be a list of 8-hex key ids, got {revoke!r}")
    if op["op"] == "add_tenant":
        check_tenant(op.get("tenant"), op.get("domains"), op.get("rate"), op.get("variants", {}))
        _check_key(op.get("key"))
    elif op["op"] == "add_key":
        if not _name_ok(op.get("tenant"), "-_."):
            raise TenantError(f"add_key: bad tenant {op.get('tenant')!r}")
        _check_key(op.get("key"))
    elif not revoke:
        raise TenantError("revoke: no key ids")


def parse(data: bytes, uri: str = "<tenants>") -> dict[str, Any]:
    """A base document: {"version": 1, "tenants": {name: {...}}}."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), dict):
            raise ValueError("no 'tenants' object")
        return doc
    except (ValueError, AttributeError) as e:
        raise TenantError(f"{uri} is not a tenant document: {e}") from e


@dataclass
class Folded:
    """The store as of one read: the tenant document, which log records applied, and which were refused (why)."""

    doc: dict[str, Any]
    applied: set[str]
    refused: dict[str, str]


def fold(base: dict[str, Any] | None, ops: list[tuple[str, Any]]) -> Folded:
    """The tenant document from a base document and log records (name, record), in name order. Bad base tenants and
    bad or conflicting records are skipped (listed in `refused` with the reason), never the whole store."""
    tenants: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}  # key id -> tenant
    refused: dict[str, str] = {}
    for name, t in sorted((base or {}).get("tenants", {}).items()):
        try:
            if not isinstance(t, dict):
                raise TenantError("not an object")
            check_tenant(name, t.get("domains"), t.get("rate"), t.get("variants") or {})
            keys = []
            for k in t.get("keys", []):
                _check_key(k)
                keys.append(dict(k))
        except TenantError as e:
            refused[f"base:{name}"] = str(e)
            continue
        tenants[name] = {**t, "variants": dict(t.get("variants") or {}), "keys": keys}
        for k in keys:
            owner.setdefault(k["id"], name)
    revoked: dict[str, str] = {}
    applied: set[str] = set()
    for name, op in sorted(ops, key=lambda kv: kv[0]):
        try:
            check_op(op)
            if op["op"] == "add_tenant":
                if op["tenant"] in tenants:
                    raise TenantError(f"tenant {op['tenant']!r} exists")
                if op["key"]["id"] in owner:
                    raise TenantError(f"key id {op['key']['id']} is in use")
                tenants[op["tenant"]] = {"domains": sorted(set(op["domains"])), "rate": op.get("rate"),
                                         "variants": dict(op.get("variants") or {}), "created": op.get("at"),
                                         "keys": [_key_record(op["key"], op)]}
                owner[op["key"]["id"]] = op["tenant"]
            elif op["op"] == "add_key":
                if op["tenant"] not in tenants:
                    raise TenantError(f"no tenant {op['tenant']!r}")
                if op["key"]["id"] in owner:
                    raise TenantError(f"key id {op['key']['id']} is in use")
                tenants[op["tenant"]]["keys"].append(_key_record(op["key"], op))
                owner[op["key"]["id"]] = op["tenant"]
        except TenantError as e:
            refused[name] = str(e)
            continue
        applied.add(name)
        for kid in op.get("revoke", []):  # by id, whatever the order: a revocation is never undone
            revoked.setdefault(kid, op.get("at") or _now())
    for t in tenants.values():
        for k in t["keys"]:
            if not k.get("revoked") and k["id"] in revoked:
                k["revoked"] = revoked[k["id"]]
    return Folded({"version": 2, "tenants": tenants}, applied, refused)


def _key_record(k: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
    return {"id": k["id"], "sha256": k["sha256"], "created": k.get("created") or op.get("at"), "revoked": None}


class TenantStore:
    """The CLI's side: reads fold the store; every change is one new log record, read back after writing."""

    def __init__(self, uri: str):
        self.uri = uri
        self.log_uri = uri + LOG_SUFFIX

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return storage.exists(self.uri) or bool(storage.list_files(self.log_uri, (".json",)))

    def records(self, known: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
        """(name, record) of every log entry; entries in `known` (name -> record) are not read again."""
        out = []
        for uri in storage.list_files(self.log_uri, (".json",)):
            name = uri.rsplit("/", 1)[-1]
            if known is not None and name in known:
                out.append((name, known[name]))
                continue
            try:
                rec = json.loads(storage.read_bytes(uri))
            except ValueError as e:
                rec = {"unreadable": str(e)}
            except storage.NotFound:  # removed by a writer that lost its race, between list and read
                continue
            out.append((name, rec))
        return out

    def base(self) -> dict[str, Any] | None:
        return parse(storage.read_bytes(self.uri), self.uri) if storage.exists(self.uri) else None

    def folded(self) -> Folded:
        return fold(self.base(), self.records())

    def load(self) -> dict[str, Any]:
        """The tenant document (every tenant, its keys and their states)."""
        return self.folded().doc

    # ------------------------------------------------------------------ writing
    def _append(self, op: dict[str, Any]) -> str:
        """Write one record under a new name and read the fold back: the name if it applied, else TenantError
        with the reason (the refused record is removed again)."""
        op = {**op, "at": _now()}
        check_op(op)
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.json"
        storage.write_bytes(storage.join(self.log_uri, name), (json.dumps(op, sort_keys=True) + "\n").encode())
        after = self.folded()
        if name not in after.applied:
            storage.delete(storage.join(self.log_uri, name))
            raise TenantError(after.refused.get(name, "the change did not apply"))
        return name

    def _with_new_key(self, op: dict[str, Any], attempts: int = 5) -> str:
        """Append an op carrying a new key; a key id taken meanwhile (by any tenant) is retried with a new one."""
        for _ in range(attempts):
            used = {k["id"] for t in self.load()["tenants"].values() for k in t["keys"]}
            kid = secrets.token_hex(4)
            while kid in used:
                kid = secrets.token_hex(4)
            key = f"{PREFIX}{kid}_{secrets.token_urlsafe(32)}"
            try:
                self._append({**op, "key": {"id": kid, "sha256": _hash(key), "created": _now()}})
                return key
            except TenantError as e:
                if "is in use" not in str(e):
                    raise
        raise TenantError(f"could not find a free key id in {attempts} attempts")

    def add(self, name: str, domains: list[str], rate: RateLimit | None = None,
            variants: dict[str, str] | None = None) -> str:
        """A new tenant with one key; returns the plaintext key (shown once)."""
        rate_d = rate.model_dump() if rate else None
        check_tenant(name, sorted(set(domains)), rate_d, dict(variants or {}))
        if name in self.load()["tenants"]:
            raise TenantError(f"tenant {name!r} exists: use `rotate` for a new key")
        return self._with_new_key({"op": "add_tenant", "tenant": name, "domains": sorted(set(domains)),
                                   "rate": rate_d, "variants": dict(variants or {})})

    def fresh_key(self, name: str, domains: list[str], rate: RateLimit | None = None) -> str:
        """A new key for `name`, the tenant's only valid one: the tenant is added if it is not there, else its
        older keys are revoked (a key is shown once: a demo or a test that runs again needs a new one)."""
        if name in self.load()["tenants"]:
            return self.rotate(name, revoke_old=True)
        return self.add(name, domains, rate)

    def rotate(self, name: str, revoke_old: bool = False) -> str:
        """A further key for `name` (old keys stay valid unless `revoke_old`: rotate without downtime)."""
        t = self._tenant(self.load(), name)
        old = [k["id"] for k in t["keys"] if not k.get("revoked")] if revoke_old else []
        return self._with_new_key({"op": "add_key", "tenant": name, "revoke": old})

    def revoke(self, ref: str) -> list[str]:
        """Revoke a key (by key id or the key itself) or every key of a tenant (by name); returns the key ids."""
        doc = self.load()
        kid = key_id(ref) or ref
        hit = sorted({k["id"] for name, t in doc["tenants"].items() for k in t["keys"]
                      if (name == ref or k["id"] == kid) and not k.get("revoked")})
        if not hit:
            raise TenantError(f"no active key or tenant {ref!r}")
        self._append({"op": "revoke", "revoke": hit})
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


class KeyIndex:
    """key id → (tenant, sha256, revoked) built from one document; `authenticate` is what the ingress calls."""

    def __init__(self, doc: dict[str, Any]):
        self.tenants: dict[str, Tenant] = {}
        self.keys: dict[str, list[tuple[str, str, bool]]] = {}
        for name, t in doc.get("tenants", {}).items():
            rate = RateLimit.model_validate(t["rate"]) if t.get("rate") else None
            self.tenants[name] = Tenant(name, tuple(t.get("domains", ())), rate, dict(t.get("variants") or {}))
            for k in t.get("keys", []):
                # an older document may hold one id in two tenants: both stay, the hash tells them apart
                self.keys.setdefault(k["id"], []).append((name, k["sha256"], bool(k.get("revoked"))))

    def authenticate(self, key: str) -> tuple[Tenant | None, str]:
        """(tenant, "") for a valid key, else (None, why)."""
        kid = key_id(key)
        entries = self.keys.get(kid, []) if kid else []
        digest = _hash(key)
        # compare against a dummy hash when the id is unknown: the time taken does not tell ids apart
        match = [e for e in entries if hmac.compare_digest(digest, e[1])]
        if not entries:
            hmac.compare_digest(digest, "0" * 64)
        if not match:
            return None, "unknown API key"
        if match[0][2]:
            return None, "revoked API key"
        return self.tenants[match[0][0]], ""


class TenantCache:
    """The serving side: the store re-read at most every `refresh_s` seconds (in the caller's thread; the ingress
    calls `refresh` from a background task), log records read once each. Fails closed: until a first good read,
    and once no read has succeeded for `max_stale_s`, `authenticate` raises StoreUnavailable (the ingress answers
    503) and `problem()` says why (readiness)."""

    def __init__(self, uri: str, refresh_s: float = 2.0, max_stale_s: float = 30.0):
        self.uri, self.refresh_s, self.max_stale_s = uri, refresh_s, max(max_stale_s, refresh_s)
        self.store = TenantStore(uri)
        self.index = KeyIndex({})
        self.loaded_at = 0.0  # last attempt (monotonic)
        self.good_at: float | None = None  # last successful read (monotonic)
        self.error: str | None = None
        self._records: dict[str, Any] = {}
        self._base: bytes | None = None
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.loaded_at < self.refresh_s:
            return
        try:
            base_bytes = storage.read_bytes(self.uri) if storage.exists(self.uri) else None
            records = self.store.records(self._records)
            if base_bytes is None and not records:
                raise StoreUnavailable(f"tenant store {self.uri} does not exist: create it with `python jobs/serve.py "
                                       "tenants add <name> --domain <domain>` (or point tenants_uri at it)")
            base = parse(base_bytes, self.uri) if base_bytes is not None else None
            folded = fold(base, records)
            for name, why in folded.refused.items():
                if name not in self._refused:
                    log.warning("tenant store %s: record %s skipped: %s", self.uri, name, why)
                    self._refused.add(name)
            index = KeyIndex(folded.doc)
            with self._lock:
                self.index, self._records, self._base = index, dict(records), base_bytes
            self.good_at, self.error = time.monotonic(), None
        except Exception as e:  # noqa: BLE001 - keep serving with the last good copy for max_stale_s, say why
            if self.error != str(e):
                log.warning("tenant store %s unreadable, keeping the last good copy for at most %.0f s: %s",
                            self.uri, self.max_stale_s, e)
            self.error = str(e)
        self.loaded_at = time.monotonic()

    def problem(self) -> str | None:
        """Why keys cannot be checked now (None: they can)."""
        if self.good_at is None:
            return f"tenant store not read yet: {self.error or 'starting'}"
        stale = time.monotonic() - self.good_at
        if stale > self.max_stale_s:
            return (f"tenant store {self.uri} unreadable for {stale:.0f} s (more than tenants_max_stale_s "
                    f"{self.max_stale_s:.0f}): {self.error}")
        return None

    def admin(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries a valid key of an admin tenant (False when keys cannot be
        checked)."""
        key = bearer(authorization)
        if key is None or self.problem():
            return False
        tenant, _ = self.index.authenticate(key)
        return tenant is not None and tenant.is_admin

    def authenticate(self, key: str) -> tuple[Tenant | None, str]:
        why = self.problem()
        if why:
            raise StoreUnavailable(why)
        return self.index.authenticate(key)
