"""The registry wrapper on a file-backed MLflow store (no server): versions per domain, aliases, downloads."""

from __future__ import annotations

import pytest

from anomalymoe.platform.tracking import registry

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    (tmp_path / "db").mkdir()
    return tmp_path


def _logged_run(store, text: str) -> str:
    import mlflow

    art = store / f"art-{text}"
    art.mkdir()
    (art / "config.json").write_text(text)
    mlflow.set_tracking_uri(registry.tracking_uri())
    with mlflow.start_run(experiment_id=registry.experiment_id("unit")) as run:
        mlflow.log_artifacts(str(art), artifact_path=registry.ARTIFACT_PATH)
    return run.info.run_id


def test_register_alias_and_download(store):
    first = _logged_run(store, "one")
    v1 = registry.register(first, "textures", {"config_hash": "abc", "manifest_hash": "m1"})
    second = _logged_run(store, "two")
    v2 = registry.register(second, "textures", {"config_hash": "def"})  # the model exists already: a new version
    assert (v1, v2) == ("1", "2")
    got = registry.version_of("textures", registry.CHALLENGER)
    assert str(got.version) == "2" and got.tags["config_hash"] == "def"  # the alias moved to the newest version
    assert registry.version_of("textures", registry.CHAMPION) is None
    assert registry.version_of("nowhere", registry.CHALLENGER) is None
    d = registry.download("models:/anomalymoe-textures/1", store / "dl1")
    assert (d / "config.json").read_text() == "one"
    d = registry.download("models:/anomalymoe-textures@challenger", store / "dl2")
    assert (d / "config.json").read_text() == "two"
    # artifacts live beside the database, not in the working directory
    assert (store / "db" / "artifacts").is_dir()


def test_download_errors_name_the_uri(store):
    with pytest.raises(registry.RegistryError, match="models:/anomalymoe-missing@champion"):
        registry.download("models:/anomalymoe-missing@champion", store / "x")
    assert registry.download(str(store)) == store  # a local directory is used as it is


def test_download_refuses_keys_that_would_write_outside_the_folder(tmp_path, monkeypatch):
    """S3 key names are outside data: an artifact listing with `…/v4//home/…/x.pth` (an absolute path to pathlib) or
    `…/v4/../x` must not write outside the download folder. The whole artifact is refused and nothing is written."""
    from anomalymoe.platform.data import storage
    from anomalymoe.platform.tracking import registry

    written = []
    monkeypatch.setattr(storage, "download_file", lambda src, dst: written.append(str(dst)))
    for evil in ("s3://b/m/v4//home/u/.local/lib/python3.11/site-packages/x.pth", "s3://b/m/v4/../../x.pth"):
        monkeypatch.setattr(storage, "list_files", lambda prefix, e=evil: ["s3://b/m/v4/model/config.json", e])
        with pytest.raises(registry.RegistryError, match="outside the download folder"):
            registry.download("s3://b/m/v4", tmp_path / "dl")
    assert all(w.startswith(str(tmp_path / "dl")) for w in written)
