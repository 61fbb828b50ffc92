"""The shortcuts `otel_bridge.engine.prefect` takes for speed give exactly
what the general code gives: Prefect's events read without validation, the
span's attributes set after its start when the sampler does not look at
them. No Prefect server: the events are the ones Prefect's engine would send,
as Prefect's own `Event` objects, handed to the bridge as its events worker
hook hands them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from uuid import UUID

import pytest

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
from otel_bridge.translate.forward import _json  # noqa: E402

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
                event, payload_json, related_json = _prefect_events.from_prefect(candidate)
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
        _prefect_events.from_prefect(too_long)
    huge = good.model_copy(update={"payload": {"blob": "y" * 1_600_000}})
    with pytest.raises(EventRejected, match="too_large"):
        _prefect_events.from_prefect(huge)
    no_role = good.model_copy(update={"related": [type(good.related[0]).model_construct(
        {"prefect.resource.id": "prefect.flow-run.x"})]})
    with pytest.raises(EventRejected):
        _prefect_events.from_prefect(no_role)


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


def _related_as(event, related):
    return event.model_copy(update={"related": [type(event.related[0]).model_construct(r)
                                                for r in related]})


def test_related_resources_known_from_the_previous_event_give_what_reading_them_gives():
    for _, sent, _ in _runs():
        previous = _prefect_events.read_prefect(sent[0])
        assert previous[3] is previous[0].related  # passed the checks as given
        for prefect_event in sent[1:]:
            known = (previous[3], previous[2])
            reordered = [dict(reversed(list(r.root.items()))) for r in prefect_event.related]
            fewer = [r.root for r in prefect_event.related][:-1]
            other = [dict(r.root, **{"prefect.resource.name": "other"})
                     for r in prefect_event.related]
            no_role = [{"prefect.resource.id": "prefect.flow-run.x"}]
            for candidate, reused in ((prefect_event, True),
                                      (_related_as(prefect_event, reordered), False),
                                      (_related_as(prefect_event, fewer), False),
                                      (_related_as(prefect_event, other), False)):
                read = _prefect_events.read_prefect(candidate, known)
                assert (read[2] is known[1]) == reused
                assert read[0].related is not known[0]  # fresh copies
                assert all(a is not b for a, b in zip(read[0].related, known[0]))
                expected = parse_wire_event(candidate.model_dump(mode="json"))
                assert read[0] == expected
                assert read[0].model_dump_json() == expected.model_dump_json()
                assert read[1:3] == _prefect_events.from_prefect(candidate)[1:]
                assert read[2] == _json(expected.related).encode()
            with pytest.raises(EventRejected):
                _prefect_events.read_prefect(_related_as(prefect_event, no_role), known)
            previous = _prefect_events.read_prefect(prefect_event, known)


def test_the_bridge_reads_a_runs_repeated_related_resources_once():
    (task_run, sent, _), _ = _runs()
    bridge.enable(TracerProvider())
    try:
        RunTelemetry().start_span(run=task_run, client=None)
        for event in sent[:-1]:
            bridge._bridge.sent(event)
        seen = bridge._bridge._events[f"prefect.task-run.{task_run.id}"]
        assert len(seen) == len(sent) - 1
        assert all(read[2] is seen[0][2] for read in seen)
        bridge._bridge.sent(sent[-1])
        assert bridge._bridge.spans_recorded == 1
    finally:
        bridge.disable()


def test_what_the_bridge_knows_to_be_a_task_runs_state_event_is_what_run_key_says():
    from otel_bridge.translate.forward import TASK_RUN, RunKey, run_key

    (_, sent, _), (_, more, _) = _runs()
    checked = 0
    for prefect_event in sent + more:
        event = _prefect_events.from_prefect(prefect_event)[0]
        resource = dict(event.resource)
        variants = [event,
                    event.model_copy(update={"event": "prefect.task-run.heartbeat"}),
                    event.model_copy(update={"event": "prefect.flow-run.Running"}),
                    event.model_copy(update={"resource": {k: v for k, v in resource.items()
                                                          if k != "prefect.state-type"}}),
                    event.model_copy(update={"resource": dict(resource, **{
                        "prefect.state-type": "running"})})]
        for variant in variants:
            if _prefect_events.is_state_event(variant):
                checked += 1
                assert run_key(variant) == RunKey(TASK_RUN, variant.resource_id)
            else:
                try:
                    key = run_key(variant)
                except EventRejected:
                    continue
                assert key is None or variant is not event
    assert checked > len(sent + more)
