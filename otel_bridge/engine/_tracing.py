"""The OpenTelemetry side of dual emission: a tracer whose spans can be given
otel-bridge's deterministic ids, the run's span handed to the SDK, and a
TracerProvider from the OTEL_* variables.

Only the SDK's public API: `Tracer.start_span` (with the run's attributes
and links when they are known at the start), `add_event`, `set_status`,
`end`. The shortcuts this module once took into the SDK's private fields
(filling a span's attribute store directly, handing the span processors a
`ReadableSpan` made by hand) saved tens of microseconds per task run, too
little against the rest of dual emission's cost to be worth depending on
one SDK version's internals (benchmarks/dual_emission.py). The one thing
the public API has no call for is giving a span chosen ids: `bridge_tracer`
sets the tracer's `id_generator` attribute, and `start_span` checks that the
span got them (and says once if an SDK stopped asking it).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import threading
import weakref
from typing import Any, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import Link, SpanContext, Status, TraceFlags

from otel_bridge.model.spans import Span, SpanLink
from otel_bridge.sinks.sdk import SCOPE, resource_from_env

log = logging.getLogger("otel_bridge.engine")


class _DeterministicIds(IdGenerator):
    """Hands out the ids set for the span being started on this thread, and
    defers to the provider's own generator otherwise (other code sharing the
    tracer keeps its random ids)."""

    def __init__(self, fallback: IdGenerator):
        self._fallback = fallback
        self._pending = threading.local()

    def set_next(self, trace_id: int, span_id: int) -> None:
        self._pending.ids = (trace_id, span_id)

    def clear(self) -> None:
        self._pending.ids = None

    def _ids(self):
        return getattr(self._pending, "ids", None)

    def generate_trace_id(self) -> int:
        ids = self._ids()
        return ids[0] if ids else self._fallback.generate_trace_id()

    def generate_span_id(self) -> int:
        ids = self._ids()
        return ids[1] if ids else self._fallback.generate_span_id()

    def is_trace_id_random(self) -> bool:
        # Derived ids are not random (W3C trace-context level 2 flag).
        return False if self._ids() else self._fallback.is_trace_id_random()


_tracers: "weakref.WeakKeyDictionary[TracerProvider, tuple[SdkTracer, _DeterministicIds]]" = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def bridge_tracer(
    provider: Optional[trace.TracerProvider] = None,
) -> Optional[tuple[SdkTracer, _DeterministicIds]]:
    """otel-bridge's tracer from `provider` (default: the global one), set up
    for deterministic ids (its `id_generator` wrapped: the SDK has no public
    way to choose a span's ids, and `start_span` checks they were taken);
    None when the provider is not the SDK's (the API's no-op default, or
    another implementation), so no span is made."""
    provider = provider if provider is not None else trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    found = _tracers.get(provider)
    if found is not None:
        return found
    with _lock:
        found = _tracers.get(provider)
        if found is None:
            tracer = provider.get_tracer(SCOPE.name, SCOPE.version)
            if not isinstance(tracer, SdkTracer):  # a disabled provider
                return None
            ids = tracer.id_generator
            if not isinstance(ids, _DeterministicIds):
                ids = _DeterministicIds(ids)
                tracer.id_generator = ids
            found = _tracers[provider] = (tracer, ids)
    return found


def tracer_provider_from_env(
    *, fallback: str = "none", set_global: bool = False
) -> TracerProvider:
    """A TracerProvider configured from the standard variables.

    Resource: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` (service.name
    defaults to "prefect", as the sidecar's). Exporter: `OTEL_TRACES_EXPORTER`
    (`otlp`, `console` or `none`); when it is unset, OTLP if
    `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
    set, else `fallback`. The OTLP exporter takes its protocol, endpoint,
    headers, ... from the `OTEL_EXPORTER_OTLP_*` variables. With `set_global`
    it becomes the global provider (which can be set once per process)."""
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(resource=resource_from_env())
    choice = (os.environ.get("OTEL_TRACES_EXPORTER") or "").strip().lower()
    if not choice:
        has_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        choice = "otlp" if has_endpoint else fallback
    for name in (c.strip() for c in choice.split(",")):
        if name == "otlp":
            from otel_bridge.sinks.otlp import exporter_from_env

            provider.add_span_processor(BatchSpanProcessor(exporter_from_env()))
        elif name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name not in ("none", ""):
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported "
                             "(use otlp, console or none)")
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


_EMPTY_CONTEXT = otel_context.Context()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


@functools.lru_cache(maxsize=1024)
def parent_context(trace_id: int, parent_span_id: Optional[int]) -> otel_context.Context:
    """The context to start a run's span in: its parent's span context (not
    whatever is current), or none for a root. Cached: the tasks of a flow run
    all sit under it (contexts and span contexts are immutable)."""
    if parent_span_id is None:
        return _EMPTY_CONTEXT
    parent = SpanContext(trace_id, parent_span_id, is_remote=False, trace_flags=_SAMPLED)
    return trace.set_span_in_context(trace.NonRecordingSpan(parent), _EMPTY_CONTEXT)


def start_span(found: tuple[SdkTracer, _DeterministicIds], name: str, trace_id: int,
               parent_span_id: Optional[int], span_id: int, start_time: int,
               **options: Any) -> trace.Span:
    """A span started through the public API with otel-bridge's ids for the
    run: `span_id` in the trace `trace_id`, under `parent_span_id` (a root if
    None). `options`: what else `Tracer.start_span` takes (kind, attributes,
    links)."""
    tracer, ids = found
    ids.set_next(trace_id, span_id)
    try:
        span = tracer.start_span(name, context=parent_context(trace_id, parent_span_id),
                                 start_time=start_time, record_exception=False,
                                 set_status_on_exception=False, **options)
    finally:
        ids.clear()
    if span.is_recording() and span.get_span_context().span_id != span_id:
        _ids_not_taken(span_id)
    return span


def finish_live_span(span: trace.Span, final: Span) -> None:
    """Give a live span, started by `start_span` when its run started, the
    name, attributes, events, links and status of `final` (the forward
    bridge's span of the same run) and end it at `final`'s end; all through
    the public API."""
    span.update_name(final.name)
    span.set_attributes(final.attributes)
    _finish(span, final)
    for link in final.links:
        span.add_link(_link_context(link), link.attributes)
    span.end(final.end_time_unix_nano)


def record_span(found: tuple[SdkTracer, _DeterministicIds], final: Span) -> bool:
    """Record `final`, a span that is over (all its content known), through
    the public API: started at its start with its attributes and links (so a
    sampler sees them), given its events and status, ended at its end. True
    when the sampler kept it."""
    span = start_span(found, final.name, final.trace_id, final.parent_span_id, final.span_id,
                      final.start_time_unix_nano, kind=final.kind, attributes=final.attributes,
                      links=[Link(_link_context(link), link.attributes) for link in final.links])
    if not span.is_recording():
        return False
    _finish(span, final)
    span.end(final.end_time_unix_nano)
    return True


def _finish(span: trace.Span, final: Span) -> None:
    for event in final.events:
        span.add_event(event.name, event.attributes, event.time_unix_nano)
    span.set_status(Status(final.status_code, final.status_message or None))


def _link_context(link: SpanLink) -> SpanContext:
    return SpanContext(link.trace_id, link.span_id, is_remote=True,
                       trace_flags=TraceFlags(link.trace_flags))


_warned_ids = False


def _ids_not_taken(span_id: int) -> None:
    """The tracer made a span with ids of its own: an SDK whose tracer no
    longer asks `id_generator` (see `bridge_tracer`). Said once."""
    global _warned_ids
    if not _warned_ids:
        _warned_ids = True
        log.warning(
            "otel-bridge: the OpenTelemetry SDK (opentelemetry-sdk %s) did not give a run's "
            "span otel-bridge's span id (%016x): its spans will not have the ids the sidecar "
            "gives the same runs", _sdk_version(), span_id)


def _sdk_version() -> str:
    try:
        return importlib.metadata.version("opentelemetry-sdk")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
