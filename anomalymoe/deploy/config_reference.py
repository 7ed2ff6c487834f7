"""docs/config.md, generated from the typed configs themselves (field, type, default, description), so the
reference cannot drift from the code; a unit test fails when the checked-in file is stale. Regenerate with::

    python -m anomalymoe.deploy.config_reference
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from pydantic import BaseModel

from anomalymoe.paths import REPO_ROOT

DOCUMENT = REPO_ROOT / "docs" / "config.md"


def _sections() -> list[tuple[str, str, type]]:
    from anomalymoe.deploy import kuberay
    from anomalymoe.models import config as mc
    from anomalymoe.platform.train.job import JobSpec
    from anomalymoe.platform.train.trainer import TrainConfig
    from anomalymoe.serve import config as sc

    return [
        ("Model", "`model:` section of a train/tune `--config` YAML; presets in anomalymoe/models/config.py",
         mc.ModelConfig),
        ("Model · backbone", "", mc.BackboneConfig), ("Model · patch experts", "", mc.PatchExpertConfig),
        ("Model · global experts", "", mc.GlobalExpertConfig), ("Model · component experts", "",
                                                                mc.ComponentExpertConfig),
        ("Model · router", "", mc.RouterConfig), ("Model · losses", "", mc.LossConfig),
        ("Model · scoring", "", mc.ScoringConfig),
        ("Model · input", "how stored images become model input, the same in training, evaluation and serving",
         mc.InputConfig),
        ("Model · input per category", "one entry of `input.categories:` (key 'domain/category')", mc.CategoryInput),
        ("Training", "`train:` section (jobs/train.py, jobs/tune.py)", TrainConfig),
        ("Training job", "`job:` section, or the flags of jobs/train.py", JobSpec),
        ("Serving", "ServeConfig YAML (jobs/serve.py --config, infra/serve/*.yaml)", sc.ServeConfig),
        ("Serving · domain", "one entry of `domains:`", sc.DomainConfig),
        ("Serving · autoscaling", "", sc.Autoscaling), ("Serving · limits", "", sc.Limits),
        ("Serving · rate", "`default_rate:` and a tenant's `--rate/--burst`", sc.RateLimit),
        ("Cluster (KubeRay)", "infra/k8s/cluster.yaml", kuberay.ClusterConfig),
        ("Cluster · pods", "", kuberay.Pods), ("Cluster · worker group", "", kuberay.WorkerGroup),
        ("Cluster · GPU toleration", "one entry of `gpu_tolerations:`", kuberay.Toleration),
    ]


def _type(t) -> str:
    s = t if isinstance(t, str) else getattr(t, "__name__", None) if typing.get_origin(t) is None else str(t)
    s = str(s or t).replace("typing.", "")
    for mod in ("anomalymoe.models.config.", "anomalymoe.serve.config.", "anomalymoe.deploy.kuberay.",
                "anomalymoe.platform.train.trainer."):
        s = s.replace(mod, "")
    return s


def _default(v) -> str:
    if callable(v) and not isinstance(v, type(BaseModel)):
        v = v()
    if isinstance(v, BaseModel) or isinstance(v, type) and issubclass(v, BaseModel):
        return "(its own section)"
    text = repr(v).replace(str(REPO_ROOT), "<repo>")  # the same document from every checkout
    return text if len(text) <= 60 else text[:57] + "…"


def _rows(cls: type) -> list[tuple[str, str, str, str]]:
    if issubclass(cls, BaseModel):
        out = []
        for name, f in cls.model_fields.items():
            default = f.default_factory if f.default_factory is not None else f.default
            if isinstance(default, type(...)) or repr(default) == "PydanticUndefined":
                default_s = "required"
            else:
                default_s = _default(default)
            out.append((f.alias or name, _type(f.annotation), default_s, (f.description or "").replace("|", "\\|")))
        return out
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default_s = _default(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default_s = _default(f.default_factory)
        else:
            default_s = "required"
        out.append((f.name, _type(hints.get(f.name, f.type)), default_s, ""))
    return out


def render_reference() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the typed configs by `python -m anomalymoe.deploy.config_reference`; do not edit.",
             "Unknown keys are errors everywhere (a typo never passes silently).", ""]
    for title, where, cls in _sections():
        lines += [f"## {title}", ""]
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(doc.split())
        if where:
            lines += [f"*{where}*", ""]
        if doc and not doc.startswith(cls.__name__ + "("):
            lines += [doc, ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        esc = lambda x: x.replace("|", "\\|")  # noqa: E731 - a pipe inside a table cell
        lines += [f"| `{n}` | `{esc(t)}` | `{esc(d)}` | {m} |" for n, t, d, m in _rows(cls)]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    DOCUMENT.parent.mkdir(parents=True, exist_ok=True)
    DOCUMENT.write_text(render_reference())
    print(f"wrote {DOCUMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
