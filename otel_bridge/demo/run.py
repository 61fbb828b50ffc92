"""`otel-bridge demo`: the whole forward path on real parts, with nothing to
set up by hand.

1. start a real Prefect server on a free loopback port (its own temporary home);
2. run the bundled example flow against it, in its own process, as a user would;
3. read the flow's events back from the server's REST API, complete;
4. turn them into spans and show the trace as a tree, and write it as
   OTLP/JSON (and the events as JSON lines) to files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.model.events import parse_wire_event
from otel_bridge.sinks.otlp_json import OtlpJsonWriter
from otel_bridge.sinks.sdk import resource_from_env
from otel_bridge.sinks.tree import TreeWriter
from otel_bridge.sources.prefect_rest import read_events
from otel_bridge.translate.assembler import Assembler
from otel_bridge.translate.forward import is_final, run_key

# Prefect stores events asynchronously; wait this long at most for the last
# ones after the flow's process has exited.
SETTLE_TIMEOUT = 40.0
# Prefect's event persister writes a batch at least every 5 s
# (PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL).
SETTLE_QUIET = 6.0


def run_demo(otlp_json_path: str, events_path: str) -> int:
    say = lambda text: print(f"otel-bridge demo: {text}", file=sys.stderr)  # noqa: E731
    say("starting a local Prefect server ...")
    with LocalPrefectServer() as server:
        say(f"Prefect server at {server.api_url}; running the example flow ...")
        since = datetime.now(timezone.utc) - timedelta(seconds=1)
        flow = subprocess.run(
            [sys.executable, "-m", "otel_bridge.demo.example_flow"],
            env=server.env(), capture_output=True, text=True, timeout=300,
        )
        if flow.returncode != 0:
            say(f"the example flow failed to run:\n{flow.stdout}\n{flow.stderr}")
            return 1
        raw = settled_events(server.api_url, since)
    say(f"read {len(raw)} events from the server's REST API")

    with open(events_path, "w", encoding="utf-8") as stream:
        for event in raw:
            stream.write(json.dumps(event) + "\n")
    assembler = Assembler()
    for event in raw:
        parsed = parse_wire_event(event)
        if parsed is not None:
            assembler.add(parsed)
    spans = assembler.flush()
    TreeWriter(sys.stdout).export(spans)
    with open(otlp_json_path, "w", encoding="utf-8") as stream:
        OtlpJsonWriter(stream, resource_from_env()).export(spans)
    say(f"{len(spans)} spans written to {otlp_json_path} (OTLP/JSON); events in {events_path}")
    say("send them to a collector with: otel-bridge convert "
        f"{events_path} --to otlp  (set OTEL_EXPORTER_OTLP_ENDPOINT)")
    return 0


def settled_events(api_url: str, since: datetime) -> list[dict]:
    """All of the flow's events, once every run in them has reached a final
    state and the reads have not changed for longer than the server's
    persister holds events back (or the timeout passes): a whole run's events
    can still be waiting in its batch while every run already read is final."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    previous: list[dict] = []
    stable_since = time.monotonic()
    while True:
        current = list(read_events(api_url, since=since))
        if len(current) != len(previous):
            stable_since = time.monotonic()
        elif current and _all_final(current) and time.monotonic() - stable_since >= SETTLE_QUIET:
            return current
        if time.monotonic() > deadline:
            return current
        previous = current
        time.sleep(0.5)


def _all_final(raw: list[dict]) -> bool:
    final: dict[str, bool] = {}
    for obj in raw:
        event = parse_wire_event(obj)
        key = run_key(event) if event is not None else None
        if key is not None:
            final[key.resource_id] = final.get(key.resource_id, False) or is_final(event)
    return bool(final) and all(final.values())
