"""What the sidecar's store costs: events through `Pipeline` into SQLite.

    .venv/bin/python benchmarks/service.py [RUNS] [BATCH]

RUNS task runs of five states each (Prefect-shaped), taken in batches of
BATCH events (one transaction each, as the service takes a websocket burst or
a push body): every event written to the store, every run's span written to
the outbox in the transaction that closes the run. Then the outbox read back
and decoded, as a delivery does. Compared with the assembler alone (no store).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.factories import FlowRun, task_run_events  # noqa: E402

from otel_bridge.model.events import parse_wire_event  # noqa: E402
from otel_bridge.service.metrics import Metrics  # noqa: E402
from otel_bridge.service.pipeline import SPAN, Pipeline, decode  # noqa: E402
from otel_bridge.service.store import Store  # noqa: E402
from otel_bridge.translate.assembler import Assembler, AssemblerOptions  # noqa: E402


def main(runs: int, batch: int) -> None:
    flow_run = FlowRun()
    states = ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]
    events = [
        parse_wire_event(event)
        for i in range(runs)
        for event in task_run_events(states, name=f"task-{i}", flow_run=flow_run, tags=["etl"])
    ]
    options = AssemblerOptions(linger_seconds=0)

    start = time.perf_counter()
    assembler = Assembler(options, clock=lambda: 1.0)
    for event in events:
        assembler.add(event)
    spans = assembler.expire()
    bare = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store.sqlite3")
        pipeline = Pipeline(store, Metrics(), options, clock=lambda: 1.0)
        start = time.perf_counter()
        for i in range(0, len(events), batch):
            pipeline.take_events(events[i:i + batch], "bench")
            pipeline.tick()
        stored = time.perf_counter() - start
        size = (Path(tmp) / "store.sqlite3").stat().st_size + sum(
            p.stat().st_size for p in Path(tmp).glob("store.sqlite3-*"))

        start = time.perf_counter()
        items = store.peek(SPAN, len(spans) + 1, 1 << 40)
        decoded = [decode(SPAN, item.body) for item in items]
        read = time.perf_counter() - start
        store.close()

    assert len(decoded) == len(spans) == runs
    n = len(events)
    print(f"{runs} task runs, {n} events, batches of {batch}")
    print(f"  assembler alone         {n / bare:>10,.0f} events/s")
    print(f"  pipeline + SQLite store {n / stored:>10,.0f} events/s  ({stored / runs * 1e6:,.0f} us per run)")
    print(f"  outbox read + decode    {runs / read:>10,.0f} spans/s")
    print(f"  store on disk           {size / 1e6:>10,.1f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000,
         int(sys.argv[2]) if len(sys.argv) > 2 else 100)
