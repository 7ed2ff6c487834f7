"""Clusters: ``ray`` (connecting a driver to Ray, Ray Train's checkpoint storage); for development and tests,
``local`` holds the servers the README's commands and the integration tests start and stop (``proc``:
``ManagedServer``, the one process life cycle; ``s3``: SeaweedFS; ``mlflow``; ``ray_head``; ``stack``: the three)."""
