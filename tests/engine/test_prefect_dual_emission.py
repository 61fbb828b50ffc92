"""Dual emission inside real Prefect (otel_bridge.engine.prefect): an
unchanged flow, with `enable()` called once, gets in process exactly the task
and flow run spans the sidecar makes from the events Prefect and its server
sent, so the trace is whole without a sidecar; the spans the user opens
inside a task are children of that task run's span."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from support.helpers import ROOT, convert

from otel_bridge.prefect_client import ui_url
from otel_bridge.demo.run import settled_events
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.model.events import parse_wire_event
from otel_bridge.model.otlp import request_from_json, span_from_proto
from otel_bridge.model.spans import Span
from otel_bridge.translate.assembler import AssemblerOptions
from otel_bridge.translate.forward import ForwardOptions
from otel_bridge.translate.ids import span_id_for, trace_id_for
from otel_bridge.translate.reverse import events_from_spans
from otel_bridge.translate.span_layout import event_json

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "prefect_flow_dual_emission.py"

# The child process: installs an SDK TracerProvider that writes OTLP/JSON
# lines to a file (as the application would install its own), runs the
# example as a program, then an async flow with async and nested tasks,
# flushing (sync, then async) before shutting the provider down by hand.
RUNNER = """
import asyncio, runpy, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from tests.support.prefect_flows.telemetry import OtlpJsonFileExporter

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(sys.argv[1])))
trace.set_tracer_provider(provider)

runpy.run_path(sys.argv[2], run_name="__main__")  # calls enable() itself

import otel_bridge.engine.prefect as bridge
assert bridge.flush() == []  # every task run's span recorded

from prefect import flow, task

tracer = trace.get_tracer("example-user-code")

@task
async def async_inner(x: int) -> int:
    with tracer.start_as_current_span("async_inner.work"):
        await asyncio.sleep(0)
    return x + 1

@task(retries=1, retry_delay_seconds=0)
async def async_outer(attempts: dict) -> int:
    attempts["n"] = attempts.get("n", 0) + 1
    if attempts["n"] == 1:
        raise RuntimeError("async attempt 1 failed")
    return await async_inner(1)

@flow(name="dual-emission-async")
async def async_flow() -> int:
    return await async_outer({})

async def main():
    await async_flow()
    assert await bridge.aflush() == []

asyncio.run(main())
provider.shutdown()
print("SPANS-RECORDED", bridge._bridge.spans_recorded, "ERRORS", bridge._bridge.errors)
"""

TASKS = {"fetch", "slow_retry", "load", "checksum", "validate", "async_outer", "async_inner"}
MAPPED = "square"  # three concurrent task runs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real run of the example (and the async flow) against a real
    server: (the spans made in process, with their scope; the events the
    server stored; the options a sidecar pointed at that server would use)."""
    spans_path = tmp_path_factory.mktemp("dual") / "spans.jsonl"
    with LocalPrefectServer() as server:
        since = datetime.now(timezone.utc) - timedelta(seconds=1)
        result = subprocess.run(
            [sys.executable, "-c", RUNNER, str(spans_path), str(EXAMPLE)],
            cwd=ROOT, env=server.env(), capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SPANS-RECORDED 12 ERRORS 0" in result.stdout, result.stdout + result.stderr
        raw = settled_events(server.api_url, since)
        # what `otel-bridge serve` or `convert` derives from the same variables
        sidecar = AssemblerOptions(forward=ForwardOptions(ui_url=ui_url(server.env())))
    live: list[tuple[str, Span]] = []
    for line in spans_path.read_text().splitlines():
        request = request_from_json(json.loads(line))
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                live.extend((scope_spans.scope.name, span_from_proto(s))
                            for s in scope_spans.spans)
    return live, raw, sidecar


def task_name(span: Span) -> str:
    return span.attributes["cicd.pipeline.task.name"]


def in_process_task_spans(live) -> dict[str, Span]:
    """The in-process task run spans by task name (the mapped task's apart)."""
    spans = [s for scope, s in live if scope == "otel_bridge" and is_task_run_span(s)
             and task_name(s) != MAPPED]
    out = {task_name(s): s for s in spans}
    assert len(out) == len(spans), "one span per task run"
    return out


def mapped_spans(live) -> list[Span]:
    return [s for scope, s in live if scope == "otel_bridge" and is_task_run_span(s)
            and task_name(s) == MAPPED]


def in_process_flow_spans(live) -> list[Span]:
    return [s for scope, s in live if scope == "otel_bridge" and not is_task_run_span(s)]


def is_task_run_span(span: Span) -> bool:
    return str(span.attributes.get("prefect.resource.id", "")).startswith("prefect.task-run.")


@pytest.mark.prefect_server
def test_in_process_spans_equal_the_sidecars(run):
    live, raw, sidecar = run
    mine = in_process_task_spans(live)
    assert set(mine) == TASKS
    assert len(mapped_spans(live)) == 3
    flows = in_process_flow_spans(live)
    assert sorted(s.name for s in flows) == ["RUN dual-emission-async", "RUN dual-emission-example"]
    everything = [*mine.values(), *mapped_spans(live), *flows]
    bridged = {s.span_id: s for s in convert(raw, sidecar)}
    assert {s.span_id for s in everything} == set(bridged)
    for span in everything:
        name, expected = span.name, bridged[span.span_id]
        # every field: trace id, span id, parent, name, start/end, attributes,
        # span events, links, status
        for field in Span.__dataclass_fields__:
            assert getattr(span, field) == getattr(expected, field), (name, field)
        assert span == expected
        # the link to the run's page, as the sidecar gives it
        if is_task_run_span(span):
            assert span.attributes["cicd.pipeline.task.run.url.full"].endswith(
                f"/runs/task-run/{span.attributes['cicd.pipeline.task.run.id']}")


@pytest.mark.prefect_server
def test_in_process_spans_give_back_the_events_the_server_stored(run):
    """The spans made in process, as the backend received them, reverse to
    exactly the task run events Prefect's server stored, byte for byte."""
    live, raw, _ = run
    spans = [*in_process_task_spans(live).values(), *mapped_spans(live)]
    stored = {}
    for obj in raw:
        event = parse_wire_event(obj)
        if event is not None and event.resource_id.startswith("prefect.task-run."):
            stored[event.id] = event
    rebuilt = {e.id: e for e in events_from_spans(spans)}
    assert len(rebuilt) == len(stored) >= 3 * len(spans)
    assert rebuilt.keys() == stored.keys()
    for event_id, event in rebuilt.items():
        assert event_json(event) == event_json(stored[event_id]), event.event


@pytest.mark.prefect_server
def test_retries_failure_and_nesting_are_in_the_spans(run):
    live, _, _ = run
    mine = in_process_task_spans(live)
    states = lambda s: [e.name.rsplit(".", 1)[-1] for e in s.events]  # noqa: E731
    assert states(mine["fetch"]).count("Retrying") == 2
    assert mine["fetch"].attributes["cicd.pipeline.task.run.result"] == "success"
    assert "AwaitingRetry" in states(mine["slow_retry"])
    assert "Retrying" in states(mine["async_outer"])
    failed = mine["validate"]
    assert failed.status_code.name == "ERROR"
    assert "ValueError: validation failed for 42" in failed.status_message
    assert failed.attributes["error.type"] == "ValueError"
    # nested task runs sit under their parent task run, in the flow run's trace
    assert mine["checksum"].parent_span_id == mine["load"].span_id
    assert mine["async_inner"].parent_span_id == mine["async_outer"].span_id
    for name in ("fetch", "slow_retry", "load", "validate"):
        flow_run = mine[name].attributes["prefect.related.flow-run.id"]
        assert mine[name].trace_id == trace_id_for(f"prefect.flow-run.{flow_run}")
        assert mine[name].parent_span_id == span_id_for(f"prefect.flow-run.{flow_run}")
        assert mine[name].span_id == span_id_for(
            f"prefect.task-run.{mine[name].attributes['cicd.pipeline.task.run.id']}")


@pytest.mark.prefect_server
def test_user_spans_are_children_of_their_task_run_span(run):
    live, _, _ = run
    mine = in_process_task_spans(live)
    user = [s for scope, s in live if scope == "example-user-code"]
    owner = {"fetch.http-get": "fetch", "load.write-rows": "load",
             "checksum.compute": "checksum", "async_inner.work": "async_inner"}
    assert sorted(s.name for s in user) == sorted(
        ["fetch.http-get"] * 3 + ["square.compute"] * 3
        + ["load.write-rows", "checksum.compute", "async_inner.work"])
    squares = {s.span_id: s for s in mapped_spans(live)}
    under_squares = [s for s in user if s.name == "square.compute"]
    assert {s.parent_span_id for s in under_squares} == set(squares)  # one each
    for span in under_squares:
        task = squares[span.parent_span_id]
        assert span.trace_id == task.trace_id
        assert task.start_time_unix_nano <= span.start_time_unix_nano
        assert span.end_time_unix_nano <= task.end_time_unix_nano
    for span in user:
        if span.name == "square.compute":
            continue
        task = mine[owner[span.name]]
        assert (span.trace_id, span.parent_span_id) == (task.trace_id, task.span_id), span.name
        assert task.start_time_unix_nano <= span.start_time_unix_nano
        assert span.end_time_unix_nano <= task.end_time_unix_nano


@pytest.mark.prefect_server
def test_the_trace_is_whole_without_a_sidecar_and_no_span_is_doubled(run):
    """Every span's parent was made in the same process: the task runs' flow
    run span too (it used to be left to a sidecar, and a backend showed
    task spans under a missing parent). Prefect's own flow span gives way to
    otel-bridge's, as its task span does."""
    live, _, _ = run
    assert [s for scope, s in live if scope == "prefect"] == []
    ids = [s.span_id for _, s in live]
    assert len(ids) == len(set(ids))
    for scope, span in live:
        if span.parent_span_id:
            assert span.parent_span_id in ids, (scope, span.name)
    for flow_span in in_process_flow_spans(live):
        assert flow_span.parent_span_id is None
        assert flow_span.trace_id == trace_id_for(flow_span.attributes["prefect.resource.id"])


def test_enable_and_disable_wrap_and_restore_prefect():
    from prefect.events.worker import EventsWorker
    from prefect.telemetry.run_telemetry import RunTelemetry

    import otel_bridge.engine.prefect as bridge

    before = (RunTelemetry._start_span, EventsWorker._handle)
    assert bridge.enable(from_env=False) is True
    try:
        assert bridge.is_enabled()
        assert (RunTelemetry._start_span, EventsWorker._handle) != before
        bridge.enable(from_env=False)  # twice: wrapped once
        assert RunTelemetry._start_span.__wrapped__ is before[0]
        assert EventsWorker._handle.__wrapped__ is before[1]
    finally:
        bridge.disable()
    assert not bridge.is_enabled()
    assert (RunTelemetry._start_span, EventsWorker._handle) == before


@pytest.mark.prefect_server
def test_the_whole_flow_benchmark_prints_its_figures():
    """benchmarks/prefect_flow.py, small: a real server, a process per mode,
    every task run's span made (it asserts that itself)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefect_flow.py"),
                             "15", "1", "0"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("none", "prefect-otel", "dual"):
        assert f"\n{row} " in result.stdout
    assert "median microseconds per task run" in result.stdout
