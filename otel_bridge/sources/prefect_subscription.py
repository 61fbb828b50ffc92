"""A reliable source of Prefect events: live websocket + REST reconciliation.

The websocket (/api/events/out) is fast but lossy: the server drops events
for a subscriber that is more than 256 behind, and nothing arrives while we
reconnect.  The REST API (/api/events/filter) has every persisted event, but
only once the server's persister has flushed its batch (every few seconds).
So events are taken from both and deduplicated by id:

* live: ``ReconnectingEventStream`` delivers what it can, at once;
* reconciliation: passes over ``occurred`` windows of the REST API yield what
  the live stream did not.  Passes, each with its own watermark:
    - the *fresh* pass, every ``reconcile_interval``, reads
      [watermark, now - settle_delay): recovers drops about settle_delay +
      reconcile_interval after they happened;
    - one *late* pass per entry of ``late_delays``, reading the same range
      again that much later (every quarter of its delay), for events the
      server stored after the earlier passes had gone by: a persister behind
      under load (seen: up to a minute for a 500-task flow on a busy sqlite
      server), a client that re-sent events after a reconnect.
  Each event is thus read 1 + len(late_delays) times, not once per overlap
  of a sliding window: REST load stays proportional to the event rate.
* dedup: ids are remembered with their ``occurred`` time and forgotten once
  the last late pass's watermark (minus a slack) has passed them: no pass
  reads them again, and the websocket never resumes before that point.
  Memory is bounded by about (settle_delay + 1.25 x max(late_delays) + slack)
  x event rate.

Guarantee: every matching event with ``occurred >= since`` that the server
persists within settle_delay + max(late_delays) of its ``occurred`` is yielded
exactly once.  Later stragglers can still come live (counted as ``late``);
``resume_point`` is the time from which a restarted consumer should resume
(events from there on may then be yielded again: dedup downstream by id).
Order is not preserved (the server does not promise it either).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Optional, Sequence

import httpx

from otel_bridge.backoff import Backoff
from otel_bridge.prefect_client import PrefectError, PrefectUnavailable, resolve_api
from otel_bridge.prefect_client.rest import (
    PAGE_SIZE,
    build_event_filter,
    check_response,
    page_requests,
)
from otel_bridge.sources import Source
from otel_bridge.sources.prefect_ws import ReconnectingEventStream, parse_occurred

__all__ = ["DEFAULT_EVENT_PREFIXES", "PrefectSubscription", "SubscriptionStats"]

logger = logging.getLogger(__name__)

DEFAULT_EVENT_PREFIXES = ("prefect.task-run.", "prefect.flow-run.")

_STOP = object()


@dataclass
class SubscriptionStats:
    live: int = 0  # yielded from the websocket
    reconciled: int = 0  # yielded from REST: the live stream had missed them
    reconciled_late: int = 0  # of those, found by a late pass: persisting lags settle_delay
    late: int = 0  # live events older than the dedup horizon (see module doc)
    duplicates: int = 0  # suppressed: already yielded
    reconnects: int = 0  # websocket connections after the first
    rest_pages: int = 0
    reconcile_passes: int = 0
    rest_errors: int = 0
    remembered_ids: int = 0  # current size of the dedup memory

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Pass:
    """One reconciliation pass: reads [watermark, now - lag) every ``every`` s.

    ``delivered`` trails ``watermark``: it moves when the consumer has taken
    every event the pass queued before moving the watermark (a marker in the
    queue says so), so it is what a consumer may act on."""

    def __init__(self, name: str, lag: float, every: float, start: datetime) -> None:
        self.name, self.lag, self.every = name, lag, every
        self.watermark = start
        self.delivered = start
        self.due = 0.0  # loop time; 0 = at the first tick


@dataclass(frozen=True)
class _Delivered:
    """Queued after a pass's events: once taken, they all were."""

    pass_: _Pass
    watermark: datetime


class PrefectSubscription(Source):
    """``async with PrefectSubscription() as sub: async for event in sub: ...``

    Yields raw event dicts (as the server sends them), each once.  Ends after
    ``close()``; raises PrefectRefused for what retrying cannot fix (bad
    credentials, not a Prefect API) or, with ``backoff.max_attempts`` set,
    PrefectUnavailable once the server has been unreachable that many times
    in a row.
    """

    def __init__(
        self,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        event_prefixes: Sequence[str] = DEFAULT_EVENT_PREFIXES,
        since: Optional[datetime] = None,
        live: bool = True,
        reconcile_interval: float = 2.0,
        settle_delay: float = 8.0,
        late_delays: Sequence[float] = (20.0, 90.0),
        backoff: Backoff = Backoff(),
        page_size: int = PAGE_SIZE,
        queue_size: int = 10_000,
        http_timeout: float = 30.0,
    ) -> None:
        self.api = resolve_api(api_url, api_key)
        self.event_prefixes = tuple(event_prefixes)
        self.since = since or datetime.now(timezone.utc)
        self.live = live
        self.backoff = backoff
        self.page_size = page_size
        self.http_timeout = http_timeout
        self._stats = SubscriptionStats()
        self._fresh = _Pass("fresh", settle_delay, reconcile_interval, self.since)
        self._passes = [self._fresh] + [
            _Pass(f"late+{d:g}s", settle_delay + d, max(reconcile_interval, d / 4), self.since)
            for d in sorted(late_delays)
        ]
        # The deepest pass: nothing before its watermark is read again.
        self._late = self._passes[-1]
        # Ids outlive the late watermark by this much, so a websocket backfill
        # started just before the watermark moved cannot replay forgotten ids.
        self._slack = timedelta(seconds=max(30.0, self._late.every))
        self._seen: dict[str, datetime] = {}
        self._prune_at = 4096
        # Bounded: a slow consumer blocks the readers instead of growing
        # memory; the live events the server then drops, REST recovers.
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self._stream: Optional[ReconnectingEventStream] = None
        self._tasks: list[asyncio.Task] = []
        self._http: Optional[httpx.AsyncClient] = None
        self._stopped = False

    # -- public -----------------------------------------------------------------

    @property
    def stats(self) -> SubscriptionStats:
        """A snapshot of the counters."""
        snap = SubscriptionStats(**self._stats.as_dict())
        if self._stream is not None:
            snap.reconnects = self._stream.reconnects
            snap.duplicates += self._stream.duplicates_dropped
        snap.remembered_ids = len(self._seen)
        return snap

    @property
    def resume_point(self) -> datetime:
        """Everything that occurred before this has been yielded (or is a
        straggler), and taken by the consumer."""
        return self._late.delivered

    @property
    def fresh_watermark(self) -> datetime:
        """Everything that occurred before this, and was persisted by the
        server within ``settle_delay``, has been yielded and taken by the
        consumer: the point up to which what the live stream missed has been
        recovered."""
        return self._fresh.delivered

    async def start(self) -> "PrefectSubscription":
        self._http = httpx.AsyncClient(timeout=self.http_timeout,
                                       verify=self.api.ssl_context() or True)
        if self.live:
            self._stream = ReconnectingEventStream(
                self.api.url,
                {"event": {"prefix": list(self.event_prefixes)}},
                api=self.api,
                since=self.since,
                backoff=self.backoff,
                # Backfill only the part REST has not reconciled yet.
                resume_margin=timedelta(seconds=self._fresh.lag + self._fresh.every),
                resume_floor=lambda: self._late.watermark,
            )
            self._tasks.append(asyncio.create_task(self._run_live(), name="prefect-live"))
        self._tasks.append(asyncio.create_task(self._run_reconcile(), name="prefect-reconcile"))
        return self

    async def close(self) -> None:
        """Stop both readers, close connections; iteration then ends."""
        if self._stopped:
            return
        self._stopped = True
        if self._stream is not None:
            await self._stream.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
        self._put_nowait_final(_STOP)

    async def __aenter__(self) -> "PrefectSubscription":
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self.events()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self._queue.get()
            if item is _STOP:
                self._put_nowait_final(_STOP)  # for any other iterator
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Delivered):
                item.pass_.delivered = item.watermark
                continue
            yield item

    # -- internals --------------------------------------------------------------

    def _put_nowait_final(self, item: Any) -> None:
        # Stop and errors must reach the consumer even when the queue is full:
        # make room by dropping an event (they are being abandoned anyway).
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()

    def _remember(self, event: dict[str, Any]) -> Optional[datetime]:
        """The event's ``occurred`` if it is new, None if already yielded."""
        event_id = event["id"]
        if event_id in self._seen:
            self._stats.duplicates += 1
            return None
        occurred = parse_occurred(event["occurred"])
        self._seen[event_id] = occurred
        return occurred

    def _forget_old_ids(self) -> None:
        horizon = self._late.watermark - self._slack
        self._seen = {k: v for k, v in self._seen.items() if v >= horizon}

    async def _run_live(self) -> None:
        assert self._stream is not None
        try:
            async for event in self._stream.events():
                occurred = self._remember(event)
                if occurred is None:
                    continue
                if occurred < self._late.watermark:
                    self._stats.late += 1
                self._stats.live += 1
                await self._queue.put(event)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.error("live event stream failed: %s", exc)
            self._put_nowait_final(exc)

    async def _run_reconcile(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        try:
            while True:
                tick = loop.time()
                for p in self._passes:
                    if tick < p.due:
                        continue
                    try:
                        await self._reconcile(p)
                        failures = 0
                    except PrefectError:  # an answer that will not change
                        self._stats.rest_errors += 1
                        raise
                    except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                        failures = self._rest_failure(exc, failures)
                        break  # retry at the next tick
                    p.due = tick + p.every
                await asyncio.sleep(self._fresh.every)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.error("event reconciliation failed: %s", exc)
            self._put_nowait_final(exc)

    def _rest_failure(self, exc: Exception, failures: int) -> int:
        self._stats.rest_errors += 1
        failures += 1
        if self.backoff.exhausted(failures):
            raise PrefectUnavailable.after(f"reading {self.api.url}/events/filter", failures,
                                           exc) from exc
        logger.warning("event reconciliation: %s: %s; retrying", type(exc).__name__, exc)
        return failures

    async def _reconcile(self, p: _Pass) -> None:
        upper = datetime.now(timezone.utc) - timedelta(seconds=p.lag)
        if upper <= p.watermark:
            return
        async for event in self._read_window(p.watermark, upper):
            if self._remember(event) is None:
                continue
            self._stats.reconciled += 1
            if p is not self._fresh:
                self._stats.reconciled_late += 1
            await self._queue.put(event)
        # Only a complete read moves the watermark: a failed one is redone.
        p.watermark = upper
        await self._queue.put(_Delivered(p, upper))
        self._stats.reconcile_passes += 1
        if p is self._late:
            self._forget_old_ids()
        elif len(self._seen) > self._prune_at:
            self._forget_old_ids()
            self._prune_at = max(4096, 2 * len(self._seen))

    async def _read_window(self, since: datetime, until: datetime) -> AsyncIterator[dict[str, Any]]:
        assert self._http is not None
        flt = build_event_filter(since, until, event_prefixes=self.event_prefixes)
        headers = {"Accept": "application/json", **self.api.http_headers()}
        requests = page_requests(self.api.url, flt, self.page_size)
        request = next(requests)
        while True:
            method, url, arguments = request
            resp = await self._http.request(method, url, headers=headers, **arguments)
            check_response(resp)
            self._stats.rest_pages += 1
            page = resp.json()
            for event in page["events"]:
                yield event
            try:
                request = requests.send(page)
            except StopIteration:
                return
