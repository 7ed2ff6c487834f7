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
