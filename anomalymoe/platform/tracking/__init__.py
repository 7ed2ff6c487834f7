"""Tracking: ``registry`` (MLflow: the tracking URI, registered models per domain, aliases, artifact download) and
``runs`` (a training run in MLflow: the rank-0 logger that never blocks training, the driver's retries, the backfill
of missed steps)."""
