"""Dual emission (otel_bridge.engine): the live span an engine makes while it
emits a run's events is the span the forward bridge makes from those events.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest
from support.helpers import convert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from otel_bridge.engine import (
    EventList,
    FlowRunRef,
    JsonlEventSink,
    StateType,
    TaskRunTracker,
)
from otel_bridge.model.otlp import span_from_proto
from otel_bridge.model.spans import Span
from otel_bridge.sinks.events_jsonl import EventsJsonlWriter
from otel_bridge.sinks.sdk import to_readable_span
from otel_bridge.translate.ids import span_id_for, trace_id_for
from otel_bridge.translate.reverse import events_from_spans

FLOW_RUN = FlowRunRef(id=UUID("0f0e0d0c-0b0a-4908-8706-050403020100"), name="brave-otter",
                      flow_name="etl", flow_id=UUID("11111111-2222-4333-8444-555555555555"))
RESOURCE = Resource({"service.name": "dual-emission-test"})


class Telemetry:
    """An SDK TracerProvider exporting to memory, and an event list."""

    def __init__(self):
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=RESOURCE)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.events = EventList()

    def tracker(self, task_name, **kwargs) -> TaskRunTracker:
        kwargs.setdefault("sink", self.events)
        return TaskRunTracker(task_name, tracer_provider=self.provider, **kwargs)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def bridged(self) -> list[Span]:
        """What the sidecar makes of the emitted events, read as JSON lines."""
        return convert(json.loads(e.model_dump_json()) for e in self.events)


def comparable(span) -> dict:
    """Every field of a span, the same shape for the SDK's and the bridge's."""
    if isinstance(span, Span):
        span = to_readable_span(span, RESOURCE)
    plain = lambda attrs: {k: list(v) if isinstance(v, tuple) else v  # noqa: E731
                           for k, v in dict(attrs).items()}
    return {
        "trace_id": span.context.trace_id,
        "span_id": span.context.span_id,
        "trace_flags": int(span.context.trace_flags),
        "parent": span.parent.span_id if span.parent else None,
        "name": span.name,
        "kind": span.kind,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": plain(span.attributes),
        "events": [(e.name, e.timestamp, plain(e.attributes)) for e in span.events],
        "links": [(link.context.trace_id, link.context.span_id, plain(link.attributes))
                  for link in span.links],
        "status": (span.status.status_code, span.status.description),
    }


def otlp_span(span: ReadableSpan):
    """The span as OTLP protobuf (what a backend receives), resource and
    scope apart."""
    request = encode_spans([span])
    return request.resource_spans[0].scope_spans[0].spans[0]


def assert_same_spans(telemetry: Telemetry) -> int:
    live = {s.context.span_id: s for s in telemetry.spans()
            if s.instrumentation_scope.name == "otel_bridge"}  # not the user's spans
    bridged = {s.span_id: s for s in telemetry.bridged()}
    assert live.keys() == bridged.keys()
    for span_id, span in live.items():
        expected = to_readable_span(bridged[span_id], RESOURCE)
        assert comparable(span) == comparable(expected), span.name
        assert otlp_span(span) == otlp_span(expected), span.name
    return len(live)


T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def at(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def run_workload(t: Telemetry) -> dict[str, TaskRunTracker]:
    runs = {}
    # success, in a flow run, through the context manager
    with t.tracker("extract", flow_run=FLOW_RUN) as runs["extract"]:
        pass
    # failure: the exception's message as Prefect writes it
    with pytest.raises(ValueError):
        with t.tracker("validate", flow_run=FLOW_RUN) as runs["validate"]:
            raise ValueError("validation failed: 10 rows, expected 100")
    # immediate retries, then success
    with t.tracker("flaky", flow_run=FLOW_RUN, retries=2) as run:
        runs["flaky"] = run
        run.set_state("RUNNING", "Retrying", "Task run encountered an exception "
                      "ConnectionError: attempt 1 failed")
        run.set_state("RUNNING", "Retrying")
    # delayed retry, then failure, with explicit timestamps and state details
    run = runs["delayed"] = t.tracker("delayed", flow_run=FLOW_RUN, retries=1,
                                      retry_delay_seconds=1.5)
    run.set_state(StateType.PENDING, timestamp=at(0))
    run.set_state(StateType.RUNNING, timestamp=at(1))
    run.set_state(StateType.SCHEDULED, "AwaitingRetry", "Retry 1/1 will start 1.5 second(s) "
                  "from now", timestamp=at(2), state_details={"retriable": True})
    run.set_state(StateType.RUNNING, "Retrying", timestamp=at(1502))
    run.set_state(StateType.FAILED, message="Task run encountered an exception "
                  "TimeoutError: gave up", timestamp=at(1503), state_details={"retriable": False})
    # nested: the inner run finds its parent (and flow run) from the context
    with t.tracker("load", flow_run=FLOW_RUN, tags=["warehouse", "daily"]) as runs["load"]:
        with t.tracker("checksum") as runs["checksum"]:
            pass
    # a task with no flow run (deferred): the root of its own trace
    with t.tracker("background", tags=["deferred"]) as runs["background"]:
        with t.tracker("background-child") as runs["background-child"]:
            pass
    # upstream failed: Pending > NotReady, never ran
    run = runs["skipped"] = t.tracker("skipped", flow_run=FLOW_RUN)
    run.set_state("PENDING")
    run.set_state("PENDING", "NotReady", "Upstream task run 'validate' did not reach a "
                  "'COMPLETED' state.")
    # cancelled, crashed, timed out, a long message
    run = runs["cancelled"] = t.tracker("cancelled", flow_run=FLOW_RUN)
    with run:
        run.set_state("CANCELLED", message="Cancelled by the user.")
    with pytest.raises(KeyboardInterrupt):
        with t.tracker("interrupted", flow_run=FLOW_RUN) as runs["interrupted"]:
            raise KeyboardInterrupt
    run = runs["slow"] = t.tracker("slow", flow_run=FLOW_RUN)
    with run:
        run.set_state("FAILED", "TimedOut", "Task run exceeded timeout of 0.5 second(s)")
    with pytest.raises(RuntimeError):
        with t.tracker("verbose", flow_run=FLOW_RUN) as runs["verbose"]:
            raise RuntimeError("x" * 5000)
    # Prefect's own trace context on the run (an SDK in Prefect's engine): a link
    run = runs["linked"] = t.tracker("linked", flow_run=FLOW_RUN, labels={
        "__OTEL_TRACEPARENT": "00-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174-01"})
    with run:
        pass
    # a run left open: no span yet (the bridge would end it at end of input)
    runs["open"] = t.tracker("open", flow_run=FLOW_RUN)
    runs["open"].set_state("PENDING")
    return runs


def test_live_spans_are_the_spans_the_bridge_makes_from_the_same_events():
    t = Telemetry()
    runs = run_workload(t)
    live = {s.context.span_id: s for s in t.spans()}
    bridged = {s.span_id: s for s in t.bridged()}
    # every finished run has one span; the open one only in the bridge's
    # end-of-input flush, and nowhere live
    open_id = span_id_for(runs["open"].resource_id)
    assert open_id not in live
    assert bridged.pop(open_id).attributes["otel_bridge.synthetic.end"] == "end_of_input"
    assert len(live) == len(runs) - 1 == len(bridged)
    for span_id, span in live.items():
        expected = to_readable_span(bridged[span_id], RESOURCE)
        assert comparable(span) == comparable(expected), span.name
        assert otlp_span(span) == otlp_span(expected), span.name
    # the tracker's result_span is the bridge's span
    for run in runs.values():
        if run.result_span is not None:
            assert comparable(run.result_span) == comparable(bridged[run.result_span.span_id])
    # and the live span as a backend receives it (OTLP) gives back the very
    # events the run emitted, byte for byte
    for run in runs.values():
        if run.is_final:
            received = span_from_proto(otlp_span(live[span_id_for(run.resource_id)]))
            assert [e.model_dump_json() for e in events_from_spans([received])] == [
                e.model_dump_json() for e in run.events], run.name

    # spans are named after their task (low cardinality), one per run here
    by_name = {s.name: s for s in t.spans()}
    assert set(by_name) == set(runs) - {"open"}
    flow_trace = trace_id_for(FLOW_RUN.resource_id)
    flow_span = span_id_for(FLOW_RUN.resource_id)
    extract = by_name["extract"]
    assert (extract.context.trace_id, extract.parent.span_id) == (flow_trace, flow_span)
    assert extract.attributes["prefect.run.name"] == runs["extract"].name
    assert [e.name for e in extract.events] == ["Pending", "Running", "Completed"]
    assert [e.attributes["prefect.state.id"] for e in extract.events] == [
        str(e.id) for e in runs["extract"].events]
    validate = by_name["validate"]
    assert validate.status.status_code is StatusCode.ERROR
    assert validate.status.description == ("Task run encountered an exception ValueError: "
                                           "validation failed: 10 rows, expected 100")
    assert validate.attributes["error.type"] == "ValueError"
    assert by_name["flaky"].status.status_code is StatusCode.UNSET
    delayed = by_name["delayed"]
    assert (delayed.start_time, delayed.end_time) == (
        int(at(1).timestamp() * 1e6) * 1000, int(at(1503).timestamp() * 1e6) * 1000)
    checksum = by_name["checksum"]
    assert checksum.parent.span_id == span_id_for(runs["load"].resource_id)
    assert checksum.context.trace_id == flow_trace
    assert by_name["load"].attributes["prefect.tags"] == ("warehouse", "daily")
    background = by_name["background"]
    assert background.parent is None
    assert background.context.trace_id == trace_id_for(runs["background"].resource_id)
    child = by_name["background-child"]
    assert child.context.trace_id == background.context.trace_id
    assert child.parent.span_id == background.context.span_id
    assert by_name["skipped"].attributes["otel_bridge.synthetic.start"] == "no_running_state"
    assert by_name["interrupted"].attributes["cicd.pipeline.task.run.result"] == "error"
    assert by_name["slow"].attributes["cicd.pipeline.task.run.result"] == "timeout"
    assert len(by_name["linked"].links) == 1


def test_the_span_is_current_while_the_run_executes_and_user_spans_nest_under_it():
    t = Telemetry()
    user_tracer = t.provider.get_tracer("user-code")
    outside = user_tracer.start_span("outside")
    with trace.use_span(outside, end_on_exit=True):
        with t.tracker("fetch", flow_run=FLOW_RUN) as run:
            assert trace.get_current_span() is run.span
            with user_tracer.start_as_current_span("GET /orders") as http:
                with user_tracer.start_as_current_span("SELECT orders"):
                    pass
        assert trace.get_current_span() is outside
    spans = {s.name: s for s in t.spans()}
    run_span_id = span_id_for(run.resource_id)
    assert spans["GET /orders"].parent.span_id == run_span_id
    assert spans["GET /orders"].context.trace_id == trace_id_for(FLOW_RUN.resource_id)
    assert spans["SELECT orders"].parent.span_id == http.get_span_context().span_id
    # the user's enclosing span does not become the run's parent: the bridge
    # places runs by Prefect's ids only
    assert spans["fetch"].parent.span_id == span_id_for(FLOW_RUN.resource_id)
    # user spans keep random ids
    assert spans["outside"].context.span_id != run_span_id
    assert t.bridged()[0].span_id == run_span_id


def test_async_runs_nest_per_task_and_match_the_bridge():
    t = Telemetry()
    user_tracer = t.provider.get_tracer("user-code")

    async def task(name: str, fail: bool = False):
        async with t.tracker(name, flow_run=FLOW_RUN) as run:
            await asyncio.sleep(0.01)
            with user_tracer.start_as_current_span(f"{name}.io"):
                await asyncio.sleep(0.01)
                async with t.tracker(f"{name}-inner"):
                    await asyncio.sleep(0)
            if fail:
                raise OSError("disk full")
        return run

    async def main():
        return await asyncio.gather(task("a"), task("b", fail=True), task("c"),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], OSError)
    spans = {s.name: s for s in t.spans()}
    for name in "abc":
        outer, inner = spans[name], spans[f"{name}-inner"]
        io = spans[f"{name}.io"]
        assert io.parent.span_id == outer.context.span_id
        # a run started under a user span still hangs off its parent run
        assert inner.parent.span_id == outer.context.span_id
    assert assert_same_spans(t) == 6
    failed = [s for s in t.spans() if s.status.status_code is StatusCode.ERROR]
    assert [s.attributes["error.type"] for s in failed] == ["OSError"]


def test_events_validate_with_prefects_own_event_model(tmp_path):
    from prefect.events.schemas.events import Event as PrefectEvent

    t = Telemetry()
    run_workload(t)
    assert len(t.events) > 30
    for event in t.events:
        wire = json.loads(event.model_dump_json())
        theirs = PrefectEvent.model_validate(wire)
        assert json.loads(theirs.model_dump_json()) == wire
        assert theirs.resource.id == event.resource_id
        assert theirs.follows == event.follows
    # follows chains each run's events, as Prefect's engine does
    by_run: dict[str, list] = {}
    for event in t.events:
        by_run.setdefault(event.resource_id, []).append(event)
    for events in by_run.values():
        assert events[0].follows is None
        assert all(b.follows == a.id for a, b in zip(events, events[1:]))


def test_sinks_jsonl_writer_callable_and_batch(tmp_path):
    path = tmp_path / "events.jsonl"
    batch_path = tmp_path / "batch.jsonl"
    seen = []
    with JsonlEventSink(path) as jsonl, open(batch_path, "w") as stream:
        writer = EventsJsonlWriter(stream)
        for sink in (jsonl, writer, seen.append):
            with TaskRunTracker("t", sink=sink, tracer_provider=TracerProvider()):
                pass
    assert len(path.read_text().splitlines()) == 3
    assert len(batch_path.read_text().splitlines()) == 3
    assert [e.event for e in seen][-1] == "prefect.task-run.Completed"
    # a failing sink is logged and counted, never raised into the run
    def broken(event):
        raise ConnectionError("no server")
    with TaskRunTracker("t", sink=broken) as run:
        pass
    assert run.sink_errors == 3


def test_without_an_sdk_only_events_are_made_and_the_context_still_propagates():
    events = EventList()
    provider = trace.NoOpTracerProvider()
    with TaskRunTracker("t", sink=events, tracer_provider=provider,
                        flow_run=FLOW_RUN) as run:
        current = trace.get_current_span().get_span_context()
        assert current.span_id == span_id_for(run.resource_id)
        assert current.trace_id == trace_id_for(FLOW_RUN.resource_id)
    assert run.span is None and len(events) == 3
    assert run.result_span.span_id == current.span_id


# -- the incremental builder is task_run_state_events, state by state ---------

STATES = [(StateType.PENDING, "Pending"), (StateType.RUNNING, "Running"),
          (StateType.RUNNING, "Retrying"), (StateType.SCHEDULED, "AwaitingRetry"),
          (StateType.COMPLETED, "Completed"), (StateType.FAILED, "Failed"),
          (StateType.CRASHED, "Crashed"), (StateType.CANCELLED, "Cancelled"),
          (StateType.PENDING, "NotReady"), (StateType.COMPLETED, "RolledBack")]

state_steps = st.lists(
    st.tuples(st.sampled_from(STATES), st.integers(0, 5_000_000), st.text(max_size=20)),
    min_size=1, max_size=8)


@given(state_steps, st.booleans(), st.booleans())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_state_sequence_gives_the_bridges_span(steps, in_flow, nested):
    """Up to and including the first final state (states after it are events
    the live span, already ended, cannot get; see the report)."""
    t = Telemetry()
    parent = uuid4() if nested else None
    run = t.tracker("x", flow_run=FLOW_RUN if in_flow else None, parent=parent)
    when = T0
    for (kind, name), micros, message in steps:
        when += timedelta(microseconds=micros)
        run.set_state(kind, name, message, timestamp=when)
        if run.is_final:
            break
    if not run.is_final:
        assert t.spans() == []
        return
    assert assert_same_spans(t) == 1


# -- examples/minimal_engine.py, run as a user would run it -------------------

def _console_spans(text: str) -> list[dict]:
    """The ConsoleSpanExporter's output: one JSON object per span, back to back."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return spans
        span, at = decoder.raw_decode(text, at)
        spans.append(span)


def _iso(ns: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=ns // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_minimal_engine_example_dual_emits_spans_equal_to_the_bridges(tmp_path):
    import os
    import subprocess
    import sys

    from support.helpers import ROOT

    events_path = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "minimal_engine.py"),
                             str(events_path)], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "16 events in" in result.stderr
    printed = {s["context"]["span_id"]: s for s in _console_spans(result.stdout)}
    bridged = convert(json.loads(line) for line in events_path.read_text().splitlines())
    assert len(bridged) == 5 and len(printed) == 6  # + the user's "INSERT rows"
    for span in bridged:
        live = printed.pop(f"0x{span.span_id_hex}")
        assert live["name"] == span.name
        assert live["context"]["trace_id"] == f"0x{span.trace_id_hex}"
        assert live["parent_id"] == f"0x{span.parent_span_id:016x}"
        assert (live["start_time"], live["end_time"]) == (
            _iso(span.start_time_unix_nano), _iso(span.end_time_unix_nano))
        assert live["attributes"] == {k: list(v) if isinstance(v, tuple) else v
                                      for k, v in span.attributes.items()}
        assert [(e["name"], e["timestamp"], e["attributes"]) for e in live["events"]] == [
            (e.name, _iso(e.time_unix_nano), dict(e.attributes)) for e in span.events]
        assert live["status"]["status_code"] == span.status_code.name
        assert live["status"].get("description", "") == span.status_message
    (user,) = printed.values()
    load = next(s for s in bridged if s.name == "load")
    checksum = next(s for s in bridged if s.name == "checksum")
    assert user["name"] == "INSERT rows" and user["parent_id"] == f"0x{load.span_id_hex}"
    assert checksum.parent_span_id == load.span_id


def test_the_benchmark_prints_its_figures():
    import subprocess
    import sys

    from support.helpers import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dual_emission.py"),
                             "30", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for row in ("none", "prefect-otel", "prefect-events", "dual", "dual-events", "dual-span",
                "prefect-dual", "  task thread", "  events worker"):
        assert f"\n{row} " in result.stdout
    assert "per state change" in result.stdout
    # every span line exported its spans through the OTLP encoder: otel-bridge's
    # span carries each of the run's facts once and each state's id, no more
    # than twice the bytes of Prefect's own span of the run
    line = result.stdout.split("OTLP bytes per task run span:")[1].splitlines()[0]
    sizes = {name: int(size.replace(",", ""))
             for name, size in re.findall(r"([\w-]+) ([\d,]*\d)", line)}
    assert set(sizes) == {"prefect-otel", "dual", "prefect-dual"}
    assert sizes["prefect-otel"] < sizes["dual"] < 2 * sizes["prefect-otel"]
    assert sizes["prefect-otel"] < sizes["prefect-dual"] < 2 * sizes["prefect-otel"]
    assert len(re.findall(r"  \d+\.\d+ us vs +\d+\.\d+ us +\d+\.\d\dx", result.stdout)) == 5
