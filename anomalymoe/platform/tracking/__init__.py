"""Tracking: ``registry`` (MLflow: the tracking URI, registered models per domain, aliases, artifact download)."""
