"""The scoring service's typed configuration and the one place that turns it into Ray Serve's config.

One `ServeConfig` declares every domain application (batching, autoscaling, limits, the registry alias it
serves). `render()` turns it into the document that `serve deploy` and a KubeRay RayService take, and
`anomalymoe.serve.app.deploy()` feeds the very same document to `serve.run` — so the YAML, the cluster and the
tests cannot drift apart.

Applications: ``ops`` at ``/`` (``/v1/healthz``, ``/v1/readyz``, ``/metrics`` and the shared tenant state) and
one per domain at ``/v1/<domain>``; Serve routes by the longest matching prefix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from anomalymoe.paths import REPO_ROOT
from anomalymoe.platform.tracking import registry
from anomalymoe.strict import Strict

OPS_APP = "ops"
CONTENT_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp")


class Limits(Strict):
    """Checked by the ingress before anything is decoded."""

    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="larger bodies are refused with 413")
    max_pixels: int = Field(40_000_000, gt=0, description="width × height read from the image header; 413 above")
    body_timeout_s: float = Field(10.0, gt=0, description="the whole body must arrive within this; 408 after (a "
                                  "client trickling bytes cannot hold an ingress slot)")
    max_side: int = Field(12_000, gt=0, description="longest side in pixels; 413 above")
    content_types: tuple[str, ...] = Field(CONTENT_TYPES, description="accepted image types (plus multipart)")


class RateLimit(Strict):
    """Token buckets per tenant: requests (`per_second` sustained, `burst` at once) and decoded pixels (what a request
    costs: a 131 KB flat PNG of 6300 x 6300 takes 1.5 CPU-s to decode, as much as ~100 small images)."""

    per_second: float = Field(50.0, gt=0)
    burst: int = Field(100, ge=1)
    megapixels_per_second: float | None = Field(40.0, gt=0, description="decoded megapixels (width x height from the "
                                                "header) per second; null: pixels are not counted")
    megapixel_burst: float = Field(200.0, gt=0, description="megapixels at once; an image larger than this is "
                                   "never admitted (413)")


class Autoscaling(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="per replica; about one full batch in flight")
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class DomainConfig(Strict):
    """One application: `/v1/<domain>/score`, serving anomalymoe-<domain>@<alias> (or `model`, a fixed URI)."""

    domain: str
    alias: str = registry.CHAMPION
    model: str | None = Field(None, description="fixed model URI instead of the alias (artifact dir, s3://, models:/)")
    max_batch_size: int = Field(8, ge=1, description="images per forward pass; CPU replicas 8-16, GPU replicas "
                                                     "32-64 (a GPU is idle between small batches)")
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    autoscaling: Autoscaling = Autoscaling()
    scorer_cpus: float = Field(1.0, ge=0, description="Ray CPUs per scorer replica")
    scorer_gpus: float = Field(0.0, ge=0, le=1, description="Ray GPUs per scorer replica (num_gpus); > 0 runs the "
                                                            "model on CUDA in bf16, < 1 shares a GPU between "
                                                            "replicas; a replica without CUDA refuses to start")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per replica (default: scorer_cpus)")
    ingress_replicas: int = Field(1, ge=1)

    @field_validator("domain")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v) or v == OPS_APP:
            raise ValueError(f"domain {v!r}: use letters, digits, - or _ (and not {OPS_APP!r})")
        return v

    @model_validator(mode="after")
    def _batching(self) -> DomainConfig:
        if self.max_ongoing_requests < self.max_batch_size:  # else batches can never fill (DESIGN.md §3)
            raise ValueError(f"{self.domain}: max_ongoing_requests {self.max_ongoing_requests} < max_batch_size "
                             f"{self.max_batch_size}")
        return self

    @property
    def model_uri(self) -> str:
        return self.model or f"models:/{registry.model_name(self.domain)}@{self.alias}"

    @property
    def device(self) -> str:
        """Where a scorer replica runs the model: Ray gives a replica with num_gpus its own CUDA_VISIBLE_DEVICES,
        so plain "cuda" is that replica's GPU."""
        return "cuda" if self.scorer_gpus > 0 else "cpu"

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, round(self.scorer_cpus))


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    domains: list[DomainConfig] = Field(default_factory=lambda: [DomainConfig(domain="textures"),
                                                                 DomainConfig(domain="objects")])
    tenants_uri: str | None = Field(None, description="tenant/key store (local path or s3://), re-read every "
                                                      "tenants_refresh_s; default <repo>/outputs/serve/tenants.json")
    tenants_refresh_s: float = Field(2.0, gt=0)
    tenants_max_stale_s: float = Field(30.0, gt=0, description="a replica that could not read the tenant store for "
                                       "this long refuses every request (503) and is not ready: a revocation is "
                                       "never missed for longer")
    limits: Limits = Limits()
    default_rate: RateLimit = RateLimit()
    request_timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0, description="re-sends of a request whose replica died")
    env: dict[str, str] = Field(default_factory=dict,
                                description="env vars for every replica (MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, …); "
                                            "no secrets: the Ray dashboard and Serve's APIs show them")

    @model_validator(mode="after")
    def _unique(self) -> ServeConfig:
        names = [d.domain for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"a domain is declared twice: {names}")
        secret = sorted(k for k in self.env if any(w in k.upper() for w in ("SECRET", "TOKEN", "PASSWORD"))
                        or k.upper() == "AWS_ACCESS_KEY_ID")
        if secret:
            raise ValueError(f"env {secret}: secrets do not go into the Serve config (the Ray dashboard and Serve's "
                             "APIs show it); give the replicas a credentials file (AWS_SHARED_CREDENTIALS_FILE), "
                             "their pod's secret or a role")
        return self

    def domain(self, name: str) -> DomainConfig:
        for d in self.domains:
            if d.domain == name:
                return d
        raise KeyError(f"no domain {name!r} in the serve config (has {[d.domain for d in self.domains]})")

    def narrowed(self, domains: list[str] | None = None, port: int | None = None, tenants_uri: str | None = None
                 ) -> ServeConfig:
        """This config with only `domains` served (each must be configured), another port or tenant store."""
        changes: dict[str, Any] = {}
        if domains:
            changes["domains"] = [self.domain(d) for d in domains]
        if port:
            changes["port"] = port
        if tenants_uri:
            changes["tenants_uri"] = tenants_uri
        return self.model_copy(update=changes) if changes else self

    @property
    def tenants_location(self) -> str:
        return self.tenants_uri or str(REPO_ROOT / "outputs" / "serve" / "tenants.json")

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None) -> ServeConfig:
    """A YAML file of ServeConfig fields; None → the defaults (textures + objects, local store)."""
    if path is None:
        return ServeConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return ServeConfig.model_validate(data)


def _scorer_deployment(d: DomainConfig, pin: dict[str, str] | None) -> dict[str, Any]:
    a = d.autoscaling
    return {
        "name": "Scorer",
        "max_ongoing_requests": d.max_ongoing_requests,
        "autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                               "initial_replicas": max(a.min_replicas, 1),
                               "target_ongoing_requests": a.target_ongoing_requests,
                               "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s},
        # num_gpus only when asked for: CPU documents stay as they were
        "ray_actor_options": {"num_cpus": d.scorer_cpus, **({"num_gpus": d.scorer_gpus} if d.scorer_gpus else {})},
        # the model this app serves; a promotion changes only this, so Serve reconfigures replicas in place
        "user_config": pin or {"uri": d.model_uri},
        "graceful_shutdown_timeout_s": 30.0,
    }


def render(cfg: ServeConfig, pins: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Ray Serve's config document (ServeDeploySchema). `pins`: domain → {"uri", "version"} resolved at deploy
    time; without one a replica resolves the alias itself when it loads."""
    args = {"config": cfg.model_dump(mode="json"), "config_hash": cfg.config_hash()}
    runtime_env = {"env_vars": dict(cfg.env)} if cfg.env else {}
    apps = [{
        "name": OPS_APP, "route_prefix": "/", "import_path": "anomalymoe.serve.app:ops_app", "args": args,
        "runtime_env": runtime_env,
        "deployments": [{"name": "ServeState", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
                        {"name": "Ops", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}],
    }]
    for d in cfg.domains:
        apps.append({
            "name": d.domain, "route_prefix": f"/v1/{d.domain}", "import_path": "anomalymoe.serve.app:domain_app",
            "args": {**args, "domain": d.domain}, "runtime_env": runtime_env,
            "deployments": [_scorer_deployment(d, (pins or {}).get(d.domain)),
                            {"name": "Ingress", "num_replicas": d.ingress_replicas,
                             "max_ongoing_requests": 4 * d.max_ongoing_requests,
                             "ray_actor_options": {"num_cpus": 0}}],
        })
    # the proxy's own end-to-end deadline: the body's, the scorer's and a margin (the ingress answers 408/504 first)
    proxy_timeout = round(cfg.limits.body_timeout_s + cfg.request_timeout_s + 5.0, 3)
    return {"proxy_location": "EveryNode", "http_options": {"host": cfg.host, "port": cfg.port,
                                                            "request_timeout_s": proxy_timeout},
            "applications": apps}


def render_yaml(cfg: ServeConfig, pins: dict[str, dict[str, str]] | None = None) -> str:
    head = (f"# Ray Serve config rendered from anomalymoe.serve.config.ServeConfig (hash {cfg.config_hash()}).\n"
            "# Do not edit: change the typed config and run `python jobs/serve.py render`.\n")
    return head + yaml.dump(render(cfg, pins), Dumper=NoAliasDumper, sort_keys=False)


class NoAliasDumper(yaml.SafeDumper):
    """Repeated sub-documents written out in full (no &id001 anchors): readable, and what KubeRay users expect."""

    def ignore_aliases(self, data):
        return True
