"""Application builders (the `import_path`s of the rendered Serve config) and deployment.

`deploy(cfg)` resolves each domain's alias to a version once, renders the Serve config with those versions
pinned, and runs every application of that document with `serve.run` — the same document `serve deploy` takes
(`jobs/serve.py render`). `push(cfg)` does it again after a promotion: only the scorers' user_config changes,
so Serve reconfigures the running replicas in place (no restart, no lost request)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from ray import serve
from ray.serve import Application

from anomalymoe.serve.config import OPS_APP, ServeConfig, render
from anomalymoe.serve.inference import load, resolve

log = logging.getLogger(__name__)


def _options(app: dict[str, Any], name: str) -> dict[str, Any]:
    d = next(x for x in app.get("deployments", []) if x["name"] == name)
    opts = {k: v for k, v in d.items() if k != "name"}
    if app.get("runtime_env"):
        opts["ray_actor_options"] = {**opts.get("ray_actor_options", {}), "runtime_env": app["runtime_env"]}
    return opts


def _versioned(deployment: Any, app: dict[str, Any]) -> Any:
    """The deployment with a fixed code version (the config's hash). `serve deploy` derives one from the config;
    `serve.run` gives every call a random one unless set, and then a promotion (only user_config changes) would
    replace every replica instead of reconfiguring it in place. Ray 2.60 removed `version` from `.options()`,
    so it is set on the attribute `serve.run` reads; tests/integration/test_serve.py checks the replicas stay."""
    deployment._version = f"{app['args']['config_hash']}-{deployment.name}"
    return deployment


def _app_doc(args: dict[str, Any], name: str) -> dict[str, Any]:
    """This application's entry of the rendered document (deployment options come from it, nowhere else)."""
    cfg = ServeConfig.model_validate(args["config"])
    doc = next(a for a in render(cfg, args.get("pins"))["applications"] if a["name"] == name)
    return {**doc, "runtime_env": doc.get("runtime_env") or {}}


def domain_app(args: dict[str, Any]) -> Application:
    """``anomalymoe.serve.app:domain_app``: Ingress → Scorer for args["domain"]."""
    from anomalymoe.serve.ingress import IngressDeployment
    from anomalymoe.serve.scorer import Scorer

    doc = _app_doc(args, args["domain"])
    scorer = _versioned(Scorer.options(**_options(doc, "Scorer")), doc).bind(args["domain"], args["config"])
    ingress = _versioned(IngressDeployment.options(**_options(doc, "Ingress")), doc)
    return ingress.bind(args["domain"], args["config"], scorer)


def ops_app(args: dict[str, Any]) -> Application:
    """``anomalymoe.serve.app:ops_app``: health, readiness, metrics and the shared ServeState."""
    from anomalymoe.serve.ops import OpsDeployment, ServeState

    doc = _app_doc(args, OPS_APP)
    state = _versioned(ServeState.options(**_options(doc, "ServeState")), doc).bind()
    return _versioned(OpsDeployment.options(**_options(doc, "Ops")), doc).bind(args["config"], state)


def pins(cfg: ServeConfig) -> dict[str, dict[str, str]]:
    """domain → {"uri": the concrete version URI, "version"}: each alias resolved once, here."""
    out = {}
    for d in cfg.domains:
        _, version, concrete = resolve(d.model_uri)
        out[d.domain] = {"uri": concrete, "version": version, "alias": d.model_uri}
    return out


FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "ANOMALYMOE_S3_ENDPOINT")


def credentials_file(env: dict[str, str] | None = None) -> str | None:
    """This process's static AWS keys in a private (0600) credentials file, for replicas on this machine: its path
    goes into the Serve config, never the keys (a runtime_env is shown by the Ray dashboard and Serve's APIs).
    Replicas on other nodes use their own credentials (the pod's secret or role); a path they lack is ignored."""
    env = os.environ if env is None else env
    if not env.get("AWS_ACCESS_KEY_ID") or not env.get("AWS_SECRET_ACCESS_KEY"):
        return None
    from anomalymoe.serve.config import REPO_ROOT

    folder = REPO_ROOT / "outputs" / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "aws-credentials"
    lines = ["[default]", f"aws_access_key_id = {env['AWS_ACCESS_KEY_ID']}",
             f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}"]
    if env.get("AWS_SESSION_TOKEN"):
        lines.append(f"aws_session_token = {env['AWS_SESSION_TOKEN']}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return str(path)


def with_driver_env(cfg: ServeConfig) -> ServeConfig:
    """The registry and S3 settings of this process handed to the replicas (they do not inherit the driver's
    environment); values the config sets win. Keys travel as a credentials file path (credentials_file), never as
    values: a secret in `env` is refused by ServeConfig."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    creds = credentials_file()
    if creds and "AWS_SHARED_CREDENTIALS_FILE" not in cfg.env:
        env["AWS_SHARED_CREDENTIALS_FILE"] = creds
    return cfg.model_copy(update={"env": {**env, **cfg.env}}) if env else cfg


def deploy(cfg: ServeConfig, pinned: dict[str, dict[str, str]] | None = None, log_level: str = "INFO"
           ) -> dict[str, dict[str, str]]:
    """Run every application of the rendered config on the connected Ray cluster (starting Serve's proxy on
    cfg.host:cfg.port if it is not running). Returns the pins it deployed. `log_level` WARNING drops the
    per-request access lines (the demo's console)."""
    pinned = pins(cfg) if pinned is None else pinned
    doc = render(with_driver_env(cfg), pinned)
    serve.start(http_options=doc["http_options"], logging_config={"log_level": log_level})
    for app in doc["applications"]:
        module, _, fn = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), fn)
        serve.run(builder({**app["args"], "pins": pinned}), name=app["name"], route_prefix=app["route_prefix"],
                  blocking=False, logging_config={"log_level": log_level})
        log.info("deployed %s at %s", app["name"], app["route_prefix"])
    return pinned


class NotReady(TimeoutError):
    """The service did not answer 200 on /v1/readyz in time; the message carries its last readiness answer."""


def wait_ready(cfg: ServeConfig, timeout: float = 600.0) -> dict[str, Any]:
    """Poll GET /v1/readyz until 200 (every domain's model loaded); returns its body, or raises NotReady."""
    url, t0, body = f"http://{cfg.host}:{cfg.port}/v1/readyz", time.monotonic(), {}
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise NotReady(f"the service did not become ready in {timeout:.0f} s: {json.dumps(body)[:1000]}")


class DeployError(RuntimeError):
    """The service cannot be deployed as configured; the message says what to do."""


def start(cfg: ServeConfig, address: str | None = None, *, ready_timeout: float | None = 600.0,
          log_level: str = "INFO") -> dict[str, dict[str, str]]:
    """Connect to Ray (`address`; None: a local Ray in this process), deploy every application and, unless
    `ready_timeout` is None, wait until every domain's model is loaded. Returns the pins deployed. Refuses, before
    anything is deployed, a tenant store that does not exist (replicas fail closed on it: readiness could never
    come) and aliases that name no model."""
    from anomalymoe.platform.cluster.ray import connect_ray
    from anomalymoe.platform.tracking.registry import RegistryError
    from anomalymoe.serve.tenants import TenantStore

    if not TenantStore(cfg.tenants_location).exists():
        raise DeployError(f"no tenant store at {cfg.tenants_location}: add a tenant first (python jobs/serve.py "
                          "tenants add <name> --domain '*'), or point tenants_uri / --tenants at the store")
    connect_ray(address)
    try:
        pinned = deploy(cfg, log_level=log_level)
    except RegistryError as e:
        raise DeployError(f"{e}\n(train and promote a model first: python jobs/train.py; python jobs/promote.py "
                          "--domain <domain>; or serve fewer domains with --domain)") from None
    if ready_timeout is not None:
        wait_ready(cfg, ready_timeout)
    return pinned


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (a service left up for a person: `jobs/serve.py run`, the demo's
    --keep-serving)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def status_lines() -> list[str]:
    """One line per running application: its status and its deployments' replica states."""
    lines = []
    for name, app in serve.status().applications.items():
        deps = {d: f"{s.status.value} {dict(s.replica_states)}" for d, s in app.deployments.items()}
        lines.append(f"{name:12s} {app.status.value:10s} {deps}")
    return lines


class PushError(RuntimeError):
    """A push that did not switch: the previous versions keep serving (rolled back where needed); says why."""


def _infos(domain: str, n: int, timeout: float = 10.0) -> list[dict[str, Any] | BaseException]:
    """`n` answers of the domain's scorer replicas to `info()` (the router spreads them over the replicas)."""
    try:
        h = serve.get_deployment_handle("Scorer", app_name=domain)
        calls = [h.info.remote() for _ in range(n)]
    except Exception as e:  # noqa: BLE001 - the app is not running
        return [e]
    out: list[dict[str, Any] | BaseException] = []
    for c in calls:
        try:
            out.append(c.result(timeout_s=timeout))
        except Exception as e:  # noqa: BLE001 - a replica still starting or gone: counted as not switched
            out.append(e)
    return out


def serving(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """domain → what one of its scorer replicas answers to `info()` (model, failed), for the running apps."""
    return {d.domain: a for d in cfg.domains for a in _infos(d.domain, 1)[:1] if isinstance(a, dict)}


def _replicas(domain: str) -> int:
    st = serve.status().applications.get(domain)
    dep = st.deployments.get("Scorer") if st else None
    return max(1, sum(dep.replica_states.values())) if dep else 1


def _switched(domains: list[str], want: dict[str, dict[str, str]], timeout: float) -> dict[str, str]:
    """Ask every changed domain's scorers until all answer with the new version (→ {}), or one reports it would
    not load (→ {domain: why}), or `timeout` passes (→ {domain: "timed out …"})."""
    t0, bad, pending = time.monotonic(), {}, set(domains)
    while pending and time.monotonic() - t0 < timeout:
        for d in sorted(pending):
            answers = _infos(d, 3 * _replicas(d))
            failed = [a["failed"] for a in answers if isinstance(a, dict) and a.get("failed")
                      and a["failed"].get("uri") == want[d]["uri"]]
            if failed:
                bad[d] = failed[0]["error"]
                pending.discard(d)
            elif all(isinstance(a, dict) and (a.get("model") or {}).get("uri") == want[d]["uri"] for a in answers):
                pending.discard(d)
        if pending:
            time.sleep(0.5)
    bad.update({d: f"timed out after {timeout:.0f} s waiting for every replica to load it" for d in pending})
    return bad


def push(cfg: ServeConfig, timeout: float = 300.0, precheck: bool = True) -> dict[str, dict[str, str]]:
    """After a promotion: resolve the aliases again and switch the running apps, safely.

    1. Each changed domain's new version is loaded here first (`precheck`): a broken version or an unreachable
       registry fails the push before any replica is touched.
    2. The new pins are deployed; Serve reconfigures the replicas in place (each loads the new model beside the
       old and switches on success; a replica that cannot load it keeps the old one, Scorer.reconfigure).
    3. Every replica of a changed domain must then answer with the new version. If one reports a failure (or
       `timeout` passes) the previous pins are deployed again and PushError says why: the previous version never
       stopped serving. Unchanged domains are left alone by Serve."""
    before = serving(cfg)
    new = pins(cfg)
    old = {d: {"uri": (b.get("model") or {}).get("uri"), "version": (b.get("model") or {}).get("version")}
           for d, b in before.items() if (b.get("model") or {}).get("uri")}
    old = {d: {**p, "alias": new[d].get("alias", p["uri"])} for d, p in old.items() if d in new}
    changed = sorted(d for d in new if old.get(d, {}).get("uri") != new[d]["uri"])
    if precheck:
        for d in changed:
            try:
                load(new[d]["uri"])
            except Exception as e:  # noqa: BLE001 - whatever stops it loading stops the push, with the reason
                raise PushError(f"{d}: {new[d]['uri']} does not load here, nothing was changed: "
                                f"{type(e).__name__}: {e}") from None
    deploy(cfg, new)
    bad = _switched(changed, new, timeout)
    if bad:
        back = {**new, **{d: old[d] for d in bad if d in old}}
        deploy(cfg, back)
        raise PushError("; ".join(f"{d}: {new[d]['uri']} was not switched to ({why}); rolled back to "
                                  f"{old.get(d, {}).get('uri')}" for d, why in sorted(bad.items())))
    return new
