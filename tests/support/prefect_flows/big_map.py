"""A flow that maps many tasks, to load the event stream (1 flow, N x 3 events).

    python -m tests.support.prefect_flows.big_map [N] [FLOW_RUN_NAME] [TASK_SECONDS]

Run from the repo root with a server's env (LocalPrefectServer.env()).  The
flow run name lets a test find this run among others through the API;
TASK_SECONDS makes each task sleep, so that a test can act mid-flow.
With OTEL_BRIDGE_CAPTURE_PREFECT_SPANS set, Prefect's own spans are written
to that file (tests/support/prefect_flows/telemetry.py).
"""

from __future__ import annotations

import sys
import time

from prefect import flow, task


@task
def work(i: int, seconds: float = 0.0) -> int:
    time.sleep(seconds)
    return i * i


@flow(name="big-map")
def big_map(n: int, seconds: float = 0.0) -> int:
    return sum(work.map(range(n), seconds=seconds).result())


def main(argv: list[str]) -> int:
    from tests.support.prefect_flows.telemetry import install_from_env

    install_from_env()
    n = int(argv[0]) if argv else 500
    options = {"flow_run_name": argv[1]} if len(argv) > 1 else {}
    seconds = float(argv[2]) if len(argv) > 2 else 0.0
    total = big_map.with_options(**options)(n, seconds)
    print(f"big-map: {n} tasks, sum {total}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
