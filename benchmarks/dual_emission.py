"""What dual emission costs an engine, per state change and per task run.

    .venv/bin/python benchmarks/dual_emission.py [RUNS] [ROUNDS]

Each task run goes Pending > Running > Completed (three state changes) around
a task body that does nothing, so every figure is pure overhead. Side by side,
in one process, with the same OpenTelemetry SDK pipeline (a TracerProvider
with a SimpleSpanProcessor and an exporter that drops the spans, so export
cost is counted in line and no I/O is):

  none             the bare loop: no telemetry
  prefect-otel     Prefect 3.9.1's own telemetry (`RunTelemetry`, what its
                   task engine calls: start_span, update_state per state,
                   end_span_on_success) with that SDK installed; Prefect
                   objects (TaskRun, states) built beforehand, not timed
  dual             otel_bridge.engine.TaskRunTracker: the three Prefect
                   events (built as Prefect's engine builds them, validated)
                   handed to an in-memory sink, and the span with the
                   bridge's ids, attributes and events
  dual-events      the same with no SDK installed: events only
  dual-span        dual minus dual-events: what the span adds

Prints the median of ROUNDS rounds of RUNS task runs each; asserts nothing.
Note that Prefect's own engine also builds and sends the three events (it
always does); `prefect-otel` counts only its spans.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Sequence
from uuid import uuid4

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from otel_bridge.engine import EventList, FlowRunRef, TaskRunTracker


class DropExporter(SpanExporter):
    def __init__(self):
        self.spans = 0

    def export(self, spans: Sequence) -> SpanExportResult:
        self.spans += len(spans)
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


def bench_prefect(runs: int) -> Callable[[], None]:
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import Completed, Pending, Running
    from prefect.telemetry.run_telemetry import RunTelemetry

    task_runs = [TaskRun(id=uuid4(), name=f"extract-{i:03x}", task_key="extract-0123abcd",
                         dynamic_key=str(i), flow_run_id=uuid4(), tags=["etl"])
                 for i in range(runs)]
    states = [(Pending(), Running(), Completed()) for _ in range(runs)]

    def go():
        for task_run, (pending, running, completed) in zip(task_runs, states):
            telemetry = RunTelemetry()
            telemetry.start_span(run=task_run, client=None, parameters={"x": 1})
            telemetry.update_state(pending)
            telemetry.update_state(running)
            body()
            telemetry.update_state(completed)
            telemetry.end_span_on_success()
    return go


def bench_dual(runs: int, provider) -> Callable[[], None]:
    flow_run = FlowRunRef(id=uuid4(), name="bench", flow_name="bench", flow_id=uuid4())

    def go():
        sink = EventList()
        for _ in range(runs):
            with TaskRunTracker("extract", sink=sink, flow_run=flow_run, tags=["etl"],
                                tracer_provider=provider):
                body()
        assert len(sink) == 3 * runs
    return go


def bench_dual_states(runs: int, provider) -> tuple[float, float]:
    """Microseconds per non-final state change (Pending, Running) and per
    final one (Completed, which also computes the span and ends it)."""
    flow_run = FlowRunRef(id=uuid4(), name="bench", flow_name="bench", flow_id=uuid4())
    sink = EventList()
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


def median_us(go: Callable[[], None], runs: int, rounds: int) -> float:
    go()  # warm up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        go()
        times.append((time.perf_counter_ns() - t0) / runs / 1000)
    return statistics.median(times)


def main(runs: int = 2000, rounds: int = 5) -> None:
    exporter = DropExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # Prefect's RunTelemetry uses the global one
    no_sdk = trace.NoOpTracerProvider()

    results = {
        "none": median_us(bench_none(runs), runs, rounds),
        "prefect-otel": median_us(bench_prefect(runs), runs, rounds),
        "dual": median_us(bench_dual(runs, provider), runs, rounds),
        "dual-events": median_us(bench_dual(runs, no_sdk), runs, rounds),
    }
    results["dual-span"] = results["dual"] - results["dual-events"]
    early, final = bench_dual_states(runs, provider)
    assert exporter.spans > 0

    print(f"{runs} task runs x {rounds} rounds, 3 state changes each; "
          "median microseconds per task run")
    print(f"{'':14} {'per task run':>12} {'per state change':>17}")
    for name, us in results.items():
        print(f"{name:14} {us:12.1f} {us / 3:17.1f}")
    print(f"dual, by state change: {early:.1f} us for Pending or Running, "
          f"{final:.1f} us for the final state (builds and ends the span)")
    ratio = (results["dual"] - results["none"]) / (results["prefect-otel"] - results["none"])
    print(f"dual emission (events + span) costs {ratio:.1f}x Prefect's own span telemetry; "
          f"its span part alone {results['dual-span'] / results['prefect-otel']:.1f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
