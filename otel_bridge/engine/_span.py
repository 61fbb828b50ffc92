"""The forward bridge's span of a run whose events a `TaskRunEventBuilder`
made, without redoing what the builder already knows.

`run_span` takes events from anywhere: it orders them, finds the run's place
in its trace, and serialises each event's related resources and payload. For
a tracker's own events most of that is known: they are in order when their
times never go back (their `follows` chain is the order they were made in),
the place is the tracker's, and the builder has the JSON. `built_run_span`
uses that and the bridge's own functions for the rest, so it gives exactly
`run_span(events)`; where its shortcut does not hold it says so (None) and
the caller uses `run_span`. Tests compare the two on any state sequence.
"""

from __future__ import annotations

from typing import Optional, Sequence

from otel_bridge.model.events import Event
from otel_bridge.model.spans import Span, SpanEvent
from otel_bridge.translate.forward import (
    ATTR_EVENT_FOLLOWS,
    ATTR_EVENT_ID,
    ATTR_EVENT_PAYLOAD,
    ATTR_RELATED,
    RunKey,
    _outcome,
    _prefect_traceparent,
    _run_attributes,
    prefect_links,
    span_bounds,
    to_unix_nano,
)
from otel_bridge.translate.task_run_events import TaskRunEventBuilder



def built_run_span(
    builder: TaskRunEventBuilder, key: RunKey, trace_id: int,
    parent_span_id: Optional[int], span_id: int,
) -> Optional[Span]:
    """`run_span(builder.events)` (default options), given the run's place
    (`placement` of its first event) and span id; None when the events are
    not in the order they were made in, or the builder did not keep their
    JSON."""
    events = builder.events
    if not builder.related_json or len(builder.payload_json) != len(events):
        return None
    return ordered_run_span(events, builder.payload_json,
                            [builder.related_json] * len(events),
                            key, trace_id, parent_span_id, span_id)


def ordered_run_span(
    events: Sequence[Event], payload_json: Sequence[bytes], related_json: Sequence[bytes],
    key: RunKey, trace_id: int, parent_span_id: Optional[int], span_id: int,
) -> Optional[Span]:
    """`run_span(events)` (default options) for one run's events, given each
    one's payload and related resources as compact JSON, the run's place
    (`placement`) and span id; None unless the events are already in
    `order_events`' order: their times never go back, events at the same
    time follow each other, no id repeats."""
    if not events:
        return None
    for a, b in zip(events, events[1:]):
        if b.occurred < a.occurred or (b.occurred == a.occurred and b.follows != a.id):
            return None  # run_span would sort them
    ids = [str(e.id) for e in events]
    if len(set(ids)) != len(ids):
        return None

    start, end, last, synthetic = span_bounds(events)
    start_ns = to_unix_nano(start.occurred)
    end_ns = max(start_ns, to_unix_nano(last.occurred))

    prefect_context = _prefect_traceparent(events)
    links = prefect_links(prefect_context, span_id)

    status_code, status_message, result, error_type = _outcome(end)
    attributes = _run_attributes(key, last, events, result, error_type)
    attributes.update(synthetic)

    span_events = []
    previous = previous_id = related_text = related = None
    for event, event_id, payload, event_related in zip(events, ids, payload_json, related_json):
        if event_related is not related:
            related, related_text = event_related, event_related.decode()
        event_attributes = {ATTR_EVENT_ID: event_id}
        if event.follows is not None:
            event_attributes[ATTR_EVENT_FOLLOWS] = (
                previous_id if previous is not None and event.follows == previous.id
                else str(event.follows))
        event_attributes.update(event.resource)
        event_attributes[ATTR_RELATED] = related_text
        event_attributes[ATTR_EVENT_PAYLOAD] = payload.decode()
        span_events.append(SpanEvent(event.event, to_unix_nano(event.occurred),
                                     event_attributes))
        previous, previous_id = event, event_id

    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent_span_id,
        name=last.resource.get("prefect.resource.name") or key.resource_id,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=end_ns,
        attributes=attributes,
        events=tuple(span_events),
        links=links,
        status_code=status_code,
        status_message=status_message,
    )
