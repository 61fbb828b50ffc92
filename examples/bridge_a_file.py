"""Use otel-bridge as a library: Prefect events in, spans out over OTLP.

    python examples/bridge_a_file.py EVENTS.jsonl

Reads Prefect events (JSON lines, as `POST /api/events/filter` returns them or
as `otel-bridge demo` saves them), assembles one span per run and exports them
with the official OTLP exporter configured by the standard variables
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL, ...). Without an
endpoint it prints the trees instead. Bad lines are counted, never fatal.
"""

from __future__ import annotations

import os
import sys

from otel_bridge import Assembler, EventRejected, parse_wire_event
from otel_bridge.sinks.otlp import OtlpSink, exporter_from_env
from otel_bridge.sinks.sdk import resource_from_env
from otel_bridge.sinks.tree import TreeWriter


def main(path: str) -> int:
    assembler = Assembler()
    spans, rejected = [], 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                event = parse_wire_event(line)
                if event is not None:
                    spans.extend(assembler.add(event))
            except EventRejected as error:
                rejected += 1
                print(f"skipped a line: {error}", file=sys.stderr)
    spans.extend(assembler.flush())  # the input is complete: end what is open

    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        sink = OtlpSink(exporter_from_env(), resource_from_env())
    else:
        sink = TreeWriter(sys.stdout)
    sink.export(spans)
    sink.close()
    print(f"{len(spans)} spans, {rejected} lines skipped", file=sys.stderr)
    return 1 if rejected else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])  # the usage line, exit status 1
    sys.exit(main(sys.argv[1]))
