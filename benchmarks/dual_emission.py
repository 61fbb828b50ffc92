"""What dual emission costs an engine, per state change and per task run.

    .venv/bin/python benchmarks/dual_emission.py [RUNS] [ROUNDS]

Each task run goes Pending > Running > Completed (three state changes) around
a task body that does nothing, so every figure is pure overhead. Side by side,
in one process, with the same OpenTelemetry SDK pipeline (a TracerProvider
with a SimpleSpanProcessor and an exporter that encodes the spans to OTLP
protobuf, as the SDK's OTLP exporters do, and drops the bytes: export is
counted in line, no I/O is):

  none             the bare loop: no telemetry
  prefect-otel     Prefect 3.9.1's own telemetry (`RunTelemetry`, what its
                   task engine calls: start_span, the span made current
                   around the body (`trace.use_span`), update_state per
                   state, end_span_on_success) with that SDK installed,
                   inside a flow run whose span Prefect made (so, as in a
                   real flow, it reads the flow's traceparent); Prefect
                   objects (TaskRun, states) built beforehand, not timed.
                   Spans only: Prefect's engine builds and sends the three
                   events on top of this, always.
  prefect-events   Prefect 3.9.1's own events of a task run, as its task
                   engine makes them (`emit_task_run_state_change_event` per
                   state: the payload, `Event` validated, its size checked,
                   handed to the events worker), in the same flow run, to a
                   stand-in for the events worker that counts them. What the
                   worker then does (related resources from the run context,
                   JSON, the socket) is not counted: this line is a floor.
  dual             otel_bridge.engine.TaskRunTracker, the whole of dual
                   emission for an engine that is not Prefect's: the three
                   Prefect events (built as Prefect's engine builds them,
                   checked) handed to a sink that counts them, and the live
                   span with the bridge's ids, given at the final state the
                   attributes, events and status of `forward.run_span`.
  dual-events      the same with no SDK installed: events only
  dual-span        dual minus dual-events: what the span adds
  prefect-dual     inside real Prefect with `otel_bridge.engine.prefect`
                   enabled, in the same flow run: the same RunTelemetry
                   calls as prefect-otel (which then hold otel-bridge's span
                   context instead of making Prefect's span), plus what the
                   events worker hook does with the three events Prefect
                   sent (made beforehand, not timed, as Prefect makes them
                   anyway): reading and checking them, making the span
                   (`forward.run_span`, as the sidecar does) and handing it
                   to the SDK through its public API. What dual
                   emission costs a Prefect flow instead of Prefect's own
                   task spans: the span side only, since the events are
                   Prefect's either way. Split in two:
    task thread    what the task run itself waits for (the hooks in its
                   thread)
    events worker  what Prefect's events worker thread does after sending
                   each event (the span is made there, at the final state)

Lines set side by side, like for like:
* an engine's telemetry, events and span: dual against Prefect's own,
  prefect-events + prefect-otel;
* the span side only: dual-span and prefect-dual against prefect-otel;
* a Prefect task run's telemetry in all, Prefect's events either way:
  prefect-events + prefect-dual against prefect-events + prefect-otel.
`prefect_flow.py` measures whole flows against a real server.

Prints the median of ROUNDS rounds of RUNS task runs each (the lines take
turns round by round); asserts nothing. The inputs made beforehand are
frozen out of the garbage collector's way (`gc.freeze`), so no line pays for
walking another's. Both pipelines drop what they make (spans: once encoded;
events: a sink that counts them), so neither pays to keep it.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Any, Callable, Sequence
from uuid import uuid4

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from otel_bridge.engine import FlowRunRef, TaskRunTracker
from otel_bridge.translate.ids import span_id_for, trace_id_for


class EncodingExporter(SpanExporter):
    """The CPU side of the SDK's OTLP exporters (`encode_spans`, then the
    protobuf bytes), the bytes counted and dropped."""

    def __init__(self):
        self.spans = self.bytes = 0

    def export(self, spans: Sequence) -> SpanExportResult:
        self.spans += len(spans)
        self.bytes += len(encode_spans(spans).SerializeToString())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def body() -> int:
    return 1


def bench_none(runs: int) -> Callable[[], None]:
    def go():
        for _ in range(runs):
            body()
    return go


def prefect_task_runs(runs: int) -> tuple[list, list, Any]:
    """Prefect's TaskRun objects, their three states each, and the context of
    the flow run they belong to (`in_flow_run`)."""
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import Completed, Pending, Running

    flow_run_id = uuid4()
    task_runs = [TaskRun(id=uuid4(), name=f"extract-{i:03x}", task_key="extract-0123abcd",
                         dynamic_key=str(i), flow_run_id=flow_run_id, tags=["etl"])
                 for i in range(runs)]
    states = [(Pending(), Running(), Completed()) for _ in range(runs)]
    return task_runs, states, in_flow_run(flow_run_id)


def bench_prefect(runs: int) -> Callable[[], None]:
    from prefect.telemetry.run_telemetry import RunTelemetry

    task_runs, states, context = prefect_task_runs(runs)

    def go():
        with context:
            for task_run, (pending, running, completed) in zip(task_runs, states):
                prefect_task_run(RunTelemetry(), task_run, pending, running, completed)
    return go


def bench_prefect_events(runs: int) -> Callable[[], None]:
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker
    from prefect.utilities.engine import emit_task_run_state_change_event

    class CountingWorker:
        """What `emit_event` asks of the events worker: a client type of
        Prefect's own (else it emits nothing) and `send`."""
        client_type = PrefectEventsClient
        events = 0

        def send(self, event) -> None:
            self.events += 1

    task_runs, states, context = prefect_task_runs(runs)

    def go():
        worker = CountingWorker()
        instance = EventsWorker.__dict__["instance"]
        EventsWorker.instance = classmethod(lambda cls, client_type=None: worker)
        try:
            with context:
                for task_run, (pending, running, completed) in zip(task_runs, states):
                    # as the task engine calls it, each event following the one before
                    sent = emit_task_run_state_change_event(task_run, None, pending)
                    sent = emit_task_run_state_change_event(task_run, pending, running,
                                                            follows=sent)
                    emit_task_run_state_change_event(task_run, running, completed,
                                                     follows=sent)
        finally:
            EventsWorker.instance = instance
        assert worker.events == 3 * runs, "Prefect emitted no events (should_emit_events?)"
    return go


def in_flow_run(flow_run_id):
    """Prefect's context of a flow run whose span Prefect's own telemetry
    made, as a task run of a real flow sees it: the flow run carries that
    span's traceparent label, which Prefect's task telemetry reads."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.context import FlowRunContext
    from prefect.telemetry.run_telemetry import RunTelemetry

    flow_run = FlowRun(id=flow_run_id, name="bench", flow_id=uuid4())
    RunTelemetry()._start_span(flow_run)  # sets the label; the flow's span is not timed
    return FlowRunContext.model_construct(flow_run=flow_run)


def prefect_task_run(telemetry, task_run, pending, running, completed) -> None:
    """The telemetry calls of Prefect's task engine for one run."""
    telemetry.start_span(run=task_run, client=None, parameters={"x": 1})
    with trace.use_span(telemetry.span, end_on_exit=False):
        telemetry.update_state(pending)
        telemetry.update_state(running)
        body()
        telemetry.update_state(completed)
    telemetry.end_span_on_success()


def bench_prefect_dual(runs: int, provider) -> Callable[[], None]:
    from prefect.client.schemas.objects import TaskRun
    from prefect.events.schemas.events import Event as PrefectEvent
    from prefect.states import Completed, Pending, Running
    from prefect.telemetry.run_telemetry import RunTelemetry

    import otel_bridge.engine.prefect as bridge

    flow_run = FlowRunRef(id=uuid4(), name="bench", flow_name="bench", flow_id=uuid4())
    task_runs, states, sent = [], [], []
    for i in range(runs):
        # The events Prefect's engine would send for this run (the builder
        # makes exactly those), as Prefect's own Event objects, with the
        # traceparent label the bridge gives the run.
        run_id = uuid4()
        traceparent = (f"00-{trace_id_for(f'prefect.flow-run.{flow_run.id}'):032x}-"
                       f"{span_id_for(f'prefect.task-run.{run_id}'):016x}-01")
        tracker = TaskRunTracker("extract", id=run_id, sink=None, flow_run=flow_run,
                                 tags=["etl"], labels={"__OTEL_TRACEPARENT": traceparent},
                                 tracer_provider=trace.NoOpTracerProvider())
        for kind in ("PENDING", "RUNNING", "COMPLETED"):
            tracker.set_state(kind)
        sent.append([PrefectEvent.model_validate(e.to_json_dict()) for e in tracker.events])
        task_runs.append(TaskRun(id=tracker.id, name=tracker.name,
                                 task_key=tracker.record.task_key,
                                 dynamic_key=tracker.record.dynamic_key,
                                 flow_run_id=flow_run.id, tags=["etl"]))
        states.append((Pending(), Running(), Completed()))

    context = in_flow_run(flow_run.id)

    def go():
        bridge.enable(provider)
        try:
            handle = bridge._bridge.sent  # what the wrapped EventsWorker._handle adds
            # Prefect's task engine and its events worker take turns per event
            # in a real flow; here each side runs all its task runs in a row,
            # timed apart: what the task run waits for, and what the events
            # worker does after each event has been sent.
            t0 = time.perf_counter_ns()
            with context:
                for task_run, (pending, running, completed) in zip(task_runs, states):
                    prefect_task_run(RunTelemetry(), task_run, pending, running, completed)
            t1 = time.perf_counter_ns()
            for events in sent:
                for event in events:
                    handle(event)
            t2 = time.perf_counter_ns()
            assert bridge._bridge.errors == 0 and bridge._bridge.spans_recorded == runs
        finally:
            bridge.disable()
        go.parts.append(((t1 - t0) / runs / 1000, (t2 - t1) / runs / 1000))

    go.parts = []
    return go


def bench_dual(runs: int, provider) -> Callable[[], None]:
    flow_run = FlowRunRef(id=uuid4(), name="bench", flow_name="bench", flow_id=uuid4())

    def go():
        sink = CountingSink()
        for _ in range(runs):
            with TaskRunTracker("extract", sink=sink, flow_run=flow_run, tags=["etl"],
                                tracer_provider=provider):
                body()
        assert sink.events == 3 * runs
    return go


class CountingSink:
    def __init__(self):
        self.events = 0

    def __call__(self, event) -> None:
        self.events += 1


def bench_dual_states(runs: int, provider) -> tuple[float, float]:
    """Microseconds per non-final state change (Pending, Running) and per
    final one (Completed, which also computes the span and ends it)."""
    flow_run = FlowRunRef(id=uuid4(), name="bench", flow_name="bench", flow_id=uuid4())
    sink = CountingSink()
    early = final = 0
    for _ in range(runs):
        run = TaskRunTracker("extract", sink=sink, flow_run=flow_run, tags=["etl"],
                             tracer_provider=provider)
        t0 = time.perf_counter_ns()
        run.set_state("PENDING")
        run.set_state("RUNNING")
        t1 = time.perf_counter_ns()
        run.set_state("COMPLETED")
        t2 = time.perf_counter_ns()
        early += t1 - t0
        final += t2 - t1
    return early / (2 * runs) / 1000, final / runs / 1000


def medians_us(benches: dict[str, Callable[[], None]], runs: int,
               rounds: int) -> dict[str, float]:
    """Median microseconds per task run of each; the rounds interleaved, so
    a busy moment of the machine falls on every line alike."""
    for go in benches.values():
        go()  # warm up
    # The inputs made beforehand stay alive throughout; frozen, the garbage
    # collector does not walk them again and again, which would charge each
    # line for the size of the others' inputs.
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(rounds):
        for name, go in benches.items():
            t0 = time.perf_counter_ns()
            go()
            times[name].append((time.perf_counter_ns() - t0) / runs / 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main(runs: int = 2000, rounds: int = 5) -> None:
    exporter = EncodingExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # Prefect's RunTelemetry uses the global one
    no_sdk = trace.NoOpTracerProvider()

    prefect_dual = bench_prefect_dual(runs, provider)
    benches = {
        "none": bench_none(runs),
        "prefect-otel": bench_prefect(runs),
        "prefect-events": bench_prefect_events(runs),
        "dual": bench_dual(runs, provider),
        "dual-events": bench_dual(runs, no_sdk),
        "prefect-dual": prefect_dual,
    }
    results = medians_us(benches, runs, rounds)
    results["dual-span"] = results["dual"] - results["dual-events"]
    results["prefect-dual"] = results.pop("prefect-dual")
    parts = prefect_dual.parts[1:]  # (the first is the warm-up)
    results["  task thread"] = statistics.median(task for task, _ in parts)
    results["  events worker"] = statistics.median(worker for _, worker in parts)
    span_bytes = {}
    for name in ("prefect-otel", "dual", "prefect-dual"):
        exporter.spans = exporter.bytes = 0
        benches[name]()
        assert exporter.spans == runs
        span_bytes[name] = exporter.bytes / runs
    early, final = bench_dual_states(runs, provider)

    print(f"{runs} task runs x {rounds} rounds, 3 state changes each; "
          "median microseconds per task run")
    print(f"{'':14} {'per task run':>12} {'per state change':>17}")
    for name, us in results.items():
        print(f"{name:14} {us:12.1f} {us / 3:17.1f}")
    print(f"dual, by state change: {early:.1f} us for Pending or Running, "
          f"{final:.1f} us for the final state (builds and ends the span)")
    print("OTLP bytes per task run span: " + ", ".join(
        f"{name} {size:,.0f}" for name, size in span_bytes.items()))
    print("Against Prefect's own telemetry, like for like (x: times its cost):")
    for line, ours, theirs in comparisons(results):
        print(f"  {line:60} {ours:7.1f} us vs {theirs:7.1f} us  {ours / theirs:4.2f}x")


def comparisons(results: dict[str, float]) -> list[tuple[str, float, float]]:
    """(what, otel-bridge's cost, Prefect's own) per task run, over the bare loop."""
    def cost(*names: str) -> float:
        return sum(results[name] - results["none"] for name in names)

    return [
        ("an engine's events and span: dual vs prefect-events+otel",
         cost("dual"), cost("prefect-events", "prefect-otel")),
        ("its span alone: dual-span vs prefect-otel",
         results["dual-span"], cost("prefect-otel")),
        ("inside Prefect, in all: prefect-events+dual vs +otel",
         cost("prefect-events", "prefect-dual"), cost("prefect-events", "prefect-otel")),
        ("inside Prefect, the span side: prefect-dual vs prefect-otel",
         cost("prefect-dual"), cost("prefect-otel")),
        ("  of which the task's own thread waits for",
         results["  task thread"], cost("prefect-otel")),
    ]


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
