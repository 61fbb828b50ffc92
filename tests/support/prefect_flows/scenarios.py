"""Real Prefect flows, one per behaviour we need captured events of.

Run one scenario per process, from the repo root, against a server given by
PREFECT_API_URL (see otel_bridge.demo.server.LocalPrefectServer.env()):

    python -m tests.support.prefect_flows.scenarios <scenario-name>

One process per scenario because some of them end the process (a crash, a
SIGTERM) and because Prefect keeps per-process state (event client, caches).
A scenario may exit non-zero: a failing flow raises, as it would for a user.
Names starting with "_" are helper roles started by other scenarios.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Callable

from prefect import flow, tags, task
from prefect.cache_policies import INPUTS

from tests.support.prefect_flows.telemetry import install_from_env

# Prefect's own spans, when OTEL_BRIDGE_CAPTURE_PREFECT_SPANS names a file
# (helper roles started as children inherit it and append to the same file).
install_from_env()

SCENARIOS: dict[str, Callable[[], object]] = {}


def scenario(name: str):
    def register(fn):
        SCENARIOS[name] = fn
        return fn

    return register


def _python_m(role: str, **popen_kwargs) -> subprocess.Popen:
    """Start a helper role of this module in a child process (same env, cwd)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.prefect_flows.scenarios", role], **popen_kwargs
    )


# --- success / failure ----------------------------------------------------------


@task
def add(x: int, y: int) -> int:
    return x + y


@flow(name="s-success")
def success_flow() -> int:
    return add(1, add(2, 3))


@scenario("success")
def run_success():
    return success_flow()


@task
def boom(x: int) -> int:
    raise ValueError(f"boom: bad input {x}")


@flow(name="s-failure")
def failure_flow() -> int:
    add(1, 1)
    return boom(7)


@scenario("failure")
def run_failure():
    return failure_flow()


# --- retries --------------------------------------------------------------------

_attempts: dict[str, int] = {}


def _attempt(key: str) -> int:
    _attempts[key] = _attempts.get(key, 0) + 1
    return _attempts[key]


@task(retries=2)
def flaky_then_ok() -> str:
    n = _attempt("flaky_then_ok")
    if n <= 2:
        raise ConnectionError(f"attempt {n} failed")
    return f"ok on attempt {n}"


@task(retries=2)
def always_flaky() -> str:
    raise ConnectionError(f"attempt {_attempt('always_flaky')} failed")


@flow(name="s-retries-immediate")
def retries_immediate_flow() -> str:
    result = flaky_then_ok()
    # return_state: the exhausted task ends Failed, the flow still completes.
    always_flaky(return_state=True)
    return result


@scenario("retries-immediate")
def run_retries_immediate():
    return retries_immediate_flow()


@task(retries=2, retry_delay_seconds=1)
def flaky_delayed() -> str:
    n = _attempt("flaky_delayed")
    if n <= 2:
        raise TimeoutError(f"attempt {n} timed out upstream")
    return f"ok on attempt {n}"


@flow(name="s-retries-delayed")
def retries_delayed_flow() -> str:
    return flaky_delayed()


@scenario("retries-delayed")
def run_retries_delayed():
    return retries_delayed_flow()


# --- cache hit ------------------------------------------------------------------


@task(cache_policy=INPUTS, persist_result=True)
def expensive(token: str, x: int) -> int:
    return x * x


@flow(name="s-cache-hit")
def cache_hit_flow() -> int:
    # A fresh token per run keeps the first call a miss even when the result
    # store already holds an earlier capture's result.
    token = uuid.uuid4().hex
    first = expensive(token, 12)
    second = expensive(token, 12)  # same inputs -> Cached
    return first + second


@scenario("cache-hit")
def run_cache_hit():
    return cache_hit_flow()


# --- tags -----------------------------------------------------------------------


@task(tags=["etl", "db"])
def tagged(x: int) -> int:
    return x + 1


@task
def untagged(x: int) -> int:
    return x - 1


@flow(name="s-tags")
def tags_flow() -> int:
    a = tagged(1)
    with tags("ctx-inner"):
        b = untagged(a)
        c = tagged(b)
    return c


@scenario("tags")
def run_tags():
    # Tags around the flow call become flow-run tags and reach every task.
    with tags("ctx-outer"):
        return tags_flow()


# --- mapped / submitted ---------------------------------------------------------


@task
def square(x: int) -> int:
    return x * x


@task
def inc(x: int) -> int:
    return x + 1


@flow(name="s-mapped")
def mapped_flow() -> int:
    squares = square.map(range(50))
    incs = [inc.submit(i) for i in range(20)]
    return sum(squares.result()) + sum(f.result() for f in incs)


@scenario("mapped")
def run_mapped():
    return mapped_flow()


# --- nested tasks / subflow -----------------------------------------------------


@task
def leaf(x: int) -> int:
    return x * 10


@task
def parent_task(x: int) -> int:
    # A task run inside a task run: the inner one's parent is this task.
    return leaf(x) + leaf(x + 1)


@flow(name="s-nested-tasks")
def nested_tasks_flow() -> int:
    return parent_task(1)


@scenario("nested-tasks")
def run_nested_tasks():
    return nested_tasks_flow()


@flow(name="s-child-flow")
def child_flow(x: int) -> int:
    return add(x, leaf(x))


@flow(name="s-subflow")
def subflow_parent() -> int:
    before = add(1, 2)
    return child_flow(before) + add(before, 0)


@scenario("subflow")
def run_subflow():
    return subflow_parent()


# --- timeout --------------------------------------------------------------------


@task(timeout_seconds=1)
def too_slow() -> str:
    time.sleep(5)
    return "never"


@flow(name="s-timeout")
def timeout_flow() -> str:
    # Return the name, not the state: a flow returning a Failed state fails.
    return too_slow(return_state=True).name


@scenario("timeout")
def run_timeout():
    return timeout_flow()


# --- cancelled (through the API, via a runner) ----------------------------------

CANCEL_DEPLOYMENT = "s-cancellable/cancel-me"


@task
def quick() -> int:
    return 1


@task
def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@flow(name="s-cancellable")
def cancellable_flow() -> float:
    quick()
    # One slow task in a worker thread, one in the flow's main thread.  On
    # cancel the runner SIGTERMs the flow process: Prefect turns that into an
    # exception in the main thread only.
    in_thread = slow.submit(60)
    in_main = slow(60)
    return in_main + in_thread.result()


@scenario("_serve-cancellable")
def serve_cancellable():
    # A runner: it polls for scheduled runs of the deployment, runs each in a
    # subprocess, and kills that subprocess when the run goes Cancelling.
    cancellable_flow.serve(name="cancel-me")


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@scenario("cancelled")
def run_cancelled():
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    env = dict(os.environ, PREFECT_RUNNER_POLL_FREQUENCY="1")
    runner = _python_m("_serve-cancellable", env=env)
    try:
        with get_client(sync_client=True) as client:

            def deployment_exists():
                try:
                    return client.read_deployment_by_name(CANCEL_DEPLOYMENT)
                except Exception:
                    return None

            _wait_for(deployment_exists, 60, "the served deployment")
            flow_run = run_deployment(CANCEL_DEPLOYMENT, timeout=0)
            print(f"flow run {flow_run.id}", flush=True)

            def slow_tasks_running():
                runs = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
                )
                running = [r for r in runs if r.state and r.state.is_running()]
                return len(running) >= 2

            _wait_for(slow_tasks_running, 90, "the slow tasks to run")
            client.set_flow_run_state(
                flow_run.id, Cancelling(message="cancelled by the capture scenario"), force=True
            )

            def cancelled():
                state = client.read_flow_run(flow_run.id).state
                return state is not None and state.is_final() and state

            final = _wait_for(cancelled, 60, "the flow run to be Cancelled")
            print(f"flow run ended {final.name}", flush=True)
    finally:
        runner.send_signal(signal.SIGINT)
        try:
            runner.wait(timeout=20)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait()


# --- crashes --------------------------------------------------------------------


@task
def interrupted() -> None:
    raise KeyboardInterrupt("simulated Ctrl-C inside a task")


@flow(name="s-crash-baseexception")
def crash_baseexception_flow():
    add(1, 2)
    interrupted()


@scenario("crash-baseexception")
def run_crash_baseexception():
    return crash_baseexception_flow()


@task
def long_running() -> None:
    print("TASK-RUNNING", flush=True)
    time.sleep(60)


@flow(name="s-crash-sigterm")
def crash_sigterm_flow():
    add(1, 2)
    long_running()


@scenario("_sigterm-child")
def sigterm_child():
    return crash_sigterm_flow()


@scenario("crash-sigterm")
def run_crash_sigterm():
    # The flow runs in a child so that *its* process gets the SIGTERM, as it
    # would from a container runtime or a process supervisor.
    child = _python_m("_sigterm-child", stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(line)
        if "TASK-RUNNING" in line:
            time.sleep(0.5)
            child.send_signal(signal.SIGTERM)
            break
    rest, _ = child.communicate(timeout=60)
    sys.stdout.write(rest or "")
    print(f"flow process exited with {child.returncode}", flush=True)


# --- not ready --------------------------------------------------------------------


@task
def upstream_fails() -> int:
    raise RuntimeError("upstream failed")


@task
def downstream(x: int) -> int:
    return x + 1


@flow(name="s-not-ready")
def not_ready_flow():
    a = upstream_fails.submit()
    b = downstream.submit(a)
    b.wait()
    return b.state.name


@scenario("not-ready")
def run_not_ready():
    return not_ready_flow()


# --- transaction rolled back ----------------------------------------------------


@task
def write_record(name: str) -> str:
    return f"record {name} written"


@write_record.on_rollback
def _undo_write(txn) -> None:
    print(f"rolling back {txn.key}", flush=True)


@task
def validate_record(name: str) -> None:
    raise ValueError(f"record {name} failed validation")


@flow(name="s-rolled-back")
def rolled_back_flow() -> str:
    from prefect.transactions import transaction

    try:
        with transaction():
            write_record("a")
            validate_record("a")
    except ValueError as exc:
        return f"transaction rolled back: {exc}"
    return "committed"


@scenario("rolled-back")
def run_rolled_back():
    return rolled_back_flow()


# --- deferred tasks (task worker, no flow run) ----------------------------------


@task
def deferred_square(x: int) -> int:
    return x * x


@task
def deferred_fail(x: int) -> int:
    raise ValueError(f"deferred task rejected {x}")


@scenario("_task-worker")
def task_worker():
    from prefect.task_worker import serve

    serve(deferred_square, deferred_fail)


@scenario("deferred")
def run_deferred():
    worker = _python_m("_task-worker")
    try:
        time.sleep(3)  # give the worker time to subscribe (runs queue anyway)
        futures = [deferred_square.delay(i) for i in range(3)]
        failing = deferred_fail.delay(99)
        print("results", [f.result(timeout=60) for f in futures], flush=True)
        failing.wait(timeout=60)
        print("failing task ended", failing.state.name, flush=True)
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


# --- async ----------------------------------------------------------------------


@task
async def fetch(i: int) -> int:
    await asyncio.sleep(0.1)
    return i * 2


@task
async def combine(values: list[int]) -> int:
    return sum(values)


@flow(name="s-async-tasks")
async def async_flow() -> int:
    first = await fetch(0)
    values = await asyncio.gather(*(fetch(i) for i in range(1, 5)))
    return await combine([first, *values])


@scenario("async-tasks")
def run_async_tasks():
    return asyncio.run(async_flow())


# --- huge message ---------------------------------------------------------------


@task
def huge_failure() -> None:
    raise ValueError("huge:" + "x" * 300_000)


@flow(name="s-huge-message")
def huge_message_flow() -> str:
    return huge_failure(return_state=True).name


@scenario("huge-message")
def run_huge_message():
    return huge_message_flow()


# --- OpenTelemetry traceparent ----------------------------------------------------


@flow(name="s-otel-traceparent")
def otel_flow() -> int:
    return add(1, add(2, 3))


@scenario("otel-traceparent")
def run_otel_traceparent():
    # Prefect only makes spans (and puts __OTEL_TRACEPARENT in run labels) when
    # an SDK TracerProvider is installed; no exporter is needed for that.
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # not captured already
        trace.set_tracer_provider(TracerProvider())
    return otel_flow()


PUBLIC_SCENARIOS = [name for name in SCENARIOS if not name.startswith("_")]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SCENARIOS:
        print(
            "usage: python -m tests.support.prefect_flows.scenarios <scenario>\n"
            "scenarios: " + ", ".join(PUBLIC_SCENARIOS),
            file=sys.stderr,
        )
        return 2
    SCENARIOS[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
