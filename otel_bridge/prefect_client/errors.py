"""What can go wrong talking to a Prefect server: one family of errors for
every direction (the subscription, the REST reads, the event sink).

    PrefectError             Prefect cannot be used as asked
      PrefectConfigError     settings that can never work (also a ValueError)

Network trouble (refused connections, timeouts, dropped sockets, a server
answering 5xx) is not in it: that is worth another attempt, and callers
retry it.
"""

from __future__ import annotations

__all__ = ["PrefectConfigError", "PrefectError"]


class PrefectError(RuntimeError):
    """Prefect cannot be used as asked; retrying will not help."""


class PrefectConfigError(PrefectError, ValueError):
    """The Prefect settings cannot work (no URL, not http(s), bad headers)."""
