"""Per-tenant token buckets. The service keeps them in one place (the ops app's ServeState replica), so a
tenant's rate holds across every ingress replica and domain. Should that replica be unreachable, each ingress
replica falls back to its own buckets (a tenant may then get up to rate × ingress replicas) and says so in the
`X-RateLimit-Scope: replica` header and in the log."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # capacity
    tokens: float = field(default=-1.0)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def take(self, now: float | None = None, n: float = 1.0) -> float:
        """0.0 when `n` tokens were taken, else the seconds until they will be there (nothing taken)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class Buckets:
    """One bucket per key (a tenant's requests, or its pixels); a changed rate or burst replaces the bucket.
    Thread-safe: Ray Serve runs a replica's sync methods in a thread pool, and an unlocked read-modify-write let a
    burst of 100 requests admit up to 173."""

    def __init__(self):
        self._b: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str, rate: float, burst: float, now: float | None = None, n: float = 1.0) -> float:
        with self._lock:
            now = time.monotonic() if now is None else now
            b = self._b.get(tenant)
            if b is None or b.rate != rate or b.burst != burst:
                b = self._b[tenant] = TokenBucket(rate, burst, stamp=now)
            return b.take(now, n)


def retry_after(wait_s: float) -> str:
    """The Retry-After header: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
