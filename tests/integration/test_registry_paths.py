"""registry.download against a real S3 server (SeaweedFS) holding an artifact with hostile key names: whatever the
server keeps of them, nothing is written outside the download folder (AWS S3 keeps such names literally: the unit
test feeds that listing to the same code)."""

from __future__ import annotations

import os

import pytest

from anomalymoe.platform.data import storage
from anomalymoe.platform.tracking import registry

pytestmark = pytest.mark.integration


def test_artifact_keys_cannot_write_outside_the_download_folder(s3, tmp_path):
    prefix = f"evil-{os.getpid()}/m/v4"
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key=f"{prefix}/model/config.json", Body=b"{}")
    refused = []
    for key in (f"{prefix}//tmp/escaped.pth", f"{prefix}/../../escaped2.pth"):
        try:
            client.put_object(Bucket=s3.bucket, Key=key, Body=b"import os")
        except client.exceptions.ClientError as e:  # SeaweedFS refuses some names outright (AWS S3 keeps them)
            refused.append((key, e.response["Error"]["Code"]))
    print("SeaweedFS refused:", refused)
    listed = storage.list_files(s3.uri(prefix))
    print("SeaweedFS lists:", listed)
    dl = tmp_path / "dl"
    hostile = [u for u in listed if ".." in u.split("/") or "//" in u.removeprefix("s3://")]
    if hostile:  # the server kept a hostile name: the artifact is refused
        with pytest.raises(registry.RegistryError, match="outside the download folder"):
            registry.download(s3.uri(prefix), dl)
    else:  # the server normalised them: what it lists lands under dl
        registry.download(s3.uri(prefix), dl)
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(str(p).startswith(str(dl)) for p in everything), everything
    # SeaweedFS (measured): refuses a key with '..' (InvalidRequest) and folds '//' into '/'. AWS S3 keeps both as
    # literal key names; that case is tests/unit/test_registry.py's (a listing with them is refused whole)
