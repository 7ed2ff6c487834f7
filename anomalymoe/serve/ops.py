"""The `ops` application at ``/``: service-wide health, readiness and metrics, and ServeState, the one replica
that holds what must be shared by every domain and ingress replica (tenant token buckets, aggregated metrics).

``GET /v1/healthz``  the proxy and this app answer (liveness)
``GET /v1/readyz``   200 when every configured domain has a scorer replica with its model loaded, else 503
                     (``{"ready"}``; each domain's model and reasons only with an admin key)
``GET /metrics``     Prometheus text format, summed over all replicas (admin key: it lists every tenant's traffic)

An admin key is a key of a tenant whose domains name ``ops`` (``jobs/serve.py tenants add <name> --domain ops``):
the ops details stay off the public port for everyone else."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from anomalymoe.serve import errors
from anomalymoe.serve.config import OPS_APP, ServeConfig
from anomalymoe.serve.errors import ApiError
from anomalymoe.serve.metrics import Metrics
from anomalymoe.serve.ratelimit import Buckets
from anomalymoe.serve.tenants import TenantCache

log = logging.getLogger("ray.serve")
READY_TIMEOUT_S = 3.0


@serve.deployment(name="ServeState", num_replicas=1)
class ServeState:
    def __init__(self):
        self.buckets = Buckets()
        self.metrics = Metrics()

    def take(self, tenant: str, rate: float, burst: float, n: float = 1.0) -> float:
        return self.buckets.take(tenant, rate, burst, n=n)

    def push(self, delta: dict[str, Any], source: str) -> None:
        self.metrics.merge(delta, source)

    def render(self) -> str:
        return self.metrics.render()


class StateClient:
    """One replica's way to ServeState. The handle is looked up on first use; None while the ops app is not
    deployed (callers then fall back, and say so)."""

    def __init__(self):
        self._handle = None

    def handle(self):
        if self._handle is None:
            try:
                self._handle = serve.get_deployment_handle("ServeState", app_name=OPS_APP)
            except Exception:  # noqa: BLE001 - RayServeException when the app does not exist
                return None
        return self._handle

    async def push(self, metrics: Metrics, source: str) -> None:
        h = self.handle()
        delta = metrics.drain()
        if h is None:
            return
        try:
            await asyncio.wait_for(h.push.remote(delta, source), timeout=5.0)
        except Exception as e:  # noqa: BLE001 - metrics must never break scoring; the counts are put back
            metrics.merge({"counters": delta["counters"], "hists": delta["hists"]})
            log.warning("could not push metrics to ServeState: %s", e)

    def start_flusher(self, metrics: Metrics, role: str) -> asyncio.Task:
        """Send this replica's metric deltas to ServeState every second (call from inside a replica's event loop)."""
        async def loop() -> None:
            source = f"{role}-{serve.get_replica_context().replica_id.unique_id}"
            while True:
                await asyncio.sleep(1.0)
                await self.push(metrics, source)

        return asyncio.get_running_loop().create_task(loop())


async def readiness(domains: list[str], timeout: float = READY_TIMEOUT_S) -> tuple[bool, dict[str, Any]]:
    """Ask one scorer replica of each domain what it serves; a replica still loading does not answer in time."""
    async def one(d: str) -> dict[str, Any]:
        try:
            h = serve.get_deployment_handle("Scorer", app_name=d)
            return await asyncio.wait_for(h.info.remote(), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - not deployed, still starting, or dead: not ready, with the reason
            return {"domain": d, "ready": False, "reason": f"{type(e).__name__}: {e}"[:300]}

    results = await asyncio.gather(*(one(d) for d in domains))
    by = {r["domain"]: r for r in results}
    return all(r["ready"] for r in results), by


# ------------------------------------------------------------------------------------------------ the app
def ops_router(ops: Ops | None) -> APIRouter:
    """The ops routes, bound to this replica's `Ops` (None: only for the OpenAPI document, see openapi.py)."""
    router = APIRouter()

    @router.get("/v1/healthz", summary="Liveness of the service")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/v1/readyz", summary="200 once every domain's model is loaded, else 503",
                responses={503: {"description": "a domain has no scorer with a loaded model yet"}})
    async def readyz(request: Request) -> JSONResponse:
        """{"ready": bool}; with an admin key (a tenant with domain "ops") also each domain's model and reasons."""
        return await ops.readyz(request)

    @router.get("/metrics", summary="Prometheus metrics of the whole service (admin key)",
                response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        """Every tenant's traffic and the variants' model URIs: only with an admin key (a tenant with domain "ops")."""
        return await ops.metrics(request)

    return router


def ops_api(ops: Ops | None) -> FastAPI:
    api = FastAPI(title="AnomalyMoE service operations", docs_url=None, redoc_url=None)
    api.include_router(ops_router(ops))
    return errors.install(api)


class Ops:
    """The ops app's replica: the configured domains, the tenant cache (admin keys) and the ServeState handle.
    Serve builds this replica's FastAPI app from it (`__serve_build_asgi_app__`), so the routes reach it directly."""

    def __init__(self, config: dict[str, Any], state: Any):
        cfg = ServeConfig.model_validate(config)
        self.domains = [d.domain for d in cfg.domains]
        self.tenants = TenantCache(cfg.tenants_location, cfg.tenants_refresh_s, cfg.tenants_max_stale_s)
        self.state = state  # bound, so Serve deploys ServeState with this app

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ops_api(self)

    def admin(self, request: Request) -> bool:
        self.tenants.refresh()
        return self.tenants.admin(request.headers.get("authorization"))

    async def readyz(self, request: Request) -> JSONResponse:
        ok, by = await readiness(self.domains)
        admin = await asyncio.to_thread(self.admin, request)
        body = {"ready": ok, "domains": by} if admin else {"ready": ok}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> PlainTextResponse:
        if not await asyncio.to_thread(self.admin, request):
            raise ApiError(401, "unauthorized", "/metrics needs an admin key: 'Authorization: Bearer <key of a "
                                                "tenant with domain ops>' (python jobs/serve.py tenants add <name> "
                                                "--domain ops)")
        text = await self.state.render.remote() if self.state is not None else ""
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


OpsDeployment = serve.deployment(name="Ops", num_replicas=1)(serve.ingress()(Ops))
