"""The scoring service over real HTTP on 127.0.0.1: Ray Serve (`serve.run` through anomalymoe.serve.app.deploy) on
the session's Ray head, models from the session's MLflow server (artifacts in SeaweedFS), tenants in S3.

One application with two scorer replicas serves a tiny calibrated model (v1, champion) of the demo's objects (two
categories, normal / logical / component test images) with part segmentation inside the model, so every request
is scored with its component level and, without ?category=, with an inferred category; v2 is promoted during a
request loop; v3 is tenant beta's own variant. Tests run in file order (the promotion is
last). The domain is called `servetest`: the registry is the session's, and anomalymoe-textures belongs to the
training job tests (which expect no champion before theirs)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DOMAIN = "servetest"


def _png(seed: int = 0, size: int = 64) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _register(model, df, out: Path, manifest: str = "serve-test") -> str:
    import mlflow

    from anomalymoe.models.artifact import save_artifact
    from anomalymoe.platform.evaluation.evaluate import evaluate
    from anomalymoe.platform.tracking import registry

    report = evaluate(model, df[df["split"] == "test"], progress=False)
    art = save_artifact(model, out, metrics=report)
    mlflow.set_tracking_uri(registry.tracking_uri())
    with mlflow.start_run(experiment_id=registry.experiment_id("serve-test")) as run:
        mlflow.log_artifacts(str(art), artifact_path=registry.ARTIFACT_PATH)
    return registry.register(run.info.run_id, DOMAIN, {"manifest_hash": manifest}, alias=None)


class Service:
    def __init__(self, cfg, url, keys, versions, root, df):
        self.cfg, self.url, self.keys, self.versions, self.root, self.df = cfg, url, keys, versions, root, df
        self.good = Path(df[df["split"] == "test"]["uri"].iloc[0]).read_bytes()

    def score(self, tenant: str | None = "alpha", data: bytes | None = None, ctype: str = "image/png",
              params: str = "", headers: dict | None = None, key: str | None = None, **kw) -> requests.Response:
        h = {"Content-Type": ctype, **(headers or {})}
        k = key or (self.keys[tenant] if tenant else None)
        if k:
            h["Authorization"] = f"Bearer {k}"
        return requests.post(f"{self.url}/v1/{DOMAIN}/score{params}", data=self.good if data is None else data,
                             headers=h, timeout=120, **kw)


def scorer_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address,
                        filters=[("class_name", "=", f"ServeReplica:{DOMAIN}:Scorer"), ("state", "=", "ALIVE")])
    return sorted(a.pid for a in alive)


@pytest.fixture(scope="module")
def service(ray_head, mlflow_server, s3, tmp_path_factory):
    import ray
    import torch
    from ray import serve

    from anomalymoe.models.calibration import fit_calibration
    from anomalymoe.models.config import presets
    from anomalymoe.models.model import AnomalyMoE
    from anomalymoe.models.parts import Parts
    from anomalymoe.platform.cluster.local.proc import free_port
    from anomalymoe.platform.data.demo.objects import generate_objects
    from anomalymoe.platform.data.pipeline import load_rows, row_keys
    from anomalymoe.platform.data.segmentation import SegmentParams, fit_parts, part_params
    from anomalymoe.platform.data.sources import resolve_data
    from anomalymoe.platform.tracking import registry
    from anomalymoe.serve import app
    from anomalymoe.serve.config import Autoscaling, DomainConfig, Limits, RateLimit, ServeConfig
    from anomalymoe.serve.tenants import TenantStore

    tmp = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**s3.env(), "MLFLOW_TRACKING_URI": mlflow_server.uri, "RAY_AUTH_MODE": "disabled"}.items():
            mp.setenv(k, v)
        root = tmp / DOMAIN
        generate_objects(root, n_train=4, n_test_good=2, n_test_defect_per_type=1, image_size=64)
        df, _ = resolve_data([f"{DOMAIN}={root}"])
        train = df[df["split"] == "train"]
        versions = {}
        for name, seed in (("v1", 0), ("v2", 1), ("v3", 2)):
            torch.manual_seed(seed)
            model = AnomalyMoE(presets()["test-tiny"]).eval()
            # parts inside the model (the tiny random backbone's clusters; every cluster kept as a part slot, so the
            # component level is in every answer)
            seg = SegmentParams(k=3, out_size=64, per_image=8)
            model.parts = Parts(part_params(seg))
            for key, sub in df.groupby(df["domain"] + "/" + df["category"]):
                cp = fit_parts(model.backbone, sub, seg)
                cp.kept = list(range(cp.k))
                model.parts.categories[key] = cp
            images, _ = load_rows(train, model.cfg.backbone.img_size)
            fit_calibration(model, [(images, None, row_keys(train))])
            versions[name] = _register(model, df, tmp / name)
        registry.client().set_registered_model_alias(registry.model_name(DOMAIN), registry.CHAMPION, versions["v1"])

        tenants = s3.uri(f"serve-{os.getpid()}", "tenants.json")
        store = TenantStore(tenants)
        keys = {
            "alpha": store.add("alpha", [DOMAIN]),
            "beta": store.add("beta", [DOMAIN], variants={DOMAIN: f"models:/anomalymoe-{DOMAIN}/{versions['v3']}"}),
            "gamma": store.add("gamma", ["objects"]),
            "slow": store.add("slow", [DOMAIN], RateLimit(per_second=0.2, burst=2)),
            "admin": store.add("admin", ["ops"]),
            "pixels": store.add("pixels", [DOMAIN], RateLimit(per_second=100, burst=100,
                                                              megapixels_per_second=0.001, megapixel_burst=0.05)),
        }
        keys["alpha2"] = store.rotate("alpha")
        cfg = ServeConfig(
            port=free_port(), tenants_uri=tenants, tenants_refresh_s=1.0,
            default_rate=RateLimit(per_second=1000, burst=1000),
            limits=Limits(max_body_bytes=8 * 1024 * 1024, body_timeout_s=3.0),
            domains=[DomainConfig(domain=DOMAIN, max_batch_size=4, max_ongoing_requests=8, scorer_cpus=0.5,
                                  torch_threads=1, batch_wait_timeout_s=0.02,
                                  autoscaling=Autoscaling(min_replicas=2, max_replicas=2))])
        ray.init(address=ray_head.address, log_to_driver=False)
        try:
            app.deploy(cfg)
            url = f"http://{cfg.host}:{cfg.port}"
            app.wait_ready(cfg, timeout=180)
            yield Service(cfg, url, keys, versions, root, df)
        finally:
            serve.shutdown()
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ 1. auth
def test_auth_and_tenant_isolation(service):
    s = service
    r = s.score(tenant=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert s.score(key="amk_deadbeef_not-a-real-key").status_code == 401
    assert s.score(key="garbage").status_code == 401
    r = s.score("gamma")
    assert r.status_code == 403 and DOMAIN in r.json()["error"]["message"]
    a = s.score("alpha").json()
    assert a["model"]["version"] == s.versions["v1"] and a["model"]["variant"] is None
    b = s.score("beta").json()
    assert b["model"]["version"] == s.versions["v3"] and b["model"]["variant"].endswith(f"/{s.versions['v3']}")
    assert b["score"] != a["score"]
    # a client cannot pick a model variant: Serve's multiplexing header is ignored, the tenant record decides
    spoof = {"serve_multiplexed_model_id": f"models:/anomalymoe-{DOMAIN}/{s.versions['v3']}"}
    assert s.score("alpha", headers=spoof).json()["model"]["variant"] is None
    spoof = {"serve_multiplexed_model_id": f"models:/anomalymoe-{DOMAIN}/{s.versions['v1']}"}
    assert s.score("beta", headers=spoof).json()["model"]["version"] == s.versions["v3"]
    # a revoked key is refused within seconds, the tenant's other key keeps working, no restart
    from anomalymoe.serve.tenants import TenantStore

    assert s.score("alpha2").status_code == 200
    TenantStore(s.cfg.tenants_uri).revoke(s.keys["alpha2"])
    t0 = time.monotonic()
    while (r := s.score("alpha2")).status_code == 200:
        assert time.monotonic() - t0 < 10, "a revoked key still works after 10 s"
        time.sleep(0.2)
    assert r.status_code == 401 and r.json()["error"]["message"] == "revoked API key"
    print(f"revoked key refused after {time.monotonic() - t0:.1f} s")
    assert s.score("alpha").status_code == 200


def test_request_id_is_echoed(service):
    r = service.score("alpha", headers={"X-Request-ID": "test-req-42"})
    assert r.headers["X-Request-ID"] == "test-req-42" and r.json()["request_id"] == "test-req-42"
    r = service.score(tenant=None, headers={"X-Request-ID": "test-req-43"})
    assert r.headers["X-Request-ID"] == "test-req-43" and r.json()["error"]["request_id"] == "test-req-43"
    r = service.score("alpha")
    assert r.headers["X-Request-ID"] == r.json()["request_id"] and len(r.json()["request_id"]) >= 16


# ------------------------------------------------------------------------------------------------ 2. bad input
def test_bad_input_is_refused_and_service_keeps_serving(service):
    s = service
    good = s.good
    big, gif_buf = io.BytesIO(), io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(big, format="PNG")
    Image.open(io.BytesIO(good)).convert("P").save(gif_buf, format="GIF")
    gif = gif_buf.getvalue()
    cases = [
        ("empty body", b"", "image/png", 400, "empty_body"),
        ("truncated PNG", good[: len(good) // 2], "image/png", 400, "bad_image"),
        ("a text file", b"name,score\nfoo,1\n" * 20, "image/png", 400, "bad_image"),
        ("10000x10000 image", big.getvalue(), "image/png", 413, "image_too_large"),
        ("200 MB body", b"\0" * (200 * 1024 * 1024), "image/png", 413, "payload_too_large"),
        ("wrong content type", good, "text/plain", 415, "unsupported_media_type"),
        ("a GIF sent as image/png", gif, "image/png", 415, "unsupported_media_type"),
    ]
    for name, body, ctype, status, code in cases:
        r = s.score("alpha", data=body, ctype=ctype)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["request_id"], name
        ok = s.score("alpha")
        assert ok.status_code == 200 and ok.json()["score"] == pytest.approx(s.score("alpha").json()["score"]), name
    # multipart upload with the category in the form
    r = requests.post(f"{s.url}/v1/{DOMAIN}/score?map=true", files={"image": ("x.png", good, "image/png")},
                      data={"category": "tray"}, headers={"Authorization": f"Bearer {s.keys['alpha']}"}, timeout=60)
    body = r.json()
    assert r.status_code == 200 and body["category"] == f"{DOMAIN}/tray" and body["category_inference"] is None
    overlay = Image.open(io.BytesIO(__import__("base64").b64decode(body["anomaly_map"]["png_base64"])))
    # the map comes back in the image's own geometry
    assert overlay.format == "PNG" and overlay.size == Image.open(io.BytesIO(good)).size \
        == (body["anomaly_map"]["width"], body["anomaly_map"]["height"])
    r = s.score("alpha", params="?category=nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_category"


# ------------------------------------------------------------------------------------------------ 3. rate limit
def test_rate_limit(service):
    codes = [service.score("slow") for _ in range(4)]
    limited = [r for r in codes if r.status_code == 429]
    assert [r.status_code for r in codes[:2]] == [200, 200] and limited, [r.status_code for r in codes]
    r = limited[0]
    assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "rate_limited"
    assert r.headers["X-RateLimit-Scope"] == "service"  # one bucket for every ingress replica


def test_pixels_are_rate_limited_and_a_trickled_body_times_out(service):
    """Within its request rate, a tenant is still limited by the megapixels it makes the service decode; a client
    trickling its body cannot hold an ingress slot past limits.body_timeout_s (408), and the service keeps
    answering others meanwhile."""
    import socket

    s = service
    w, h = Image.open(io.BytesIO(s.good)).size
    fits = int(0.05 // (w * h / 1e6))  # images that fit the 0.05 MP burst
    codes = [s.score("pixels").status_code for _ in range(fits + 2)]
    assert codes[:fits] == [200] * fits and 429 in codes[fits:], (fits, codes)
    limited = s.score("pixels")
    assert limited.status_code == 429 and "megapixels" in limited.json()["error"]["message"]
    big = io.BytesIO()
    Image.new("RGB", (400, 400)).save(big, format="PNG")  # 0.16 MP: over the tenant's whole burst
    r = s.score("pixels", data=big.getvalue())
    assert r.status_code == 413 and "megapixel burst" in r.json()["error"]["message"]

    t0 = time.monotonic()
    with socket.create_connection((s.cfg.host, s.cfg.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/{DOMAIN}/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {s.keys['alpha']}\r\n"
                      "Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n").encode())
        sock.settimeout(1.0)
        answer, others = b"", None
        while b"\r\n\r\n" not in answer and time.monotonic() - t0 < 25:
            sock.sendall(b"\0")  # one byte a second: never done
            if others is None:
                others = s.score("alpha").status_code  # the service answers others meanwhile
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                pass
    took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert others == 200
    assert s.cfg.limits.body_timeout_s <= took < s.cfg.limits.body_timeout_s + 5, took


# ------------------------------------------------------------------------------------------------ 4. load + kill
def _load(service, clients: int, per_client: int, tenant_of=lambda i: "alpha", on_progress=None):
    results: list[tuple[int, dict | str]] = []
    lock = threading.Lock()

    def client(i: int):
        sess = requests.Session()
        tenant = tenant_of(i)
        for j in range(per_client):
            try:
                r = sess.post(f"{service.url}/v1/{DOMAIN}/score", data=_png(1000 * i + j),
                              headers={"Authorization": f"Bearer {service.keys[tenant]}",
                                       "Content-Type": "image/png"}, timeout=120)
                out = (r.status_code, r.json() if r.status_code == 200 else r.text[:300])
            except requests.RequestException as e:
                out = (-1, repr(e))
            with lock:
                results.append((i, tenant, *out))
                if on_progress:
                    on_progress(len(results))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results


def test_load_with_a_replica_killed(service):
    before = scorer_pids()
    assert len(before) == 2
    killed = {}

    def kill_once(done: int):
        if done == 120 and not killed:
            killed["pid"] = before[0]
            os.kill(before[0], signal.SIGKILL)

    t0 = time.monotonic()
    results = _load(service, clients=16, per_client=25, on_progress=kill_once)
    elapsed = time.monotonic() - t0
    failed = [r for r in results if r[2] != 200]
    assert killed and len(results) == 400
    assert not failed, f"{len(failed)} of 400 failed: {failed[:3]}"
    sizes = Counter(r[3]["timings_ms"]["batch_size"] for r in results)
    print(f"400 requests from 16 clients in {elapsed:.1f} s, replica {killed['pid']} killed; batch sizes {sizes}")
    assert max(sizes) > 1  # concurrent requests were batched
    t0 = time.monotonic()
    while len(scorer_pids()) < 2:  # Serve replaces the killed replica
        assert time.monotonic() - t0 < 120, "the killed replica was not replaced"
        time.sleep(1)
    assert killed["pid"] not in scorer_pids()


def test_a_batch_never_mixes_models(service):
    from ray import serve

    results = _load(service, clients=8, per_client=6, tenant_of=lambda i: "beta" if i % 2 else "alpha")
    assert all(r[2] == 200 for r in results), [r for r in results if r[2] != 200][:3]
    for _, tenant, _, body in results:  # every answer came from the tenant's own model
        want = service.versions["v3"] if tenant == "beta" else service.versions["v1"]
        assert body["model"]["version"] == want
    batches = []
    for _ in range(6):  # each call reaches one of the replicas
        batches += serve.get_deployment_handle("Scorer", app_name=DOMAIN).recent_batches.remote().result()
    ids = {m for m, _ in batches}
    assert "" in ids and any(m.endswith(f"/{service.versions['v3']}") for m in ids)
    assert any(n > 1 for _, n in batches)  # batching happened; Scorer._batch refuses a batch of mixed ids


# ------------------------------------------------------------------------------------------------ health, metrics
def test_health_ready_metrics(service):
    """Health is public; readiness says only ready/not without an admin key and what is served with one; /metrics
    (every tenant's traffic, the variants' model URIs) needs an admin key and answers in the service's error shape
    without one; an admin key scores nothing."""
    s = service
    admin = {"Authorization": f"Bearer {s.keys['admin']}"}
    assert requests.get(f"{s.url}/v1/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{s.url}/v1/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    ready = requests.get(f"{s.url}/v1/readyz", headers=admin, timeout=10)
    assert ready.status_code == 200 and ready.json()["domains"][DOMAIN]["model"]["version"] == s.versions["v1"]
    dom = requests.get(f"{s.url}/v1/{DOMAIN}/readyz", timeout=10)
    assert dom.status_code == 200 and dom.json() == {"ready": True}
    assert requests.get(f"{s.url}/v1/{DOMAIN}/readyz", headers=admin, timeout=10).json()["model"]["version"] \
        == s.versions["v1"]
    for headers in ({}, {"Authorization": f"Bearer {s.keys['alpha']}"}):
        r = requests.get(f"{s.url}/metrics", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert "alpha" not in r.text and r.json()["error"]["request_id"]
    assert s.score("admin").status_code == 403
    expected = [f'anomalymoe_requests_total{{code="200",domain="{DOMAIN}",tenant="alpha"}}',
                f'anomalymoe_requests_total{{code="429",domain="{DOMAIN}",tenant="slow"}}',
                f'anomalymoe_errors_total{{code="unauthorized",domain="{DOMAIN}",tenant="-"}}']
    t0 = time.monotonic()
    while True:  # replicas push their counts every second
        text = requests.get(f"{s.url}/metrics", headers=admin, timeout=10).text
        missing = [e for e in expected if e not in text]
        if not missing:
            break
        assert time.monotonic() - t0 < 15, f"missing {missing} in /metrics:\n{text}"
        time.sleep(1)
    assert "anomalymoe_request_duration_seconds_bucket" in text and "anomalymoe_batch_size_count" in text
    assert f'version="{s.versions["v1"]}"' in text
    count = sum(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(f'anomalymoe_requests_total{{code="200",domain="{DOMAIN}",tenant="alpha"}}'))
    assert count >= 400, text


# ------------------------------------------------------------------------------------------------ 6. == evaluate.py
def test_http_score_equals_evaluate_job(service, tmp_path):
    """Every objects test image (normal, logical, component) answers over HTTP exactly the row jobs/evaluate.py
    writes for it on the same model: score, normalised score, verdict, threshold, every level's score and the
    experts; with ?category= and, for a domain of two categories, without it (the category inferred from the
    image, and the right one)."""
    s = service
    out = tmp_path / "eval"
    env = dict(os.environ)  # MLFLOW_TRACKING_URI of the session's server (set for this module)
    subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model",
                    f"models:/anomalymoe-{DOMAIN}/{s.versions['v1']}", "--data", f"{DOMAIN}={s.root}",
                    "--out", str(out), "--panels", "0"], check=True, env=env, cwd=REPO, capture_output=True)
    import pandas as pd

    rows = pd.read_csv(out / "scores.csv")
    assert set(rows["defect_group"].fillna("")) == {"", "logical", "component"} and rows["category"].nunique() == 2
    for row in rows.itertuples():
        data = Path(row.uri).read_bytes()
        for params in (f"?category={row.category}", ""):
            body = s.score("alpha", data=data, params=params).json()
            assert body["category"] == f"{DOMAIN}/{row.category}", (row.uri, params, body.get("category_inference"))
            assert body["score"] == pytest.approx(row.score, rel=1e-4, abs=1e-5), (row.uri, params, body, row)
            assert body["normalized_score"] == pytest.approx(row.normalized_score, rel=1e-4, abs=1e-4)
            assert body["is_anomaly"] == bool(row.is_anomaly) and body["threshold"] == pytest.approx(row.threshold)
            for lv, info in body["levels"].items():
                assert (info["score"] is None) == np.isnan(getattr(row, f"level_{lv}"))
                if info["score"] is not None:
                    assert info["score"] == pytest.approx(getattr(row, f"level_{lv}"), rel=1e-4, abs=1e-5), lv
            assert body["levels"]["component"]["used"] and "part" in body["levels"]["component"]
            assert sorted(int(e["expert"].split(".")[1]) + {"patch": 0, "global": 3, "component": 6}[
                e["expert"].split(".")[0]] for e in body["experts"]) == sorted(int(x) for x in row.experts.split(","))
            if not params:
                inf = body["category_inference"]
                assert inf["inferred"] and 0.5 < inf["confidence"] <= 1.0 and inf["margin"] is not None


# ------------------------------------------------------------------------------------------------ 5. promotion
def test_promotion_during_requests_switches_version_without_failures(service):
    from anomalymoe.platform import promotion
    from anomalymoe.serve import app

    s = service
    pids = scorer_pids()
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def loop():
        sess = requests.Session()
        while not stop.is_set():
            r = sess.post(f"{s.url}/v1/{DOMAIN}/score", data=s.good, timeout=120,
                          headers={"Authorization": f"Bearer {s.keys['alpha']}", "Content-Type": "image/png"})
            seen.append((r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text[:200]))

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        rep = promotion.promote(DOMAIN, s.versions["v2"], tol=1.0)  # the gates, then the alias moves
        assert rep.passed, rep.text()
        pinned = app.push(s.cfg)  # resolved once here, pushed to the running replicas by reconfigure
        assert pinned[DOMAIN]["version"] == s.versions["v2"]
        t0 = time.monotonic()
        while not (len(seen) > 20 and all(v == s.versions["v2"] for _, v in seen[-12:])):
            assert time.monotonic() - t0 < 60, f"still not switched: {seen[-12:]}"
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    codes = Counter(c for c, _ in seen)
    versions = Counter(v for c, v in seen if c == 200)
    print(f"during the promotion: {dict(codes)}, versions {dict(versions)}")
    assert codes == Counter({200: len(seen)}), codes
    assert versions[s.versions["v1"]] > 0 and versions[s.versions["v2"]] > 0
    assert scorer_pids() == pids  # reconfigured in place: the same replica processes
    admin = {"Authorization": f"Bearer {s.keys['admin']}"}
    assert requests.get(f"{s.url}/v1/readyz", headers=admin, timeout=10).json()["domains"][DOMAIN]["model"][
        "version"] == s.versions["v2"]


def test_a_failed_push_leaves_the_previous_version_serving(service, tmp_path):
    """A champion that does not load (here: its weights file cut short): `push` fails before touching the service
    (it loads the version itself first); and when the replicas are the ones that cannot load it (pre-check skipped,
    as for an S3 or MLflow blip on their side), they keep the previous model, push sees it, deploys the previous
    pins again and fails with the reason. The domain answers 200 with the previous version throughout."""
    import mlflow

    from anomalymoe.platform.tracking import registry
    from anomalymoe.serve import app

    s = service
    name = registry.model_name(DOMAIN)
    before = s.score("alpha").json()["model"]["version"]
    art = registry.download(f"models:/{name}/{before}", tmp_path / "art")
    weights = art / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    mlflow.set_tracking_uri(registry.tracking_uri())
    with mlflow.start_run(experiment_id=registry.experiment_id("serve-test")) as run:
        mlflow.log_artifacts(str(art), artifact_path=registry.ARTIFACT_PATH)
    broken = registry.register(run.info.run_id, DOMAIN, {"manifest_hash": "serve-test"}, alias=None)
    c = registry.client()
    c.set_registered_model_alias(name, registry.CHAMPION, broken)  # as a bad promotion would
    try:
        with pytest.raises(app.PushError, match="does not load here, nothing was changed"):
            app.push(s.cfg)
        assert s.score("alpha").json()["model"]["version"] == before
        with pytest.raises(app.PushError, match=f"rolled back to models:/{name}/{before}"):
            app.push(s.cfg, precheck=False, timeout=120)
        for _ in range(10):
            r = s.score("alpha")
            assert r.status_code == 200 and r.json()["model"]["version"] == before
        info = app.serving(s.cfg)[DOMAIN]
        assert info["model"]["version"] == before
    finally:
        c.set_registered_model_alias(name, registry.CHAMPION, before)
