"""A real Prefect flow with otel-bridge dual emission switched on by one line:
every task run and flow run gets otel-bridge's span in process (the same
span, same id, that the sidecar makes from the run's events), and the spans
the code opens inside a task are children of that task run's span. The
trace is whole without a sidecar: the flow run's span is made from the
events the server stored for it, a few seconds after the flow ends (the
program waits for it at exit, or at `otel_bridge.engine.prefect.flush()`).

    PREFECT_API_URL=... python examples/prefect_flow_dual_emission.py

Spans go to the global OpenTelemetry TracerProvider if the program set one,
else over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (or as
OTEL_TRACES_EXPORTER says).
"""

from __future__ import annotations

from opentelemetry import trace
from prefect import flow, task

import otel_bridge.engine.prefect

otel_bridge.engine.prefect.enable()  # the one line

tracer = trace.get_tracer("example-user-code")  # the user's own spans


@task(retries=2, retry_delay_seconds=0)
def fetch(attempts: dict) -> int:
    attempts["fetch"] = attempts.get("fetch", 0) + 1
    with tracer.start_as_current_span("fetch.http-get") as span:
        span.set_attribute("attempt", attempts["fetch"])
        if attempts["fetch"] < 3:
            raise ConnectionError(f"attempt {attempts['fetch']} failed")
    return 42


@task(retries=1, retry_delay_seconds=1)
def slow_retry(attempts: dict) -> int:
    attempts["slow"] = attempts.get("slow", 0) + 1
    if attempts["slow"] == 1:
        raise TimeoutError("first attempt timed out")
    return 1


@task
def checksum(value: int) -> int:
    with tracer.start_as_current_span("checksum.compute"):
        return value % 7


@task(tags=["warehouse"])
def load(value: int) -> int:
    with tracer.start_as_current_span("load.write-rows"):
        pass
    return checksum(value)  # a nested task run


@task
def square(x: int) -> int:
    with tracer.start_as_current_span("square.compute"):
        return x * x


@task
def validate(value: int) -> None:
    raise ValueError(f"validation failed for {value}")


@flow(name="dual-emission-example")
def etl() -> int:
    attempts: dict = {}
    value = fetch(attempts)
    slow_retry(attempts)
    total = load(value)
    total += sum(f.result() for f in square.map([1, 2, 3]))  # concurrent task runs
    validate(value, return_state=True)  # a failed task run; the flow goes on
    return total


if __name__ == "__main__":
    print(etl())
