"""The shortcuts `otel_bridge.engine.prefect` takes for speed give exactly
what the general code gives: Prefect's events read without validation, the
span's attributes set after its start when the sampler does not look at
them. No Prefect server: the events are the ones Prefect's engine would send,
as Prefect's own `Event` objects, handed to the bridge as its events worker
hook hands them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("prefect")

from opentelemetry import baggage, propagate  # noqa: E402
from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry.baggage.propagation import W3CBaggagePropagator  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.propagators.composite import CompositePropagator  # noqa: E402
from opentelemetry.propagators.textmap import TextMapPropagator  # noqa: E402
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace import sampling  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import NoOpTracerProvider, SpanContext, TraceFlags  # noqa: E402
from opentelemetry.trace.propagation.tracecontext import (  # noqa: E402
    TraceContextTextMapPropagator,
)
from prefect.client.schemas.objects import TaskRun  # noqa: E402
from prefect.events.schemas.events import Event as PrefectEvent  # noqa: E402
from prefect.states import Completed, Failed, Pending, Running  # noqa: E402
from prefect.telemetry.run_telemetry import RunTelemetry  # noqa: E402

import otel_bridge.engine.prefect as bridge  # noqa: E402
from otel_bridge.engine import FlowRunRef, TaskRunTracker  # noqa: E402
from otel_bridge.engine import _prefect_events, _tracing  # noqa: E402
from otel_bridge.model.events import EventRejected, parse_wire_event  # noqa: E402
from otel_bridge.translate.forward import TASK_RUN, RunKey, _json, run_span  # noqa: E402
from otel_bridge.translate.ids import span_id_for  # noqa: E402

FLOW_RUN = FlowRunRef(id=UUID("0f0e0d0c-0b0a-4908-8706-050403020100"), name="brave-otter",
                      flow_name="etl", flow_id=UUID("11111111-2222-4333-8444-555555555555"))
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def _runs():
    """Two task runs as Prefect's engine would report them: (TaskRun, its
    sent events as Prefect's Event objects, its states)."""
    counter = iter(range(1, 1000))
    ids = lambda: UUID(int=next(counter))  # noqa: E731
    ticks = iter(range(1000))
    clock = lambda: T0 + timedelta(milliseconds=next(ticks))  # noqa: E731
    out = []
    for name, steps in (
        ("extract", [("PENDING", "Pending", ""), ("RUNNING", "Running", ""),
                     ("COMPLETED", "Completed", "")]),
        ("validate", [("PENDING", "Pending", ""), ("RUNNING", "Running", ""),
                      ("RUNNING", "Retrying", "Task run encountered an exception E: x"),
                      ("FAILED", "Failed", "Task run encountered an exception ValueError: "
                       + "bad é " * 300)]),
    ):
        tracker = TaskRunTracker(name, flow_run=FLOW_RUN, tags=["etl", "daily"], clock=clock,
                                 id_factory=ids, tracer_provider=NoOpTracerProvider())
        for kind, state_name, message in steps:
            tracker.set_state(kind, state_name, message)
        sent = [PrefectEvent.model_validate(e.to_json_dict()) for e in tracker.events]
        task_run = TaskRun(id=tracker.id, name=tracker.name, task_key=tracker.record.task_key,
                           dynamic_key=tracker.record.dynamic_key, flow_run_id=FLOW_RUN.id,
                           tags=["etl", "daily"])
        out.append((task_run, sent, len(steps)))
    return out


def test_prefect_events_read_directly_are_what_parsing_their_json_gives():
    for _, sent, _ in _runs():
        for prefect_event in sent:
            zoned = prefect_event.model_copy(update={
                "occurred": prefect_event.occurred.astimezone(timezone(timedelta(hours=5)))})
            for candidate in (prefect_event, zoned):
                event, payload_json, related_json = _prefect_events.read_prefect(candidate)
                expected = parse_wire_event(candidate.model_dump(mode="json"))
                assert event == expected
                assert event.model_dump_json() == expected.model_dump_json()
                assert event.occurred.tzinfo is timezone.utc and type(event.occurred) is datetime
                assert payload_json == _json(expected.payload).encode()
                assert related_json == _json(expected.related).encode()


def test_prefect_events_the_bridge_cannot_vouch_for_are_validated():
    (_, sent, _), _ = _runs()
    good = sent[0]
    too_long = good.model_copy(update={"event": "prefect.task-run." + "x" * 1100})
    with pytest.raises(EventRejected):
        _prefect_events.read_prefect(too_long)
    huge = good.model_copy(update={"payload": {"blob": "y" * 1_600_000}})
    with pytest.raises(EventRejected, match="too_large"):
        _prefect_events.read_prefect(huge)
    no_role = good.model_copy(update={"related": [type(good.related[0]).model_construct(
        {"prefect.resource.id": "prefect.flow-run.x"})]})
    with pytest.raises(EventRejected):
        _prefect_events.read_prefect(no_role)


class _LooksAtAttributes(sampling.Sampler):
    """Not one of the SDK's own samplers: gets the attributes at the start."""

    def __init__(self):
        self.seen = []

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None):
        self.seen.append(dict(attributes or {}))
        return sampling.ALWAYS_ON.should_sample(parent_context, trace_id, name, kind,
                                                attributes, links)

    def get_description(self):
        return "LooksAtAttributes"


class _TagsOnStart(SpanProcessor):
    """A processor that sets attributes when a span starts, one of them also
    a run attribute."""

    def on_start(self, span, parent_context=None):
        span.set_attribute("team", "data")
        span.set_attribute("prefect.run.type", "overridden")


def _record(sampler=None, on_start=False, limits=None):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**{k: v for k, v in (("sampler", sampler),
                                                   ("span_limits", limits)) if v})
    if on_start:
        provider.add_span_processor(_TagsOnStart())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bridge.enable(provider)
    try:
        for task_run, sent, count in _runs():
            telemetry = RunTelemetry()
            telemetry.start_span(run=task_run, client=None)
            for state in (Pending(), Running(), Completed() if count == 3 else Failed())[:3]:
                telemetry.update_state(state)
            for event in sent:
                bridge._bridge.sent(event)
        assert bridge._bridge.errors == 0 and bridge._bridge.spans_recorded == 2
    finally:
        bridge.disable()
    return exporter.get_finished_spans()


def _otlp(spans):
    return [encode_spans([s]).resource_spans[0].scope_spans[0].spans[0] for s in spans]


@pytest.mark.parametrize("on_start,limits", [
    (False, None), (True, None),
    (True, SpanLimits(max_span_attributes=20)), (False, SpanLimits(max_attribute_length=50)),
])
def test_attributes_set_after_the_start_give_the_span_a_sampler_would_see(on_start, limits):
    assert _tracing.sampler_ignores_attributes(TracerProvider().sampler)
    late = _record(on_start=on_start, limits=limits)
    looking = _LooksAtAttributes()
    assert not _tracing.sampler_ignores_attributes(looking)
    early = _record(looking, on_start=on_start, limits=limits)
    assert len(looking.seen) == 2 and all(len(seen) > 20 for seen in looking.seen)
    assert _otlp(late) == _otlp(early)
    for a, b in zip(late, early):
        assert list(a.attributes.items()) == list(b.attributes.items())
        assert a.dropped_attributes == b.dropped_attributes
    if on_start:
        assert all(s.attributes["prefect.run.type"] == "overridden" for s in late)
    if limits is not None and limits.max_span_attributes == 20:
        assert all(s.dropped_attributes > 0 for s in late)


def test_which_samplers_are_known_to_ignore_attributes():
    ignores = _tracing.sampler_ignores_attributes
    assert ignores(sampling.ALWAYS_ON) and ignores(sampling.ALWAYS_OFF)
    assert ignores(sampling.DEFAULT_ON) and ignores(sampling.DEFAULT_OFF)
    assert ignores(sampling.TraceIdRatioBased(0.5))
    assert ignores(sampling.ParentBasedTraceIdRatio(0.5))
    assert not ignores(sampling.ParentBased(_LooksAtAttributes()))
    assert not ignores(sampling.ParentBased(sampling.ALWAYS_ON,
                                            local_parent_sampled=_LooksAtAttributes()))

    class Sub(sampling.StaticSampler):
        pass

    assert not ignores(Sub(sampling.Decision.RECORD_AND_SAMPLE))


class _OwnTraceparent(TextMapPropagator):
    """A propagator that writes a `traceparent` of its own."""

    def extract(self, carrier, context=None, getter=None):
        return context

    def inject(self, carrier, context=None, setter=None):
        carrier["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-00"

    @property
    def fields(self):
        return {"traceparent"}


@pytest.mark.parametrize("make", [
    lambda default: default,
    lambda default: TraceContextTextMapPropagator(),
    lambda default: CompositePropagator([W3CBaggagePropagator()]),
    lambda default: CompositePropagator([]),
    lambda default: CompositePropagator([TraceContextTextMapPropagator(), _OwnTraceparent()]),
    lambda default: _OwnTraceparent(),
    lambda default: CompositePropagator([default]),
])
def test_the_traceparent_written_directly_is_what_prefect_writes(make):
    default = propagate.get_global_textmap()
    propagate.set_global_textmap(make(default))
    token = otel_context.attach(baggage.set_baggage("team", "data"))
    try:
        (task_run, _, _), _ = _runs()
        for flags in (TraceFlags.SAMPLED, TraceFlags.DEFAULT):
            span = bridge.TaskRunSpan(SpanContext(0xabc << 64, 0xdef, is_remote=False,
                                                  trace_flags=TraceFlags(flags)),
                                      task_run.id, None)
            assert bridge._traceparent(span) == RunTelemetry.traceparent_from_span(span)
        invalid = bridge.TaskRunSpan(SpanContext(0, 0xdef, is_remote=False), task_run.id, None)
        assert bridge._traceparent(invalid) == RunTelemetry.traceparent_from_span(invalid)
    finally:
        otel_context.detach(token)
        propagate.set_global_textmap(default)


_STATES = [("PENDING", "Pending"), ("RUNNING", "Running"), ("RUNNING", "Retrying"),
           ("SCHEDULED", "AwaitingRetry"), ("COMPLETED", "Completed"), ("FAILED", "Failed"),
           ("CRASHED", "Crashed"), ("PENDING", "NotReady"), ("COMPLETED", "RolledBack")]
_TWISTS = ["none", "related", "zone", "naive", "swap", "repeat", "invalid", "foreign label"]


@given(st.lists(st.tuples(st.sampled_from(_STATES), st.integers(0, 3_000_000),
                          st.text(max_size=12)), min_size=1, max_size=6),
       st.booleans(), st.sampled_from(["own", "other", None]), st.sampled_from(_TWISTS),
       st.integers(0, 5))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_span_straight_from_prefects_events_is_the_sidecars(steps, nested, traceparent,
                                                                 twist, where):
    """task_run_span: None, or exactly the span the general way and the
    sidecar (run_span of the events as the server stores them) give."""
    run_id = uuid4()
    resource_id = f"prefect.task-run.{run_id}"
    span_id = span_id_for(resource_id)
    own = f"00-{'ab' * 16}-{span_id:016x}-01"
    label = {"own": own, "other": "00-" + "12" * 16 + "-" + "34" * 8 + "-01"}.get(traceparent)
    now = [T0]
    tracker = TaskRunTracker(
        "load", id=run_id, flow_run=FLOW_RUN, parent=uuid4() if nested else None,
        tags=["etl", "daily"], labels={"__OTEL_TRACEPARENT": label} if label else None,
        clock=lambda: now[0],
        tracer_provider=NoOpTracerProvider())
    for (kind, name), micros, message in steps:
        now[0] += timedelta(microseconds=micros)  # 0: at the same time as the one before
        tracker.set_state(kind, name, message)
    sent = [PrefectEvent.model_validate(e.to_json_dict()) for e in tracker.events]
    at = where % len(sent)
    if twist == "related":  # one event names its related resources in another order
        sent[at] = _related_as(sent[at], [dict(reversed(list(r.root.items())))
                                          for r in sent[at].related])
    elif twist == "zone":
        sent[at] = sent[at].model_copy(update={
            "occurred": sent[at].occurred.astimezone(timezone(timedelta(hours=5)))})
    elif twist == "naive":
        sent[at] = sent[at].model_copy(update={"occurred": datetime(
            *sent[at].occurred.timetuple()[:6], sent[at].occurred.microsecond)})
    elif twist == "swap" and len(sent) > 1:
        sent[at - 1], sent[at] = sent[at], sent[at - 1]
    elif twist == "repeat":
        sent.insert(at, sent[at])
    elif twist == "invalid":  # a related resource with no role: Prefect's server refuses it
        sent[at] = _related_as(sent[at], [{"prefect.resource.id": "prefect.flow-run.x"}])
    elif twist == "foreign label":  # the label names another span than the bridge wrote
        own = own.replace("-01", "-00")
    key = RunKey(TASK_RUN, resource_id)

    short = _prefect_events.task_run_span(sent, key, span_id, own)
    server = []
    for event in sent:  # what the sidecar gets: the events the server accepts
        try:
            server.append(parse_wire_event(event.model_dump(mode="json")))
        except EventRejected:
            continue
    if not server:
        assert short is None
        return
    sidecar = run_span(server)
    reads = []
    for event in sent:
        try:
            reads.append(_prefect_events.read_prefect(event))
        except EventRejected:
            continue
    assert _prefect_events.span_of(key, reads, span_id) == sidecar
    if twist in ("none", "related", "naive", "foreign label"):
        assert short is not None  # the short way is taken where it holds
    if twist in ("invalid", "repeat") or (twist == "zone"):
        assert short is None
    if short is not None:
        assert short == sidecar


def _related_as(event, related):
    return event.model_copy(update={"related": [type(event.related[0]).model_construct(r)
                                                for r in related]})


def test_the_bridge_keeps_what_the_server_keeps_and_waits_for_a_final_state_it_accepts():
    """An event Prefect's server would refuse is set aside (counted), the
    span made from the rest; a refused final state leaves the run open."""
    (task_run, sent, _), (other_run, other_sent, _) = _runs()
    refused = [{"prefect.resource.id": "prefect.flow-run.x"}]  # no role
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bridge.enable(provider)
    try:
        for run in (task_run, other_run):
            RunTelemetry().start_span(run=run, client=None)
        middle = _related_as(sent[1], refused)
        for event in (sent[0], middle, sent[2]):
            bridge._bridge.sent(event)
        assert bridge._bridge.errors == 1 and bridge._bridge.spans_recorded == 1
        (span,) = exporter.get_finished_spans()
        assert [e.attributes["prefect.event.id"] for e in span.events] == [
            str(sent[0].id), str(sent[2].id)]

        for event in other_sent[:-1] + [_related_as(other_sent[-1], refused)]:
            bridge._bridge.sent(event)
        assert bridge._bridge.errors == 2 and bridge._bridge.spans_recorded == 1
        assert bridge.flush() == [other_run.id]  # still open, with its accepted events
        bridge._bridge.sent(other_sent[-1])  # (Prefect sends a state again)
        assert bridge._bridge.spans_recorded == 2
        assert len(exporter.get_finished_spans()[1].events) == len(other_sent)
    finally:
        bridge.disable()


def test_what_the_bridge_knows_to_be_a_task_runs_state_event_is_what_run_key_says():
    from otel_bridge.translate.forward import TASK_RUN, RunKey, run_key

    (_, sent, _), (_, more, _) = _runs()
    checked = 0
    for prefect_event in sent + more:
        event = _prefect_events.read_prefect(prefect_event)[0]
        resource = dict(event.resource)
        variants = [event,
                    event.model_copy(update={"event": "prefect.task-run.heartbeat"}),
                    event.model_copy(update={"event": "prefect.flow-run.Running"}),
                    event.model_copy(update={"resource": {k: v for k, v in resource.items()
                                                          if k != "prefect.state-type"}}),
                    event.model_copy(update={"resource": dict(resource, **{
                        "prefect.state-type": "running"})})]
        for variant in variants:
            if _prefect_events.is_task_run_state(variant.event, variant.resource):
                checked += 1
                assert run_key(variant) == RunKey(TASK_RUN, variant.resource_id)
            else:
                try:
                    key = run_key(variant)
                except EventRejected:
                    continue
                assert key is None or variant is not event
    assert checked > len(sent + more)
