"""A flow that maps many tasks, to load the event stream (1 flow, N x 3 events).

    python -m tests.prefect_flows.big_map [N] [FLOW_RUN_NAME]

Run from the repo root with a server's env (LocalPrefectServer.env()).  The
flow run name lets a test find this run among others through the API.
"""

from __future__ import annotations

import sys

from prefect import flow, task


@task
def work(i: int) -> int:
    return i * i


@flow(name="big-map")
def big_map(n: int) -> int:
    return sum(work.map(range(n)).result())


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 500
    options = {"flow_run_name": argv[1]} if len(argv) > 1 else {}
    total = big_map.with_options(**options)(n)
    print(f"big-map: {n} tasks, sum {total}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
