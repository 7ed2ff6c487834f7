"""The whole platform on the embedded default, end to end: the demo data (textures + objects), component masks,
the training job on a local Ray (Ray Train, CPU-sized), calibration and evaluation, the MLflow run and registered
versions in the local store, promotion through the gates, the scoring service on Ray Serve, a few images scored
over HTTP, and a report (HTML + Markdown: metric tables, anomaly-map panels, the HTTP answers with their
overlays, the routing histogram) whose path it prints.

    python jobs/demo.py                    # everything under outputs/demo/; a second run reuses what is there
    python jobs/demo.py --steps 20         # quicker, weaker
    python jobs/demo.py --keep-serving     # leave the service up at http://127.0.0.1:<port> until Ctrl-C
    python jobs/demo.py --preset test-tiny --steps 2 --batch-size 4   # a smoke run: tiny random model, no meaning

Training settings come from configs/cpu-small.yaml (--config / --preset pick another) as in jobs/train.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from anomalymoe.platform.data.sources import ensure_demo_data  # noqa: E402
from anomalymoe.platform.evaluation.evaluate import metrics_table  # noqa: E402
from anomalymoe.platform.evaluation.report import write_report  # noqa: E402
from anomalymoe.platform.tracking import registry  # noqa: E402
from anomalymoe.platform.train.config import USER_ERRORS, add_config_arguments  # noqa: E402

STAGES = 7
REPO = Path(__file__).resolve().parents[1]


def stage(n: int, text: str) -> None:
    print(f"\n[{n}/{STAGES}] {text}", flush=True)


def build_spec(args, out: Path):
    """The training job: the config (--config / --preset; default configs/cpu-small.yaml) layered with the flags by
    the same code as jobs/train.py, then the demo's own data, names and places."""
    import dataclasses

    from anomalymoe.platform.train import config as job_config

    conf = job_config.layer(job_config.config_ref(args), job_config.flags_from_args(args))
    warning = job_config.random_if_offline_missing(conf)
    if warning:
        print(warning, flush=True)
    spec = job_config.to_spec(conf)
    steps, seed = spec.train.steps, spec.train.seed
    # a fixed run name per setting: rerunning the demo finds (and reuses) its own run; the model config's hash is in
    # it, so a checkout whose model config changed (a new version of this code) trains afresh instead of trying to
    # resume a checkpoint of another config
    return dataclasses.replace(
        spec, data=["demo"], domains=None,
        name=f"demo-{Path(conf['source']).stem}-{steps}-s{seed}-{spec.model.config_hash()[:8]}",
        output=str(out / "train"), storage=str(out / "ray_runs"), demo_root=str(out / "data"), experiment="demo",
        segment_k=args.k, log_every=10, checkpoint_every=max(10, steps // 3))


def score_over_http(url: str, key: str, test, per_domain: int = 3) -> list[dict]:
    """A normal image and defects of each domain, each scored once with ?map=true."""
    import requests

    rows = []
    for domain, sub in test.groupby("domain"):
        picks = [*sub[sub["label"] == 0].head(1).itertuples(), *sub[sub["label"] == 1]
                 .drop_duplicates("defect").head(per_domain - 1).itertuples()]
        for r in picks:
            t0 = time.perf_counter()
            resp = requests.post(f"{url}/v1/{domain}/score?map=true&category={r.category}",
                                 data=Path(r.uri).read_bytes(), timeout=300,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
            ms = (time.perf_counter() - t0) * 1000
            body = resp.json()
            rows.append({"domain": domain, "category": r.category, "defect": r.defect, "uri": r.uri,
                         "status": resp.status_code, "ms": ms, "body": body})
            verdict = body.get("is_anomaly") if resp.status_code == 200 else body.get("error")
            print(f"    POST /v1/{domain}/score  {r.category}/{r.defect}/{Path(r.uri).name}: {resp.status_code} "
                  f"score {body.get('score', float('nan')):.4f} anomaly={verdict} ({ms:.0f} ms)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "demo", help="output directory")
    # --config / --preset (default configs/cpu-small.yaml: 60 steps, batch 8, lr 2e-3), --steps, --lr, --seed, ...
    add_config_arguments(ap)
    ap.add_argument("--k", type=int, default=6, help="component clusters per objects category")
    ap.add_argument("--port", type=int, default=0, help="scoring service port (default: a free one)")
    ap.add_argument("--keep-serving", action="store_true", help="leave the service up until Ctrl-C")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    out: Path = args.out.resolve()
    try:
        spec = build_spec(args, out)  # before anything runs: a bad config is one line, at once
    except USER_ERRORS as e:
        raise SystemExit(f"demo: {e}") from None
    seed = spec.train.seed
    # the demo's own registry (unless MLFLOW_TRACKING_URI says otherwise): its promotions compare its own versions,
    # not champions trained elsewhere on other data (the gate would rightly refuse those comparisons)
    (out / "mlflow").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")

    stage(1, f"demo data (textures + objects) -> {out / 'data'}")
    for dom, s in ensure_demo_data(out / "data", seed=seed).items():
        print(f"    {dom}: {s['n_images']} images, {s['n_masks']} defect masks "
              f"({'generated' if s['regenerated'] else 'reused'})", flush=True)

    from anomalymoe.platform.train.job import reusable_summary, run_job

    summary = reusable_summary(out / "train", spec.name)
    if summary:
        stage(2, f"train: reusing run {spec.name} (versions {summary['versions']}); delete {out / 'train'} to "
                 "train again")
    else:
        stage(2, f"train on a local Ray (Ray Train, run {spec.name}: {spec.train.steps} steps) with each category's "
                 "part segmentation inside the model, calibrate on held-out normals, evaluate the test split, log to "
                 "MLflow, register (challenger)")
        summary = run_job(spec)
    report = json.loads((out / "train" / "eval" / "report.json").read_text())

    stage(3, "promote each domain's new version to champion (gates: artifact, calibration, smoke inference, "
             "not worse than the champion)")
    from anomalymoe.platform import promotion

    promoted = {}
    for d, v in summary["versions"].items():
        rep = promotion.promote(d, str(v))
        promoted[d] = rep.passed
        print("    " + rep.text().replace("\n", "\n    "), flush=True)

    stage(4, "start the scoring service (Ray Serve: one application per domain + ops) with a demo tenant")
    from anomalymoe.platform.cluster.local.proc import free_port, port_free
    from anomalymoe.serve import app
    from anomalymoe.serve.config import DomainConfig, RateLimit, ServeConfig
    from anomalymoe.serve.tenants import TenantStore

    tenants = out / "serve" / "tenants.json"
    key = TenantStore(str(tenants)).fresh_key("demo", ["*"], RateLimit(per_second=50, burst=100))
    cfg = ServeConfig(port=args.port or (8000 if port_free(8000) else free_port()), tenants_uri=str(tenants),
                      domains=[DomainConfig(domain=d, scorer_cpus=0.5, torch_threads=1) for d in summary["versions"]])
    url = f"http://{cfg.host}:{cfg.port}"
    from ray import serve

    try:
        try:
            pinned = app.start(cfg, None, ready_timeout=300, log_level="WARNING")
        except (app.DeployError, app.NotReady) as e:
            raise SystemExit(str(e)) from None
        for d, p in pinned.items():
            print(f"    {url}/v1/{d}/score  serves anomalymoe-{d} version {p['version']}", flush=True)

        stage(5, "score test images over HTTP (Authorization: Bearer <demo key>, ?map=true)")
        from anomalymoe.platform.data.sources import resolve_data

        df, _ = resolve_data("demo", demo_root=out / "data", seed=seed)
        rows = score_over_http(url, key, df[df["split"] == "test"])

        stage(6, "write the report")
        path = write_report(out, report, rows, summary, promoted, url)
        print("\n" + metrics_table(report))
        print(f"Report   : {path}  (and report.md beside it)")
        print(f"Panels   : {out / 'train' / 'eval' / 'panels'}/<domain>/<category>/*.png")
        print(f"MLflow   : {registry.tracking_uri()}  (experiment 'demo', run {summary['run_id']})")
        if args.keep_serving:
            print(f"Service  : {url}  key for tenant 'demo': {key}\nCtrl-C stops it", flush=True)
            app.wait_for_signal()
        stage(7, "stop the scoring service")
    finally:
        serve.shutdown()
    ok = all(r["status"] == 200 for r in rows)
    print(f"Done in {time.perf_counter() - t0:.0f} s" + ("" if ok else " (some HTTP requests failed, see above)"))
    print("SUMMARY " + json.dumps({"report": str(path), "versions": summary["versions"], "promoted": promoted,
                                  "http_ok": ok, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
