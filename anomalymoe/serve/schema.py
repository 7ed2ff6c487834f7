"""The scoring API's response models: what `POST /v1/<domain>/score` answers and what its errors look like. The
ingress builds every answer through `ScoreResponse` (unknown fields are errors), and the OpenAPI document
(docs/openapi.json) is generated from the same classes, so the two cannot drift apart."""

from __future__ import annotations

from anomalymoe.strict import Strict


class ErrorDetail(Strict):
    code: str
    message: str
    request_id: str


class ErrorResponse(Strict):
    error: ErrorDetail


class ModelInfo(Strict):
    name: str
    version: str
    uri: str
    variant: str | None = None


class PartInfo(Strict):
    """The part slot that drove the component level (inference.part_explanation)."""

    slot: int
    cluster: int
    score: float | None = None
    appearance_score: float | None = None
    layout_score: float | None = None
    driven_by: str
    missing: bool
    area: float


class LevelInfo(Strict):
    used: bool
    routing_mass: float
    score: float | None = None
    part: PartInfo | None = None  # component level only


class CategoryInference(Strict):
    """How a request without ?category= was assigned one: the nearest prototype among the domain's categories."""

    inferred: bool
    confidence: float
    similarity: float
    margin: float | None = None
    in_distribution: bool


class ExpertWeight(Strict):
    expert: str
    weight: float


class AnomalyMap(Strict):
    png_base64: str  # the overlay in the request image's own geometry (aspect ratio; size up to 1024 px)
    width: int  # of the PNG
    height: int
    size: int  # side of the model's square map it was drawn from
    peak: float


class ScoreResponse(Strict):
    request_id: str
    model: ModelInfo
    category: str | None = None
    category_inference: CategoryInference | None = None
    score: float
    normalized_score: float | None = None
    is_anomaly: bool
    threshold: float | None = None
    levels: dict[str, LevelInfo]
    experts: list[ExpertWeight]
    timings_ms: dict[str, float | int]  # queue, decode, model, ingress, total (ms); batch_size
    anomaly_map: AnomalyMap | None = None
