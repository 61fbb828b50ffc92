"""`otel-bridge demo`: the whole forward path on real parts, with nothing to
set up by hand.

1. start a real Prefect server on a free loopback port (its own temporary home);
2. run the bundled example flow against it, in its own process, as a user would;
3. read the flow's events back from the server's REST API, complete, and
   then its log lines (`POST /api/logs/filter`);
4. turn them into spans and show the trace as a tree, each failed task run's
   last log lines under its span, and the run metrics `convert --metrics`
   records under the tree; write the spans and the log records as OTLP/JSON
   (and the events as JSON lines) to files.

What is printed is made by pure functions (`sinks.tree`, `demo.report`);
this module does the I/O.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

from otel_bridge.demo.report import failed_task_notes, metrics_lines
from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.model.events import EventRejected, parse_wire_event
from otel_bridge.prefect_client import resolve_api
from otel_bridge.sinks.otlp_json import OtlpJsonWriter
from otel_bridge.sinks.otlp_logs import OtlpJsonLogWriter
from otel_bridge.sinks.sdk import resource_from_env
from otel_bridge.sinks.tree import TreeWriter
from otel_bridge.sources.prefect_logs import PrefectLogReader
from otel_bridge.sources.prefect_rest import read_events
from otel_bridge.translate.assembler import Assembler
from otel_bridge.translate.forward import is_final, run_key
from otel_bridge.translate.logs import log_record

# Prefect stores events asynchronously; wait this long at most for the last
# ones after the flow's process has exited.
SETTLE_TIMEOUT = 40.0
# Prefect's event persister writes a batch at least every 5 s
# (PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL).
SETTLE_QUIET = 6.0
# The flow's process sends its log lines in batches every 2 s
# (PREFECT_LOGGING_TO_API_BATCH_INTERVAL) and the rest as it exits; the
# server stores each batch as it takes it. Read them until they have not
# changed for a batch interval and a little more.
LOGS_SETTLE_TIMEOUT = 20.0
LOGS_SETTLE_QUIET = 2.5


def run_demo(otlp_json_path: str, events_path: str, logs_path: str) -> int:
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
        raw_logs = settled_logs(server.api_url, since)
    say(f"read {len(raw)} events and {len(raw_logs)} log lines from the server's REST API")

    with open(events_path, "w", encoding="utf-8") as stream:
        for event in raw:
            stream.write(json.dumps(event) + "\n")
    assembler = Assembler()
    for event in raw:
        parsed = parse_wire_event(event)
        if parsed is not None:
            assembler.add(parsed)
    spans = assembler.flush()
    records = log_records(raw_logs)
    TreeWriter(sys.stdout, notes=failed_task_notes(spans, records)).export(spans)
    summary = metrics_lines(spans)
    if summary:
        print("\n".join(summary) + "\n", flush=True)
    resource = resource_from_env()
    with open(otlp_json_path, "w", encoding="utf-8") as stream:
        OtlpJsonWriter(stream, resource).export(spans)
    with open(logs_path, "w", encoding="utf-8") as stream:
        OtlpJsonLogWriter(stream, resource).export(records)
    say(f"{len(spans)} spans written to {otlp_json_path} and {len(records)} log records "
        f"to {logs_path} (OTLP/JSON); events in {events_path}")
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


def settled_logs(api_url: str, since: datetime) -> list[dict]:
    """The log lines stored since `since`, oldest first, once a read has
    not changed for `LOGS_SETTLE_QUIET` seconds (or the timeout passes)."""
    deadline = time.monotonic() + LOGS_SETTLE_TIMEOUT
    previous: list[dict] = []
    stable_since = time.monotonic()
    while True:
        current = asyncio.run(_read_logs(api_url, since))
        if len(current) != len(previous):
            stable_since = time.monotonic()
        elif time.monotonic() - stable_since >= LOGS_SETTLE_QUIET:
            return current
        if time.monotonic() > deadline:
            return current
        previous = current
        time.sleep(0.5)


async def _read_logs(api_url: str, since: datetime) -> list[dict]:
    # Up to a little past now: a line's timestamp is the client's clock.
    until = datetime.now(timezone.utc) + timedelta(minutes=1)
    # Nothing of the user's Prefect settings (an API key, custom headers)
    # goes to the demo's throw-away server.
    reader = PrefectLogReader(api_url, api=resolve_api(api_url, env={}))
    try:
        seen: dict[str, dict] = {}
        async for page in reader.read_window(since, until):
            for line in page:  # a page boundary's lines come twice: once by id
                seen.setdefault(str(line.get("id")), line)
        return list(seen.values())
    finally:
        await reader.close()


def log_records(raw_logs: list[dict]) -> list:
    """The log records of the lines of a run (the others are passed over)."""
    records = []
    for line in raw_logs:
        try:
            record = log_record(line)
        except EventRejected as error:
            print(f"otel-bridge demo: a log line set aside ({error.reason}): {error.detail}",
                  file=sys.stderr)
            continue
        if record is not None:
            records.append(record)
    return records
