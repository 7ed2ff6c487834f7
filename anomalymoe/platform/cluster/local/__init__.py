"""Local servers: ``proc`` (the managed-process life cycle every server here uses), ``s3`` (SeaweedFS),
``mlflow`` (a tracking + registry server), ``ray_head`` (``ray start --head``), ``stack`` (all three)."""
