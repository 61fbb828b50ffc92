"""Plain spans -> the OpenTelemetry SDK's `ReadableSpan`, the form the official
exporters and encoders take; and the OTel resource the bridge reports as."""

from __future__ import annotations

import os
from typing import Iterable

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import Event as SdkEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, Status, TraceFlags

from otel_bridge._version import __version__
from otel_bridge.model.spans import Span

__all__ = ["DEFAULT_SERVICE_NAME", "SCOPE", "resource_from_env", "to_readable_span", "to_readable_spans"]

DEFAULT_SERVICE_NAME = "prefect"
SCOPE = InstrumentationScope("otel_bridge", __version__)


def resource_from_env() -> Resource:
    """The SDK's resource (`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME`),
    with `service.name` = "prefect" unless the user set one.

    The SDK's random per-process `service.instance.id` is left out unless the
    user sets one: the spans describe Prefect's runs, not this process, and
    two replicas must send the same span id with the same content."""
    user = OTELResourceDetector().detect().attributes
    attributes = dict(Resource.create({}).attributes)
    if "service.instance.id" not in user:
        attributes.pop("service.instance.id", None)
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name" not in user:
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    return Resource(attributes)


def to_readable_span(span: Span, resource: Resource) -> ReadableSpan:
    sampled = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(span.trace_id, span.span_id, is_remote=False, trace_flags=sampled)
    parent = (
        SpanContext(span.trace_id, span.parent_span_id, is_remote=False, trace_flags=sampled)
        if span.parent_span_id
        else None
    )
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=dict(span.attributes),
        events=[
            SdkEvent(e.name, attributes=dict(e.attributes), timestamp=e.time_unix_nano)
            for e in span.events
        ],
        links=[
            Link(
                SpanContext(
                    link.trace_id,
                    link.span_id,
                    is_remote=True,
                    trace_flags=TraceFlags(link.trace_flags),
                ),
                attributes=dict(link.attributes),
            )
            for link in span.links
        ],
        kind=span.kind,
        status=Status(span.status_code, span.status_message or None),
        start_time=span.start_time_unix_nano,
        end_time=span.end_time_unix_nano,
        instrumentation_scope=SCOPE,
    )


def to_readable_spans(spans: Iterable[Span], resource: Resource) -> list[ReadableSpan]:
    return [to_readable_span(span, resource) for span in spans]
