"""Prometheus metrics of the scoring service, aggregated over every replica.

Each replica records into its own `Metrics` and periodically sends the *delta* (`drain`) to the ops app's
ServeState replica, which `merge`s them and renders the text exposition format at ``GET /metrics``. A replica
that dies loses at most its last second of counts."""

from __future__ import annotations

import math
import threading
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

HELP = {
    "anomalymoe_requests_total": ("counter", "Scoring requests by domain, tenant and HTTP status code."),
    "anomalymoe_errors_total": ("counter", "Failed scoring requests by domain, tenant and error code."),
    "anomalymoe_request_duration_seconds": ("histogram", "End-to-end scoring latency inside the service."),
    "anomalymoe_batch_size": ("histogram", "Images per model forward pass."),
    "anomalymoe_model_info": ("gauge", "1 for the model version each domain (and tenant variant) serves."),
    "anomalymoe_rate_limited_total": ("counter", "Requests refused with 429, by tenant."),
}
BUCKETS = {"anomalymoe_request_duration_seconds": LATENCY_BUCKETS, "anomalymoe_batch_size": BATCH_BUCKETS}

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, Any]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


class Metrics:
    """Counters, gauges and fixed-bucket histograms keyed by (name, labels). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, Labels], float] = {}
        self.gauges: dict[tuple[str, Labels], float] = {}
        self.hists: dict[tuple[str, Labels], list[float]] = {}  # bucket counts..., +Inf count, sum

    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        key = (name, _labels(labels))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: Any) -> None:
        with self._lock:
            self.gauges[(name, _labels(labels))] = value

    def clear_gauge(self, name: str, **match: Any) -> None:
        """Drop gauge series whose labels include `match` (e.g. an old model version)."""
        m = set(_labels(match))
        with self._lock:
            for k in [k for k in self.gauges if k[0] == name and m <= set(k[1])]:
                del self.gauges[k]

    def observe(self, name: str, value: float, **labels: Any) -> None:
        bounds = BUCKETS[name]
        key = (name, _labels(labels))
        with self._lock:
            h = self.hists.setdefault(key, [0.0] * (len(bounds) + 2))
            i = next((j for j, b in enumerate(bounds) if value <= b), len(bounds))
            h[i] += 1
            h[-1] += value

    def drain(self) -> dict[str, Any]:
        """The counts since the last drain (and the current gauges), resetting counters and histograms."""
        with self._lock:
            delta = {"counters": list(self.counters.items()), "hists": list(self.hists.items()),
                     "gauges": list(self.gauges.items())}
            self.counters, self.hists = {}, {}
        return delta

    def merge(self, delta: dict[str, Any], source: str = "") -> None:
        """Add another replica's drained delta. Gauges are kept per `source` replica until it reports anew."""
        with self._lock:
            for key, v in delta.get("counters", []):
                key = (key[0], tuple(map(tuple, key[1])))
                self.counters[key] = self.counters.get(key, 0.0) + v
            for key, h in delta.get("hists", []):
                key = (key[0], tuple(map(tuple, key[1])))
                mine = self.hists.setdefault(key, [0.0] * len(h))
                for i, v in enumerate(h):
                    mine[i] += v
            if "gauges" in delta:
                for k in [k for k in self.gauges if ("source", source) in k[1]]:
                    del self.gauges[k]
                for key, v in delta["gauges"]:
                    labels = tuple(sorted((*map(tuple, key[1]), ("source", source)))) if source else \
                        tuple(map(tuple, key[1]))
                    self.gauges[(key[0], labels)] = v

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            series: dict[str, list[str]] = {}
            for (name, labels), v in sorted(self.counters.items()):
                series.setdefault(name, []).append(f"{name}{_fmt(labels)} {_num(v)}")
            for (name, labels), v in sorted(self.gauges.items()):
                series.setdefault(name, []).append(f"{name}{_fmt(labels)} {_num(v)}")
            for (name, labels), h in sorted(self.hists.items()):
                bounds, cum, out = BUCKETS[name], 0.0, series.setdefault(name, [])
                for b, c in zip(bounds, h, strict=False):
                    cum += c
                    out.append(f"{name}_bucket{_fmt((*labels, ('le', _num(b))))} {_num(cum)}")
                cum += h[len(bounds)]
                out.append(f"{name}_bucket{_fmt((*labels, ('le', '+Inf')))} {_num(cum)}")
                out.append(f"{name}_sum{_fmt(labels)} {_num(h[-1])}")
                out.append(f"{name}_count{_fmt(labels)} {_num(cum)}")
        lines = []
        for name in sorted(series):
            kind, text = HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *series[name]]
        return "\n".join(lines) + "\n"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels) + "}" if labels else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if float(v).is_integer() else repr(float(v))
