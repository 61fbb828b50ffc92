"""How long to wait after failed attempts: one policy for everything that
retries (the Prefect subscription, the Prefect event sink, the service's
deliveries), each with its own numbers. Below every layer: it knows nothing
of what is retried."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: exponential, capped, jittered.

    The cap bounds how late we notice a peer that came back; the jitter
    keeps many sidecars from reconnecting in lockstep after a server restart.
    The first ``immediate`` failures are retried at once (a load balancer
    that drops idle sockets is not an outage). ``max_attempts`` None retries
    for ever (a sidecar outlives server restarts); a number gives up after
    that many failed attempts in a row (`exhausted`). Callers count the
    failures and start again from zero after a success.
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5  # the randomised fraction of each delay
    immediate: int = 0
    max_attempts: Optional[int] = None

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` failed attempts in a row (>= 1)."""
        if failures <= self.immediate:
            return 0.0
        exponent = min(max(failures - 1 - self.immediate, 0), 64)  # no float overflow
        base = min(self.maximum, self.initial * self.multiplier**exponent)
        return base * (1 - self.jitter) + random.uniform(0, base * self.jitter)

    def exhausted(self, failures: int) -> bool:
        """Whether `failures` failed attempts in a row are all there may be."""
        return self.max_attempts is not None and failures >= self.max_attempts
