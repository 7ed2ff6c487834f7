"""The demo's report: report.md and report.html (self-contained but for links to the evaluation's panels) with the
test-split metric table, the images scored over HTTP with their answers and overlays, the routing histogram and
the anomaly-map panels."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from anomalymoe.platform.evaluation.evaluate import metrics_table
from anomalymoe.platform.tracking import registry


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
