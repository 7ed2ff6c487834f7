"""One JSON error shape for every app of the service (scoring domains and ops), request ids, and 500 bodies that
carry nothing internal: ``{"error": {"code", "message", "request_id"}}``. An unexpected exception is logged with
its request id and answered with that id only (it used to carry Ray actor ids, hosts, paths and the MLflow URI)."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def error_response(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "request_id": request_id(request)}},
                        status_code=status, headers=headers)


def internal(request: Request, e: BaseException, doing: str = "handling the request") -> ApiError:
    """Log an unexpected exception with the request id; the answer says only that id."""
    rid = request_id(request)
    log.error("request %s: %s failed: %s: %s", rid, doing, type(e).__name__, e, exc_info=e)
    return ApiError(500, "internal", f"internal error; the service log has the details under request id {rid}")


def install(api: FastAPI) -> FastAPI:
    """Request ids (the client's X-Request-ID when well formed, else a new one, echoed) and the error shape."""

    @api.middleware("http")
    async def with_request_id(request: Request, call_next):
        # Serve's proxy passes the client's X-Request-ID on (or makes one) and echoes it on the response itself
        rid = request.headers.get("x-request-id", "")
        request.state.request_id = rid if REQUEST_ID.match(rid) else uuid.uuid4().hex
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 - anything a route did not turn into an ApiError
            err = internal(request, e)
            response = error_response(request, err.status, err.code, err.message)
        if request.state.request_id != rid:
            response.headers["X-Request-ID"] = request.state.request_id
        return response

    @api.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(request, e.status, e.code, e.message, e.headers)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(request, e.status_code, code, str(e.detail))

    @api.exception_handler(RequestValidationError)
    async def bad_params(request: Request, e: RequestValidationError):
        return error_response(request, 400, "bad_request", "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                                                     for x in e.errors()))

    return api
