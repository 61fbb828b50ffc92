"""`otel_bridge.engine.prefect` without a server: Prefect's events read
without validation are what parsing their JSON gives, the span recorded from
the events sent is the sidecar's span of the events the server keeps, and
Prefect's private methods are wrapped only in the Prefect version the tests
ran with. The events are the ones Prefect's engine would send, as Prefect's
own `Event` objects, handed to the bridge as its events worker hook hands
them."""

from __future__ import annotations

import importlib.metadata
import logging
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as case
from hypothesis import strategies as st

pytest.importorskip("prefect")

from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import NoOpTracerProvider  # noqa: E402
from prefect.client.schemas.objects import TaskRun  # noqa: E402
from prefect.events.schemas.events import Event as PrefectEvent  # noqa: E402
from prefect.telemetry.run_telemetry import RunTelemetry  # noqa: E402

import otel_bridge.engine.prefect as bridge  # noqa: E402
from otel_bridge.engine import FlowRunRef, TaskRunTracker  # noqa: E402
from otel_bridge.engine import _prefect_events  # noqa: E402
from otel_bridge.model.events import EventRejected, parse_wire_event  # noqa: E402
from otel_bridge.sinks.sdk import to_readable_span  # noqa: E402
from otel_bridge.prefect_client import ui_url  # noqa: E402
from otel_bridge.translate.forward import ForwardOptions, is_final, run_span  # noqa: E402
from otel_bridge.translate.ids import span_id_for, trace_id_for  # noqa: E402

FLOW_RUN = FlowRunRef(id=UUID("0f0e0d0c-0b0a-4908-8706-050403020100"), name="brave-otter",
                      flow_name="etl", flow_id=UUID("11111111-2222-4333-8444-555555555555"))
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
FLOW_TRACE = trace_id_for(FLOW_RUN.resource_id)


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
                event = _prefect_events.read_prefect(candidate)
                expected = parse_wire_event(candidate.model_dump(mode="json"))
                assert event == expected
                assert event.model_dump_json() == expected.model_dump_json()
                assert event.occurred.tzinfo is timezone.utc and type(event.occurred) is datetime


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


_STATES = [("PENDING", "Pending"), ("RUNNING", "Running"), ("RUNNING", "Retrying"),
           ("SCHEDULED", "AwaitingRetry"), ("COMPLETED", "Completed"), ("FAILED", "Failed"),
           ("CRASHED", "Crashed"), ("PENDING", "NotReady"), ("COMPLETED", "RolledBack")]
_TWISTS = ["none", "related", "zone", "naive", "swap", "repeat", "invalid"]
RESOURCE = Resource({"service.name": "test"})


def _comparable(span):
    """Every field of an SDK span, lists for tuples (as the bridge's)."""
    plain = lambda attrs: {k: list(v) if isinstance(v, tuple) else v  # noqa: E731
                           for k, v in dict(attrs).items()}
    return (span.name, span.context.trace_id, span.context.span_id,
            span.parent.span_id if span.parent else None, span.kind, plain(span.attributes),
            [(e.name, e.timestamp, plain(e.attributes)) for e in span.events],
            [(link.context.trace_id, link.context.span_id, plain(link.attributes))
             for link in span.links],
            span.status.status_code, span.status.description, span.start_time, span.end_time)


@given(st.lists(st.tuples(st.sampled_from(_STATES), st.integers(0, 3_000_000),
                          st.text(max_size=12)), min_size=1, max_size=6),
       st.booleans(), st.sampled_from(["own", "other", None]), st.sampled_from(_TWISTS),
       st.integers(0, 5))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_span_recorded_from_prefects_events_is_the_sidecars(steps, nested, traceparent,
                                                                 twist, where):
    """Whatever Prefect sent by a run's final state, in whatever order and
    form: the span recorded is the sidecar's (run_span of the events as the
    server stores them, those it refuses left out), or, when the server would
    refuse the final state, none yet."""
    run_id = uuid4()
    resource_id = f"prefect.task-run.{run_id}"
    span_id = span_id_for(resource_id)
    parent = uuid4() if nested else None
    own = f"00-{FLOW_TRACE:032x}-{span_id:016x}-01"  # what the bridge writes on the run
    label = {"own": own, "other": "00-" + "12" * 16 + "-" + "34" * 8 + "-01"}.get(traceparent)
    now = [T0]
    tracker = TaskRunTracker(
        "load", id=run_id, flow_run=FLOW_RUN, parent=parent,
        tags=["etl", "daily"], labels={"__OTEL_TRACEPARENT": label} if label else None,
        clock=lambda: now[0], tracer_provider=NoOpTracerProvider())
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

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hook = bridge._Bridge(provider)
    task_run = SimpleNamespace(id=run_id, flow_run_id=FLOW_RUN.id, task_inputs={
        "__parents__": [{"input_type": "task_run", "id": str(parent)}] if parent else []})
    hook.start(task_run, "task")
    for event in sent:  # as the events worker hook hands them over
        hook.sent(event)

    # The sidecar's span: of the events the server accepts, as of the first
    # final state it accepts (the in-process span is recorded then; states
    # after it reach the sidecar only).
    accepted, refused, final_at = [], 0, None
    for at, event in enumerate(sent):
        try:
            accepted.append(parse_wire_event(event.model_dump(mode="json")))
        except EventRejected:
            refused += 1
            continue
        if is_final(accepted[-1]):
            final_at = at
            break
    if final_at is None:  # no final state the server accepts: the run stays open
        case("no final state accepted: open")
        assert exporter.get_finished_spans() == () and hook.open_runs() == [run_id]
        assert hook.errors <= refused
        return
    case(f"recorded, {refused} refused")
    assert hook.errors == refused and hook.open_runs() == []
    (recorded,) = exporter.get_finished_spans()
    sidecar = to_readable_span(run_span(accepted), RESOURCE)
    assert _comparable(recorded) == _comparable(sidecar)
    assert encode_spans([recorded]) == encode_spans([sidecar])
    if twist in ("none", "zone", "naive", "related"):  # what was sent, all of it
        assert len(recorded.events) == len(set(e.id for e in sent[:final_at + 1]))
    if traceparent == "own":  # the label names this very span: no link
        assert not recorded.links
    elif traceparent == "other" and any(
            (e.payload.get("task_run") or {}).get("labels", {}).get("__OTEL_TRACEPARENT") == label
            for e in accepted):
        # (the label is on the events' task run once the run starts; a swap
        # can leave the accepted events without one)
        assert len(recorded.links) == 1


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
        assert [e.attributes["prefect.state.id"] for e in span.events] == [
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
        event = _prefect_events.read_prefect(prefect_event)
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


def test_the_span_links_to_the_runs_page_as_the_sidecars_does(monkeypatch):
    """The sidecar pointed at the same server links each span to its run's
    page (the UI's address derived from PREFECT_API_URL as Prefect derives
    it); so does the span made in process, else one span id would carry two
    contents."""
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    (task_run, sent, _), _ = _runs()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert bridge.enable(provider) is True
    try:
        RunTelemetry().start_span(run=task_run, client=None)
        for event in sent:
            bridge._bridge.sent(event)
    finally:
        bridge.disable()
    (span,) = exporter.get_finished_spans()
    assert span.attributes["cicd.pipeline.task.run.url.full"] == (
        f"http://127.0.0.1:4200/runs/task-run/{task_run.id}")
    sidecar = run_span([parse_wire_event(e.model_dump(mode="json")) for e in sent],
                       ForwardOptions(ui_url=ui_url()))
    assert _comparable(span) == _comparable(to_readable_span(sidecar, RESOURCE))


def test_enable_leaves_an_untested_prefect_alone_and_says_so_once(monkeypatch, caplog):
    """Prefect's private methods are wrapped only in the version the tests
    ran with; in another, nothing changes (no wrap, no provider set up) and
    one warning says why."""
    from prefect.events.worker import EventsWorker

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: (
        "3.10.0" if name == "prefect" else real_version(name)))
    monkeypatch.setattr(bridge, "_warned_version", None)
    before = (RunTelemetry._start_span, EventsWorker._handle)
    global_provider = trace.get_tracer_provider()
    with caplog.at_level(logging.WARNING, logger="otel_bridge.engine.prefect"):
        assert bridge.enable(TracerProvider()) is False
        assert bridge.enable() is False  # (from_env: would set up a global provider)
    assert not bridge.is_enabled()
    assert (RunTelemetry._start_span, EventsWorker._handle) == before
    assert trace.get_tracer_provider() is global_provider
    (warning,) = [r for r in caplog.records if "dual emission is off" in r.getMessage()]
    assert "3.10.0" in warning.getMessage() and "3.9.1" in warning.getMessage()

    monkeypatch.setattr(importlib.metadata, "version", real_version)
    assert bridge.TESTED_PREFECT_VERSIONS == {real_version("prefect")}
    try:
        assert bridge.enable(TracerProvider()) is True and bridge.is_enabled()
        assert RunTelemetry._start_span.__wrapped__ is before[0]
    finally:
        bridge.disable()
