"""The flow the demo runs: small, but it shows what the bridge maps — a task
that succeeds, one that succeeds after a retry, a nested task, tags, and a task
that fails (the flow catches it and carries on). The retried task and the
failing one log through Prefect's run logger, so their lines reach the server
and the demo can show the failing task's last lines under its span."""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger, tags, task

_attempts = {"flaky": 0}


@task
def extract(n: int) -> list[int]:
    return list(range(n))


@task(retries=2, retry_delay_seconds=0)
def flaky_transform(values: list[int]) -> list[int]:
    logger = get_run_logger()
    _attempts["flaky"] += 1
    if _attempts["flaky"] == 1:
        logger.warning("attempt 1: upstream not ready, raising so Prefect retries")
        raise ConnectionError("upstream hiccup, will retry")
    logger.info("attempt %d: doubled %d values", _attempts["flaky"], len(values))
    return [v * 2 for v in values]


@task
def checksum(values: list[int]) -> int:
    return sum(values)


@task(tags=["load"])
def load(values: list[int]) -> int:
    # A task inside a task: its span is a child of this task's span.
    return checksum(values)


@task
def validate(values: list[int]) -> None:
    logger = get_run_logger()
    logger.info("validating %d rows against the expected 100", len(values))
    logger.warning("%d rows missing; the first is %d", 100 - len(values), len(values))
    raise ValueError(f"validation failed: {len(values)} rows, expected 100")


@flow(name="otel-bridge-demo")
def demo_pipeline(n: int = 10) -> int:
    values = extract(n)
    with tags("demo"):
        doubled = flaky_transform(values)
    total = load(doubled)
    state = validate(doubled, return_state=True)
    print(f"validate ended {state.name}; total={total}")
    return total


if __name__ == "__main__":
    demo_pipeline(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
