"""From the outbox to a sink, until the sink has it.

One `Delivery` per kind of output (spans to OTLP or a file, events to Prefect
or a file). It sends the oldest items in batches and removes them from the
outbox only once the sink accepted them. A failed batch stays, and is tried
again after an exponential backoff, for as long as it takes: an endpoint
that is down costs disk (bounded by the outbox), not data.

One item a sink refuses for good (too big, invalid) must not block the ones
behind it forever. After a few failures in a row items go one at a time; an
item that fails alone while the item after it goes through is moved to the
store's ``dead_letters`` table and counted as dropped ("refused"). While the
sink is down, the next item fails too, so nothing is set aside for an outage.

Sinks are synchronous (the OpenTelemetry exporters are), so each runs on its
own daemon thread: a send stuck past the shutdown grace period cannot hold
the process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Optional

from otel_bridge.backoff import Backoff
from otel_bridge.service.metrics import Metrics
from otel_bridge.service.pipeline import SPAN, decode, encoded_span
from otel_bridge.service.store import OutboxItem, Store
from otel_bridge.sinks import Sink

__all__ = ["Delivery"]

logger = logging.getLogger(__name__)

_ALONE_AFTER = 3  # failures in a row before items go one at a time
_REMIND_SECONDS = 300.0  # while a sink keeps failing, a log line this often


def _describe(exc: BaseException) -> str:
    """An error in a few words, also one whose message is empty (a
    TimeoutError says nothing by itself)."""
    text = str(exc) or {TimeoutError: "no answer in time",
                        asyncio.TimeoutError: "no answer in time"}.get(type(exc), "")
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:500]


class Delivery:
    def __init__(
        self,
        store: Store,
        kind: str,
        sink: Sink,
        sink_name: str,
        metrics: Metrics,
        *,
        batch_items: int = 512,
        batch_bytes: int = 8 * 1024 * 1024,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ):
        self.store = store
        self.kind = kind
        self.sink = sink
        self.sink_name = sink_name
        self.metrics = metrics
        self.batch_items = batch_items
        self.batch_bytes = batch_bytes
        self.backoff = Backoff(initial=retry_initial, maximum=retry_max, jitter=0.0)
        self.failures = 0  # in a row
        # While set, items up to this seq go one at a time (`deliver_once`).
        self._suspects_until: Optional[int] = None
        # An outage, as the logs tell it (`_report_failure`).
        self._failing_since: Optional[float] = None
        self._last_reminder = 0.0
        self._failed_attempts = 0
        self._wake = asyncio.Event()
        self._worker = _Worker(f"otel-bridge-{sink_name}")
        self._reader = store.outbox_reader()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set and then, to `drain`, until empty."""
        while not stop.is_set():
            try:
                delivered = await self.deliver_once()
            except Exception:  # the store failing (disk full...): keep trying, loudly
                logger.exception("delivery failed", extra={"sink": self.sink_name})
                self.failures += 1
                delivered = False
            if not delivered:
                await self._sleep(self._pause(), stop)

    async def drain(self, deadline: float) -> bool:
        """Deliver what is left until `deadline` (monotonic); True when empty."""
        while self.store.outbox_items(self.kind) and time.monotonic() < deadline:
            if not await self.deliver_once(timeout=deadline - time.monotonic()):
                await asyncio.sleep(min(self._pause(), max(0.0, deadline - time.monotonic())))
        return not self.store.outbox_items(self.kind)

    def close(self) -> None:
        self._worker.submit(self.sink.close)
        self._worker.submit(self._reader.close)

    async def _peek(self, max_items: int, timeout: Optional[float],
                    after: int = 0) -> list[OutboxItem]:
        """Read on the sink's thread, not the event loop (`OutboxReader`);
        none when that thread is still busy with a send at `timeout`."""
        try:
            return await asyncio.wait_for(self._worker.submit(
                lambda: self._reader.peek(self.kind, max_items, self.batch_bytes, after)), timeout)
        except asyncio.TimeoutError:
            return []

    async def deliver_once(self, timeout: Optional[float] = None) -> bool:
        """One batch; False when there was nothing to do or it failed."""
        alone = self.failures >= _ALONE_AFTER or self._suspects_until is not None
        items = await self._peek(1 if alone else self.batch_items, timeout)
        if alone and items and self._suspects_until is not None \
                and items[0].seq > self._suspects_until and self.failures < _ALONE_AFTER:
            # Past every item of the batch that kept failing: batches again.
            self._suspects_until, alone = None, False
            items = await self._peek(self.batch_items, timeout)
        if not items:
            return False
        error = await self._send(items, timeout)
        if error is None:
            if self._failing_since is not None:
                logger.info("delivering again", extra={
                    "sink": self.sink_name, "failed_attempts": self._failed_attempts,
                    "down_seconds": round(time.monotonic() - self._failing_since, 1),
                    "waiting": self.store.outbox_items(self.kind)})
                self._failing_since, self._failed_attempts = None, 0
            self.failures = 0
            return True
        self.failures += 1
        self._report_failure(items, error)
        if not alone and self.failures >= _ALONE_AFTER:
            # One item in it may be what the sink refuses: the batch's items
            # go one at a time until the one refused is found and set aside
            # (going back to whole batches after each success cost every
            # good item ahead of it three failed attempts).
            self._suspects_until = items[-1].seq
        self.store.failed(items)
        self.metrics.export_failures.labels(self.sink_name).inc()
        if alone and items[0].attempts >= 1:  # it had failed alone before
            behind = await self._peek(1, timeout, after=items[0].seq)
            if behind and await self._send(behind, timeout) is None:
                self.store.set_aside(items[0], error)
                self.metrics.dropped.labels(self.kind, "refused").inc()
                logger.error("the sink refuses one item while taking the next: set aside",
                             extra={"sink": self.sink_name, "seq": items[0].seq, "error": error})
                self.failures = 0
                return True
        return False

    def _report_failure(self, items: list[OutboxItem], error: str) -> None:
        """One clear line when a sink stops taking output (the endpoint down,
        say), what is kept, and then quiet: a reminder every few minutes, and
        a line when it takes output again. Each failure is in the metrics."""
        self._failed_attempts += 1
        now = time.monotonic()
        first = self._failing_since is None
        if first:
            self._failing_since = self._last_reminder = now
        elif now - self._last_reminder < _REMIND_SECONDS:
            logger.debug("export failed again", extra={"sink": self.sink_name, "error": error})
            return
        self._last_reminder = now
        logger.warning(
            "the sink does not take output: it is kept in the store and sent again with backoff"
            if first else "the sink still does not take output", extra={
                "sink": self.sink_name, "error": error, "batch": len(items),
                "waiting": self.store.outbox_items(self.kind),
                "waiting_bytes": self.store.outbox_bytes(self.kind),
                "failed_attempts": self._failed_attempts,
                "retry_in_seconds": round(self._pause(), 1)})

    async def _send(self, items: list[OutboxItem], timeout: Optional[float]) -> Optional[str]:
        export_encoded = getattr(self.sink, "export_encoded", None)

        def export() -> None:
            if export_encoded is not None and self.kind == SPAN:  # the bytes as they are kept
                export_encoded([encoded_span(item.body) for item in items])
            else:
                self.sink.export([decode(item.kind, item.body) for item in items])

        try:
            await asyncio.wait_for(self._worker.submit(export), timeout)
        except Exception as exc:  # the sink's failure, whatever its type
            return _describe(exc)
        self.store.remove(items)
        now = time.time()
        self.metrics.exported.labels(self.sink_name).inc(len(items))
        retried = sum(1 for item in items if item.attempts)
        if retried:
            self.metrics.export_retries.labels(self.sink_name).inc(retried)
        for item in items:
            self.metrics.export_lag.labels(self.kind).observe(max(0.0, now - item.stamp))
        return None

    def _pause(self) -> float:
        if not self.failures:
            return 1.0  # idle: woken early by new output
        return self.backoff.delay(self.failures)

    async def _sleep(self, seconds: float, stop: asyncio.Event) -> None:
        self._wake.clear()
        waits = [asyncio.ensure_future(stop.wait())]
        if not self.failures:
            waits.append(asyncio.ensure_future(self._wake.wait()))
        _, pending = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()


class _Worker:
    """One daemon thread running calls in order, each answered by a future."""

    def __init__(self, name: str):
        self._calls: list[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._ready:
            self._calls.append((call, future, loop))
            self._ready.notify()
        return future

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._calls:
                    self._ready.wait()
                call, future, loop = self._calls.pop(0)
            try:
                result, error = call(), None
            except BaseException as exc:  # handed to the awaiting side
                result, error = None, exc
            loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if future.done():  # the waiter gave up (timeout)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
