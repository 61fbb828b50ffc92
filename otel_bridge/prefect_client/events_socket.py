"""Prefect's websockets: the event websockets, both directions,
``/api/events/out`` (what the subscription reads) and ``/api/events/in``
(where the sink writes), and the logs websocket ``/api/logs/out`` (what the
log follower reads).

Opening one, as Prefect's clients do (prefect/events/clients.py,
prefect/logging/clients.py, and the server's prefect/server/api/events.py,
logs.py and utilities/subscriptions.py, 3.9):

1. connect with the websocket subprotocol ``prefect`` (without it the server
   falls back to a legacy mode with no auth handshake, and refuses it when
   an auth string is configured); the custom headers and credentials go on
   the upgrade too, for proxies that check it;
2. send ``{"type": "auth", "token": <auth string or key>}``, receive
   ``{"type": "auth_success"}``; otherwise the server closes with 1008 and
   a reason ("Invalid token").

Prefect Cloud's events/in is the exception: it authenticates the upgrade
(the key as a bearer token), with neither subprotocol nor handshake.

What the server says for good raises `PrefectRefused` (`PrefectAuthFailed`
for credentials); network trouble (`RETRYABLE`) is the caller's to retry.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal, Optional

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from otel_bridge._version import __version__
from otel_bridge.prefect_client.errors import (
    PrefectAuthFailed,
    PrefectConfigError,
    PrefectError,
    refusal_for_status,
)
from otel_bridge.prefect_client.settings import PrefectApi

__all__ = ["REFUSAL_CODES", "RETRYABLE", "is_refusal", "open_events_socket", "open_logs_socket",
           "typed_frame"]

# Network trouble worth a reconnect (Prefect's RETRYABLE_EXCEPTIONS), and a
# handshake the server broke off (it restarted during the upgrade, say).
RETRYABLE = (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidHandshake)
# Close codes with which the server gives a verdict rather than drops us:
# 1008 policy violation (authentication), 1002 protocol error (a bad filter).
REFUSAL_CODES = (1002, 1008)


def typed_frame(url: str, message: Any, kind: str) -> Optional[tuple[str, Any]]:
    """A frame's text and JSON if it is of `kind` ("event", "log"): Prefect
    3.9.1 sends only those after the handshake, and anything else a later
    server might add is passed over (None). Raises `PrefectError` for a
    frame that is not JSON."""
    text = message.decode() if isinstance(message, bytes) else message
    try:
        frame = json.loads(text)
    except ValueError as exc:
        raise PrefectError(f"{url} sent a non-JSON frame: {text[:200]!r}") from exc
    if isinstance(frame, dict) and frame.get("type") == kind:
        return text, frame
    return None


def is_refusal(closed: ConnectionClosed) -> bool:
    return closed.rcvd is not None and closed.rcvd.code in REFUSAL_CODES


async def open_events_socket(
    api: PrefectApi,
    direction: Literal["in", "out"],
    *,
    open_timeout: float = 10.0,
    **options: Any,
) -> ClientConnection:
    """A socket to ``events/<direction>``, authenticated; `options` go to
    `websockets.connect` (keepalive, frame size...)."""
    return await _open_socket(api, api.events_url(direction), upgrade_only=direction == "in"
                              and api.cloud, open_timeout=open_timeout, **options)


async def open_logs_socket(api: PrefectApi, *, open_timeout: float = 10.0,
                           **options: Any) -> ClientConnection:
    """A socket to ``logs/out``, authenticated as events/out is (the same
    handshake, on Prefect Cloud too); `options` go to `websockets.connect`."""
    return await _open_socket(api, api.logs_url(), upgrade_only=False,
                              open_timeout=open_timeout, **options)


async def _open_socket(api: PrefectApi, url: str, *, upgrade_only: bool, open_timeout: float,
                       **options: Any) -> ClientConnection:
    try:
        ws = await connect(
            url,
            subprotocols=None if upgrade_only else [Subprotocol("prefect")],
            additional_headers=api.http_headers(),
            user_agent_header=f"otel-bridge/{__version__}",
            ssl=api.ssl_context(),
            open_timeout=open_timeout,
            **options,
        )
    except InvalidStatus as exc:
        refusal = refusal_for_status(exc.response.status_code, url, "to the websocket upgrade")
        if refusal is None:
            raise
        raise refusal from exc
    except InvalidURI as exc:
        raise PrefectConfigError(f"bad websocket URL {url}: {exc}") from exc
    try:
        # A server that did not take the subprotocol is in legacy mode: no handshake.
        if ws.subprotocol == "prefect":
            await _authenticate(ws, api.ws_token, url, open_timeout)
    except BaseException:
        await ws.close()
        raise
    return ws


async def _authenticate(ws: ClientConnection, token: Any, url: str, timeout: float) -> None:
    await ws.send(json.dumps({"type": "auth", "token": token}))
    try:
        text = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        if not is_refusal(exc):
            raise  # a dropped connection, not a verdict: retryable
        raise _auth_failed(url, exc.rcvd.reason if exc.rcvd else "") from exc
    try:
        reply = json.loads(text)
    except ValueError as exc:
        raise PrefectError(f"{url} answered the handshake with {text[:200]!r}") from exc
    if not isinstance(reply, dict) or reply.get("type") != "auth_success":
        reason = reply.get("reason", reply) if isinstance(reply, dict) else reply
        raise _auth_failed(url, repr(reason))


def _auth_failed(url: str, reason: str) -> PrefectAuthFailed:
    return PrefectAuthFailed(f"{url} refused authentication: {reason or 'no reason given'} "
                             "(check PREFECT_API_AUTH_STRING / PREFECT_API_KEY)")
