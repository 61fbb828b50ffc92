"""Prefect's log lines, read two ways: stored, from `POST /api/logs/filter`
in passes over windows of their timestamps (`PrefectLogReader`), and live,
from the logs websocket `/api/logs/out` (`PrefectLogSocket`).

REST is the ground truth: it has every line the server stored, whatever its
settings. The websocket is faster but may be off: on a server with default
settings it is (PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED and
PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED are both false), and then it
accepts the subscription and sends nothing, with no error and no close:
silence that cannot be told from "no logs". So REST is always read, and the
caller (`service.log_follower`) decides from what both bring whether the
socket delivers.

A line's `timestamp` is when the client logged it, and the client sends its
lines in batches (every 2 s by default, `PREFECT_LOGGING_TO_API_BATCH_INTERVAL`)
and again after a lost connection, so a line is stored a little after its
timestamp, sometimes much after. Hence two passes, as the event subscription
reads events (`prefect_subscription`), each with its own mark:

- the *fresh* pass, every `poll_seconds`, reads [mark, now - settle);
- the *late* pass, every quarter of `lateness`, reads [mark, now - lateness)
  again, for lines stored late.

Each line is thus read twice, not once per poll of a sliding window, and a
line stored within `lateness` of its timestamp is read. The caller
deduplicates by id (a line at a window's edge is read by both windows) and
keeps the marks, so a restart neither loses nor repeats lines.

The logs websocket, as Prefect 3.9.1's server speaks it
(prefect/server/api/logs.py, prefect/server/logs/stream.py; its client is
prefect/logging/clients.py):

1. connect with the subprotocol ``prefect``, send ``{"type": "auth",
   "token": ...}``, receive ``{"type": "auth_success"}`` (or a close 1008),
   as on events/out (`prefect_client.events_socket`);
2. send ``{"type": "filter", "filter": <LogFilter JSON>}``; anything else,
   or a filter that does not validate, is closed with 1002. There is no
   acknowledgement and no backfill: only lines stored from then on come;
3. receive ``{"type": "log", "log": <Log JSON>}`` frames, nothing else (no
   heartbeat). The filter is applied to live lines, `timestamp` included
   (Prefect's client sends a year ahead as `before_`); the empty filter
   sent here lets every line through.

What the frames hold: the line as REST gives it, with the same `id`, but
`created` and `updated` null (the server publishes the line it is about to
insert; the database sets them). The server publishes before its
transaction commits, so a line usually comes on the socket before REST can
read it. Each subscriber has a backlog of 256 lines, past which the server
drops lines for it, silently. Nothing comes while disconnected: REST fills
every gap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Callable, Optional

import aiohttp
import httpx
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from otel_bridge.backoff import Backoff
from otel_bridge.prefect_client import PrefectApi, PrefectError, resolve_api
from otel_bridge.prefect_client.errors import refusal_for_status

__all__ = ["LOG_PAGE_SIZE", "LogPass", "PrefectLogReader", "PrefectLogSocket", "log_filter",
           "socket_filter"]

logger = logging.getLogger(__name__)

# PREFECT_SERVER_API_DEFAULT_LIMIT: the most a page may hold (larger is a 422).
LOG_PAGE_SIZE = 200


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def log_filter(since: datetime, until: datetime, offset: int = 0,
               limit: int = LOG_PAGE_SIZE) -> dict[str, Any]:
    """The body of `POST /api/logs/filter` for the lines with since <=
    timestamp <= until (Prefect 3.9's `LogFilterTimestamp` takes both ends),
    oldest first."""
    return {"logs": {"timestamp": {"after_": _iso(since), "before_": _iso(until)}},
            "sort": "TIMESTAMP_ASC", "limit": limit, "offset": offset}


@dataclass
class LogPass:
    """One pass over the log lines: everything with a timestamp before
    `mark` has been read by it; it reads up to `lag` seconds before now,
    every `every` seconds (monotonic `due`)."""

    name: str
    lag: float
    every: float
    mark: datetime
    due: float = 0.0

    def window(self, now: datetime) -> Optional[tuple[datetime, datetime]]:
        upper = now - timedelta(seconds=self.lag)
        return (self.mark, upper) if upper > self.mark else None


class PrefectLogReader:
    """Pages of stored log lines, each a list of the JSON objects the
    server sent. An answer that will not change (credentials, not a Prefect
    API) raises `PrefectRefused`; a server in trouble `httpx.HTTPError`, as
    the other readers of Prefect's REST API do.

    Over aiohttp's client, not httpx's: every line is read twice in steady
    state (the fresh pass, the late one), and a page cost `serve` half the
    CPU over aiohttp (4 us a line, against 9)."""

    def __init__(self, api_url: str, api_key: Optional[str] = None, *,
                 page_size: int = LOG_PAGE_SIZE, http_timeout: float = 30.0,
                 api: Optional[PrefectApi] = None):
        self.api = api or resolve_api(api_url, api_key)
        self.page_size = page_size
        self.pages = 0
        self._timeout = http_timeout
        self._ssl = self.api.ssl_context() or True
        self._session: Optional[aiohttp.ClientSession] = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, url: str, body: dict, headers: dict) -> bytes:
        """The answer's body; raises as `check_response` does for httpx."""
        if self._session is None:  # (made on the loop that uses it)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout))
        try:
            async with self._session.post(url, data=orjson.dumps(body), headers=headers,
                                          ssl=self._ssl, allow_redirects=False) as response:
                content = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise httpx.TransportError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            return content
        refusal = refusal_for_status(status, url, content[:200].decode(errors="replace"))
        if refusal is not None:
            raise refusal
        request = httpx.Request("POST", url)
        raise httpx.HTTPStatusError(f"POST {url}: HTTP {status}", request=request,
                                    response=httpx.Response(status, request=request))

    async def read_window(self, since: datetime, until: datetime) -> AsyncIterator[list[dict]]:
        """Every line with since <= timestamp <= until, a page at a time.
        Paged by timestamp (the next page starts at the last one's last
        timestamp; the caller drops the lines read twice), as offsets over
        lines of one instant have no defined order between two queries;
        only a page that is all one instant is stepped through by offset."""
        after, offset = since, 0
        headers = {"Accept": "application/json", "Content-Type": "application/json",
                   **self.api.http_headers()}
        while True:
            content = await self._post(f"{self.api.url}/logs/filter",
                                       log_filter(after, until, offset, self.page_size), headers)
            self.pages += 1
            try:
                page = orjson.loads(content)  # (twice as fast as the json module)
            except orjson.JSONDecodeError as exc:
                raise httpx.DecodingError(f"/logs/filter answered what is not JSON: {exc}") from None
            if not isinstance(page, list):
                raise httpx.DecodingError(f"/logs/filter answered {type(page).__name__}, not a list")
            yield page
            if len(page) < self.page_size:
                return
            last = _timestamp(page[-1])
            if last is not None and last > after:
                after, offset = last, 0
            else:
                offset += len(page)


def _timestamp(log: Any) -> Optional[datetime]:
    try:
        moment = datetime.fromisoformat(log["timestamp"])
    except (TypeError, KeyError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def socket_filter() -> dict[str, Any]:
    """The logs websocket's filter message: every line (an empty LogFilter;
    a `timestamp` window would be applied to live lines as well)."""
    return {"type": "filter", "filter": {}}


class PrefectLogSocket:
    """Live log lines from `/api/logs/out`: ``async for batch in s.batches()``.

    Each batch is the ``log`` objects of the frames that came together (up
    to `max_batch`, gathered for at most `gather_seconds` after the first),
    as the server sent them. Reconnects after any drop or failure, with
    `backoff` (its `max_attempts` is not heeded: the socket is an extra,
    REST is the safety net, and giving up is REST's to decide); a refusal
    (credentials, a filter refused, no such route on an older server) is
    logged and tried again after the backoff's maximum. Only `close()`
    ends it.

    `connected_since` is the wall-clock time (`clock`) from which the
    current connection has been subscribed, None while there is none;
    `down_since` the time the last one ended (or the socket was made).
    """

    def __init__(self, api: PrefectApi, *, backoff: Backoff = Backoff(),
                 open_timeout: float = 10.0, max_batch: int = LOG_PAGE_SIZE,
                 gather_seconds: float = 0.05, clock: Callable[[], float] = time.time):
        self.api = api
        self.url = api.logs_url()
        self.backoff = backoff
        self.open_timeout = open_timeout
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self.clock = clock
        self.connected_since: Optional[float] = None
        self.down_since: Optional[float] = clock()
        # Counters, for metrics.
        self.connections = 0  # subscriptions made
        self.failures = 0  # connections that failed or were lost
        self.lines = 0  # lines the socket sent
        self._ws: Optional[ClientConnection] = None
        self._closed = False
        self._last_refusal = ""

    async def close(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    async def _open(self) -> ClientConnection:
        from otel_bridge.prefect_client.events_socket import open_logs_socket

        # A message may be up to 1,000,000 characters, JSON-escaped in a frame.
        ws = await asyncio.wait_for(
            open_logs_socket(self.api, open_timeout=self.open_timeout, max_size=16 * 1024 * 1024),
            self.open_timeout * 2)
        try:
            await ws.send(json.dumps(socket_filter()))
        except BaseException:
            await ws.close()
            raise
        return ws

    async def batches(self) -> AsyncIterator[list[Any]]:
        from otel_bridge.prefect_client.events_socket import RETRYABLE, is_refusal

        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closed:
            try:
                self._ws = await self._open()
            except PrefectError as exc:  # a refusal: a retry now would get the same
                self.failures += 1
                failures += 1
                await self._wait(self.backoff.maximum, exc, refused=True)
                continue
            except RETRYABLE as exc:
                self.failures += 1
                failures += 1
                await self._wait(self.backoff.delay(failures), exc)
                continue
            self.connections += 1
            self.connected_since = self.clock()
            self.down_since = None
            opened, delivered = loop.time(), False
            refused = False
            try:
                async for batch in self._read(self._ws):
                    delivered = True
                    yield batch
                exc: BaseException = EOFError("the server closed the logs websocket")
            except ConnectionClosed as closed:
                exc, refused = closed, is_refusal(closed)
            except PrefectError as bad:  # not a frame of this protocol
                exc, refused = bad, True
            finally:
                self.connected_since, self.down_since = None, self.clock()
                ws, self._ws = self._ws, None
                if ws is not None:
                    await ws.close()
            if self._closed:
                return
            self.failures += 1
            # A connection that worked resets the count; one that died at
            # once keeps backing off (a server that accepts and drops would
            # otherwise be hammered).
            worked = delivered or loop.time() - opened > self.backoff.maximum
            failures = 1 if worked else failures + 1
            await self._wait(self.backoff.maximum if refused else self.backoff.delay(failures),
                             exc, refused=refused)

    async def _wait(self, delay: float, exc: BaseException, refused: bool = False) -> None:
        error = f"{type(exc).__name__}: {exc}"[:300]
        if refused and error == self._last_refusal:
            logger.debug("the logs websocket refused again", extra={"error": error})
        else:
            logger.warning("the logs websocket %s: reconnecting; REST polling goes on",
                           "refused" if refused else "failed", extra={
                               "url": self.url, "error": error, "retry_seconds": round(delay, 1)})
        if refused:
            self._last_refusal = error
        await asyncio.sleep(delay)

    async def _read(self, ws: ClientConnection) -> AsyncIterator[list[Any]]:
        """Batches of lines until the connection ends; what came before a
        close is yielded before the close is raised."""
        while True:
            batch = [self._line(await ws.recv())]
            lost: Optional[ConnectionClosed] = None
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._line(await asyncio.wait_for(ws.recv(),
                                                                   self.gather_seconds)))
                except asyncio.TimeoutError:  # (cancelling recv loses no message)
                    break
                except ConnectionClosed as closed:
                    lost = closed
                    break
            lines = [line for line in batch if line is not _NOT_A_LINE]
            self.lines += len(lines)
            if lines:
                yield lines
            if lost is not None:
                raise lost

    def _line(self, message: Any) -> Any:
        from otel_bridge.prefect_client.events_socket import typed_frame

        found = typed_frame(self.url, message, "log")
        return _NOT_A_LINE if found is None else found[1].get("log")


_NOT_A_LINE = object()
