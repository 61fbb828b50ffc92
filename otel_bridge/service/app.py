"""`otel-bridge serve`: the long-running sidecar, wired together.

    sources                      pipeline               outbox      deliveries
    Prefect subscription --\\
    POST /v1/events --------+--> assembler --> spans --> SQLite --> OTLP | file
    OTLP gRPC / HTTP -----------> reverse  --> events --> SQLite --> Prefect | file
    Prefect logs (REST, ws) ----> log lines ----------> SQLite --> OTLP | file

Life cycle: open the store and restore the runs that were open; bind every
endpoint; follow Prefect; deliver. On SIGTERM or SIGINT: stop intake (the
subscription, the receivers; pushes get 503), emit the runs that have
finished, deliver what the grace period allows, and leave the rest (open
runs, undelivered output, the subscription's resume point) in the store for
the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from aiohttp import web

from otel_bridge.prefect_client import ui_url
from otel_bridge.model.events import EventRejected, validate_event
from otel_bridge.runtime import tune_gc
from otel_bridge.service import log_follower
from otel_bridge.service.auth import server_tls
from otel_bridge.service.config import ServeSettings
from otel_bridge.service.delivery import Delivery
from otel_bridge.service.http import admin_app
from otel_bridge.service.metrics import Metrics
from otel_bridge.service.pipeline import EVENT, LOG, SPAN, Pipeline
from otel_bridge.service.store import Store
from otel_bridge.sinks.factory import open_log_sink, open_sink
from otel_bridge.translate.assembler import AssemblerOptions
from otel_bridge.translate.forward import ForwardOptions

__all__ = ["Service"]

logger = logging.getLogger("otel_bridge.service")

RESUME_KEY = "prefect_resume_point"
TICK_SECONDS = 0.2
_SPANS_PER_TICK_SLICE = 200
_READY_OUTBOX_FRACTION = 0.9
_OBSERVE_SECONDS = 5.0
# (kind, forward_to or reverse_to) -> the sink (`sinks.factory`: a file gets
# OTLP/JSON or event JSON lines), and its delivery's name in logs and metrics.
_SINKS = {(SPAN, "otlp"): ("otlp", "otlp"), (SPAN, "file"): ("otlp-json", "file"),
          (EVENT, "prefect"): ("prefect", "prefect"), (EVENT, "file"): ("events", "file-events"),
          (LOG, "otlp"): ("otlp", "otlp-logs"), (LOG, "file"): ("otlp-json", "file-logs")}
_KINDS = (SPAN, EVENT, LOG)


class Service:
    def __init__(self, settings: ServeSettings):
        # Every listener serves TLS when a certificate and key are set.
        self._tls = (server_tls(settings.tls_cert_file, settings.tls_key_file)
                     if settings.tls_cert_file and settings.tls_key_file else None)
        self.settings = settings
        self.metrics = Metrics()
        self.store: Optional[Store] = None
        self.pipeline: Optional[Pipeline] = None
        self.deliveries: dict[str, Delivery] = {}
        self.bound: dict[str, int] = {}  # endpoint name -> port
        self._stop = asyncio.Event()
        self._started = False
        self._stopping = False
        self._fatal: Optional[str] = None
        self._last_tick = time.monotonic()
        self._pending: list = []  # events from the subscription, not yet taken
        self._subscription: Any = None
        self._log_follower: Any = None
        self._runners: list[web.AppRunner] = []
        self._run_metrics: Any = None  # a RunMetricsRecorder, with metrics on
        self._open_runs_observed = 0.0
        self._grpc: Any = None
        self._tasks: list[asyncio.Task] = []

    # -- probes ------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        stalled = time.monotonic() - self._last_tick > 10 * TICK_SECONDS + 5
        ok = self._fatal is None and not stalled
        return ok, {"status": "ok" if ok else "failing", "fatal": self._fatal, "stalled": stalled}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        full = [kind for kind in _KINDS if self.store is not None and
                self.store.outbox_bytes(kind) > _READY_OUTBOX_FRACTION * self.settings.outbox_max_bytes]
        ok = self._started and not self._stopping and not full and self._fatal is None
        return ok, {"status": "ready" if ok else "not ready", "started": self._started,
                    "stopping": self._stopping, "outbox_nearly_full": full}

    def stop(self) -> None:
        self._stop.set()

    # -- run ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; 0 after a clean stop, 1 after a fatal error."""
        s = self.settings
        loop = asyncio.get_running_loop()
        # Deliveries run on threads; at the default 5 ms switch interval,
        # each time the event loop let go of the GIL (any system call) it
        # waited 5 ms to get it back, and a health check took 300 ms.
        sys.setswitchinterval(0.0005)
        tune_gc()
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, self.stop)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        self.store = Store(s.store_path)
        try:
            self.pipeline = Pipeline(
                self.store, self.metrics,
                AssemblerOptions(
                    linger_seconds=s.linger_seconds, run_timeout_seconds=s.run_timeout_seconds,
                    max_open_runs=s.max_open_runs, max_events_per_run=s.max_events_per_run,
                    forward=ForwardOptions(prefect_trace_context=s.prefect_trace_context,
                                           ui_url=ui_url()),
                    track_states=s.metrics),
                outbox_max_bytes=s.outbox_max_bytes)
            if s.metrics:
                self._start_run_metrics()
            self._watch()
            logger.info("store opened", extra={
                "store_path": str(s.store_path), "open_runs": self.pipeline.assembler.open_runs,
                "outbox_spans": self.store.outbox_items(SPAN), "outbox_events": self.store.outbox_items(EVENT)})
            if self.store.unreadable_rows:
                self.metrics.dropped.labels(EVENT, "unreadable").inc(self.store.unreadable_rows)
                logger.error("store rows that could not be read were passed over", extra={
                    "store_path": str(s.store_path), "rows": self.store.unreadable_rows,
                    "hint": f"otel-bridge store check {s.store_path}"})
            self._start_deliveries()
            await self._bind()
            if s.follows_prefect:
                self._tasks.append(asyncio.create_task(self._follow_prefect(), name="prefect"))
            self._start_logs()
            self._tasks.append(asyncio.create_task(self._tick(), name="tick"))
            self._started = True
            logger.info("serving", extra={"listen_host": s.listen_host, **self.bound,
                                          "follows_prefect": s.follows_prefect})
            await self._stop.wait()
            return await self._shutdown()
        finally:
            self.store.close()

    def _watch(self) -> None:
        store, pipeline = self.store, self.pipeline
        self.metrics.watch("otel_bridge_ready", "1 when /readyz says ready",
                           lambda: {(): float(self.readiness()[0])})
        self.metrics.watch("otel_bridge_open_runs", "Runs waiting for their final state",
                           lambda: {(): pipeline.assembler.open_runs})
        self.metrics.watch("otel_bridge_outbox_items", "Output waiting for its sink",
                           lambda: {(k,): store.outbox_items(k) for k in _KINDS}, ("kind",))
        self.metrics.watch("otel_bridge_outbox_bytes", "Disk held by output waiting for its sink",
                           lambda: {(k,): store.outbox_bytes(k) for k in _KINDS}, ("kind",))

        def subscription() -> dict[tuple[str, ...], float]:
            if self._subscription is None:
                return {}
            return {(k,): v for k, v in self._subscription.stats.as_dict().items() if k != "remembered_ids"}

        def watermark() -> dict[tuple[str, ...], float]:
            mark = self._watermark()
            return {} if mark is None or self._subscription is None else {(): mark.timestamp()}

        self.metrics.watch("otel_bridge_prefect_watermark_seconds",
                           "Unix time before which every Prefect event has been read, the ones "
                           "the live stream missed included; finished runs leave once behind it",
                           watermark)

        def logs_mode() -> dict[tuple[str, ...], float]:
            if not self.settings.logs:
                return {("off",): 1.0}
            mode = log_follower.REST if self._log_follower is None else self._log_follower.mode
            return {(m,): float(m == mode) for m in log_follower.MODES}

        self.metrics.watch("otel_bridge_logs_mode",
                           "How Prefect's log lines come: 1 for the mode it is in. rest (POST "
                           "/api/logs/filter, polled), websocket (the logs websocket delivers; "
                           "REST still reconciles), or off", logs_mode, ("mode",))
        self.metrics.watch(
            "otel_bridge_prefect_logs", "The follower of Prefect's log lines: read, taken (live: "
            "from the websocket, reconciled: from REST), duplicates, no_run, rejected, late "
            "(stored after the fresh pass), socket_missed, rest_errors...",
            lambda: {} if self._log_follower is None else {
                (k,): v for k, v in self._log_follower.stats.as_dict().items()},
            ("counter",), counter=True)
        self.metrics.watch("otel_bridge_prefect_subscription",
                           "The Prefect subscription's counters: live, reconciled (missed by the "
                           "live stream, read back from REST), reconnects, rest_errors...",
                           subscription, ("counter",), counter=True)

    def _start_run_metrics(self) -> None:
        """Run metrics through the SDK's `MeterProvider`, exported every
        OTEL_METRIC_EXPORT_INTERVAL ms by its periodic reader: the totals the
        store keeps (cumulative), or each export's runs (delta)."""
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from otel_bridge.service.run_metrics import RunCounter, Shard
        from otel_bridge.sinks.otlp_metrics import (
            BaselineExporter,
            BaselineReader,
            CheckedExporter,
            OtlpJsonMetricExporter,
            RunMetricsRecorder,
            metric_exporter_from_env,
        )
        from otel_bridge.sinks.sdk import resource_from_env
        from otel_bridge.translate.open_run_metrics import StuckThresholds

        s = self.settings
        thresholds = StuckThresholds({"Late": s.metrics_stuck_late_seconds,
                                      "Pending": s.metrics_stuck_pending_seconds,
                                      "Running": s.metrics_stuck_running_seconds})

        def failed() -> None:  # on the reader's thread; the next export carries the same totals
            self.metrics.export_failures.labels("otlp-metrics").inc()
            if exporter.failed == 1 or exporter.failed % 10 == 0:
                logger.warning("run metrics: exports are failing; each next one carries the same "
                               "totals, so none is lost", extra={"failed": exporter.failed,
                                                                 "succeeded": exporter.succeeded})

        exporter = CheckedExporter(
            OtlpJsonMetricExporter(open(s.metrics_file, "a", encoding="utf-8"))
            if s.forward_to == "file" else metric_exporter_from_env(), failed)
        resource = resource_from_env()
        counter = RunCounter(self.store, None, Shard.parse(s.metrics_shard), thresholds)
        totals = BaselineExporter(exporter, lambda: counter.totals, counter.started_unix_nano,
                                  resource)
        if totals.cumulative():
            # The store's totals are the series: exact, and continued across
            # restarts; the SDK's reader and exporter send them.
            reader = BaselineReader(totals)
        else:
            # Delta: the SDK aggregates each export's runs itself.
            reader = PeriodicExportingMetricReader(exporter)
            counter.record = lambda found: recorder.record_measurements(found)
        recorder = RunMetricsRecorder(reader, resource, open_runs=counter.open_run_measurements)
        counter.observe_open_runs(self.pipeline.assembler.open_run_states())
        self.pipeline.run_counter, self._run_metrics = counter, recorder
        self.metrics.watch("otel_bridge_runs_counted",
                           "Finished runs this process counted in the run metrics",
                           lambda: {(): counter.runs_counted}, counter=True)
        logger.info("run metrics on", extra={
            "series_in_store": len(counter.totals), "shard": s.metrics_shard,
            "to": str(s.metrics_file) if s.forward_to == "file" else "otlp"})

    def _start_deliveries(self) -> None:
        s = self.settings
        outputs = {SPAN: (s.forward_to, s.forward_file)}
        if s.logs:
            outputs[LOG] = (s.forward_to, s.logs_file)
        if s.otlp_receiver or self.store.outbox_items(EVENT):
            outputs[EVENT] = (s.reverse_to, s.reverse_file)
        key = s.prefect_api_key.get_secret_value() if s.prefect_api_key else None
        for kind, (to, path) in outputs.items():
            sink_name, name = _SINKS[kind, to]
            if kind == LOG:
                sink = open_log_sink(sink_name, path or "-", append=True)
            else:
                sink = open_sink(sink_name, path or "-", append=True,
                                 on_unencodable=self._unencodable,
                                 prefect_api_url=s.prefect_api_url, prefect_api_key=key)
            delivery = self.deliveries[kind] = Delivery(
                self.store, kind, sink, name, self.metrics, batch_items=s.export_batch_items,
                retry_initial=s.retry_initial_seconds, retry_max=s.retry_max_seconds)
            self._tasks.append(asyncio.create_task(delivery.run(self._stop), name=f"deliver-{name}"))
        self.pipeline.on_output = lambda kind: self.deliveries[kind].wake() if kind in self.deliveries else None

    def _unencodable(self, span, error) -> None:
        # (The pipeline sets aside what OTLP cannot carry when a run closes;
        # this is for spans an older version put in the outbox.)
        logger.error("a span OTLP cannot carry is set aside", extra={
            "trace_id": span.trace_id_hex, "span_id": span.span_id_hex, "error": str(error)})
        self.metrics.dropped.labels(SPAN, "unencodable").inc()

    async def _bind(self) -> None:
        s = self.settings
        push_token = s.push_token.get_secret_value() if s.push_token else None
        app = admin_app(self, self.metrics, self.pipeline, push_token, s.max_body_bytes,
                        accepting=self._push_refusal)
        self.bound["http_port"] = await self._serve(app, s.http_port)
        if s.otlp_receiver:
            from otel_bridge.service.otlp_receiver import otlp_http_routes, start_grpc_receiver

            def rejected(transport: str, reason: str, count: int) -> None:
                self.pipeline.reject(f"otlp-{transport}", reason, count)

            token = s.otlp_token.get_secret_value() if s.otlp_token else None
            tls = ((s.tls_cert_file.read_bytes(), s.tls_key_file.read_bytes())
                   if s.tls_cert_file and s.tls_key_file else None)
            self._grpc, self.bound["otlp_grpc_port"] = await start_grpc_receiver(
                self._receive_spans, s.listen_host, s.otlp_grpc_port, s.max_body_bytes, rejected,
                token=token, tls=tls)
            otlp = web.Application(client_max_size=s.max_body_bytes)
            otlp.add_routes(otlp_http_routes(self._receive_spans, s.max_body_bytes, rejected,
                                             token=token))
            # The receiver gunzips itself, capped; aiohttp's own unzipping is
            # bounded only in recent versions.
            self.bound["otlp_http_port"] = await self._serve(otlp, s.otlp_http_port, auto_decompress=False)

    def _push_refusal(self) -> Optional[str]:
        if self._stopping:
            return "the service is stopping"
        if self.store.outbox_bytes(SPAN) > _READY_OUTBOX_FRACTION * self.settings.outbox_max_bytes:
            # Taking the events would only drop their spans; the sender can wait.
            return "the span outbox is nearly full: the span endpoint is not taking spans"
        return None

    async def _serve(self, app: web.Application, port: int, **options: Any) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, **options)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.listen_host, port, ssl_context=self._tls)
        await site.start()
        self._runners.append(runner)
        return site._server.sockets[0].getsockname()[1]

    async def _receive_spans(self, spans, transport: str):
        from otel_bridge.service.otlp_receiver import Received, ReceiverBusy

        if self._stopping:
            raise ReceiverBusy("the service is stopping", retry_after=5.0)
        if self.store.outbox_bytes(EVENT) > self.settings.outbox_max_bytes:
            raise ReceiverBusy("the outbox is full: Prefect is not taking events", retry_after=10.0)
        intake = await self.pipeline.take_spans(spans, transport)
        if not intake.rejected:
            return Received()
        first = "; ".join(f"{exc.reason}: {exc.detail}" for _, exc in intake.rejected[:3])
        return Received(rejected_spans=len(intake.rejected), error_message=first)

    # -- the Prefect subscription ---------------------------------------------------------

    async def _follow_prefect(self) -> None:
        from otel_bridge.prefect_client import PrefectError
        from otel_bridge.sources.prefect_subscription import PrefectSubscription

        s = self.settings
        stored = self.store.get_meta(RESUME_KEY)
        since = (datetime.fromisoformat(stored) if stored
                 else datetime.now(timezone.utc) - timedelta(seconds=s.backfill_seconds))
        logger.info("following Prefect", extra={"api_url": s.prefect_api_url, "since": since.isoformat(),
                                                "resumed": bool(stored)})
        key = s.prefect_api_key.get_secret_value() if s.prefect_api_key else None
        try:
            async with PrefectSubscription(s.prefect_api_url, key, event_prefixes=s.event_prefixes,
                                           since=since) as subscription:
                self._subscription = subscription
                async for raw in subscription:
                    try:
                        self._pending.append(validate_event(raw))
                    except EventRejected as exc:
                        self.pipeline.reject("prefect", exc.reason)
                        logger.warning("event from Prefect rejected", extra={
                            "reason": exc.reason, "detail": exc.detail, "event_id": raw.get("id")})
                    if len(self._pending) >= 1000:
                        self._take_pending()
        except PrefectError as exc:  # credentials refused, not a Prefect API, gave up
            self._fatal = f"Prefect subscription: {exc}"
            logger.error("cannot follow Prefect", extra={"error": str(exc)})
            self.stop()
        except Exception as exc:  # a bug: stop with 1, the store keeps the state
            self._fatal = f"Prefect subscription: {type(exc).__name__}: {exc}"
            logger.exception("the Prefect subscription failed")
            self.stop()

    # -- Prefect's log lines -----------------------------------------------------------------

    def _start_logs(self) -> None:
        s = self.settings
        if not s.logs:
            logger.info("Prefect's log lines are not followed (logs: off)", extra={"logs_mode": "off"})
            return
        from otel_bridge.prefect_client import resolve_api
        from otel_bridge.sources.prefect_logs import PrefectLogReader, PrefectLogSocket

        key = s.prefect_api_key.get_secret_value() if s.prefect_api_key else None
        api = resolve_api(s.prefect_api_url, key)
        self._log_follower = log_follower.LogFollower(
            self.store, self.pipeline, PrefectLogReader(s.prefect_api_url, key, api=api),
            socket=PrefectLogSocket(api) if s.logs_websocket else None,
            since=datetime.now(timezone.utc) - timedelta(seconds=s.backfill_seconds),
            poll_seconds=s.logs_poll_seconds, lateness_seconds=s.logs_lateness_seconds)
        if s.logs_websocket:
            how = ("following Prefect's log lines: polling REST (POST /api/logs/filter), and the "
                   "logs websocket (/api/logs/out) once it proves to deliver")
            why = ("the logs websocket is off on a server with default settings and then sends "
                   "nothing, which cannot be told from no logs: REST until a line comes on it")
        else:
            how = "following Prefect's log lines by polling REST (POST /api/logs/filter)"
            why = "logs_websocket: off"
        logger.info(how, extra={
            "logs_mode": self._log_follower.mode, "poll_seconds": s.logs_poll_seconds,
            "lateness_seconds": s.logs_lateness_seconds, "websocket": s.logs_websocket,
            "resumed": self._log_follower.resumed, "why": why})
        self._tasks.append(asyncio.create_task(self._follow_logs(), name="prefect-logs"))

    async def _follow_logs(self) -> None:
        from otel_bridge.prefect_client import PrefectError

        try:
            await self._log_follower.run()
        except PrefectError as exc:  # credentials refused, not a Prefect API, gave up
            self._fatal = f"Prefect logs: {exc}"
            logger.error("cannot follow Prefect's logs", extra={"error": str(exc)})
            self.stop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: stop with 1, the store keeps the marks
            self._fatal = f"Prefect logs: {type(exc).__name__}: {exc}"
            logger.exception("following Prefect's logs failed")
            self.stop()

    def _take_pending(self) -> None:
        if self._pending:
            events, self._pending = self._pending, []
            self.pipeline.take_events(events, "prefect")

    async def _tick(self) -> None:
        while True:
            try:
                watermark = self._watermark()
                with self.store.transaction():
                    self._take_pending()
                    emitted = self.pipeline.tick(watermark, _SPANS_PER_TICK_SLICE)
                    self._save_resume_point()
                # Thousands of runs can be due at once: a slice at a time, each
                # its own transaction, the event loop free between two.
                while emitted == _SPANS_PER_TICK_SLICE:
                    await asyncio.sleep(0)
                    emitted = self.pipeline.tick(watermark, _SPANS_PER_TICK_SLICE)
                self._observe_open_runs()
                self._last_tick = time.monotonic()  # /healthz fails while ticks fail
            except Exception:  # a full disk, a store error: keep trying, loudly
                logger.exception("tick failed")
            await asyncio.sleep(TICK_SECONDS)

    def _observe_open_runs(self, force: bool = False) -> None:
        # For the active and stuck run metrics, read at each export: often
        # enough for those, rarely enough to cost nothing with many runs open.
        counter = self.pipeline.run_counter
        now = time.monotonic()
        if counter is not None and (force or now - self._open_runs_observed >= _OBSERVE_SECONDS):
            counter.observe_open_runs(self.pipeline.assembler.open_run_states())
            self._open_runs_observed = now

    def _watermark(self) -> Optional[datetime]:
        """Runs leave once their final state is behind this: every event that
        occurred before it has been read from Prefect, the ones the live
        stream dropped (under load, while connecting, before a restart)
        recovered from REST. None when not following Prefect."""
        if not self.settings.follows_prefect:
            return None
        if self._subscription is None:
            return datetime.min.replace(tzinfo=timezone.utc)
        return self._subscription.fresh_watermark

    def _save_resume_point(self) -> None:
        # Everything before it was taken (what is pending was taken just
        # before, in the same transaction).
        if self._subscription is not None:
            self.store.set_meta(RESUME_KEY, self._subscription.resume_point.isoformat())

    # -- stop ------------------------------------------------------------------------------

    async def _shutdown(self) -> int:
        s = self.settings
        deadline = time.monotonic() + s.shutdown_grace_seconds
        self._stopping = True
        logger.info("stopping", extra={"grace_seconds": s.shutdown_grace_seconds})
        # 1. stop intake
        if self._subscription is not None:
            await self._subscription.close()
        if self._grpc is not None:
            await self._grpc.stop(min(1.0, s.shutdown_grace_seconds))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # 2. what has finished leaves; what is open stays in the store
        with self.store.transaction():
            self._take_pending()
            self.pipeline.flush_finished(self._watermark())
            self._save_resume_point()
        # 3. deliver what the grace period allows, the run metrics' last export too
        export = None
        if self._run_metrics is not None:
            self._observe_open_runs(force=True)
            export = asyncio.get_running_loop().run_in_executor(
                None, self._run_metrics.close, max(0.0, deadline - time.monotonic()))
        drained = await asyncio.gather(*(d.drain(deadline) for d in self.deliveries.values()))
        if export is not None:
            await export
        for delivery in self.deliveries.values():
            delivery.close()
        for runner in self._runners:
            await runner.cleanup()
        logger.info("stopped", extra={
            "delivered_all": all(drained), "open_runs_kept": self.pipeline.assembler.open_runs,
            "outbox_spans_kept": self.store.outbox_items(SPAN),
            "outbox_events_kept": self.store.outbox_items(EVENT),
            "outbox_logs_kept": self.store.outbox_items(LOG)})
        return 1 if self._fatal else 0
