"""The scoring service on Ray Serve: ``config`` (``ServeConfig`` and its rendering), ``app`` (start, deploy, push,
readiness), ``ingress`` (HTTP: auth, limits, checks; each replica's FastAPI app built around its ``Ingress``),
``schema`` (the response model), ``scorer`` (the batched model replica), ``inference`` (what a replica does with a
batch), ``tenants`` (keys), ``ratelimit``, ``metrics`` (Prometheus), ``ops`` (health, readiness, metrics, shared
state), ``errors`` (one error shape), ``openapi`` (the document, from the same route builders)."""
