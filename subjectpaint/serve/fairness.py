"""Per-tenant placement rate limit: a token bucket per tenant, so one tenant's burst is answered 429 (with
Retry-After) and never delays or refuses another tenant. (Registration jobs: `ServeConfig.check_job_quota`.)"""

from __future__ import annotations

import threading
import time

from ..errors import QuotaExceeded


class TenantRateLimit:
    """`rate` requests per second per tenant, sustained, and bursts of up to `burst` at once."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, tenant: str) -> None:
        """Spend one token of `tenant`'s bucket, or raise `QuotaExceeded` saying when the next one is there."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(tenant, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise QuotaExceeded(f"tenant {tenant!r} is over its placement rate ({self.rate:g}/s, bursts of "
                                    f"{self.burst}); retry in {wait:.2f} s", retry_after=wait)
            self._buckets[tenant] = (tokens - 1.0, now)
