"""The base of every typed config (model, training, serving, catalog, cluster): unknown keys are errors, so a typo in
a YAML file never passes silently."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
