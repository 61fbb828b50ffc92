"""A minimal engine that dual-emits: each task run's Prefect events and its
OpenTelemetry span come from one `TaskRunTracker`.

    python examples/minimal_engine.py EVENTS.jsonl

Events go to EVENTS.jsonl (as Prefect serialises them; `otel-bridge convert
EVENTS.jsonl` makes the very same spans from them). Spans go through the
OpenTelemetry SDK: over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (or as
OTEL_TRACES_EXPORTER says), else printed to the console.
"""

from __future__ import annotations

import sys
from uuid import uuid4

from opentelemetry import trace

from otel_bridge.engine import (FlowRunRef, JsonlEventSink, TaskRunTracker, failure_text,
                                tracer_provider_from_env)

provider = tracer_provider_from_env(fallback="console", set_global=True)
tracer = trace.get_tracer("minimal-engine")  # the user code's own spans


def run_task(fn, *args, retries=0, **options):
    """Run `fn` as a task run: Pending > Running [> Retrying...] > Completed/Failed."""
    with TaskRunTracker(fn.__name__, retries=retries, **options) as run:
        for attempt in range(retries + 1):
            try:
                return fn(*args)
            except Exception as exc:
                if attempt == retries:
                    raise  # the tracker records Failed with Prefect's message
                run.set_state("RUNNING", "Retrying",
                              f"Task run encountered an exception {failure_text(exc)}")


attempts = []


def extract():
    return list(range(10))


def transform(rows):
    attempts.append(1)
    if len(attempts) == 1:
        raise ConnectionError("flaky upstream")
    return [r * 2 for r in rows]


def checksum(rows):
    return sum(rows)


def load(rows):
    with tracer.start_as_current_span("INSERT rows"):  # nests under load's span
        return run_task(checksum, rows)  # a nested task run


def validate(rows):
    raise ValueError(f"validation failed: {len(rows)} rows, expected 100")


def main(events_path: str) -> int:
    flow_run = FlowRunRef(id=uuid4(), name="minimal-run", flow_name="minimal", flow_id=uuid4())
    with JsonlEventSink(events_path) as sink:
        common = dict(sink=sink, flow_run=flow_run)
        rows = run_task(extract, **common)
        rows = run_task(transform, rows, retries=2, tags=["etl"], **common)
        run_task(load, rows, **common)
        try:
            run_task(validate, rows, **common)
        except ValueError as exc:
            print(f"validate failed: {exc}", file=sys.stderr)
    provider.shutdown()  # flush the spans
    print(f"{sink.events_written} events in {events_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])  # the usage line, exit status 1
    sys.exit(main(sys.argv[1]))
