"""The OpenTelemetry side of dual emission: a tracer whose spans can be given
otel-bridge's deterministic ids, and a TracerProvider from the OTEL_* variables.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Any, Mapping, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event as SdkEvent
from opentelemetry.sdk.trace import ReadableSpan, SynchronousMultiSpanProcessor
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import _Span as _SdkSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace import sampling as _sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags

from otel_bridge.model.spans import Span
from otel_bridge.sinks.sdk import SCOPE, resource_from_env


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
    for deterministic ids; None when the provider is not the SDK's (the API's
    no-op default, or another implementation), so no span is made."""
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


# The SDK's own samplers whose decision (and the attributes they hand back)
# does not depend on the attributes they are given: they pass them through
# unchanged when sampling, drop them otherwise. By exact type, since a
# subclass may look at them.
_STATIC_SAMPLERS = frozenset({_sampling.StaticSampler, _sampling._AlwaysOn, _sampling._AlwaysOff,
                              _sampling.TraceIdRatioBased})
_PARENT_BASED = frozenset({_sampling.ParentBased, _sampling.ParentBasedTraceIdRatio,
                           _sampling._ParentBasedAlwaysOn, _sampling._ParentBasedAlwaysOff})


def sampler_ignores_attributes(sampler: object, _depth: int = 0) -> bool:
    """Whether `sampler` is one of the SDK's built-in samplers that decide
    without looking at a span's attributes and return them as given (ALWAYS_ON,
    ALWAYS_OFF, TraceIdRatioBased, ParentBased and AlwaysRecordSampler of
    those): starting a span without its attributes and setting them right
    after then gives the same decision and the same attributes."""
    kind = type(sampler)
    if kind in _STATIC_SAMPLERS:
        return True
    if _depth > 4:
        return False
    try:
        if kind in _PARENT_BASED:
            return all(sampler_ignores_attributes(getattr(sampler, name), _depth + 1) for name in (
                "_root", "_remote_parent_sampled", "_remote_parent_not_sampled",
                "_local_parent_sampled", "_local_parent_not_sampled"))
        if kind is getattr(_sampling, "AlwaysRecordSampler", None):
            return sampler_ignores_attributes(sampler._root, _depth + 1)
    except AttributeError:  # another SDK version's internals
        return False
    return False


def set_attributes_first(span: trace.Span, attributes: Mapping[str, Any]) -> None:
    """Give a span just started without `attributes` what it would have had
    if they had been passed to `start_span`, when a span processor's
    `on_start` has set attributes meanwhile: the run's first, then the
    processor's again (what it set, set anew), with the SDK's limits applied
    and dropped attributes counted in that order. Exact for a processor that
    sets attributes without reading them."""
    added = dict(span.attributes)
    stored = getattr(span, "_attributes", None)
    if isinstance(stored, BoundedAttributes) and isinstance(getattr(stored, "_dict", None), dict):
        with stored._lock:
            stored._dict.clear()
            stored.dropped = 0
    span.set_attributes(attributes)
    span.set_attributes(added)


def finish_live_span(span: trace.Span, final: Span, *, attributes: bool = True) -> None:
    """Give a live SDK span the name, attributes (unless it was started with
    them), events, links and status of `final` (the forward bridge's span of
    the same run) and end it at `final`'s end."""
    if not _fill_directly(span, final, attributes):
        span.update_name(final.name)
        if attributes:
            span.set_attributes(final.attributes)
        for event in final.events:
            span.add_event(event.name, event.attributes, event.time_unix_nano)
    for link in final.links:
        span.add_link(SpanContext(link.trace_id, link.span_id, is_remote=True,
                                  trace_flags=TraceFlags(link.trace_flags)),
                      dict(link.attributes))
    span.set_status(Status(final.status_code, final.status_message or None))
    span.end(final.end_time_unix_nano)


def _fill_directly(span: trace.Span, final: Span, with_attributes: bool) -> bool:
    """Put `final`'s name, attributes and events into the SDK span as the
    SDK's own `update_name`, `set_attributes` and `add_event` would store
    them, without checking each value again: the forward bridge's mapping
    makes only strings, ints, floats and lists of strings (the SDK keeps the
    first three as they are and makes the lists tuples; span events carry
    strings only). Only where the SDK would keep every attribute unchanged:
    the span's limits cut nothing (no length limit, room for every
    attribute), no key is empty, and no sampler has put attributes on it;
    otherwise (False) the public API does it, checks and all. It uses the
    SDK span's private fields (opentelemetry-sdk 1.x); should they change,
    it falls back to the API. Tested against the public API's result, field
    by field and in OTLP (tests/test_engine_fast_paths.py)."""
    if type(span) is not _SdkSpan:
        return False
    try:
        limits = span._limits
        attributes = span._attributes
        max_event_attributes = limits.max_event_attributes
        if limits.max_attribute_length is not None or any(
            "" in e.attributes
            or (max_event_attributes is not None and len(e.attributes) > max_event_attributes)
            for e in final.events
        ):
            return False
        if with_attributes and (
            attributes or attributes.max_value_len is not None or "" in final.attributes
            or (attributes.maxlen is not None and len(final.attributes) > attributes.maxlen)
        ):
            return False
        stored = attributes._dict
    except AttributeError:  # another SDK version's internals: use the API
        return False
    with span._lock:
        if span._end_time is not None:
            return False  # the public API warns about an ended span
        span._name = final.name
        if with_attributes:
            _store(stored, final.attributes)  # empty before: the order is final's
        events = span._events
        for event in final.events:
            events.append(SdkEvent(event.name, _frozen(event.attributes, max_event_attributes),
                                   event.time_unix_nano))
    return True


def _store(stored: dict, attributes: Mapping[str, Any]) -> None:
    """Put attributes the SDK would keep as they are into its store, as its
    `set_attributes` keeps them (lists become tuples)."""
    stored.update(attributes)
    for key, value in stored.items():  # (values replaced, none added: safe)
        if type(value) is list:
            stored[key] = tuple(value)


def _frozen(attributes: Mapping[str, Any], most: Optional[int]) -> BoundedAttributes:
    """An event's or link's attributes as the SDK freezes them, when it would
    keep every one (span events and links carry strings only)."""
    frozen = BoundedAttributes(most, immutable=True)
    frozen._dict = dict(attributes)
    return frozen


def record_span(found: tuple[SdkTracer, _DeterministicIds], final: Span) -> bool:
    """Record `final`, a span that is over (all its content known), through
    the tracer's provider, as the SDK records a span started at `final`'s
    start with its attributes, given its events, links and status, and ended
    at its end. True when the sampler kept it.

    Directly (`_readable_span`) where the SDK's result is known without
    running it; else through the public API, the attributes set right after
    the start when the sampler does not look at them (the same span without
    the SDK checking every value twice)."""
    tracer, ids = found
    recorded = _record_directly(tracer, final)
    if recorded is not None:
        return recorded
    ctx = parent_context(final.trace_id, final.parent_span_id)
    late = sampler_ignores_attributes(tracer.sampler)
    ids.set_next(final.trace_id, final.span_id)
    try:
        span = tracer.start_span(final.name, context=ctx, kind=final.kind,
                                 start_time=final.start_time_unix_nano,
                                 attributes=None if late else final.attributes,
                                 record_exception=False, set_status_on_exception=False)
    finally:
        ids.clear()
    if not span.is_recording():
        return False
    if late and span.attributes:  # a span processor set some in on_start
        set_attributes_first(span, final.attributes)
        late = False
    finish_live_span(span, final, attributes=late)
    return True


# Span processors whose `on_start` and `_on_ending` do nothing (they act in
# `on_end` only), by exact type.
_END_ONLY_PROCESSORS = frozenset({SimpleSpanProcessor, BatchSpanProcessor})


def _record_directly(tracer: SdkTracer, final: Span) -> Optional[bool]:
    """`record_span` without a live span: the `ReadableSpan` the SDK would
    hand its span processors, made from `final` and handed to them, when
    nothing between the start and the end could tell: the tracer is enabled
    and records no metrics of its own, its sampler does not look at the
    span's attributes, its processors are the SDK's exporting ones (nothing
    in `on_start`), and its limits cut nothing. None otherwise (the caller
    goes through the public API). Uses the SDK's private fields
    (opentelemetry-sdk 1.x), falling back when they change. Tested against
    the public API's result, field by field and in OTLP
    (tests/test_engine_fast_paths.py)."""
    try:
        processor = tracer.span_processor
        limits = tracer._span_limits
        setup = (tracer.sampler, processor, processor._span_processors, limits,
                 tracer._tracer_config, tracer._tracer_metrics)
        known = _direct_setups.get(tracer)
        if known is None or known[0] != setup:
            known = _direct_setups[tracer] = (setup, _can_record_directly(tracer))
        if not known[1] or not _within_limits(final, limits):
            return None
        scope = tracer._instrumentation_scope
        info = tracer.instrumentation_info
    except (AttributeError, TypeError):  # another SDK version's internals
        return None
    parent = None
    context = _EMPTY_CONTEXT
    if final.parent_span_id is not None:
        context = parent_context(final.trace_id, final.parent_span_id)
        parent = trace.get_current_span(context).get_span_context()
    sampling = tracer.sampler.should_sample(context, final.trace_id, final.name, final.kind,
                                            None, ())
    decision = sampling.decision
    if not decision.is_recording():
        return False
    if sampling.attributes:  # (the SDK's samplers that ignore attributes add none)
        return None
    attributes = BoundedAttributes(limits.max_span_attributes, immutable=True)
    _store(attributes._dict, final.attributes)
    events = BoundedList(limits.max_events)
    for event in final.events:
        events.append(SdkEvent(event.name, _frozen(event.attributes, limits.max_event_attributes),
                               event.time_unix_nano))
    links = BoundedList(limits.max_links)
    for link in final.links:
        links.append(Link(SpanContext(link.trace_id, link.span_id, is_remote=True,
                                      trace_flags=TraceFlags(link.trace_flags)),
                          _frozen(link.attributes, limits.max_link_attributes)))
    flags = _SAMPLED if decision.is_sampled() else _NOT_SAMPLED
    status = (Status(final.status_code, final.status_message or None)
              if final.status_code is not StatusCode.UNSET else _UNSET)
    processor.on_end(ReadableSpan(
        name=final.name,
        context=SpanContext(final.trace_id, final.span_id, is_remote=False,
                            trace_flags=flags, trace_state=sampling.trace_state),
        parent=parent, resource=tracer.resource, attributes=attributes, events=events,
        links=links, kind=final.kind, instrumentation_info=info, status=status,
        start_time=final.start_time_unix_nano, end_time=final.end_time_unix_nano,
        instrumentation_scope=scope))
    return True


def _can_record_directly(tracer: SdkTracer) -> bool:
    """Whether the tracer's set-up lets `_record_directly` make its spans."""
    processor = tracer.span_processor
    return (type(tracer) is SdkTracer and tracer._is_enabled()
            and type(tracer._tracer_metrics).__name__ == "NoOpTracerMetrics"
            and type(processor) is SynchronousMultiSpanProcessor
            and all(type(p) in _END_ONLY_PROCESSORS for p in processor._span_processors)
            and sampler_ignores_attributes(tracer.sampler))


# tracer -> (what its verdict was made from, the verdict); made again when any
# of it changes (a processor added, another sampler or limits)
_direct_setups: "weakref.WeakKeyDictionary[SdkTracer, tuple[tuple, bool]]" = (
    weakref.WeakKeyDictionary())


def _within_limits(final: Span, limits: Any) -> bool:
    """Whether the SDK would keep every attribute, event and link of `final`
    as it is: no length limit, room for all, no empty key."""
    if limits.max_span_attribute_length is not None or limits.max_attribute_length is not None:
        return False
    if not (_room(limits.max_span_attributes, len(final.attributes))
            and _room(limits.max_events, len(final.events))
            and _room(limits.max_links, len(final.links))) or "" in final.attributes:
        return False
    most = limits.max_event_attributes
    for event in final.events:
        if "" in event.attributes or not _room(most, len(event.attributes)):
            return False
    most = limits.max_link_attributes
    for link in final.links:
        if "" in link.attributes or not _room(most, len(link.attributes)):
            return False
    return True


def _room(most: Optional[int], count: int) -> bool:
    return most is None or count <= most


_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
