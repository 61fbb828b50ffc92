"""How fast the forward path is, and how much memory open runs hold.

    .venv/bin/python benchmarks/forward.py [RUNS]

Builds RUNS task runs of five states each (Prefect-shaped, as tests/support/factories
makes them), then times: parsing the JSON lines, assembling spans, and
encoding OTLP/JSON; and measures the peak memory of holding every run open at
once (the worst case for the assembler's cap on open runs). Prints figures;
asserts nothing.
"""

from __future__ import annotations

import io
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.factories import FlowRun, task_run_events  # noqa: E402

from otel_bridge.model.events import parse_wire_event  # noqa: E402
from otel_bridge.sinks.otlp_json import OtlpJsonWriter  # noqa: E402
from otel_bridge.sinks.sdk import resource_from_env  # noqa: E402
from otel_bridge.translate.assembler import Assembler  # noqa: E402


def main(runs: int) -> None:
    flow_run = FlowRun()
    states = ["Pending", "Running", "AwaitingRetry", "Retrying", "Completed"]
    lines = [
        json.dumps(event)
        for i in range(runs)
        for event in task_run_events(states, name=f"task-{i}", flow_run=flow_run, tags=["etl"])
    ]
    size = sum(len(line) + 1 for line in lines)

    started = time.perf_counter()
    events = [parse_wire_event(line) for line in lines]
    parsed = time.perf_counter()
    assembler = Assembler()
    for event in events:
        assembler.add(event)
    assembled = time.perf_counter()
    del events
    spans = assembler.flush()
    flushed = time.perf_counter()
    resource = resource_from_env()
    out = io.StringIO()
    OtlpJsonWriter(out, resource).export(spans)  # as `convert` writes it
    encoded = len(out.getvalue())
    done = time.perf_counter()

    n = len(lines)
    print(f"{runs} task runs, {n} events, {size / 1e6:.1f} MB of JSON lines")
    print(f"parse        {parsed - started:7.3f} s  {n / (parsed - started):9.0f} events/s")
    print(f"assemble     {assembled - parsed:7.3f} s  {n / (assembled - parsed):9.0f} events/s")
    print(f"build spans  {flushed - assembled:7.3f} s  {runs / (flushed - assembled):9.0f} spans/s")
    print(f"OTLP/JSON    {done - flushed:7.3f} s  {runs / (done - flushed):9.0f} spans/s"
          f"  ({encoded / 1e6:.1f} MB)")
    total = done - started
    print(f"end to end   {total:7.3f} s  {n / total:9.0f} events/s")
    held = open_runs_memory(lines)
    print(f"memory held by {runs} open runs: {held / 1e6:.1f} MB "
          f"({held / runs / 1e3:.1f} kB per run of {len(states)} events)")


def open_runs_memory(lines: list[str]) -> int:
    """Bytes an assembler holding every run open takes, its events included
    (traced separately: tracemalloc slows what it watches)."""
    tracemalloc.start()
    assembler = Assembler()
    for line in lines:
        assembler.add(parse_wire_event(line))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return held


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
