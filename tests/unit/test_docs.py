"""Generated documentation stays current: the configuration reference is rendered from the typed configs."""

import pytest

from anomalymoe.deploy.config_reference import DOCUMENT, render_reference

pytestmark = pytest.mark.unit


def test_config_reference_is_current():
    text = render_reference()
    assert DOCUMENT.read_text() == text, "docs/config.md is stale: python -m anomalymoe.deploy.config_reference"
    for section in ("## Model · backbone", "## Training", "## Serving · domain", "## Cluster (KubeRay)"):
        assert section in text
    assert "| `max_batch_size` | `int` | `8` |" in text  # a field, its type and its default


def _imports() -> dict[str, set[str]]:
    """Module -> the anomalymoe modules it imports (anywhere in the file, lazy imports included)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    mods = {}
    for f in (root / "anomalymoe").rglob("*.py"):
        name = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("anomalymoe"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    graph[m].add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name.startswith("anomalymoe")}
    return {m: {d for d in ds if d in mods and d != m} for m, ds in graph.items()}


def test_packages_depend_one_way():
    """models <- platform <- serve <- deploy: models imports nothing of the platform, nothing in the platform imports
    serve, and no module imports another that imports it back (directly or round a circle)."""
    graph = _imports()
    for m, deps in graph.items():
        if m.startswith("anomalymoe.models"):
            assert all(d.startswith(("anomalymoe.models", "anomalymoe.strict")) for d in deps), (m, deps)
        if m.startswith("anomalymoe.platform"):
            assert not any(d.startswith(("anomalymoe.serve", "anomalymoe.deploy")) for d in deps), (m, deps)
        if m.startswith("anomalymoe.serve"):
            assert not any(d.startswith("anomalymoe.deploy") for d in deps), (m, deps)
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def walk(m: str, path: list[str]) -> None:
        seen[m] = 1
        for d in graph[m]:
            assert seen.get(d) != 1, f"import circle: {' -> '.join([*path, m, d])}"
            if d not in seen:
                walk(d, [*path, m])
        seen[m] = 2

    for m in graph:
        if m not in seen:
            walk(m, [])
