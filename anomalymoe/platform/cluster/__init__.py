"""Clusters for development and tests: ``local`` holds the servers the README's commands and the integration tests
start and stop (``proc``: process life cycle, ``s3``: SeaweedFS, ``mlflow``, ``ray_head``, ``stack``: the three)."""
