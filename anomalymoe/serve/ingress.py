"""The per-domain HTTP ingress (FastAPI on Ray Serve) in front of the domain's Scorer.

Per request, in this order, each refusal a JSON error {"error": {"code", "message", "request_id"}}:
  request id      X-Request-ID taken from the request when well-formed (else a new one), echoed on every response
  401 / 403       Bearer key → tenant (hashed keys, constant-time compare) → the tenant may use this domain
  429             the tenant's token bucket (shared service-wide through ServeState), with Retry-After
  415             content type not an accepted image type nor multipart/form-data (nothing read yet)
  413             Content-Length or the bytes read over the limit; then width/height from the image header
  400             empty body, not an image, truncated/corrupt (found when the scorer decodes it)
  503 / 504       no scorer replica answered after `retries` re-sends / in `request_timeout_s`
A request whose scorer replica dies is re-sent to another replica (up to `retries` times), so a killed replica
costs latency, not answers."""

from __future__ import annotations

import asyncio
import io
import logging
import time
import warnings
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from ray import serve

from anomalymoe.serve import errors
from anomalymoe.serve.config import ServeConfig
from anomalymoe.serve.errors import ApiError
from anomalymoe.serve.metrics import Metrics
from anomalymoe.serve.ops import StateClient, readiness
from anomalymoe.serve.ratelimit import Buckets, retry_after
from anomalymoe.serve.schema import ErrorResponse, ScoreResponse
from anomalymoe.serve.tenants import StoreUnavailable, Tenant, TenantCache, bearer

log = logging.getLogger("ray.serve")


ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in {
    400: "empty, undecodable or truncated image; unknown category", 401: "no, unknown or revoked API key",
    403: "the tenant may not use this domain", 408: "the body did not arrive within limits.body_timeout_s",
    413: "body or image dimensions over the limit",
    415: "content type not accepted, or the image is not of the declared type",
    429: "over the tenant's rate (requests or decoded megapixels; see Retry-After)",
    503: "no model loaded / no scorer replica / the tenant store unreadable for too long",
    504: "the scorer did not answer in time"}.items()}
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/png", "image/jpeg", "image/bmp",
                                                                          "image/tiff", "image/webp")},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}, "category": {"type": "string"}}}}}}}


# ------------------------------------------------------------------------------------------------ checks
def bearer_key(request: Request) -> str:
    key = bearer(request.headers.get("authorization"))
    if key is None:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    return key


def media_type(request: Request, accepted: tuple[str, ...]) -> str:
    ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ct == "multipart/form-data" or ct in accepted:
        return ct
    raise ApiError(415, "unsupported_media_type",
                   f"content type {ct or '(none)'!r} not accepted: send one of {list(accepted)} or multipart/form-data")


async def read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, "payload_too_large", f"body of {int(declared)} bytes is over the {limit}-byte limit")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, "payload_too_large", f"body is over the {limit}-byte limit")
    return bytes(buf)


FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/bmp": "BMP", "image/tiff": "TIFF", "image/webp": "WEBP"}


def check_image(data: bytes, max_pixels: int, max_side: int, declared: str | None = None) -> tuple[int, int]:
    """Width and height from the header only (nothing decoded); refuses non-images, oversized images, and images
    whose format is not the declared type's (a GIF or ICO sent as image/png: 415), or, undeclared (a multipart part
    without a type), not one the service takes."""
    if not data:
        raise ApiError(400, "empty_body", "the request has no image")
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning; the limits below are the service's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                fmt = im.format
    except Image.DecompressionBombError as e:  # over twice PIL's process-wide limit: far over ours too
        raise ApiError(413, "image_too_large", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ApiError(400, "bad_image", f"the body is not a readable image: {e}") from None
    want = FORMATS.get(declared or "")
    if (want and fmt != want) or (not want and fmt not in FORMATS.values()):
        raise ApiError(415, "unsupported_media_type", f"the body is a {fmt} image, not the declared "
                                                      f"{declared or 'image type'} (accepted: {sorted(FORMATS)})")
    if w * h > max_pixels or max(w, h) > max_side:
        raise ApiError(413, "image_too_large", f"image of {w}×{h} px is over the limit "
                                               f"({max_pixels} px, {max_side} px a side)")
    return w, h


async def image_and_category(request: Request, ctype: str, body: bytes, query_category: str | None
                             ) -> tuple[bytes, str | None, str | None]:
    """(image bytes, category, the image's declared content type: the body's, or the multipart part's if any)."""
    if ctype != "multipart/form-data":
        return body, query_category, ctype
    request._body = body  # starlette parses the form from the bytes already read (and capped)
    try:
        form = await request.form()
    except Exception as e:  # noqa: BLE001 - malformed multipart
        raise ApiError(400, "bad_request", f"malformed multipart body: {e}") from None
    part = form.get("image")
    if part is None or isinstance(part, str):
        raise ApiError(400, "bad_request", "multipart body needs a file field 'image'")
    data = await part.read()
    category = form.get("category")
    part_type = (part.content_type or "").split(";")[0].strip().lower() or None
    return data, category if isinstance(category, str) and category else query_category, part_type


# ------------------------------------------------------------------------------------------------ the app
def domain_router(ing: Ingress | None) -> APIRouter:
    """A domain's routes, bound to this replica's `Ingress` (None: only for the OpenAPI document, see openapi.py)."""
    router = APIRouter()

    @router.post("/score", response_model=ScoreResponse, responses=ERRORS, openapi_extra=IMAGE_BODY,
                 summary="Score one image: anomaly score, verdict, the levels and experts behind it")
    async def score(request: Request,
                    map: bool = Query(False, description="add the anomaly map as a base64 PNG overlay"),  # noqa: A002
                    category: str | None = Query(None, description="the image's category (its threshold); "
                                                                   "default: the domain's pooled threshold")
                    ) -> JSONResponse:
        return await ing.score(request, map, category)

    @router.get("/readyz", summary="200 when this domain's model is loaded and keys can be checked, else 503",
                responses={503: {"description": "no scorer replica of this domain has its model loaded, or the "
                                                "tenant store is unreadable"}})
    async def domain_readyz(request: Request) -> JSONResponse:
        """{"ready": bool}; with an admin key (a tenant with domain "ops") also what is served and why not ready."""
        return await ing.readyz(request)

    return router


def domain_api(ing: Ingress | None) -> FastAPI:
    api = FastAPI(title="AnomalyMoE scoring", version="1", docs_url=None, redoc_url=None)
    api.include_router(domain_router(ing))
    return errors.install(api)


def _retryable() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (RayActorError, ActorDiedError, ActorUnavailableError)


class Ingress:
    """One replica of a domain's HTTP front: its tenant cache, rate limits and metrics, and the Scorer handle.
    Serve builds the replica's FastAPI app from it (`__serve_build_asgi_app__`), so the routes reach it directly."""

    def __init__(self, domain: str, config: dict[str, Any], scorer: Any):
        self.cfg = ServeConfig.model_validate(config)
        self.domain, self.scorer = domain, scorer
        self.tenants = TenantCache(self.cfg.tenants_location, self.cfg.tenants_refresh_s,
                                   self.cfg.tenants_max_stale_s)
        self.tenants.refresh(force=True)
        self.local_buckets = Buckets()
        self.metrics = Metrics()
        self._refreshing = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self._scope_warned = False
        self.state = StateClient()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return domain_api(self)

    async def readyz(self, request: Request) -> JSONResponse:
        ok, by = await readiness([self.domain])
        body = dict(by[self.domain])
        problem = self.tenants.problem()
        if problem:  # keys cannot be checked: every request would be refused
            ok, body["tenants"] = False, problem
        if self.tenants.admin(request.headers.get("authorization")):
            return JSONResponse({**body, "ready": ok}, status_code=200 if ok else 503)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def _tenant(self, request: Request) -> Tenant:
        key = bearer_key(request)
        if time.monotonic() - self.tenants.loaded_at >= self.tenants.refresh_s and not self._refreshing.locked():
            async with self._refreshing:
                await asyncio.to_thread(self.tenants.refresh)
        try:
            tenant, why = self.tenants.authenticate(key)
        except StoreUnavailable as e:  # fail closed: no key is checked against a store too old to trust
            log.warning("refusing a request: %s", e)
            raise ApiError(503, "tenant_store_unavailable",
                           "API keys cannot be checked right now; retry later") from None
        if tenant is None:
            raise ApiError(401, "unauthorized", why)
        if not tenant.allows(self.domain):
            raise ApiError(403, "forbidden", f"tenant {tenant.name!r} may not use the {self.domain!r} domain")
        return tenant

    async def _take(self, key: str, rate: float, burst: float, n: float = 1.0) -> tuple[float, str]:
        """(seconds to wait, scope) from the service-wide bucket `key`, else this replica's (said in the scope)."""
        h = self.state.handle()
        if h is not None:
            try:
                return await asyncio.wait_for(h.take.remote(key, rate, burst, n), timeout=2.0), "service"
            except Exception as e:  # noqa: BLE001 - the shared state is down: limit per replica, and say so
                if not self._scope_warned:
                    log.warning("ServeState unreachable (%s): rate limits now hold per ingress replica", e)
                    self._scope_warned = True
        return self.local_buckets.take(key, rate, burst, n=n), "replica"

    def _limited(self, tenant: Tenant, what: str, wait: float, scope: str) -> ApiError:
        self.metrics.inc("anomalymoe_rate_limited_total", tenant=tenant.name, domain=self.domain)
        return ApiError(429, "rate_limited", f"tenant {tenant.name!r} is over {what}; retry in {wait:.2f} s",
                        {"Retry-After": retry_after(wait), "X-RateLimit-Scope": scope})

    async def _admit(self, tenant: Tenant) -> str:
        rate = tenant.rate or self.cfg.default_rate
        wait, scope = await self._take(tenant.name, rate.per_second, rate.burst)
        if wait > 0:
            raise self._limited(tenant, f"{rate.per_second}/s (burst {rate.burst})", wait, scope)
        return scope

    async def _admit_pixels(self, tenant: Tenant, pixels: int) -> None:
        """Charge the image's decoded size (from its header, before any decoding) to the tenant's pixel bucket."""
        rate = tenant.rate or self.cfg.default_rate
        if rate.megapixels_per_second is None:
            return
        mp = pixels / 1e6
        if mp > rate.megapixel_burst:
            raise ApiError(413, "image_too_large", f"an image of {mp:.1f} MP is over tenant {tenant.name!r}'s "
                                                   f"megapixel burst ({rate.megapixel_burst:g} MP)")
        wait, scope = await self._take(f"{tenant.name}#px", rate.megapixels_per_second, rate.megapixel_burst, mp)
        if wait > 0:
            raise self._limited(tenant, f"{rate.megapixels_per_second:g} decoded megapixels/s (burst "
                                        f"{rate.megapixel_burst:g} MP)", wait, scope)

    async def _call(self, item: dict[str, Any], variant: str | None) -> dict[str, Any]:
        handle = self.scorer.options(multiplexed_model_id=variant) if variant else self.scorer
        last: BaseException | None = None
        for attempt in range(self.cfg.retries + 1):
            try:
                return await asyncio.wait_for(handle.score.remote(item), timeout=self.cfg.request_timeout_s)
            except _retryable() as e:  # the replica died with the request: send it again (another replica)
                last = e
                log.warning("scorer replica lost a request (attempt %d): %s", attempt + 1, type(e).__name__)
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
            except TimeoutError:
                raise ApiError(504, "timeout", f"the scorer did not answer in {self.cfg.request_timeout_s} s") \
                    from None
        raise ApiError(503, "unavailable", f"no scorer replica answered after {self.cfg.retries + 1} attempts: "
                                           f"{type(last).__name__}")

    async def score(self, request: Request, want_map: bool, category: str | None) -> JSONResponse:
        t0 = time.perf_counter()
        self._start_flusher()
        tenant_name, status, code = "-", 200, "ok"
        try:
            tenant = await self._tenant(request)
            tenant_name = tenant.name
            scope = await self._admit(tenant)
            lim = self.cfg.limits
            ctype = media_type(request, lim.content_types)
            try:
                body = await asyncio.wait_for(read_capped(request, lim.max_body_bytes), timeout=lim.body_timeout_s)
            except TimeoutError:
                raise ApiError(408, "request_timeout", f"the body did not arrive within {lim.body_timeout_s:g} s") \
                    from None
            data, category, declared = await image_and_category(request, ctype, body, category)
            w, h = check_image(data, lim.max_pixels, lim.max_side, declared)
            await self._admit_pixels(tenant, w * h)
            variant = tenant.variants.get(self.domain)
            t_in = time.perf_counter()
            out = await self._call({"data": data, "category": category, "map": want_map, "variant": variant or ""},
                                   variant)
            if "error" in out:
                e = out["error"]
                raise ApiError(e["status"], e["code"], e["message"])
            out["timings_ms"]["ingress"] = round(1000 * (t_in - t0), 2)
            out["timings_ms"]["total"] = round(1000 * (time.perf_counter() - t0), 2)
            # the answer is built through the response model the OpenAPI document shows: a field the model lacks, or
            # one of the wrong type, fails here (and in the tests) instead of drifting from the document
            answer = ScoreResponse.model_validate({"request_id": request.state.request_id, **out})
            return JSONResponse(answer.model_dump(mode="json", exclude_unset=True),
                                headers={"X-RateLimit-Scope": scope})
        except ApiError as e:
            status, code = e.status, e.code
            raise
        except Exception as e:  # noqa: BLE001 - logged with the request id; the answer carries nothing internal
            status, code = 500, "internal"
            raise errors.internal(request, e, "scoring") from None
        finally:
            self.metrics.inc("anomalymoe_requests_total", domain=self.domain, tenant=tenant_name, code=status)
            if status >= 400:
                self.metrics.inc("anomalymoe_errors_total", domain=self.domain, tenant=tenant_name, code=code)
            self.metrics.observe("anomalymoe_request_duration_seconds", time.perf_counter() - t0,
                                 domain=self.domain, tenant=tenant_name)

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = self.state.start_flusher(self.metrics, f"ingress-{self.domain}")


IngressDeployment = serve.deployment(name="Ingress")(serve.ingress()(Ingress))
