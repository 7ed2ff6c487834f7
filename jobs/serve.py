"""Serve the registered models over HTTP: one Ray Serve application per domain (/v1/<domain>/score), behind
tenant API keys. The configuration is a ServeConfig YAML (anomalymoe/serve/config.py; infra/serve/*.yaml).

    python jobs/serve.py run                          # local Ray, textures + objects @champion, until Ctrl-C
    python jobs/serve.py run --domain textures --port 8000
    python jobs/serve.py deploy --address auto --config infra/serve/local.yaml   # onto a running cluster, exit
    python jobs/serve.py push --address auto          # after jobs/promote.py: running apps switch in place, or
                                                      # the previous versions keep serving and it exits 1
    python jobs/serve.py render --out serve.yaml      # the Serve config for `serve deploy` / a RayService
    python jobs/serve.py status --address auto
    python jobs/serve.py tenants add acme --domain textures [--rate 5 --burst 10] [--variant textures=models:/…/4]
    python jobs/serve.py tenants rotate acme [--revoke-old] | revoke <key id|key|tenant> | list
    python jobs/serve.py tenants add monitor --domain ops   # an admin key: /metrics and readiness details
    python jobs/serve.py openapi --out docs/openapi.json

Then: curl -H "Authorization: Bearer <key>" -H "Content-Type: image/png" --data-binary @img.png \\
          "http://127.0.0.1:8000/v1/textures/score?map=true"
MLflow from MLFLOW_TRACKING_URI, else the local store (outputs/mlflow); tenants at the config's tenants_uri."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from anomalymoe.platform.data.storage import StorageError  # noqa: E402
from anomalymoe.platform.tracking.registry import RegistryError  # noqa: E402
from anomalymoe.serve.config import RateLimit, ServeConfig, load_config, render_yaml  # noqa: E402
from anomalymoe.serve.tenants import TenantError, TenantStore  # noqa: E402


def _config(args) -> ServeConfig:
    serving = args.command != "tenants"  # tenants' --domain is the tenant's
    return load_config(args.config).narrowed(getattr(args, "domain", None) if serving else None,
                                             getattr(args, "port", None), getattr(args, "tenants", None))


def _cluster(args) -> str:
    """deploy/push/status go to a running cluster (RAY_ADDRESS, else the local one): never a throwaway Ray."""
    return args.address or os.environ.get("RAY_ADDRESS") or "auto"


def _start(cfg: ServeConfig, address: str | None, **kw) -> dict:
    from anomalymoe.serve import app

    try:
        return app.start(cfg, address, **kw)
    except (app.DeployError, app.NotReady) as e:
        raise SystemExit(str(e)) from None


def _summary(cfg: ServeConfig, pinned: dict, **more) -> None:
    print("SUMMARY " + json.dumps({"url": f"http://{cfg.host}:{cfg.port}", "pins": pinned, **more}))


def cmd_run(args) -> int:
    from ray import serve

    from anomalymoe.serve import app

    cfg = _config(args)
    pinned = _start(cfg, args.address)
    base = f"http://{cfg.host}:{cfg.port}"
    print(f"serving on {base}:")
    for d, p in pinned.items():
        print(f"  POST {base}/v1/{d}/score   {p['alias']} -> version {p['version']}")
    print(f"  GET  {base}/v1/readyz  {base}/v1/healthz  {base}/metrics")
    _summary(cfg, pinned, ready=True)
    if not args.detach:
        print("Ctrl-C stops the service", flush=True)
        app.wait_for_signal()
        serve.shutdown()
    return 0


def cmd_deploy(args) -> int:
    cfg = _config(args)
    _summary(cfg, _start(cfg, _cluster(args), ready_timeout=None))
    return 0


def cmd_push(args) -> int:
    """After a promotion: switch the running apps to the new champions, or leave the previous ones serving and exit
    non-zero with the reason (app.push: pre-load here, deploy, every replica switched, else roll back)."""
    from anomalymoe.platform.cluster.ray import connect_ray
    from anomalymoe.serve import app

    cfg = _config(args)
    connect_ray(_cluster(args))
    try:
        pinned = app.push(cfg)
    except (app.PushError, RegistryError) as e:
        raise SystemExit(f"push failed, the previous versions keep serving: {e}") from None
    _summary(cfg, pinned)
    return 0


def cmd_status(args) -> int:
    from anomalymoe.platform.cluster.ray import connect_ray
    from anomalymoe.serve import app

    connect_ray(_cluster(args))
    print("\n".join(app.status_lines()))
    return 0


def cmd_render(args) -> int:
    from anomalymoe.serve.app import pins

    cfg = _config(args)
    text = render_yaml(cfg, pins(cfg) if args.pin else None)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out} (config hash {cfg.config_hash()})")
    else:
        print(text, end="")
    return 0


def cmd_openapi(args) -> int:
    from anomalymoe.serve.openapi import dumps, openapi_document, write

    if args.out:
        print(f"wrote {write(args.out)}")
    else:
        print(dumps(openapi_document()), end="")
    return 0


def cmd_tenants(args) -> int:
    store = TenantStore(_config(args).tenants_location)
    if args.action == "add":
        rate = RateLimit(per_second=args.rate, burst=args.burst or max(1, int(2 * args.rate))) if args.rate else None
        variants = dict(v.split("=", 1) for v in args.variant or [])
        key = store.add(args.name, args.domain or [], rate, variants)
        print(f"tenant {args.name}: API key (shown once, store it now):\n{key}")
    elif args.action == "rotate":
        key = store.rotate(args.name, revoke_old=args.revoke_old)
        print(f"tenant {args.name}: new API key (shown once){' — older keys revoked' if args.revoke_old else ''}:"
              f"\n{key}")
    elif args.action == "revoke":
        print(f"revoked key(s) {', '.join(store.revoke(args.name))}; serving replicas refuse them within "
              f"{_config(args).tenants_refresh_s:.0f} s")
    else:
        print(json.dumps(store.listing(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, serving: bool = True):
        p.add_argument("--config", help="ServeConfig YAML (default: textures + objects @champion, local stores)")
        p.add_argument("--tenants", help="tenant store URI (local path or s3://), overrides the config's")
        if serving:
            p.add_argument("--domain", action="append", help="serve only these domains of the config (repeatable)")
            p.add_argument("--port", type=int, help="HTTP port (overrides the config)")
            p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray in this process)")
        return p

    run = common(sub.add_parser("run", help="deploy and keep serving until Ctrl-C"))
    run.add_argument("--detach", action="store_true", help="return once ready (the apps live as long as the cluster)")
    common(sub.add_parser("deploy", help="deploy onto a running cluster and exit"))
    common(sub.add_parser("push", help="resolve the aliases again and reconfigure running apps (after a promotion); "
                                       "give the same --config as the running service"))
    st = sub.add_parser("status", help="applications and replicas")
    st.add_argument("--address")
    rd = common(sub.add_parser("render", help="write the Ray Serve config YAML (serve deploy / RayService)"))
    rd.add_argument("--out")
    rd.add_argument("--pin", action="store_true", help="resolve the aliases now and pin the versions")
    oa = sub.add_parser("openapi", help="print or write the OpenAPI document")
    oa.add_argument("--out")
    tn = common(sub.add_parser("tenants", help="manage tenants and API keys"), serving=False)
    tn.add_argument("action", choices=("add", "rotate", "revoke", "list"))
    tn.add_argument("name", nargs="?", help="tenant name (revoke: a key id, a key or a tenant name)")
    tn.add_argument("--domain", action="append", help="add: a domain the tenant may use ('*' = all; repeatable)")
    tn.add_argument("--rate", type=float, help="add: requests per second (default: the service's default_rate)")
    tn.add_argument("--burst", type=int, help="add: bucket size (default: 2 × rate)")
    tn.add_argument("--variant", action="append", help="add: domain=model URI, a tenant-specific model (repeatable)")
    tn.add_argument("--revoke-old", action="store_true", help="rotate: revoke the tenant's older keys")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "tenants" and args.action != "list" and not args.name:
        ap.error(f"tenants {args.action} needs a name")
    handlers = {"run": cmd_run, "deploy": cmd_deploy, "push": cmd_push, "status": cmd_status,
                "render": cmd_render, "openapi": cmd_openapi, "tenants": cmd_tenants}
    try:
        return handlers[args.command](args)
    except (TenantError, StorageError, KeyError, ValueError) as e:
        raise SystemExit(f"{args.command}: {e}") from None


if __name__ == "__main__":
    raise SystemExit(main())
