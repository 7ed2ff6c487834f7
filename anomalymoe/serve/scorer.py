"""The per-domain Scorer deployment: one loaded model (plus tenant variants), dynamic batching.

- The default model comes from `user_config` {"uri", "version"?}: Serve calls `reconfigure` once at start and
  again whenever only the user_config changes (a promotion pushed by `jobs/serve.py push`). The new model is
  loaded beside the old one and swapped in one assignment, so requests in flight finish on the old version
  and none fails. Nothing is looked up per request.
- Tenant variants are Serve multiplexed models (model id = the variant's model URI, chosen by the ingress from
  the tenant record, never by the client), LRU-cached per replica.
- `@serve.batch` groups concurrent requests; Ray Serve splits a batch by multiplexed model id, and `_run`
  checks that again, so one forward pass never mixes two models. The forward runs in a worker thread, so the
  replica keeps accepting (and queueing) requests meanwhile.
- Device: `scorer_gpus` > 0 puts every model of the replica on its GPU (bf16 autocast, see inference.py); a GPU
  replica that sees no CUDA device fails in its constructor, so Serve reports the deployment unhealthy with
  that message instead of a slow CPU replica serving unnoticed."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from ray import serve

from anomalymoe.serve.config import ServeConfig
from anomalymoe.serve.inference import Loaded, device_for, load, score_batch
from anomalymoe.serve.metrics import Metrics
from anomalymoe.serve.ops import StateClient

log = logging.getLogger("ray.serve")


@serve.deployment(name="Scorer")
class Scorer:
    def __init__(self, domain: str, config: dict[str, Any]):
        import torch

        self.cfg = ServeConfig.model_validate(config)
        self.dom = self.cfg.domain(domain)
        self.domain = domain
        self.device = device_for(self.dom.scorer_gpus)  # before anything is loaded: a wrong node fails here
        torch.set_num_threads(self.dom.threads)
        self.default: Loaded | None = None
        self.failed: dict[str, str] | None = None  # the last model that would not load (still serving default)
        self.metrics = Metrics()
        self.batches: collections.deque = collections.deque(maxlen=2000)  # (model id, size): for tests/debugging
        self._batch.set_max_batch_size(self.dom.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.dom.batch_wait_timeout_s)
        self.state = StateClient()
        self._flusher: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the pinned model beside the current one and switch on success. A failure (an MLflow or S3 blip, a
        broken version) with a model already loaded keeps that model serving and is reported by `info()`, so
        `jobs/serve.py push` rolls the config back; raising here would make Serve stop the replica, and its
        replacements fail the same way: with one replica the domain went offline. Only a replica with nothing
        loaded yet fails (Serve reports it unhealthy with the reason)."""
        uri = user_config.get("uri")
        if not uri:
            raise ValueError(f"Scorer {self.domain}: user_config needs a model 'uri', got {user_config}")
        if self.default is not None and self.default.uri == uri:
            self.failed = None
            return
        t0 = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(load, uri, self.dom.threads, self.device)
            pinned = user_config.get("version")
            # a path or s3:// URI resolves to "local" (no registry version to pin); the loaded model names itself by
            # its config hash, which is not a mismatch
            if pinned and pinned != "local" and pinned != loaded.version:
                raise ValueError(f"{uri} resolved to version {loaded.version}, the deployment pins {pinned}")
        except Exception as e:
            if self.default is None:
                raise
            self.failed = {"uri": uri, "error": f"{type(e).__name__}: {e}"[:1000]}
            log.error("Scorer %s keeps serving %s version %s: loading %s failed: %s", self.domain, self.default.name,
                      self.default.version, uri, e)
            return
        self.failed = None
        old, self.default = self.default, loaded
        if old is not None:
            self.metrics.clear_gauge("anomalymoe_model_info", domain=self.domain, variant="")
        self.metrics.set("anomalymoe_model_info", 1, domain=self.domain, model=loaded.name, version=loaded.version,
                         variant="")
        log.info("Scorer %s now serves %s version %s (was %s), loaded in %.1f s", self.domain, loaded.name,
                 loaded.version, old.version if old else None, time.perf_counter() - t0)
        self._start_flusher()

    @serve.multiplexed(max_num_models_per_replica=4)
    async def variant(self, model_id: str) -> Loaded:
        loaded = await asyncio.to_thread(load, model_id, self.dom.threads, self.device)
        self.metrics.set("anomalymoe_model_info", 1, domain=self.domain, model=loaded.name, version=loaded.version,
                         variant=model_id)
        return loaded

    async def info(self) -> dict[str, Any]:
        """What this replica serves (the readiness check calls this)."""
        d = self.default
        return {"domain": self.domain, "ready": d is not None, "model": d.describe() if d else None,
                "device": str(self.device), "failed": self.failed}

    async def recent_batches(self) -> list[tuple[str, int]]:
        return list(self.batches)

    async def score(self, item: dict[str, Any]) -> dict[str, Any]:
        item["enqueued"] = time.time()
        return await self._batch(item)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        model_id = serve.get_multiplexed_model_id()
        ids = {it.get("variant") or "" for it in items}
        if ids != {model_id}:  # Serve splits batches by model id; a mix would score images with the wrong model
            raise RuntimeError(f"a batch mixed model ids {sorted(ids)} (multiplexed id {model_id!r})")
        loaded = await self.variant(model_id) if model_id else self.default
        if loaded is None:
            raise RuntimeError(f"Scorer {self.domain} has no model loaded yet")
        self.batches.append((model_id, len(items)))
        self.metrics.observe("anomalymoe_batch_size", len(items), domain=self.domain)
        return await asyncio.to_thread(score_batch, loaded, items, self.domain, model_id or None)

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = self.state.start_flusher(self.metrics, f"scorer-{self.domain}")
