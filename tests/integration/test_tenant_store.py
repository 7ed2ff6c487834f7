"""The tenant store under concurrent writers, as operators run it: eight `jobs/serve.py tenants add` processes at
once and a `revoke` racing them, on a local folder and on SeaweedFS (S3). With the old read-modify-write document,
8 concurrent adds kept 4 tenants and a racing revoke could be undone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomalymoe.serve.tenants import KeyIndex, TenantStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_cli_changes_are_all_kept(where, tmp_path, s3):
    if where == "s3":
        uri, env = s3.uri(f"tenants-{os.getpid()}", "tenants.json"), {**os.environ, **s3.env()}
    else:
        uri, env = str(tmp_path / "store" / "tenants.json"), dict(os.environ)
    store = TenantStore(uri)
    victim = store.add("victim", ["*"])

    def cli(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "jobs/serve.py", "tenants", "--tenants", uri, *args], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [cli("add", f"t{i}", "--domain", "textures") for i in range(8)] + [cli("revoke", "victim")]
    outs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in outs), outs
    keys = [out.strip().splitlines()[-1] for _, out in outs[:8]]
    doc = store.load()
    assert sorted(doc["tenants"]) == sorted([f"t{i}" for i in range(8)] + ["victim"])  # none lost
    idx = KeyIndex(doc)
    assert [idx.authenticate(k)[0].name for k in keys] == [f"t{i}" for i in range(8)]  # every printed key works
    assert idx.authenticate(victim) == (None, "revoked API key")  # and the racing revoke holds
    ids = [k["id"] for t in doc["tenants"].values() for k in t["keys"]]
    assert len(ids) == len(set(ids)) == 9  # key ids unique across tenants
