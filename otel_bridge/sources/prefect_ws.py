"""Subscribe to a Prefect server's live event stream (``/api/events/out``).

Protocol (prefect/server/api/events.py, prefect/events/clients.py):

1. connect with websocket subprotocol ``prefect`` (without it the server
   falls back to a legacy mode with no auth handshake; with an auth string
   configured it refuses the connection);
2. send ``{"type": "auth", "token": <key or null>}``, receive
   ``{"type": "auth_success"}`` (the server closes with 1008 otherwise);
3. send ``{"type": "filter", "filter": <EventFilter JSON>, "backfill": bool}``
   (the server closes with 1002 on an invalid filter);
4. receive ``{"type": "event", "event": {...}}`` frames until closed.

The stream is lossy: the server keeps at most 256 undelivered events per
subscriber and silently drops the rest.  Use it for liveness, and the REST API
(prefect_rest) for completeness.

Reconnecting is not done here yet.  It would wrap ``_open`` in a retry loop
inside ``frames()``, re-sending the filter with ``backfill`` and a ``since``
of the last event seen, and dropping ids already yielded (as Prefect's own
PrefectEventSubscriber does).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Optional, Union

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.typing import Subprotocol

__all__ = [
    "PrefectEventStream",
    "PrefectStreamError",
    "events_out_url",
    "live_filter",
    "subscribe",
]


class PrefectStreamError(RuntimeError):
    """The server refused the subscription (auth or filter) or broke protocol."""


def events_out_url(api_url: str) -> str:
    """http(s)://host/api -> ws(s)://host/api/events/out, as Prefect does it."""
    ws = api_url.replace("https://", "wss://").replace("http://", "ws://").rstrip("/")
    return ws + "/events/out"


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


class PrefectEventStream:
    """``async with PrefectEventStream(api_url, filter) as s: async for frame in s.frames(): ...``

    ``frames()`` yields each event frame's raw text, exactly as received;
    ``events()`` yields the parsed ``event`` objects.  The subscription is
    active once ``__aenter__`` returns, so events emitted after that are seen
    (subject to the server's backlog limit).
    """

    def __init__(
        self,
        api_url: str,
        event_filter: Optional[dict[str, Any]] = None,
        *,
        backfill: bool = False,
        api_key: Optional[str] = None,
        open_timeout: float = 10.0,
    ) -> None:
        self.url = events_out_url(api_url)
        self.event_filter = live_filter(event_filter)
        self.backfill = backfill
        self.api_key = api_key
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
        ws = await connect(
            self.url,
            subprotocols=[Subprotocol("prefect")],
            open_timeout=self.open_timeout,
            # Event frames can be large (a state message alone may be 100 kB,
            # an event up to 1.5 MB); the default 1 MiB limit would kill the
            # connection on a legitimate event.
            max_size=16 * 1024 * 1024,
        )
        try:
            await self._handshake(ws)
        except BaseException:
            await ws.close()
            raise
        self._ws = ws

    async def _handshake(self, ws: ClientConnection) -> None:
        if ws.subprotocol == "prefect":
            await ws.send(json.dumps({"type": "auth", "token": self.api_key}))
            try:
                reply = json.loads(await ws.recv())
            except ConnectionClosed as exc:
                reason = exc.rcvd.reason if exc.rcvd else ""
                raise PrefectStreamError(
                    f"event stream refused authentication: {reason or exc}"
                ) from exc
            if reply.get("type") != "auth_success":
                raise PrefectStreamError(
                    f"event stream refused authentication: {reply.get('reason', reply)}"
                )
        # else: a server that did not accept the subprotocol is in legacy mode,
        # where the first frame must already be the filter.
        await ws.send(
            json.dumps(
                {"type": "filter", "filter": self.event_filter, "backfill": self.backfill}
            )
        )

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
            text = message.decode() if isinstance(message, bytes) else message
            try:
                frame = json.loads(text)
            except ValueError as exc:
                raise PrefectStreamError(f"non-JSON frame: {text[:200]!r}") from exc
            # Prefect 3.9.1 sends only event frames after the handshake; skip
            # anything else a later server might add.
            if isinstance(frame, dict) and frame.get("type") == "event":
                yield text, frame

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
