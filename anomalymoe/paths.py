"""Where the repository is, for the defaults that live in it (outputs/, configs/, the local stack's state): the one
place that knows how deep this file sits."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = REPO_ROOT / "outputs"
