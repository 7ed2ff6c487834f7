"""Where a job's Ray is: the connection (a given address, RAY_ADDRESS, or a local Ray with this checkout on its
path) and the checkpoint storage Ray Train writes to (a directory or s3:// through the storage layer)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from anomalymoe.paths import REPO_ROOT
from anomalymoe.platform.data import storage

log = logging.getLogger(__name__)



def connect_ray(address: str | None) -> None:
    """Inside `ray job submit` the job's runtime env (working dir) already ships this code. A driver started by
    hand (a local Ray, or RAY_ADDRESS / --address of a head on this machine) points its workers at this
    checkout; on a multi-node cluster submit the job with --working-dir instead."""
    import ray

    if ray.is_initialized():
        return
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by the job supervisor of a submitted job
        ray.init(address=address or None)
        return
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # a local Ray keeps its dashboard: Ray Train's placement-group cleaner asks the state API (served by it) whether
    # a controller is gone, and without it the resources of a killed run (an ASHA-stopped trial) are never freed
    ray.init(address=address or None, runtime_env={"env_vars": {"PYTHONPATH": path}})


def storage_config(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a local dir as is; s3:// through the storage layer's pyarrow
    filesystem (the same endpoint and credential rules as every other S3 access: storage.pyarrow_filesystem)."""
    if not storage.is_s3(uri):
        return str(Path(uri).resolve()), None
    return uri.removeprefix("s3://").rstrip("/"), storage.pyarrow_filesystem()
