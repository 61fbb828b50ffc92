"""Deliver events to a Prefect server the way Prefect's own client does.

Protocol and reliability follow `prefect.events.clients.PrefectEventsClient`
(Prefect 3.9), without importing Prefect:

* ``ws(s)://<PREFECT_API_URL>/events/in``, opened and authenticated as
  `otel_bridge.prefect_client.events_socket` does.  One JSON event per text
  frame; the server never answers an event.
* Confirmation is a checkpoint: a websocket ping sent after a run of events.
  The pong comes back on the same ordered stream after every earlier frame,
  so it proves the server read them.  Events written since the last pong are
  "unconfirmed" and are written again, in order, after a reconnect.  That
  makes delivery at-least-once; the server stores each event id once.
* What a pong does NOT prove: that the server has persisted the event (it
  goes through an in-memory queue first).  Prefect's client has the same
  limit.

Configuration: Prefect's own settings, as `otel_bridge.prefect_client` reads them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Optional, Sequence

from websockets.asyncio.client import ClientConnection

from otel_bridge.backoff import Backoff
from otel_bridge.model.events import MAX_EVENT_SIZE_BYTES, Event
from otel_bridge.prefect_client import (
    PrefectConfigError,
    PrefectError,
    PrefectRefused,
    PrefectUnavailable,
    resolve_api,
)
from otel_bridge.prefect_client.errors import describe_error
from otel_bridge.prefect_client.events_socket import RETRYABLE, open_events_socket
from otel_bridge.sinks import Sink

__all__ = ["PrefectEventSink"]

log = logging.getLogger(__name__)

# The server measures the received event, which adds a `received` timestamp.
_MAX_FRAME = MAX_EVENT_SIZE_BYTES - 64


class PrefectEventSink(Sink[Event]):
    """Synchronous, reliable event delivery to a Prefect server.

    ``with PrefectEventSink() as sink: sink.export(events)``.  `export` returns
    once the server has confirmed every event, or raises a `PrefectError`
    whose `unconfirmed_events` are those the server may not have:
    `PrefectRefused` (`PrefectAuthFailed`) when sending again will not help,
    `PrefectUnavailable` once the reconnection attempts ran out.
    The connection stays open between calls.  Not for use inside a running
    event loop (it runs its own).
    """

    def __init__(
        self,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        auth_string: Optional[str] = None,
        checkpoint_every: int = 100,
        reconnection_attempts: int = 10,
        backoff: float = 0.25,
        max_backoff: float = 5.0,
        open_timeout: float = 10.0,
        confirm_timeout: float = 20.0,
        tls_insecure_skip_verify: Optional[bool] = None,
        ssl_cert_file: Optional[str] = None,
    ) -> None:
        self.api = resolve_api(api_url, api_key, auth_string,
                               tls_insecure_skip_verify=tls_insecure_skip_verify,
                               ssl_cert_file=ssl_cert_file)
        self.api_url = self.api.url
        self.url = self.api.events_url("in")
        # Prefect Cloud authenticates the socket's upgrade with the key alone.
        if self.api.cloud and not self.api.api_key:
            raise PrefectConfigError(
                "Prefect Cloud needs an API key: pass api_key or set PREFECT_API_KEY")

        if checkpoint_every < 1 or reconnection_attempts < 0:
            raise PrefectConfigError("checkpoint_every must be >= 1 and reconnection_attempts >= 0")
        self.checkpoint_every = checkpoint_every
        # Prefect retries twice at once (load balancers drop idle sockets),
        # then waits; we back off exponentially from there, without jitter.
        self.backoff = Backoff(initial=backoff, maximum=max_backoff, jitter=0.0, immediate=2,
                               max_attempts=reconnection_attempts + 1)
        self.open_timeout = open_timeout
        self.confirm_timeout = confirm_timeout

        self.sent = 0  # events written for the first time
        self.resent = 0  # events written again after a reconnect
        self.confirmed = 0  # events the server confirmed
        self.reconnects = 0  # connections opened after the first one

        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ws: Optional[ClientConnection] = None
        self._connected_once = False

    def export(self, events: Sequence[Event]) -> None:
        """Deliver `events` in order; returns when all are confirmed."""
        if not events:
            return
        # The server drops oversized events with only a log line, after
        # confirming them; refuse them here, before anything is sent.
        frames = [(e, e.model_dump_json(exclude={"received"})) for e in events]
        too_big = [e for e, frame in frames if len(frame.encode()) > _MAX_FRAME]
        if too_big:
            raise PrefectRefused(
                f"{len(too_big)} events exceed Prefect's {MAX_EVENT_SIZE_BYTES} byte limit "
                f"(first: {too_big[0].id}); nothing was sent",
                events,
            )
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._send(frames))

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._loop.run_until_complete(self._disconnect())
        finally:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "PrefectEventSink":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    async def _send(self, frames: list[tuple[Event, str]]) -> None:
        # (event, frame, written before?) not yet written on the current connection
        pending: deque[tuple[Event, str, bool]] = deque((e, f, False) for e, f in frames)
        # written on the current connection, waiting for the next pong
        unconfirmed: list[tuple[Event, str, bool]] = []
        failures = 0
        while pending or unconfirmed:
            try:
                if self._ws is None:
                    await self._connect()
                    # Everything not confirmed goes again, in the original
                    # order, before anything new (Prefect's resend).
                    pending.extendleft(reversed([(e, f, True) for e, f, _ in unconfirmed]))
                    unconfirmed.clear()
                ws = self._ws
                assert ws is not None
                while pending:
                    item = pending.popleft()
                    unconfirmed.append(item)
                    # Counted as attempts: a frame torn by a failing send
                    # counts as sent, and as resent when it goes again.
                    if item[2]:
                        self.resent += 1
                    else:
                        self.sent += 1
                    await ws.send(item[1])
                    if len(unconfirmed) >= self.checkpoint_every:
                        await self._checkpoint(ws)
                        self.confirmed += len(unconfirmed)
                        unconfirmed.clear()
                        failures = 0  # progress: the retry budget is per stall
                await self._checkpoint(ws)
                self.confirmed += len(unconfirmed)
                unconfirmed.clear()
            except PrefectError as exc:
                # Not worth retrying (auth, wrong URL): report what is unconfirmed.
                await self._drop_connection()
                exc.unconfirmed_events = [e for e, _, _ in (*unconfirmed, *pending)]
                raise
            except RETRYABLE as exc:
                await self._drop_connection()
                failures += 1
                if self.backoff.exhausted(failures):
                    left = [e for e, _, _ in (*unconfirmed, *pending)]
                    raise PrefectUnavailable.after(
                        f"sending to {self.url} ({len(left)} of {len(frames)} events not "
                        "confirmed)", failures, exc, left) from exc
                delay = self.backoff.delay(failures)
                log.info("connection to %s lost (%s); retry %d in %.2fs",
                         self.url, describe_error(exc), failures, delay)
                await asyncio.sleep(delay)

    async def _checkpoint(self, ws: ClientConnection) -> None:
        pong = await ws.ping()
        await asyncio.wait_for(pong, self.confirm_timeout)

    async def _connect(self) -> None:
        self._ws = await open_events_socket(
            self.api, "in", open_timeout=self.open_timeout,
            # Keepalive pings bound how long a send can hang on a dead peer.
            ping_interval=self.confirm_timeout, ping_timeout=self.confirm_timeout,
            close_timeout=2, max_size=None)
        if self._connected_once:
            self.reconnects += 1
        self._connected_once = True

    async def _drop_connection(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 2)
            except Exception:
                pass

    async def _disconnect(self) -> None:
        await self._drop_connection()
