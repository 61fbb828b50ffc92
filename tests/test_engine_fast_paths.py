"""The shortcuts dual emission takes for speed give exactly what the general
code gives: the builder's unvalidated events, the ordered span, the SDK span
filled directly."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanLimits, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_bridge.engine import FlowRunRef, StateType, TaskRunTracker
from otel_bridge.engine import _tracing
from otel_bridge.engine._span import ordered_run_span
from otel_bridge.model.events import EventRejected, validate_event
from otel_bridge.translate.forward import TASK_RUN, RunKey, _json, placement, run_span
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
def test_built_events_are_what_validation_makes_and_the_ordered_span_is_run_span(
        sequence, nested):
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
    # what the forward bridge writes on the span events
    assert builder.payload_json == [_json(e.payload).encode() for e in builder.events]
    assert all(builder.related_json == _json(e.related).encode() for e in builder.events)
    key = RunKey(TASK_RUN, run.resource_id)
    trace_id, parent = placement(key, builder.events)
    span = ordered_run_span(builder.events, builder.payload_json,
                            [builder.related_json] * len(builder.events), key, trace_id, parent,
                            span_id_for(run.resource_id))
    ordered = [e.occurred for e in builder.events] == sorted(e.occurred for e in builder.events)
    if ordered:
        assert span == run_span(builder.events)
    else:
        assert span is None


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


def _telemetry(limits=None):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=limits) if limits else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _workload(provider):
    """The same runs every time: ids and clock fixed."""
    counter = iter(range(1, 1000))
    ids = lambda: UUID(int=next(counter))  # noqa: E731
    ticks = iter(range(1000))
    clock = lambda: T0 + timedelta(milliseconds=next(ticks))  # noqa: E731
    with TaskRunTracker("extract", flow_run=FLOW_RUN, tags=["etl", "daily"], clock=clock,
                        id_factory=ids, tracer_provider=provider) as run:
        run.set_state("RUNNING", "Retrying", "Task run encountered an exception E: x")
    with pytest.raises(ValueError):
        with TaskRunTracker("validate", flow_run=FLOW_RUN, tracer_provider=provider,
                            clock=clock, id_factory=ids, labels={
                "__OTEL_TRACEPARENT": "00-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174-01"}):
            raise ValueError("bad " * 400)


def _otlp(spans):
    return [encode_spans([s]).resource_spans[0].scope_spans[0].spans[0] for s in spans]


def test_the_directly_filled_sdk_span_is_the_public_apis(monkeypatch):
    provider, fast = _telemetry()
    used = []
    original = _tracing._fill_directly
    monkeypatch.setattr(_tracing, "_fill_directly",
                        lambda *args: used.append(original(*args)) or used[-1])
    _workload(provider)
    assert used == [True, True]

    monkeypatch.setattr(_tracing, "_fill_directly", lambda *args: False)
    provider, public = _telemetry()
    _workload(provider)
    fast_spans, public_spans = fast.get_finished_spans(), public.get_finished_spans()
    assert _otlp(fast_spans) == _otlp(public_spans)
    for a, b in zip(fast_spans, public_spans):
        assert dict(a.attributes) == dict(b.attributes)
        assert [(e.name, dict(e.attributes), e.dropped_attributes) for e in a.events] == \
            [(e.name, dict(e.attributes), e.dropped_attributes) for e in b.events]


def test_limits_that_would_cut_anything_take_the_public_api(monkeypatch):
    used = []
    original = _tracing._fill_directly
    monkeypatch.setattr(_tracing, "_fill_directly",
                        lambda *args: used.append(original(*args)) or used[-1])
    provider, exporter = _telemetry(SpanLimits(max_attribute_length=100))
    _workload(provider)
    assert used == [False, False]
    (_, validate) = exporter.get_finished_spans()
    assert len(validate.status.description) > 100
    assert all(len(v) <= 100 for v in validate.attributes.values() if isinstance(v, str))
    used.clear()
    provider, exporter = _telemetry(SpanLimits(max_span_attributes=5))
    _workload(provider)
    assert used == [False, False]
    assert all(len(s.attributes) == 5 for s in exporter.get_finished_spans())


def _finished_spans():
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


def _sdk_fields(span):
    """Everything a ReadableSpan tells its exporters."""
    return (span.name, span.context, span.parent, span.resource, span.kind,
            list(span.attributes.items()), span.dropped_attributes,
            [(e.name, e.timestamp, list(e.attributes.items()), e.dropped_attributes)
             for e in span.events], span.dropped_events,
            [(link.context, list(link.attributes.items()), link.dropped_attributes)
             for link in span.links], span.dropped_links,
            span.status.status_code, span.status.description, span.start_time, span.end_time,
            span.instrumentation_scope)


_RECORD_ONLY = sampling.StaticSampler(sampling.Decision.RECORD_ONLY)


@pytest.mark.parametrize("sampler", [
    sampling.ALWAYS_ON, sampling.ParentBased(sampling.ALWAYS_ON),
    sampling.TraceIdRatioBased(0.5), _RECORD_ONLY, sampling.ALWAYS_OFF,
])
def test_a_span_recorded_directly_is_the_one_the_public_api_records(monkeypatch, sampler):
    spans = _finished_spans()

    def record(direct):
        provider = TracerProvider(sampler=sampler)
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        seen = []  # every ReadableSpan the processors get, sampled or not
        provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
        provider._active_span_processor._span_processors[-1].on_end = seen.append
        used = []
        original = _tracing._record_directly
        monkeypatch.setattr(_tracing, "_record_directly", lambda *args: used.append(
            original(*args) if direct else None) or used[-1])
        recorded = [_tracing.record_span(_tracing.bridge_tracer(provider), s) for s in spans]
        return recorded, used, exporter.get_finished_spans(), seen

    recorded, used, exported, seen = record(direct=True)
    assert used == recorded and None not in used  # every span took the direct path
    public_recorded, _, public_exported, public_seen = record(direct=False)
    assert recorded == public_recorded
    assert [_sdk_fields(s) for s in seen] == [_sdk_fields(s) for s in public_seen]
    assert _otlp(exported) == _otlp(public_exported)
    if sampler is sampling.ALWAYS_OFF:
        expected = [False] * 4
    elif isinstance(sampler, sampling.TraceIdRatioBased):  # by each trace id
        expected = [s.trace_id & sampler.TRACE_ID_LIMIT < sampler.bound for s in spans]
        assert True in expected and False in expected
    else:
        expected = [True] * 4
    assert recorded == expected and len(seen) == sum(expected)
    sampled = sampler is not _RECORD_ONLY
    assert [s.context.trace_flags.sampled for s in seen] == [sampled] * len(seen)
    assert len(exported) == (len(seen) if sampled else 0)


def test_what_the_direct_recording_cannot_vouch_for_takes_the_public_api(monkeypatch):
    span = _finished_spans()[1]
    used = []
    original = _tracing._record_directly
    monkeypatch.setattr(_tracing, "_record_directly",
                        lambda *args: used.append(original(*args)) or used[-1])

    class OnStart(SimpleSpanProcessor):
        def on_start(self, span, parent_context=None):
            span.set_attribute("seen", True)

    cases = [TracerProvider(span_limits=SpanLimits(max_span_attributes=5)),
             TracerProvider(span_limits=SpanLimits(max_attribute_length=40)),
             TracerProvider(span_limits=SpanLimits(max_event_attributes=3)),
             TracerProvider(sampler=sampling.ParentBased(_AttributeSampler()))]
    for provider in cases:
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    exporter = InMemorySpanExporter()
    with_on_start = TracerProvider()
    with_on_start.add_span_processor(OnStart(exporter))
    cases.append(with_on_start)
    for provider in cases:
        assert _tracing.record_span(_tracing.bridge_tracer(provider), span)
    assert used == [None] * len(cases)
    assert exporter.get_finished_spans()[0].attributes["seen"] is True

    # a processor added after the first span: the next one sees it start
    used.clear()
    later = TracerProvider()
    later.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert _tracing.record_span(_tracing.bridge_tracer(later), span)
    later.add_span_processor(OnStart(exporter))
    assert _tracing.record_span(_tracing.bridge_tracer(later), span)
    assert used == [True, None]
    assert exporter.get_finished_spans()[-1].attributes["seen"] is True


class _AttributeSampler(sampling.Sampler):
    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None):
        return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self):
        return "looks"


# forward._run_attributes as it was before it was made faster, kept as the
# reference the faster one must equal, key order included.
def _reference_run_attributes(key, last, events, result, error_type):
    import re

    from otel_bridge.translate.forward import (
        FLOW_RUN as FLOW,
        MAX_SPAN_ATTRIBUTE_CHARS,
        _task_run_metadata,
    )

    attributes = {}
    for label, value in last.resource.items():
        if len(value) > MAX_SPAN_ATTRIBUTE_CHARS:
            attributes[f"otel_bridge.truncated.{label}"] = len(value)
            value = value[: MAX_SPAN_ATTRIBUTE_CHARS - 3] + "..."
        attributes[label] = value
    run_id = key.resource_id.removeprefix(f"prefect.{key.kind}.")
    attributes["prefect.run.type"] = "task" if key.kind == TASK_RUN else "flow"
    attributes["prefect.run.id"] = run_id
    if "prefect.resource.name" in last.resource:
        attributes["prefect.run.name"] = last.resource["prefect.resource.name"]
    tags = sorted({r["prefect.resource.id"].removeprefix("prefect.tag.")
                   for r in last.related if r.get("prefect.resource.role") == "tag"})
    if tags:
        attributes["prefect.tags"] = tags
    for related in last.related:
        role = related["prefect.resource.role"]
        if role == "tag" or f"prefect.related.{role}.id" in attributes:
            continue
        attributes[f"prefect.related.{role}.id"] = related["prefect.resource.id"]
        if related.get("prefect.resource.name"):
            attributes[f"prefect.related.{role}.name"] = related["prefect.resource.name"]
    flow = last.related_in_role("flow")
    if key.kind == TASK_RUN:
        attributes.update(_task_run_metadata(events))
        task_key = attributes.get("prefect.task.key")
        if isinstance(task_key, str):
            attributes["cicd.pipeline.task.name"] = re.sub(r"-[0-9a-f]{8}$", "", task_key)
        attributes["cicd.pipeline.task.run.id"] = run_id
        if result:
            attributes["cicd.pipeline.task.run.result"] = result
        flow_run = last.related_in_role(FLOW)
        if flow_run:
            attributes["cicd.pipeline.run.id"] = flow_run["prefect.resource.id"].removeprefix(
                f"prefect.{FLOW}.")
    else:
        attributes["cicd.pipeline.run.id"] = run_id
        if result:
            attributes["cicd.pipeline.result"] = result
    if flow and flow.get("prefect.resource.name"):
        attributes["cicd.pipeline.name"] = flow["prefect.resource.name"]
    if error_type:
        attributes["error.type"] = error_type
    return attributes


_roles = st.sampled_from(["tag", "flow", "flow-run", "deployment", "task-run", "work-pool"])
_labels = st.fixed_dictionaries(
    {"prefect.resource.id": st.sampled_from(["prefect.tag.a", "prefect.tag.b",
                                             "prefect.flow.x", "prefect.flow-run.y", "z"]),
     "prefect.resource.role": _roles},
    optional={"prefect.resource.name": st.sampled_from(["", "n", "m"])})
_extra_labels = st.dictionaries(
    st.sampled_from(["prefect.related.flow.id", "prefect.run.name", "prefect.tags",
                     "prefect.task.key", "x"]),
    st.text(max_size=3) | st.just("q" * 1500), max_size=3)


@given(st.sampled_from(["task-run", "flow-run"]), st.lists(_labels, max_size=6),
       _extra_labels, st.booleans(), st.sampled_from([None, "success", "failure"]),
       st.sampled_from([None, "ValueError"]), st.text(max_size=4) | st.just("m" * 1100))
@settings(max_examples=300, deadline=None)
def test_run_attributes_equal_the_reference(kind, related, extra, named, result, error_type,
                                            message):
    from otel_bridge.translate.forward import _run_attributes

    resource_id = f"prefect.{kind}.{uuid4()}"
    resource = {"prefect.resource.id": resource_id, "prefect.state-message": message,
                "prefect.state-type": "COMPLETED", **extra}
    if named:
        resource["prefect.resource.name"] = "load-1ab"
    event = validate_event({"occurred": T0, "event": f"prefect.{kind}.Completed",
                            "resource": resource, "related": related, "id": uuid4(),
                            "payload": {"task_run": {"task_key": "load-0123abcd",
                                                     "dynamic_key": "0", "total_run_time": 1,
                                                     "empirical_policy": {"retries": 2}}}})
    key = RunKey(kind, resource_id)
    got = _run_attributes(key, event, [event], result, error_type)
    want = _reference_run_attributes(key, event, [event], result, error_type)
    assert list(got.items()) == list(want.items())
