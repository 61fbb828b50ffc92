"""What can go wrong talking to a Prefect server: one family of errors for
every direction (the subscription, the REST reads, the event sink).

    PrefectError             Prefect cannot be used as asked
      PrefectConfigError     settings that can never work (also a ValueError)
      PrefectRefused         the server's answer, which a retry will not change
        PrefectAuthFailed    ... to our credentials
      PrefectUnavailable     the server stayed out of reach: retries ran out

Network trouble (refused connections, timeouts, dropped sockets, a server
answering 5xx) is not in it: that is worth another attempt, and callers
retry it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

__all__ = [
    "PrefectAuthFailed",
    "PrefectConfigError",
    "PrefectError",
    "PrefectRefused",
    "PrefectUnavailable",
    "describe_error",
    "refusal_for_status",
]


class PrefectError(RuntimeError):
    """Prefect cannot be used as asked; retrying will not help.

    When sending events, `unconfirmed_events` are those the server did not
    confirm: they may or may not have reached it, and sending them again is
    harmless (the server stores each event id once)."""

    def __init__(self, message: str, unconfirmed_events: Sequence[Any] = ()):
        super().__init__(message)
        self.unconfirmed_events = list(unconfirmed_events)

    @property
    def unconfirmed(self) -> int:
        return len(self.unconfirmed_events)


class PrefectConfigError(PrefectError, ValueError):
    """The Prefect settings cannot work (no URL, not http(s), bad headers)."""


class PrefectRefused(PrefectError):
    """The server refused (not a Prefect API, a filter it rejects, an event
    too big for it): the same request will get the same answer."""


class PrefectAuthFailed(PrefectRefused):
    """The server refused our credentials."""


class PrefectUnavailable(PrefectError):
    """Every attempt failed: the server was unreachable or kept dropping us."""

    @classmethod
    def after(cls, what: str, failures: int, last_error: BaseException,
              unconfirmed_events: Sequence[Any] = ()) -> "PrefectUnavailable":
        return cls(f"gave up {what} after {failures} failed attempts; last error: "
                   f"{describe_error(last_error)}", unconfirmed_events)


def refusal_for_status(status: int, url: str, detail: str = "") -> Optional[PrefectRefused]:
    """What an HTTP answer (to a REST call or a websocket upgrade) says for
    good, or None for a server in trouble (5xx, 408, 429): worth a retry."""
    if status >= 500 or status in (408, 429):
        return None
    detail = f": {detail}" if detail else ""
    if status in (401, 403):
        return PrefectAuthFailed(f"{url} refused our credentials (HTTP {status}){detail} "
                                 "(check PREFECT_API_KEY / PREFECT_API_AUTH_STRING)")
    return PrefectRefused(f"{url} answered HTTP {status}{detail}; is PREFECT_API_URL the API "
                          "root, http(s)://host[:port]/api?")


def describe_error(exc: BaseException) -> str:
    """An error in a few words: its type, and its message when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
