"""Dual emission inside real Prefect (3.9.x): one line makes an unchanged
flow's task runs produce otel-bridge's spans in process.

    import otel_bridge.engine.prefect
    otel_bridge.engine.prefect.enable()   # before the flow runs

    @flow
    def etl(): ...

What it does, per task run:

* While the task runs, the span Prefect's own `RunTelemetry` makes current
  (it wraps the task body in `trace.use_span`) is a span context with
  otel-bridge's deterministic ids: trace id of the flow run, span id of the
  task run (`otel_bridge.translate.ids`). So a span the user opens inside the
  task is a child of the task run's span, and the `__OTEL_TRACEPARENT` label
  Prefect puts on the task run (and so on its events) names that same span,
  which the forward bridge recognises as itself (no link, no reparenting).
* Prefect's events worker hands every event it sends to otel-bridge as well.
  When a task run's final state event has been sent, the run's span is
  recorded through the OpenTelemetry SDK with exactly the content the sidecar
  would give it: `run_span` of the very events Prefect sent (name,
  start/end, attributes, span events, status). A run that is also seen by a
  sidecar gives one span, not two.

And per flow run: while it runs, the span Prefect makes current for the
flow body has otel-bridge's ids too (so its tasks' spans have their parent
in the same process), and once Prefect ends it the flow run's span is
recorded from the flow-run events Prefect's server emitted for it (read back
over the REST API: `_flow_run_events`), as a sidecar makes it. A trace is
then whole with or without a sidecar; with one, each id still has one span.

Spans need an OpenTelemetry SDK `TracerProvider`: the one passed to
`enable`, else the global one, else (with `from_env=True`, the default) one
set up from the standard `OTEL_*` variables and installed globally.

Prefect 3.9.1 offers no public hook for either half: `EventsWorker`'s client
override cannot be used to observe events (`emit_event` only emits when the
worker's client type is one of Prefect's own classes, by identity) and
`RunTelemetry` always takes its tracer from the global provider. So `enable`
wraps two methods, in `_install` below and nowhere else:
`prefect.telemetry.run_telemetry.RunTelemetry._start_span` and `prefect.events.worker.EventsWorker._handle` (after the event is sent).
`disable` restores them.

Private methods change without notice, so `enable` wraps them only in the
Prefect versions the tests ran with (`TESTED_PREFECT_VERSIONS`). In any
other, it logs one warning and leaves Prefect as it is: Prefect's own
telemetry, if any, goes on unchanged, and a sidecar still makes otel-bridge's
spans from the run's events. A half-working wrap would be worse: a span
context Prefect no longer makes current, or spans that no longer match the
sidecar's, would break the traces silently.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import importlib.metadata
import inspect
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Optional
from uuid import UUID

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from otel_bridge.prefect_client import ui_url
from otel_bridge.model.events import EventRejected
from otel_bridge.model.spans import Span
from otel_bridge.translate.forward import (
    FLOW_RUN,
    TASK_RUN,
    ForwardOptions,
    RunKey,
    is_final,
    is_final_state,
    run_key,
    run_span,
)
from otel_bridge.translate.ids import span_id_for, trace_id_for

from ._flow_run_events import (
    FINAL_EVENT_WAIT_SECONDS,
    FlowRunEventsMissing,
    flow_run_events,
    prefect_api,
)
from ._prefect_events import TASK_RUN_PREFIX, is_task_run_state, read_prefect
from ._tracing import bridge_tracer, record_span, tracer_provider_from_env

__all__ = ["TESTED_PREFECT_VERSIONS", "FlowRunSpan", "TaskRunSpan", "aflush", "disable", "enable", "flush",
           "is_enabled", "prefect_version_supported"]

log = logging.getLogger("otel_bridge.engine.prefect")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class TaskRunSpan(NonRecordingSpan):
    """What Prefect's task engine holds and makes current while a task runs:
    the task run's span context, with otel-bridge's ids. Prefect's own calls
    on it (state events, status, end) are ignored: the recorded span is made
    from the run's events once its final state has been sent."""

    def __init__(self, context: SpanContext, task_run_id: UUID, parent_span_id: Optional[int]):
        super().__init__(context)
        self.task_run_id = task_run_id
        self.parent_span_id = parent_span_id

    def __repr__(self) -> str:
        return f"TaskRunSpan({self.task_run_id})"


class FlowRunSpan(NonRecordingSpan):
    """What Prefect's flow engine holds and makes current while a flow runs:
    the flow run's span context, with otel-bridge's ids. When Prefect ends
    it, the flow run's span is recorded from the server's events."""

    def __init__(self, context: SpanContext, run: Any, bridge: "_Bridge"):
        super().__init__(context)
        self.flow_run_id: UUID = run.id
        self.since = getattr(run, "created", None) or datetime.now(timezone.utc)
        self._bridge = bridge

    def end(self, end_time: Optional[int] = None) -> None:
        self._bridge.flow_run_ended(self)

    def __repr__(self) -> str:
        return f"FlowRunSpan({self.flow_run_id})"


class _Bridge:
    """The state of one `enable`: the provider, and the events of the task
    runs whose span is open."""

    def __init__(self, provider: Optional[trace.TracerProvider],
                 options: ForwardOptions = ForwardOptions()):
        self.provider = provider
        self.options = options
        self._lock = threading.Lock()
        self._open: dict[str, TaskRunSpan] = {}  # resource id -> span context
        # resource id -> the events sent so far (Prefect's `Event` objects)
        self._events: dict[str, list[Any]] = {}
        # flow runs whose span is being made from the server's events
        self._flow_runs: dict[UUID, threading.Thread] = {}
        self.spans_recorded = 0
        self.errors = 0

    # -- in the task's context (Prefect's RunTelemetry._start_span) ---------

    def start(self, run: Any, run_type: str) -> Optional[NonRecordingSpan]:
        """The span context of a task or flow run that is starting (None: no
        SDK)."""
        if bridge_tracer(self.provider) is None:
            return None
        if run_type == "flow":
            # As `forward.placement` places a flow run: the root of its trace.
            own = f"prefect.{FLOW_RUN}.{run.id}"
            return FlowRunSpan(SpanContext(trace_id_for(own), span_id_for(own), is_remote=False,
                                           trace_flags=_SAMPLED), run, self)
        resource_id = f"prefect.{TASK_RUN}.{run.id}"
        trace_id, parent_span_id = _placement(run, resource_id)
        span = TaskRunSpan(
            SpanContext(trace_id, span_id_for(resource_id), is_remote=False,
                        trace_flags=_SAMPLED),
            run.id, parent_span_id)
        with self._lock:
            self._open[resource_id] = span
            self._events.setdefault(resource_id, [])
        return span

    # -- in the events worker's thread (EventsWorker._handle) ---------------

    def sent(self, prefect_event: Any) -> None:
        """A Prefect event has been sent: keep it if it is a task run's state
        event, and record the run's span at its final state."""
        resource = prefect_event.resource.root
        resource_id = resource.get("prefect.resource.id", "")
        if not resource_id.startswith(TASK_RUN_PREFIX):
            return
        # Kept as Prefect made it, read once the run is over (`_finish`); an
        # event not known to be a state event is read now, to ask run_key.
        if (not is_task_run_state(prefect_event.event, resource)
                and run_key(read_prefect(prefect_event)) is None):
            return
        with self._lock:
            seen = self._events.setdefault(resource_id, [])
            seen.append(prefect_event)
            if not is_final_state(resource):
                return
            span = self._open.pop(resource_id, None)
            self._events.pop(resource_id, None)
        if span is not None:  # else: a run that never started here
            self._finish(span, RunKey(TASK_RUN, resource_id), seen)

    def _finish(self, span: TaskRunSpan, key: RunKey, sent: list[Any]) -> None:
        """Record the span of a run whose final state has been sent: the
        forward bridge's span of the events Prefect's server accepts (an
        event it would refuse is set aside and counted; if that is the final
        state, the run stays open for the next one)."""
        events, kept = [], []
        for prefect_event in sent:
            try:
                events.append(read_prefect(prefect_event))
                kept.append(prefect_event)
            except EventRejected as exc:
                self.errors += 1
                log.warning("otel-bridge: event %s of %s set aside: %s", prefect_event.id,
                            key.resource_id, exc)
        if not events or not is_final(events[-1]):  # the final state was set aside
            with self._lock:
                self._open[key.resource_id] = span
                self._events.setdefault(key.resource_id, [])[:0] = kept
            return
        self._record(span, run_span(events, self.options))

    def _record(self, started: "TaskRunSpan | FlowRunSpan", final: Span) -> None:
        found = bridge_tracer(self.provider)
        if found is None:
            return
        context = started.get_span_context()
        parent = started.parent_span_id if isinstance(started, TaskRunSpan) else None
        if (final.trace_id, final.span_id, final.parent_span_id) != (
            context.trace_id, context.span_id, parent
        ):
            log.warning("otel-bridge: %r was placed at %032x/%s while it ran, its events "
                        "place it at %032x/%s", started, context.trace_id, parent,
                        final.trace_id, final.parent_span_id)
        if record_span(found, final):
            self.spans_recorded += 1

    # -- flow runs (their events are the server's) ----------------------------

    def flow_run_ended(self, span: FlowRunSpan) -> None:
        """Prefect ended the flow run's span: read its events from the server
        and record its span, on a thread of its own (the server stores the
        final event a few seconds later; the flow's process goes on)."""
        thread = threading.Thread(target=self._record_flow_run, args=(span,), daemon=True,
                                  name=f"otel-bridge-flow-run-{span.flow_run_id}")
        with self._lock:
            self._flow_runs[span.flow_run_id] = thread
        thread.start()

    def _record_flow_run(self, started: FlowRunSpan) -> None:
        try:
            api_url, api_key = prefect_api()
            if api_url is None:
                raise FlowRunEventsMissing(
                    "no PREFECT_API_URL: an ephemeral server in this process, whose events "
                    "nothing outside it can read")
            events = flow_run_events(started.flow_run_id, started.since, api_url=api_url,
                                     api_key=api_key)
            self._record(started, run_span(events, self.options))
        except Exception as exc:  # telemetry must not break the run
            self.errors += 1
            log.warning("otel-bridge: the span of flow run %s is not recorded in process (a "
                        "sidecar still makes it): %s", started.flow_run_id, exc)
        finally:
            with self._lock:
                self._flow_runs.pop(started.flow_run_id, None)

    def wait_for_flow_runs(self, timeout: Optional[float]) -> list[UUID]:
        """Wait for the flow runs' spans being made; those still not made."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._flow_runs.values())
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            return list(self._flow_runs)

    def open_runs(self) -> list[UUID]:
        with self._lock:
            return [span.task_run_id for span in self._open.values()] + list(self._flow_runs)


def _placement(run: Any, own: str) -> tuple[int, Optional[int]]:
    """`forward.placement` from the task run itself, `own` its resource id
    (its events name the same flow run and parents): under the parent task
    run if nested, else under the flow run; the trace is the flow run's."""
    flow_run = f"prefect.flow-run.{run.flow_run_id}" if run.flow_run_id else None
    parent_task = None
    for parent in (run.task_inputs or {}).get("__parents__", ()):
        input_type = getattr(parent, "input_type", None) or (
            parent.get("input_type") if isinstance(parent, dict) else None)
        parent_id = getattr(parent, "id", None) or (
            parent.get("id") if isinstance(parent, dict) else None)
        if input_type == "task_run" and parent_id:
            parent_task = f"prefect.{TASK_RUN}.{parent_id}"
            break
    root = flow_run or parent_task or own
    parent = parent_task or flow_run
    return trace_id_for(root), span_id_for(parent) if parent else None


_bridge: Optional[_Bridge] = None
_originals: dict[str, Any] = {}
_install_lock = threading.Lock()


def _install() -> None:
    """The only place otel-bridge changes Prefect: two methods wrapped, both
    calling Prefect's own code. See the module docstring for why."""
    from prefect.events.worker import EventsWorker
    from prefect.telemetry.run_telemetry import RunTelemetry

    original_start_span = RunTelemetry._start_span
    original_handle = EventsWorker._handle

    @functools.wraps(original_start_span)
    def _start_span(self, run, parameters=None):
        # Task and flow runs get otel-bridge's span context (made current by
        # the engine for the run's body) instead of Prefect's own span.
        bridge = _bridge
        if bridge is not None:
            run_type = self._run_type(run)
            try:
                span = bridge.start(run, run_type)
            except Exception:  # telemetry must not break the run
                bridge.errors += 1
                log.exception("otel-bridge: could not start the span of %s run %s", run_type,
                              run.id)
                span = None
            if span is not None:
                self.span = span
                traceparent = self.traceparent_from_span(span)
                if traceparent:
                    run.labels["__OTEL_TRACEPARENT"] = traceparent
                return traceparent, span
        return original_start_span(self, run, parameters)

    @functools.wraps(original_handle)
    async def _handle(self, event):
        await original_handle(self, event)
        bridge = _bridge
        if bridge is not None:
            try:
                bridge.sent(event)
            except Exception:
                bridge.errors += 1
                log.exception("otel-bridge: could not record the span for event %s", event.id)

    _originals.update(start_span=original_start_span, handle=original_handle)
    RunTelemetry._start_span = _start_span
    EventsWorker._handle = _handle


def enable(
    tracer_provider: Optional[trace.TracerProvider] = None, *, from_env: bool = True
) -> bool:
    """Switch dual emission on for the Prefect task runs of this process;
    True when it is on.

    `tracer_provider`: where the spans go; default the global provider at the
    time each span is made. If there is none (the API's default) and
    `from_env`, one is set up from the `OTEL_*` variables
    (`tracer_provider_from_env`, OTLP when an endpoint is set) and installed
    as the global provider. Calling it again changes the provider.

    The spans are the sidecar's for the same events, the link to each run's
    page included when the UI's address is known as the sidecar knows it
    (`PREFECT_UI_URL`, or derived from `PREFECT_API_URL`).

    With a Prefect version the tests did not run with (see the module's
    docstring) it does nothing, not even set up a provider, and returns
    False, having logged why (once per process)."""
    global _bridge
    if not prefect_version_supported():
        return False
    if (tracer_provider is None and from_env
            and bridge_tracer(trace.get_tracer_provider()) is None):
        tracer_provider_from_env(set_global=True)
    with _install_lock:
        if not _originals:
            _install()
            atexit.register(_at_exit)
        _bridge = _Bridge(tracer_provider, ForwardOptions(ui_url=ui_url()))
    return True


# The Prefect versions whose private methods `_install` wraps, as the tests
# ran with them: add a version only once they pass with it.
TESTED_PREFECT_VERSIONS = frozenset({"3.9.1"})
_warned_version: Optional[str] = None


def prefect_version_supported() -> bool:
    """Whether the installed Prefect is one `enable` wraps; logs a warning,
    once per process, when it is not."""
    global _warned_version
    try:
        version = importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    if version in TESTED_PREFECT_VERSIONS:
        return True
    if _warned_version is None:
        _warned_version = version
        log.warning(
            "otel-bridge: dual emission is off: it wraps private methods of Prefect "
            "(RunTelemetry._start_span, EventsWorker._handle) and was tested with Prefect %s "
            "only, not with Prefect %s. Prefect runs as it would without otel-bridge; a "
            "sidecar (otel-bridge serve) still makes the spans from the events.",
            ", ".join(sorted(TESTED_PREFECT_VERSIONS)), version)
    return False


def disable() -> None:
    """Switch it off and restore Prefect's methods."""
    global _bridge
    with _install_lock:
        _bridge = None
        if _originals:
            from prefect.events.worker import EventsWorker
            from prefect.telemetry.run_telemetry import RunTelemetry

            RunTelemetry._start_span = _originals.pop("start_span")
            EventsWorker._handle = _originals.pop("handle")


def is_enabled() -> bool:
    return _bridge is not None


def flush(timeout: Optional[float] = 30.0) -> list[UUID]:
    """Send Prefect's pending events (so the spans of finished task runs are
    recorded), wait for the spans of finished flow runs (made from the
    server's events, a few seconds behind), and flush the span processors.
    Needed only before shutting a TracerProvider down by hand: at interpreter
    exit Prefect drains its events, and otel-bridge waits for the flow runs'
    spans, before the SDK's own exit handler runs. Returns the runs whose
    span is still open or not yet made. From async code, `await aflush()`."""
    from prefect.events.worker import EventsWorker

    waiting = EventsWorker.drain_all(timeout=timeout, at_exit=False)
    if inspect.isawaitable(waiting):  # a running event loop in this thread
        waiting.close()
        raise RuntimeError("otel_bridge.engine.prefect.flush() was called from async "
                           "code: use `await aflush()`")
    return _flush_spans(timeout)


async def aflush(timeout: Optional[float] = 30.0) -> list[UUID]:
    """`flush` for async code."""
    from prefect.events.worker import EventsWorker

    await EventsWorker.drain_all(timeout=timeout, at_exit=False)
    return await asyncio.to_thread(_flush_spans, timeout)


def _flush_spans(timeout: Optional[float]) -> list[UUID]:
    bridge = _bridge
    if bridge is not None:
        bridge.wait_for_flow_runs(timeout)
    provider = (bridge.provider if bridge is not None else None) or trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush()
    return bridge.open_runs() if bridge is not None else []


def _at_exit() -> None:
    """Before the SDK's own exit handler shuts the provider down (registered
    earlier, it runs later): the flow runs' spans still being made."""
    bridge = _bridge
    if bridge is not None:
        bridge.wait_for_flow_runs(FINAL_EVENT_WAIT_SECONDS)
