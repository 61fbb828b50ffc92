"""Dual emission's engine side: the events the builder makes without
validating them are exactly what validation makes, and the run's span goes
to the SDK through its public API only (so the SDK's limits, samplers and
span processors apply to it as to any span), with otel-bridge's ids."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_bridge.engine import FlowRunRef, StateType, TaskRunTracker
from otel_bridge.engine import _tracing
from otel_bridge.model.events import EventRejected, validate_event
from otel_bridge.translate.forward import run_span
from otel_bridge.translate.ids import span_id_for
from otel_bridge.translate.task_run_events import StateRecord, TaskRunEventBuilder, TaskRunRecord

FLOW_RUN = FlowRunRef(id=UUID("0f0e0d0c-0b0a-4908-8706-050403020100"), name="brave-otter",
                      flow_name="etl", flow_id=UUID("11111111-2222-4333-8444-555555555555"))
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
STATES = [(StateType.PENDING, "Pending"), (StateType.RUNNING, "Running"),
          (StateType.RUNNING, "Retrying"), (StateType.SCHEDULED, "AwaitingRetry"),
          (StateType.COMPLETED, "Completed"), (StateType.FAILED, "Failed"),
          (StateType.CRASHED, "Crashed"), (StateType.PENDING, "NotReady"),
          (StateType.COMPLETED, "RolledBack")]
ZONES = [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-7))]

steps = st.lists(st.tuples(st.sampled_from(STATES), st.integers(-2_000_000, 5_000_000),
                           st.sampled_from(ZONES), st.text(max_size=30)),
                 min_size=1, max_size=7)


def record(**overrides) -> TaskRunRecord:
    fields = dict(id=uuid4(), name="load-1ab", task_key="load-0123abcd", dynamic_key="0",
                  tags=["b", "a"], labels={"__OTEL_TRACEPARENT":
                                           "00-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174-01"},
                  task_inputs={"__parents__": [{"input_type": "task_run", "id": str(uuid4())}]},
                  flow_run_run_count=1, expected_start_time=T0,
                  context=FLOW_RUN.related())
    fields.update(overrides)
    return TaskRunRecord(**fields)


@given(steps, st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_built_events_are_what_validation_makes(sequence, nested):
    run = record() if nested else record(task_inputs={}, labels={})
    builder = TaskRunEventBuilder(run)
    when = T0
    for (kind, name), micros, zone, message in sequence:
        when += timedelta(microseconds=micros)
        builder.add(StateRecord(kind, name, when.astimezone(zone), uuid4(), message))
    for event in builder.events:
        wire = json.loads(event.model_dump_json())
        validated = validate_event(dict(event.__dict__))
        assert event == validated and event.model_dump_json() == validated.model_dump_json()
        assert validate_event(wire) == event


def test_events_the_builder_cannot_vouch_for_are_validated():
    # a naive timestamp: validation makes it UTC
    naive = TaskRunEventBuilder(record()).add(
        StateRecord(StateType.PENDING, "Pending", T0.replace(tzinfo=None), uuid4()))
    assert naive.occurred == T0
    # a related resource with no id: rejected as validate_event rejects it
    with pytest.raises(EventRejected):
        TaskRunEventBuilder(record(context=[{"prefect.resource.role": "flow-run"}])).add(
            StateRecord(StateType.PENDING, "Pending", T0, uuid4()))
    # a state name too long for an event name
    with pytest.raises(EventRejected):
        TaskRunEventBuilder(record()).add(StateRecord(StateType.PENDING, "x" * 1100, T0, uuid4()))
    # too large: the bound sends it to the exact check, which rejects it
    with pytest.raises(EventRejected, match="too_large"):
        TaskRunEventBuilder(record(labels={"big": "y" * 1_600_000})).add(
            StateRecord(StateType.PENDING, "Pending", T0, uuid4()))
    # a long message is still cut as Prefect cuts it
    event = TaskRunEventBuilder(record()).add(
        StateRecord(StateType.FAILED, "Failed", T0, uuid4(), "z" * 150_000))
    assert "additional characters" in event.resource["prefect.state-message"]


def _telemetry(limits=None, sampler=None, processor=None):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**{k: v for k, v in (("span_limits", limits),
                                                   ("sampler", sampler)) if v})
    if processor is not None:
        provider.add_span_processor(processor)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _finals():
    """Spans of every shape the bridge makes: nested with a link (Prefect's
    own traceparent), failed with a long message, a root with no flow run,
    and one with no Running state (marked synthetic)."""
    counter = iter(range(1, 1000))
    ids = lambda: UUID(int=next(counter))  # noqa: E731
    ticks = iter(range(1000))
    clock = lambda: T0 + timedelta(milliseconds=next(ticks))  # noqa: E731
    out = []
    for flow_run, steps, labels in (
        (FLOW_RUN, [("PENDING", "Pending", ""), ("RUNNING", "Running", ""),
                    ("COMPLETED", "Completed", "")],
         {"__OTEL_TRACEPARENT": "00-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174-01"}),
        (FLOW_RUN, [("PENDING", "Pending", ""), ("RUNNING", "Running", ""),
                    ("FAILED", "Failed", "Task run encountered an exception E: " + "é" * 2000)],
         {}),
        (None, [("RUNNING", "Running", ""), ("COMPLETED", "Completed", "")], {}),
        (FLOW_RUN, [("PENDING", "NotReady", "")], {}),
    ):
        tracker = TaskRunTracker("load", flow_run=flow_run, tags=["b", "a"], clock=clock,
                                 id_factory=ids, labels=labels,
                                 tracer_provider=trace.NoOpTracerProvider())
        for kind, name, message in steps:
            tracker.set_state(kind, name, message)
        out.append(run_span(tracker.events))
    assert out[0].links and out[1].status_message and out[2].parent_span_id is None
    assert "otel_bridge.synthetic.start" in out[3].attributes
    return out


def _fields(span):
    """What the SDK's span says, in a form to compare with the bridge's."""
    plain = lambda attrs: {k: list(v) if isinstance(v, tuple) else v  # noqa: E731
                           for k, v in dict(attrs).items()}
    return (span.name, span.context.trace_id, span.context.span_id,
            span.parent.span_id if span.parent else None, span.kind,
            plain(span.attributes),
            [(e.name, e.timestamp, plain(e.attributes)) for e in span.events],
            [(link.context.trace_id, link.context.span_id, plain(link.attributes))
             for link in span.links],
            span.status.status_code, span.status.description or "",
            span.start_time, span.end_time)


def _bridge_fields(final):
    return (final.name, final.trace_id, final.span_id, final.parent_span_id, final.kind,
            dict(final.attributes),
            [(e.name, e.time_unix_nano, dict(e.attributes)) for e in final.events],
            [(link.trace_id, link.span_id, dict(link.attributes)) for link in final.links],
            final.status_code, final.status_message, final.start_time_unix_nano,
            final.end_time_unix_nano)


def test_a_recorded_span_is_the_bridges_span_with_its_ids():
    finals = _finals()
    provider, exporter = _telemetry()
    found = _tracing.bridge_tracer(provider)
    assert all(_tracing.record_span(found, final) for final in finals)
    assert [_fields(s) for s in exporter.get_finished_spans()] == [
        _bridge_fields(f) for f in finals]
    # the tracer hands out otel-bridge's ids only for the run's span: other
    # spans of the same tracer keep random ones
    other = found[0].start_span("user")
    assert other.get_span_context().span_id not in {f.span_id for f in finals}


class _Looking(sampling.Sampler):
    """A sampler that decides on the attributes and links it is given."""

    def __init__(self):
        self.seen = []

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None):
        self.seen.append((name, dict(attributes or {}), len(links or ())))
        decision = (sampling.Decision.DROP if (attributes or {}).get("error.type")
                    else sampling.Decision.RECORD_AND_SAMPLE)
        return sampling.SamplingResult(decision, attributes)

    def get_description(self):
        return "looks"


def test_a_sampler_sees_the_runs_attributes_and_links_when_its_span_is_recorded():
    finals = _finals()
    looking = _Looking()
    provider, exporter = _telemetry(sampler=looking)
    found = _tracing.bridge_tracer(provider)
    recorded = [_tracing.record_span(found, final) for final in finals]
    assert recorded == [True, False, True, True]  # the failed run dropped by its error.type
    assert [seen for seen in looking.seen] == [
        (f.name, dict(f.attributes), len(f.links)) for f in finals]
    assert [s.context.span_id for s in exporter.get_finished_spans()] == [
        f.span_id for f, kept in zip(finals, recorded) if kept]


class _TagsOnStart(SpanProcessor):
    def on_start(self, span, parent_context=None):
        span.set_attribute("team", "data")


def test_the_sdks_limits_and_span_processors_apply_to_the_runs_span():
    finals = _finals()
    provider, exporter = _telemetry(SpanLimits(max_attribute_length=40, max_span_attributes=12),
                                    processor=_TagsOnStart())
    found = _tracing.bridge_tracer(provider)
    assert all(_tracing.record_span(found, final) for final in finals)
    failed = exporter.get_finished_spans()[1]
    assert len(failed.status.description) > 40  # the status is not an attribute
    assert all(len(v) <= 40 for v in failed.attributes.values() if isinstance(v, str))
    assert all(len(v) <= 40 for e in failed.events for v in e.attributes.values())
    for span, final in zip(exporter.get_finished_spans(), finals):
        assert len(span.attributes) == 12 and span.attributes["team"] == "data"
        assert span.dropped_attributes == len(final.attributes) + 1 - 12

    # a live span (TaskRunTracker) gets the same
    provider, exporter = _telemetry(SpanLimits(max_attribute_length=40), processor=_TagsOnStart())
    with pytest.raises(ValueError):
        with TaskRunTracker("validate", flow_run=FLOW_RUN, tracer_provider=provider):
            raise ValueError("bad " * 400)
    (span,) = exporter.get_finished_spans()
    assert span.attributes["team"] == "data" and span.attributes["error.type"] == "ValueError"
    assert all(len(v) <= 40 for v in span.attributes.values() if isinstance(v, str))


def test_a_span_without_otel_bridges_ids_is_said_once(monkeypatch, caplog):
    """Should an SDK stop asking the tracer's id generator, the spans lose
    the ids the sidecar gives the same runs: said once, not per span."""
    monkeypatch.setattr(_tracing, "_warned_ids", False)
    provider, exporter = _telemetry()
    found = _tracing.bridge_tracer(provider)
    monkeypatch.setattr(type(found[1]), "_ids", lambda self: None)  # ids of its own
    with caplog.at_level(logging.WARNING, logger="otel_bridge.engine"):
        for final in _finals():
            assert _tracing.record_span(found, final)
        with TaskRunTracker("extract", flow_run=FLOW_RUN, tracer_provider=provider) as run:
            pass
    spans = exporter.get_finished_spans()
    assert len(spans) == 5 and span_id_for(run.resource_id) not in {
        s.context.span_id for s in spans}
    warnings = [r for r in caplog.records if "did not give a run's span" in r.message]
    assert len(warnings) == 1
