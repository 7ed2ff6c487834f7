"""The model registry (MLflow): one registered model per domain, ``anomalymoe-<domain>``, whose versions point at
our own artifact directory (model.safetensors, config.json, calibration.json, metrics.json) logged under a run.
Aliases, never stages: ``challenger`` for a fresh version, ``champion`` only through jobs/promote.py's gates.

Tracking URI: the standard ``MLFLOW_TRACKING_URI``, else a local sqlite store under ``outputs/mlflow`` (the
embedded default; the registry works there too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from anomalymoe.paths import OUTPUTS
from anomalymoe.platform.data import storage

ARTIFACT_PATH = "model"
CHALLENGER, CHAMPION = "challenger", "champion"
LOCAL_STORE = OUTPUTS / "mlflow"


class RegistryError(RuntimeError):
    """The registry could not be reached or does not hold what was asked; the message says which."""


def model_name(domain: str) -> str:
    return f"anomalymoe-{domain}"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    LOCAL_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


def experiment_id(name: str) -> str:
    """Create the experiment if needed (artifacts under outputs/mlflow/artifacts for the local store)."""
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # a file store: artifacts beside the database, not in the current directory
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def register(run_id: str, domain: str, tags: dict[str, str], alias: str | None = CHALLENGER,
             artifact_path: str = ARTIFACT_PATH) -> str:
    """A new version of anomalymoe-<domain> from the artifact the run logged at ``artifact_path``; returns it."""
    from mlflow.exceptions import MlflowException

    c = client()
    name = model_name(domain)
    try:
        c.create_registered_model(name, description=f"AnomalyMoE for the {domain} domain")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code if hasattr(e, "error_code") else e):
            raise
    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    v = c.create_model_version(name, source, run_id=run_id, tags={k: str(val) for k, val in tags.items()})
    if alias:
        c.set_registered_model_alias(name, alias, v.version)
    return str(v.version)


def version_of(domain: str, alias: str) -> Any | None:
    """The ModelVersion an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(model_name(domain), alias)
    except MlflowException:
        return None


def download(uri: str, dst: str | os.PathLike[str] | None = None) -> Path:
    """An artifact directory for ``uri``: a local path as is, ``s3://`` copied, ``models:/name@alias`` or
    ``models:/name/3`` downloaded from the registry."""
    if uri.startswith("models:/"):
        mlflow = _mlflow()
        dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="anomalymoe-model-"))
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        except Exception as e:  # noqa: BLE001 - MLflow raises many types; the user needs the URI and the cause
            raise RegistryError(f"cannot fetch {uri} from MLflow at {tracking_uri()}: {e}") from e
    if storage.is_s3(uri):
        dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="anomalymoe-model-"))
        prefix = uri.rstrip("/") + "/"
        files = list(storage.list_files(prefix))
        if not files:
            raise RegistryError(f"no model artifact under {uri}")
        for f in files:
            # a key name is outside data: "…/v4//home/u/x.pth" or "…/../x" must not write outside dst (a .pth file
            # there is code every new Python process runs)
            try:
                target = Path(storage.safe_join(dst, f[len(prefix):]))
            except storage.UnsafePath as e:
                raise RegistryError(f"{uri}: refusing the artifact: key {f!r} would be written outside the download "
                                    f"folder ({e})") from None
            storage.download_file(f, target)
        return dst
    return Path(uri)
