"""The scoring service on Ray Serve: ``config`` (``ServeConfig`` and its rendering), ``app`` (deploy, push, readiness),
``ingress`` (HTTP: auth, limits, checks), ``scorer`` (the batched model replica), ``inference`` (what a replica does
with a batch), ``tenants`` (keys), ``ratelimit``, ``metrics`` (Prometheus), ``ops`` (health, readiness, metrics,
shared state), ``errors`` (one error shape), ``openapi``."""
