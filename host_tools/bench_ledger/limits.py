"""Rate limits of the bench ledger: token buckets per device id and per client address.

Why two keys: the client address is limited *before* any parsing or cryptography, so a flood of
forgeries from one address costs a dictionary look-up each and then a clear 429; the device id
is limited only for messages whose signature verified, so a forger cannot spend a victim
device's budget by sending garbage in its name. Buckets refill continuously; the dictionary is
bounded (the idlest keys are dropped first), so a spray of addresses cannot grow memory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class RateLimit:
    """``per_second`` sustained, ``burst`` at once. ``per_second == 0`` disables the limit."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_second < 0 or self.burst < 1:
            raise ValueError(f"rate limit: expected per_second >= 0 and burst >= 1, got {self.per_second}/{self.burst}")

    @property
    def enabled(self) -> bool:
        return self.per_second > 0


class RateLimiter:
    """Thread-safe token buckets keyed by a string. ``take(key)`` returns 0 when allowed, else the
    seconds until one token is back (for the Retry-After header)."""

    def __init__(self, limit: RateLimit, *, max_keys: int = 100_000, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._max_keys = max_keys
        self._now = monotonic
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        if not self.limit.enabled:
            return 0.0
        rate, burst = self.limit.per_second, float(self.limit.burst)
        now = self._now()
        with self._lock:
            tokens, last = self._buckets.pop(key, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)  # re-inserted last: dict order = least recently used first
                allowed = True
            else:
                self._buckets[key] = (tokens, now)
                allowed = False
            if len(self._buckets) > self._max_keys:
                for old in list(self._buckets)[: len(self._buckets) - self._max_keys]:
                    del self._buckets[old]
        return 0.0 if allowed else (1.0 - tokens) / rate
