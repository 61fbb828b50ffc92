#!/usr/bin/env python
"""Capture real Prefect 3.9.1 events for every scenario in tests/support/prefect_flows.

    .venv/bin/python scripts/capture_prefect_events.py [scenario ...]

Starts a throw-away local Prefect server; for each scenario: subscribes to the
live stream (no backfill), runs ``python -m tests.support.prefect_flows.scenarios
<name>`` against the server, waits for the events to settle, then reads the
complete set for the scenario's time window from the REST API.  Writes
(overwriting) into tests/fixtures/prefect-3.9.1/:

    <scenario>.jsonl     the REST set: one ReceivedEvent per line, as returned,
                         ordered by `occurred`
    <scenario>.ws.jsonl  the websocket frames as received, in arrival order

and prints a summary: event counts from both sources and each run's states.
Exits 1 if a scenario did not show the behaviour it is named after.

With --with-prefect-spans, Prefect's own OpenTelemetry spans are switched on in
each scenario's process (OTEL_BRIDGE_CAPTURE_PREFECT_SPANS, see
tests/support/prefect_flows/telemetry.py), and the output goes to
tests/fixtures/prefect-3.9.1-telemetry/ instead:

    <scenario>.jsonl                the REST set, as above
    <scenario>.prefect-spans.jsonl  Prefect's own spans of the same runs, as
                                    OTLP/JSON lines (one request per line)

`map-500` (only with --with-prefect-spans, not in the default set) runs
tests/support/prefect_flows/big_map.py with 500 tasks as a scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from otel_bridge.demo.server import LocalPrefectServer  # noqa: E402
from otel_bridge.sources.prefect_rest import read_all_events  # noqa: E402
from otel_bridge.sources.prefect_ws import PrefectEventStream  # noqa: E402

OUT_DIR = REPO / "tests" / "fixtures" / "prefect-3.9.1"
TELEMETRY_OUT_DIR = REPO / "tests" / "fixtures" / "prefect-3.9.1-telemetry"
SPANS_ENV = "OTEL_BRIDGE_CAPTURE_PREFECT_SPANS"  # tests/support/prefect_flows/telemetry.py

# Kept in step with tests/support/prefect_flows/scenarios.py (not imported: that module
# imports prefect, which this script does not need).
ALL_SCENARIOS = [
    "success",
    "failure",
    "retries-immediate",
    "retries-delayed",
    "cache-hit",
    "tags",
    "mapped",
    "nested-tasks",
    "subflow",
    "timeout",
    "cancelled",
    "crash-baseexception",
    "crash-sigterm",
    "not-ready",
    "rolled-back",
    "deferred",
    "async-tasks",
    "huge-message",
    "otel-traceparent",
]

# Runs that are not in scenarios.py: a scenario name -> the module and its
# arguments (python -m MODULE ARGS...).
EXTRA_RUNS: dict[str, list[str]] = {
    "map-500": ["tests.support.prefect_flows.big_map", "500"],
}

# What each scenario must show (event names that must occur), so a capture
# that silently lost its point is caught.
EXPECTED: dict[str, set[str]] = {
    "success": {"prefect.task-run.Completed", "prefect.flow-run.Completed"},
    "failure": {"prefect.task-run.Failed", "prefect.flow-run.Failed"},
    "retries-immediate": {"prefect.task-run.Retrying", "prefect.task-run.Failed"},
    "retries-delayed": {"prefect.task-run.AwaitingRetry", "prefect.task-run.Retrying"},
    "cache-hit": {"prefect.task-run.Cached"},
    "timeout": {"prefect.task-run.TimedOut"},
    "cancelled": {"prefect.flow-run.Cancelled", "prefect.task-run.Crashed"},
    "crash-baseexception": {"prefect.task-run.Crashed", "prefect.flow-run.Crashed"},
    "crash-sigterm": {"prefect.task-run.Crashed", "prefect.flow-run.Crashed"},
    "not-ready": {"prefect.task-run.NotReady"},
    "rolled-back": {"prefect.task-run.RolledBack"},
    "deferred": {"prefect.task-run.Scheduled", "prefect.task-run.Completed"},
    "huge-message": {"prefect.task-run.Failed"},
    "map-500": {"prefect.task-run.Completed", "prefect.flow-run.Completed"},
}

# States after which a run emits nothing more (NotReady is PENDING-typed but
# final for a task whose upstream failed).
FINAL_TYPES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
FINAL_NAMES = {"NotReady"}

SCENARIO_TIMEOUT = 240.0
SETTLE_TIMEOUT = 45.0
QUIET_WHEN_FINAL = 2.0  # seconds without a new event once every run is final
QUIET_OTHERWISE = 6.0  # well over the event persister's flush interval (0.5 s here)


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def run_sequences(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """State events per flow/task run, by resource id, in `occurred` order."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        rid = ev["resource"].get("prefect.resource.id", "")
        if rid.startswith(("prefect.task-run.", "prefect.flow-run.")) and "prefect.state-name" in ev["resource"]:
            runs[rid].append(ev)
    for seq in runs.values():
        seq.sort(key=lambda e: _parse_ts(e["occurred"]))
    return runs


def all_runs_final(events: list[dict[str, Any]]) -> bool:
    for seq in run_sequences(events).values():
        last = seq[-1]["resource"]
        if last.get("prefect.state-type") not in FINAL_TYPES and last.get("prefect.state-name") not in FINAL_NAMES:
            return False
    return True


class Capture:
    def __init__(
        self, server: LocalPrefectServer, name: str, log_dir: Path, with_spans: bool = False
    ) -> None:
        self.server = server
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        # Prefect's own spans, written by the scenario's process(es) here.
        self.spans_path: Optional[Path] = log_dir / f"{name}.prefect-spans.jsonl" if with_spans else None
        self.frames: list[str] = []
        self.ws_ids: set[str] = set()
        self.rest: list[dict[str, Any]] = []
        self.returncode: Optional[int] = None
        self.settled = False
        self.since: Optional[datetime] = None

    async def _listen(self, stream: PrefectEventStream) -> None:
        async for text in stream.frames():
            self.frames.append(text)
            self.ws_ids.add(json.loads(text)["event"]["id"])

    def _read_rest(self, until: datetime) -> list[dict[str, Any]]:
        assert self.since is not None
        return read_all_events(self.server.api_url, self.since, until)

    async def run(self) -> None:
        # Subscribe before anything happens; no backfill: we want only what the
        # live stream delivers.
        async with PrefectEventStream(self.server.api_url, backfill=False) as stream:
            listener = asyncio.create_task(self._listen(stream))
            self.since = datetime.now(timezone.utc)
            env = self.server.env()
            if self.spans_path is not None:
                self.spans_path.unlink(missing_ok=True)
                env[SPANS_ENV] = str(self.spans_path)
            command = EXTRA_RUNS.get(self.name, ["tests.support.prefect_flows.scenarios", self.name])
            with open(self.log_path, "wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    *command,
                    cwd=str(REPO),
                    env=env,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                )
                try:
                    self.returncode = await asyncio.wait_for(proc.wait(), SCENARIO_TIMEOUT)
                except asyncio.TimeoutError:
                    proc.kill()
                    self.returncode = await proc.wait()
            await self._settle()
            listener.cancel()
            try:
                await listener
            except asyncio.CancelledError:
                pass
        # The final read, over the whole window, after the stream is closed.
        self.rest = await asyncio.to_thread(self._read_rest, datetime.now(timezone.utc))
        # REST already returns occurred-ascending; a stable sort only settles
        # the order of equal timestamps deterministically (by arrival).
        self.rest.sort(key=lambda e: _parse_ts(e["occurred"]))

    async def _settle(self) -> None:
        """Wait until the server has stored everything the scenario caused."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        last_count = -1
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            until = datetime.now(timezone.utc) + timedelta(seconds=1)
            events = await asyncio.to_thread(self._read_rest, until)
            count = len(events) + len(self.frames)
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            quiet = time.monotonic() - last_change
            stored = {e["id"] for e in events}
            caught_up = self.ws_ids <= stored
            if caught_up and all_runs_final(events) and quiet >= QUIET_WHEN_FINAL:
                self.settled = True
                return
            if caught_up and quiet >= QUIET_OTHERWISE:
                # Runs left non-final (e.g. a task orphaned by a killed process):
                # nothing more will come for them.
                self.settled = True
                return
            await asyncio.sleep(0.5)

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"{self.name}.jsonl", "w") as fh:
            for ev in self.rest:
                fh.write(json.dumps(ev) + "\n")
        if self.spans_path is not None:
            # The websocket frames are left out: the REST set is what is compared.
            spans = self.spans_path.read_bytes() if self.spans_path.exists() else b""
            (out_dir / f"{self.name}.prefect-spans.jsonl").write_bytes(spans)
            return
        with open(out_dir / f"{self.name}.ws.jsonl", "w") as fh:
            for frame in self.frames:
                fh.write(frame.rstrip("\n") + "\n")

    def span_count(self) -> int:
        if self.spans_path is None or not self.spans_path.exists():
            return 0
        return sum(
            len(ss.get("spans", []))
            for line in self.spans_path.read_text().splitlines() if line.strip()
            for rs in json.loads(line).get("resourceSpans", [])
            for ss in rs.get("scopeSpans", [])
        )

    def problems(self) -> list[str]:
        found = {e["event"] for e in self.rest}
        out = [f"missing event {n}" for n in sorted(EXPECTED.get(self.name, set()) - found)]
        missing_from_rest = self.ws_ids - {e["id"] for e in self.rest}
        if missing_from_rest:
            out.append(f"{len(missing_from_rest)} websocket events not returned by REST")
        if not self.settled:
            out.append("events did not settle")
        if self.name == "deferred":
            for e in self.rest:
                if e["event"].startswith("prefect.task-run.") and any(
                    r.get("prefect.resource.role") == "flow-run" for r in e["related"]
                ):
                    out.append("deferred task-run event has a flow-run related resource")
                    break
        if self.name == "cancelled" and "prefect.flow-run.Cancelled" not in found:
            out.append("flow run not Cancelled")
        if self.spans_path is not None and not self.span_count():
            out.append("no Prefect spans written")
        return out

    def summary(self) -> str:
        lines = [
            f"== {self.name}: exit {self.returncode}; REST {len(self.rest)} events, "
            f"websocket {len(self.frames)} frames ({len(self.ws_ids)} unique)"
            + (f"; {self.span_count()} Prefect spans" if self.spans_path is not None else "")
        ]
        kinds = Counter(e["event"] for e in self.rest if "prefect.state-name" not in e["resource"])
        if kinds:
            lines.append("   other events: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
        runs = run_sequences(self.rest)
        grouped: Counter[tuple[str, str, str]] = Counter()
        for rid, seq in runs.items():
            kind = "flow-run" if rid.startswith("prefect.flow-run.") else "task-run"
            name = seq[0]["resource"].get("prefect.resource.name", "?")
            base = name.rsplit("-", 1)[0] if kind == "task-run" and "-" in name else name
            if kind == "flow-run":
                base = "(flow run)"
            states = " > ".join(e["resource"]["prefect.state-name"] for e in seq)
            grouped[(kind, base, states)] += 1
        for (kind, base, states), n in sorted(grouped.items()):
            mult = f" x{n}" if n > 1 else ""
            lines.append(f"   {kind:8} {base:22} {states}{mult}")
        for p in self.problems():
            lines.append(f"   PROBLEM: {p}")
        return "\n".join(lines)


async def capture_all(names: list[str], out_dir: Path, with_spans: bool = False) -> int:
    failures = 0
    with tempfile.TemporaryDirectory(prefix="prefect-capture-logs-") as logs:
        # A short persister flush interval only shortens the settle wait; the
        # events themselves are the same.
        with LocalPrefectServer(
            extra_env={"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5"}
        ) as server:
            print(f"Prefect server at {server.api_url}", flush=True)
            for name in names:
                cap = Capture(server, name, Path(logs), with_spans)
                started = time.monotonic()
                await cap.run()
                cap.write(out_dir)
                print(cap.summary() + f"\n   ({time.monotonic() - started:.1f}s)", flush=True)
                if cap.problems():
                    failures += 1
                    tail = cap.log_path.read_text(errors="replace").splitlines()[-25:]
                    print("   scenario log tail:\n      " + "\n      ".join(l[:300] for l in tail))
    return failures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", help="default: all")
    parser.add_argument("--out-dir", type=Path,
                        help=f"default: {OUT_DIR.relative_to(REPO)}, or with --with-prefect-spans "
                             f"{TELEMETRY_OUT_DIR.relative_to(REPO)}")
    parser.add_argument("--with-prefect-spans", action="store_true",
                        help="switch Prefect's own spans on and write them beside the events")
    args = parser.parse_args(argv)
    known = ALL_SCENARIOS + (list(EXTRA_RUNS) if args.with_prefect_spans else [])
    unknown = [s for s in args.scenarios if s not in known]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(known)}")
    out_dir = args.out_dir or (TELEMETRY_OUT_DIR if args.with_prefect_spans else OUT_DIR)
    failures = asyncio.run(
        capture_all(args.scenarios or ALL_SCENARIOS, out_dir, args.with_prefect_spans)
    )
    if failures:
        print(f"{failures} scenario(s) did not show their behaviour", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
