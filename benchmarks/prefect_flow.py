"""What telemetry costs a real Prefect flow, per task run.

    .venv/bin/python benchmarks/prefect_flow.py [TASKS] [ROUNDS] [SETTLE_SECONDS]

`dual_emission.py` times the telemetry calls alone; this times whole flows.
A real Prefect 3.9.1 server runs as a child process; each round runs, for
each mode in turn (the order turning round by round, a pause between for the
server to take in the events of the one before), a fresh Python process that
runs one flow of TASKS sequential tasks doing nothing (after a warm-up flow),
waits until Prefect's events worker has sent every event, and reports per
task run the process's CPU time until then (every thread: the task engine,
Prefect's events worker, the SDK, the HTTP clients) and the wall time of the
flow call (what the flow waits for; the events worker keeps sending after
it). Modes:

  none          no OpenTelemetry SDK: Prefect makes no spans
  prefect-otel  Prefect's own telemetry: an SDK TracerProvider installed
  dual          otel-bridge's `enable()` on the same provider: task runs get
                otel-bridge's spans (flow runs keep Prefect's own)

Both telemetry modes use one pipeline: a SimpleSpanProcessor and an exporter
that encodes the spans to OTLP protobuf, as the SDK's OTLP exporters do, and
drops the bytes: export is counted, no I/O is. Prints the median of ROUNDS
per mode and what each telemetry mode adds to `none`; asserts that every
task run got its span.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

MODES = ("none", "prefect-otel", "dual")


def child(mode: str, tasks: int) -> None:
    """One measured flow run in this process; prints a JSON line."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from prefect import flow, task
    from prefect.events.worker import EventsWorker

    class Count(SpanExporter):
        spans = 0

        def export(self, spans):
            encode_spans(spans).SerializeToString()
            # task run spans: Prefect's own, or otel-bridge's
            Count.spans += sum(1 for s in spans if s.attributes.get("prefect.run.type") == "task"
                               or "cicd.pipeline.task.run.id" in s.attributes)
            return SpanExportResult.SUCCESS

    if mode != "none":
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Count()))
        trace.set_tracer_provider(provider)
    if mode == "dual":
        import otel_bridge.engine.prefect

        otel_bridge.engine.prefect.enable()

    @task
    def step(i: int) -> int:
        return i

    @flow
    def many(n: int) -> int:
        return sum(step(i) for i in range(n))

    def timed(n: int) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        many(n)
        wall = time.perf_counter() - wall
        EventsWorker.drain_all(timeout=120)  # every event sent, every span made
        return time.process_time() - cpu, wall

    timed(20)  # warm-up: clients, connections, caches
    before = Count.spans
    cpu, wall = timed(tasks)
    print(json.dumps({"mode": mode, "cpu": cpu, "wall": wall,
                      "task_spans": Count.spans - before}))


def main(tasks: int = 300, rounds: int = 6, settle: float = 5.0) -> None:
    from otel_bridge.demo.server import LocalPrefectServer

    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    with LocalPrefectServer() as server:
        env = dict(server.env(), PREFECT_LOGGING_TO_API_ENABLED="false")
        for round_no in range(rounds):
            # the order turns round by round, and each process starts once
            # the server has had time to take in the one before's events
            for mode in MODES[round_no % 3:] + MODES[:round_no % 3]:
                time.sleep(settle)
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(tasks)],
                                     env=env, capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
                line = json.loads(out.stdout.strip().splitlines()[-1])
                expected = 0 if mode == "none" else tasks
                assert line["task_spans"] == expected, line
                results[mode].append((line["cpu"], line["wall"]))

    per_run = {mode: (statistics.median(c for c, _ in values) / tasks * 1e6,
                      statistics.median(w for _, w in values) / tasks * 1e6)
               for mode, values in results.items()}
    for mode, values in results.items():
        print(f"{mode}: CPU per round (s) " + " ".join(f"{c:.2f}" for c, _ in values))
    spread = max(max(c for c, _ in v) / min(c for c, _ in v) for v in results.values())
    print(f"{tasks} sequential task runs per flow x {rounds} rounds, a real Prefect server; "
          "median microseconds per task run")
    print(f"{'':14} {'CPU':>8} {'added':>8} {'wall':>8} {'added':>8}")
    base_cpu, base_wall = per_run["none"]
    for mode, (cpu, wall) in per_run.items():
        print(f"{mode:14} {cpu:8.0f} {cpu - base_cpu:8.0f} {wall:8.0f} {wall - base_wall:8.0f}")
    print(f"rounds of one mode differ by up to {100 * (spread - 1):.0f}% in CPU on this machine")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main(*(int(a) for a in sys.argv[1:3]), *(float(a) for a in sys.argv[3:4]))
