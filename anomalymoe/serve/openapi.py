"""The service's OpenAPI document, built from the same route builders the deployments serve: the domain router under
``/v1/{domain}`` and the ops router at the root. The copy in the repo (``docs/openapi.json``) is checked against
it by a test; regenerate with ``python jobs/serve.py openapi --out docs/openapi.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from anomalymoe.serve.config import REPO_ROOT

DOCUMENT = REPO_ROOT / "docs" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    from anomalymoe.serve import ingress, ops

    app = FastAPI(title="AnomalyMoE scoring service", version="1",
                  description="One application per domain at /v1/{domain}; every request to /score needs "
                              "'Authorization: Bearer <tenant API key>'. Errors are "
                              '{"error": {"code", "message", "request_id"}}.')
    app.include_router(ingress.domain_router(None), prefix="/v1/{domain}")
    app.include_router(ops.ops_router(None))
    doc = app.openapi()
    doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops_ in doc["paths"].items():
        for op in ops_.values():
            op["responses"].pop("422", None)  # parameter errors are answered as 400 bad_request
            if path.endswith("/score"):
                op["security"] = [{"bearer": []}]
            if "{domain}" in path:
                op.setdefault("parameters", []).insert(0, {"name": "domain", "in": "path", "required": True,
                                                           "schema": {"type": "string"},
                                                           "description": "e.g. textures, objects"})
    return doc


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write(path: str | Path = DOCUMENT) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps(openapi_document()))
    return p
