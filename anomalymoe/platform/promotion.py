"""Promotion gates: `champion` moves to a version of anomalymoe-<domain> only if

1. its artifact loads and carries a fitted calibration (levels and score thresholds for its categories),
2. a smoke inference succeeds (one image through the loaded model gives finite scores and a map), and
3. on the same evaluation set its metrics are not worse than the current champion's (tolerance `tol`).

"The same evaluation set": with `data`, both models are evaluated now on that data's test split (the same rows,
the same code); without it, the metrics logged at registration are compared only when both versions carry the
same manifest_hash tag. With no champion yet, gate 3 passes. Every gate's verdict and reason is reported."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anomalymoe.models.artifact import load_artifact, read_metrics
from anomalymoe.platform.tracking import registry

COMPARED = ("image_auroc", "pixel_auroc")


@dataclass
class Gate:
    name: str
    passed: bool
    reason: str


@dataclass
class GateReport:
    domain: str
    version: str
    champion: str | None
    gates: list[Gate] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # {"candidate": {...}, "champion": {...}}

    @property
    def passed(self) -> bool:
        return bool(self.gates) and all(g.passed for g in self.gates)

    def text(self) -> str:
        head = f"{registry.model_name(self.domain)} version {self.version} (champion now: {self.champion or 'none'})"
        return "\n".join([head, *(f"  [{'PASS' if g.passed else 'FAIL'}] {g.name}: {g.reason}" for g in self.gates)])


def _calibration_gate(model, domain: str) -> Gate:
    cal = model.calibration
    if not cal.levels or not cal.scores:
        return Gate("calibration", False, "no calibration in the artifact (levels or score thresholds missing)")
    cats = sorted(k for k in cal.scores if k.startswith(f"{domain}/"))
    if not cats:
        return Gate("calibration", False, f"no score thresholds for any {domain}/* category "
                                          f"(has {sorted(cal.scores)[:5]})")
    return Gate("calibration", True, f"levels {sorted(cal.levels)}, thresholds for {len(cats)} {domain} categories")


def _smoke_gate(model, domain: str) -> Gate:
    try:
        size = model.cfg.backbone.img_size
        img = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        cat = next((k for k in model.calibration.scores if k.startswith(f"{domain}/")), None)
        t0 = time.perf_counter()
        p = model.predict(img, None, [cat])
        ms = (time.perf_counter() - t0) * 1000
    except Exception as e:  # noqa: BLE001 - any failure of the model is the gate's verdict
        return Gate("smoke inference", False, f"{type(e).__name__}: {e}")
    finite = bool(torch.isfinite(p.score).all() and torch.isfinite(p.anomaly_map).all())
    if not finite:
        return Gate("smoke inference", False, "non-finite score or anomaly map")
    return Gate("smoke inference", True, f"score {float(p.score[0]):.4f} in {ms:.0f} ms")


def _domain_metrics(report: dict, domain: str) -> dict[str, float]:
    r = report.get("domains", {}).get(domain) or report.get("mean") or {}
    return {k: float(r[k]) for k in COMPARED if k in r}


def _defined(m: dict[str, float], k: str) -> bool:
    v = m.get(k)
    return v is not None and not math.isnan(v)


def _metrics_gate(cand: dict[str, float], champ: dict[str, float], tol: float, where: str) -> Gate:
    """Compare the metrics both sides have: on data with image-level labels only, pixel metrics are undefined on
    both, and image AUROC decides. A metric the champion has and the candidate lacks fails (same data, same code:
    that is a broken candidate); none in common fails too."""
    lost = [k for k in COMPARED if _defined(champ, k) and not _defined(cand, k)]
    common = [k for k in COMPARED if _defined(champ, k) and _defined(cand, k)]
    worse = [f"{k} {cand[k]:.4f} < {champ[k]:.4f}" for k in common if cand[k] < champ[k] - tol]
    worse += [f"{k} undefined for the candidate ({champ[k]:.4f} for the champion)" for k in lost]
    shown = ", ".join(f"{k} {cand[k]:.4f} vs {champ[k]:.4f}" for k in common)
    skipped = [k for k in COMPARED if k not in common and k not in lost]
    if skipped:
        shown += f" ({', '.join(skipped)} not compared: undefined on this data)"
    if worse:
        return Gate("not worse than champion", False, f"{where}: worse on {'; '.join(worse)} (tolerance {tol})")
    if not common:
        return Gate("not worse than champion", False, f"{where}: no metric defined for both ({COMPARED})")
    return Gate("not worse than champion", True, f"{where}: {shown}")


def check(domain: str, version: str, data: list[str] | None = None, tol: float = 0.0,
          work_dir: str | Path | None = None) -> GateReport:
    """Run the gates for `version` of anomalymoe-<domain>; nothing is changed."""
    import tempfile

    c = registry.client()
    name = registry.model_name(domain)
    champ_v = registry.version_of(domain, registry.CHAMPION)
    rep = GateReport(domain, str(version), str(champ_v.version) if champ_v else None)
    work = Path(work_dir or tempfile.mkdtemp(prefix="anomalymoe-promote-"))
    try:
        cand_v = c.get_model_version(name, str(version))
        model = load_artifact(registry.download(f"models:/{name}/{version}", work / f"v{version}"))
    except Exception as e:  # noqa: BLE001 - ArtifactError, RegistryError, MLflow errors: the gate verdict
        rep.gates.append(Gate("artifact", False, f"cannot load version {version}: {e}"))
        return rep
    rep.gates.append(Gate("artifact", True, f"loaded from run {cand_v.run_id}"))
    rep.gates.append(_calibration_gate(model, domain))
    rep.gates.append(_smoke_gate(model, domain))
    if champ_v is None:
        rep.gates.append(Gate("not worse than champion", True, "no champion yet"))
        return rep
    if str(champ_v.version) == str(version):
        rep.gates.append(Gate("not worse than champion", True, "this version is the champion"))
        return rep
    if data:
        from anomalymoe.platform.data.sources import resolve_data
        from anomalymoe.platform.evaluation.evaluate import evaluate

        df, kept = resolve_data(data, domains=[domain])
        test = df[df["split"] == "test"]
        if test.empty:
            rep.gates.append(Gate("not worse than champion", False, f"no {domain} test rows in {data}"))
            return rep
        champ = load_artifact(registry.download(f"models:/{name}/{champ_v.version}", work / "champion"))
        cand_m = _domain_metrics(evaluate(model, test, kept=kept, progress=False), domain)
        champ_m = _domain_metrics(evaluate(champ, test, kept=kept, progress=False), domain)
        where = f"both evaluated now on {len(test)} {domain} test images"
    else:
        m1, m2 = cand_v.tags.get("manifest_hash"), champ_v.tags.get("manifest_hash")
        if not m1 or m1 != m2:
            rep.gates.append(Gate("not worse than champion", False,
                                  f"registered metrics come from different evaluation sets (manifest {m1} vs {m2}): "
                                  "pass --data to evaluate both on the same data"))
            return rep
        champ_dir = registry.download(f"models:/{name}/{champ_v.version}", work / "champion")
        cand_m = _domain_metrics(read_metrics(work / f"v{version}") or {}, domain)
        champ_m = _domain_metrics(read_metrics(champ_dir) or {}, domain)
        where = f"metrics logged at registration (manifest {m1})"
    rep.metrics = {"candidate": cand_m, "champion": champ_m}
    rep.gates.append(_metrics_gate(cand_m, champ_m, tol, where))
    return rep


def promote(domain: str, version: str, data: list[str] | None = None, tol: float = 0.0) -> GateReport:
    """Move `champion` to `version` if every gate passes (the previous champion is kept as a tag).

    A compare-and-set on the champion: the gates compare against the champion read when they start; if another
    promotion moved it meanwhile, this one is refused ("rerun: compare against the new champion") instead of the
    later write winning whatever its metrics. MLflow has no conditional alias update, so the check is made right
    before the move and again after it: a promotion that lost a race in between says so (and its tag names the
    champion it actually replaced)."""
    rep = check(domain, version, data, tol)
    if not rep.passed:
        return rep
    c = registry.client()
    name = registry.model_name(domain)

    def champion() -> str | None:
        v = registry.version_of(domain, registry.CHAMPION)
        return str(v.version) if v else None

    now = champion()
    if now != rep.champion:
        rep.gates.append(Gate("champion unchanged", False, f"the champion moved from {rep.champion} to {now} while "
                                                           "the gates ran: rerun to compare against it"))
        return rep
    c.set_registered_model_alias(name, registry.CHAMPION, str(version))
    after = champion()
    if after != str(version):
        rep.gates.append(Gate("champion unchanged", False, f"another promotion set the champion to {after} at the "
                                                           "same moment: rerun to compare against it"))
        return rep
    rep.gates.append(Gate("champion unchanged", True, f"{rep.champion} -> {version}"))
    c.set_model_version_tag(name, str(version), "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    c.set_model_version_tag(name, str(version), "previous_champion", now or "")
    return rep


def resolve_version(domain: str, ref: str) -> str:
    """A version number as is, or an alias (e.g. challenger) resolved."""
    if ref.isdigit():
        return ref
    v = registry.version_of(domain, ref)
    if v is None:
        raise registry.RegistryError(f"{registry.model_name(domain)} has no alias {ref!r}")
    return str(v.version)


def summary(rep: GateReport) -> dict[str, Any]:
    return {"domain": rep.domain, "version": rep.version, "champion_before": rep.champion, "promoted": rep.passed,
            "gates": [g.__dict__ for g in rep.gates], "metrics": rep.metrics}
