"""Subscribe to a Prefect server's live event stream (``/api/events/out``).

Protocol (prefect/server/api/events.py, prefect/events/clients.py):

1. open the socket and authenticate (`prefect_client.events_socket`);
2. send ``{"type": "filter", "filter": <EventFilter JSON>, "backfill": bool}``
   (the server closes with 1002 on an invalid filter);
3. receive ``{"type": "event", "event": {...}}`` frames until closed.

The stream is lossy: the server keeps at most 256 undelivered events per
subscriber and silently drops the rest.  Use it for liveness, and the REST API
(prefect_rest) for completeness.

``ReconnectingEventStream`` adds what a long-running consumer needs, like
Prefect's own PrefectEventSubscriber: it reconnects after any drop (exponential
backoff with jitter, optionally bounded), resumes with ``backfill`` and an
``occurred.since`` a little before the newest event seen, and drops ids it
already yielded.  Refusals that a retry cannot fix (bad credentials, a rejected
filter, a URL that is not a Prefect API) raise `PrefectRefused` at once instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Callable, Optional, Union

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from otel_bridge.backoff import Backoff
from otel_bridge.prefect_client import (
    PrefectApi,
    PrefectRefused,
    PrefectUnavailable,
    resolve_api,
)
from otel_bridge.prefect_client.events_socket import (
    RETRYABLE,
    is_refusal,
    open_events_socket,
    typed_frame,
)
from otel_bridge.sources import Source

logger = logging.getLogger(__name__)

__all__ = [
    "PrefectEventStream",
    "ReconnectingEventStream",
    "parse_occurred",
    "live_filter",
    "subscribe",
]


def parse_occurred(value: str) -> datetime:
    """An event timestamp as an aware UTC datetime (Python 3.10 rejects "Z")."""
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    ts = datetime.fromisoformat(value)
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def live_filter(
    event_filter: Optional[dict[str, Any]] = None,
    *,
    backfill_minutes: float = 1.0,
) -> dict[str, Any]:
    """Make an EventFilter usable for a live subscription.

    The server applies ``occurred`` to live events too, and Prefect's default
    ``until`` is "now" (when the server parses the filter), which would let no
    future event through.  Like Prefect's client, we give an explicit window:
    from a little in the past (the backfill horizon) to a year from now.
    """
    flt = dict(event_filter or {})
    if "occurred" not in flt:
        now = datetime.now(timezone.utc)
        flt["occurred"] = {
            "since": (now - timedelta(minutes=backfill_minutes)).isoformat(),
            "until": (now + timedelta(days=365)).isoformat(),
        }
    return flt


class PrefectEventStream(Source):
    """``async with PrefectEventStream(api_url, filter) as s: async for frame in s.frames(): ...``

    ``frames()`` yields each event frame's raw text, exactly as received;
    ``events()`` yields the parsed ``event`` objects.  The subscription is
    active once ``__aenter__`` returns, so events emitted after that are seen
    (subject to the server's backlog limit).
    """

    def __init__(
        self,
        api_url: Optional[str] = None,
        event_filter: Optional[dict[str, Any]] = None,
        *,
        backfill: bool = False,
        api_key: Optional[str] = None,
        open_timeout: float = 10.0,
        api: Optional[PrefectApi] = None,
    ) -> None:
        # `api`: where and how, as `resolve_api` gives it (the URL, key and
        # the rest of Prefect's settings from the environment otherwise)
        self.api = api if api is not None else resolve_api(api_url, api_key)
        self.url = self.api.events_url("out")
        self.event_filter = live_filter(event_filter)
        self.backfill = backfill
        self.open_timeout = open_timeout
        self._ws: Optional[ClientConnection] = None

    async def __aenter__(self) -> "PrefectEventStream":
        await self._open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    async def _open(self) -> None:
        # Event frames can be large (a state message alone may be 100 kB, an
        # event up to 1.5 MB); the default 1 MiB limit would kill the
        # connection on a legitimate event.
        ws = await open_events_socket(self.api, "out", open_timeout=self.open_timeout,
                                      max_size=16 * 1024 * 1024)
        try:
            await ws.send(json.dumps(
                {"type": "filter", "filter": self.event_filter, "backfill": self.backfill}))
        except BaseException:
            await ws.close()
            raise
        self._ws = ws

    async def _event_frames(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        if self._ws is None:
            raise RuntimeError("not connected; use `async with`")
        ws = self._ws
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosedOK:
                return
            # ConnectionClosedError (abnormal close, or 1002 for a filter the
            # server rejected) propagates: the caller must know it lost events.
            found = typed_frame(self.url, message, "event")
            if found is not None:
                yield found

    async def frames(self) -> AsyncIterator[str]:
        """Raw text of each ``{"type": "event", ...}`` frame; ends on a clean close."""
        async for text, _ in self._event_frames():
            yield text

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The ``event`` object of each frame, parsed."""
        async for _, frame in self._event_frames():
            yield frame["event"]


async def subscribe(
    api_url: str,
    event_filter: Optional[dict[str, Any]] = None,
    *,
    backfill: bool = False,
    api_key: Optional[str] = None,
    raw: bool = False,
) -> AsyncIterator[Union[str, dict[str, Any]]]:
    """Yield live events: parsed event dicts, or raw frame text if ``raw``."""
    async with PrefectEventStream(
        api_url, event_filter, backfill=backfill, api_key=api_key
    ) as stream:
        source = stream.frames() if raw else stream.events()
        async for item in source:
            yield item


class ReconnectingEventStream(Source):
    """Live events that survive disconnects: ``async for event in s.events()``.

    * Reconnects after any drop, including a clean close by the server (a
      restarting server says 1001 "going away"); only ``close()`` ends it.
    * Waits ``backoff`` between failed attempts; gives up with
      PrefectUnavailable after ``backoff.max_attempts`` consecutive failures.
      Refusals (bad key, bad filter, HTTP 4xx) raise PrefectRefused at once.
    * Resumes with ``backfill`` from ``resume_margin`` before the newest
      ``occurred`` seen (never before ``resume_floor()``, if given), and skips
      ids it already yielded.  The backfill only has what the server has
      persisted, so events still in flight during the gap can be missed: the
      stream narrows the gap, the REST reconciliation closes it.
    """

    def __init__(
        self,
        api_url: Optional[str] = None,
        event_filter: Optional[dict[str, Any]] = None,
        *,
        api_key: Optional[str] = None,
        since: Optional[datetime] = None,
        backoff: Backoff = Backoff(),
        resume_margin: timedelta = timedelta(seconds=60),
        resume_floor: Optional[Callable[[], Optional[datetime]]] = None,
        open_timeout: float = 10.0,
        api: Optional[PrefectApi] = None,
    ) -> None:
        self.api = api if api is not None else resolve_api(api_url, api_key)
        self.url = self.api.events_url("out")
        self.event_filter = {k: v for k, v in (event_filter or {}).items() if k != "occurred"}
        self.since = since or datetime.now(timezone.utc)
        self.backoff = backoff
        self.resume_margin = resume_margin
        self.resume_floor = resume_floor
        self.open_timeout = open_timeout
        self.newest_occurred: Optional[datetime] = None
        # Counters, for metrics.
        self.connections = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.duplicates_dropped = 0
        self.connected = False
        self._seen: dict[str, datetime] = {}
        self._prune_at = 1024
        self._stream: Optional[PrefectEventStream] = None
        self._closed = False

    def _resume_since(self) -> datetime:
        since = self.since
        if self.newest_occurred is not None:
            since = max(since, self.newest_occurred - self.resume_margin)
        floor = self.resume_floor() if self.resume_floor else None
        return max(since, floor) if floor is not None else since

    async def _connect(self) -> PrefectEventStream:
        flt = dict(self.event_filter)
        flt["occurred"] = {
            "since": self._resume_since().isoformat(),
            # Live events must pass the server's `until` too (see live_filter).
            "until": (datetime.now(timezone.utc) + timedelta(days=365)).isoformat(),
        }
        stream = PrefectEventStream(
            self.api.url,
            flt,
            # The first connection starts now; later ones replay the gap.
            backfill=self.connections > 0,
            open_timeout=self.open_timeout,
            api=self.api,
        )
        await asyncio.wait_for(stream._open(), self.open_timeout * 2)
        return stream

    def _remember(self, event_id: str, occurred: datetime) -> bool:
        """False if already yielded; bounded to ids a resume could replay."""
        if event_id in self._seen:
            return False
        self._seen[event_id] = occurred
        if len(self._seen) >= self._prune_at and self.newest_occurred is not None:
            # A resume never asks for events older than newest - margin.
            horizon = self.newest_occurred - self.resume_margin
            self._seen = {k: v for k, v in self._seen.items() if v >= horizon}
            self._prune_at = max(1024, 2 * len(self._seen))
        return True

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closed:
            try:
                self._stream = await self._connect()
            except RETRYABLE as exc:  # (what will not change raises PrefectError)
                failures += 1
                self.connect_failures += 1
                await self._wait_before_retry(failures, exc)
                continue
            if self.connections > 0:
                self.reconnects += 1
            self.connections += 1
            self.connected = True
            delivered = False
            opened = loop.time()
            try:
                async for _, frame in self._stream._event_frames():
                    delivered = True
                    event = frame["event"]
                    occurred = parse_occurred(event["occurred"])
                    if self.newest_occurred is None or occurred > self.newest_occurred:
                        self.newest_occurred = occurred
                    if not self._remember(event["id"], occurred):
                        self.duplicates_dropped += 1
                        continue
                    yield event
                exc: BaseException = EOFError("the server closed the event stream")
            except ConnectionClosed as closed:
                exc = closed
            finally:
                self.connected = False
                stream, self._stream = self._stream, None
                if stream is not None:
                    await stream.close()
            if self._closed:
                return
            if isinstance(exc, ConnectionClosed) and is_refusal(exc):
                raise PrefectRefused(f"{self.url} refused the subscription: "
                                     f"{exc.rcvd.reason if exc.rcvd else exc}") from exc
            # A connection that worked resets the count; one that died at once
            # keeps backing off (a server that accepts and drops would
            # otherwise be hammered).
            worked = delivered or loop.time() - opened > self.backoff.maximum
            failures = 1 if worked else failures + 1
            await self._wait_before_retry(failures, exc)

    async def _wait_before_retry(self, failures: int, exc: BaseException) -> None:
        if self.backoff.exhausted(failures):
            raise PrefectUnavailable.after(f"on {self.url}", failures, exc) from exc
        delay = self.backoff.delay(failures)
        logger.warning(
            "event stream %s: %s: %s; reconnecting in %.1fs (attempt %d)",
            self.url, type(exc).__name__, exc, delay, failures + 1,
        )
        await asyncio.sleep(delay)

    async def drop_connection(self) -> None:
        """Close the current connection as if the network cut it (for tests and
        for a consumer that wants a fresh connection); the stream reconnects."""
        stream = self._stream
        if stream is not None and stream._ws is not None:
            stream._ws.transport.abort()

    async def close(self) -> None:
        """End ``events()``: the generator returns after its current step."""
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
