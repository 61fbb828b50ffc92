"""`otel-bridge serve` end to end, with real parts only (issue #4, "Sidecar service").

A real Prefect 3.9.1 server runs real flows; `otel-bridge serve` runs as its
own process (`python -m otel_bridge serve`), with its own SQLite store, and
exports over OTLP to a real OpenTelemetry Collector whose `file` exporter
writes what it received as OTLP/JSON lines: those files are what the tests
read. The bridge is hurt the way a sidecar is in production: `kill -9` in the
middle of a 500-task flow and a restart on the same store, the Collector
going away for a while, SIGTERM with runs still open.

Ground truth is the server: its flow runs and task runs from the REST API,
and its stored events, converted by `otel-bridge convert` (the batch path of
the same forward translation), give the span every run must have.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.sources.prefect_rest import read_events
from otel_bridge.translate.ids import span_id_for, trace_id_for
from support import backends

REPO = Path(__file__).resolve().parents[2]
N_TASKS = 500
LINGER = 1.0

pytestmark = [pytest.mark.prefect_server, pytest.mark.backend, pytest.mark.integration]


# A flow with one quick task and one slow one, to stop the bridge while a run is open.
SLOW_FLOW = """\
import sys, time
from prefect import flow, task

@task
def quick() -> int:
    return 1

@task
def slow(seconds: float) -> float:
    print("SLOW-RUNNING", flush=True)
    time.sleep(seconds)
    return seconds

@flow(name="serve-slow")
def serve_slow(seconds: float) -> float:
    quick()
    return slow(seconds)

if __name__ == "__main__":
    serve_slow(float(sys.argv[1]))
"""

SCENARIOS = ["failure", "retries-immediate", "crash-baseexception", "crash-sigterm"]
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server():
    with LocalPrefectServer() as srv:
        yield srv


class ManagedCollector:
    """A Collector that a test can stop and start again on the same ports,
    each run writing its own file."""

    def __init__(self, tmp_path: Path, ports: Optional[dict[str, str]] = None):
        self.tmp_path = tmp_path
        self.ports = dict(ports or {})
        self.files: list[Path] = []
        self._cm = None
        self.current: Optional[backends.Collector] = None

    def start(self) -> "ManagedCollector":
        path = self.tmp_path / f"collector-{len(self.files)}.jsonl"
        self.files.append(path)
        self._cm = backends.file_collector(path, self.ports)
        self.current = self._cm.__enter__()
        self.ports = {k: str(v) for k, v in self.current.ports.items()}
        return self

    def stop(self) -> None:
        cm, self._cm, self.current = self._cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)

    @property
    def http_traces_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['OTELCOL_OTLP_HTTP_PORT']}/v1/traces"

    @property
    def grpc_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['OTELCOL_OTLP_GRPC_PORT']}"

    def spans(self) -> list[dict]:
        """Every span in every file so far (a line being written is skipped)."""
        return [span for path in self.files for span in backends.file_spans(path)]


class Bridge:
    """`python -m otel_bridge serve` as a child process."""

    def __init__(self, tmp_path: Path, name: str, env: dict[str, str], args: list[str]):
        self.store = tmp_path / f"{name}-store" / "store.sqlite3"
        self.http_port = backends.free_port()
        self.log_path = tmp_path / f"{name}.log"
        self.env = env
        self.args = args
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> "Bridge":
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "otel_bridge", "serve",
                 "--store-path", str(self.store), "--http-port", str(self.http_port),
                 "--log-format", "json", "--linger-seconds", str(LINGER), *self.args],
                cwd=str(REPO), env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        backends.wait_until(lambda: self.get("/readyz")[0] == 200, timeout,
                            what="the bridge's /readyz", proc=self.proc, log_path=self.log_path)
        return self

    def get(self, path: str) -> tuple[int, str]:
        """(status, body); status 0 when nothing answers."""
        status, body = backends.http_get(self.url + path, timeout=5)
        return status, body.decode(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.metrics(), name, **labels)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def sigterm(self) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def log_records(self, message: str) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("message") == message:
                out.append(record)
        return out


def bridge_env(server: LocalPrefectServer, protocol: str, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in server.env().items()
           if not k.startswith(("OTEL_EXPORTER_", "OTEL_BRIDGE_", "OTEL_SERVICE_NAME",
                                "OTEL_RESOURCE_ATTRIBUTES"))}
    env.update({
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        # Short enough that an export into an outage fails within the outage,
        # rather than being retried by the exporter until the Collector is back.
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@dataclass
class Fleet:
    """Everything a test started, shown on failure and stopped at the end."""

    bridges: list[Bridge] = field(default_factory=list)
    collectors: list[ManagedCollector] = field(default_factory=list)
    procs: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)

    def run(self, name: str, argv: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.Popen:
        out = tmp_path / f"{name}.out"
        with open(out, "wb") as f:
            proc = subprocess.Popen(argv, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                                    stdout=f, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, out))
        return proc

    def report(self) -> str:
        parts = []
        for b in self.bridges:
            parts.append(f"--- bridge log {b.log_path} (tail) ---\n{b.log_tail()}")
        for name, proc, out in self.procs:
            text = out.read_text(errors="replace") if out.is_file() else ""
            parts.append(f"--- {name} (exit {proc.poll()}) ---\n" + "\n".join(text.splitlines()[-15:]))
        for c in self.collectors:
            if c.current is not None:
                parts.append(f"--- collector log (tail) ---\n{c.current.process.log_tail()}")
        return "\n".join(parts)

    def close(self) -> None:
        for b in self.bridges:
            b.stop()
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for c in self.collectors:
            c.stop()


@pytest.fixture
def fleet():
    f = Fleet()
    yield f
    f.close()


def explained(test):
    """On failure, show the logs of what the test started (bridge stderr,
    flows, Collector) with the error."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except BaseException:
            print(kwargs["fleet"].report())
            raise

    return run


# ---------------------------------------------------------------- the server's record


def api_post(server: LocalPrefectServer, path: str, body: dict) -> Any:
    with httpx.Client(timeout=30) as http:
        resp = http.post(f"{server.api_url}{path}", json=body)
        resp.raise_for_status()
        return resp.json()


def flow_runs_of(server: LocalPrefectServer, flow_names: list[str]) -> list[dict]:
    return api_post(server, "/flow_runs/filter",
                    {"flows": {"name": {"any_": flow_names}}, "limit": 200})


def task_runs_of(server: LocalPrefectServer, flow_run_ids: list[str]) -> list[dict]:
    runs: list[dict] = []
    while True:
        page = api_post(server, "/task_runs/filter",
                        {"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200,
                         "offset": len(runs)})
        runs += page
        if len(page) < 200:
            return runs


def settled_runs(server: LocalPrefectServer, flows: dict[str, int], min_tasks: dict[str, int],
                 timeout: float = 120) -> tuple[list[dict], list[dict]]:
    """The flow runs of these flows (name -> how many) and their task runs,
    once the server has recorded all of them in a final state (its task-run
    recorder trails the flows by seconds)."""

    def read():
        flow_names = {f["id"]: f["name"] for f in api_post(server, "/flows/filter", {})}
        fruns = flow_runs_of(server, list(flows))
        for r in fruns:
            r["flow_name"] = flow_names[r["flow_id"]]
        per_flow = defaultdict(int)
        for r in fruns:
            per_flow[r["flow_name"]] += 1
        if any(per_flow[name] < n for name, n in flows.items()):
            return None
        if any(r["state_type"] not in FINAL_STATES for r in fruns):
            return None
        truns = task_runs_of(server, [r["id"] for r in fruns])
        flow_of = {r["id"]: r["flow_name"] for r in fruns}
        tasks_per_flow = defaultdict(int)
        for t in truns:
            tasks_per_flow[flow_of[t["flow_run_id"]]] += 1
        if any(tasks_per_flow[name] < n for name, n in min_tasks.items()):
            return None
        if any(t["state_type"] not in FINAL_STATES for t in truns):
            return None
        return fruns, truns

    return backends.wait_until(read, timeout, interval=1.0, what="the server's runs to settle")


def expected_result(state_type: str, state_name: str) -> str:
    """The CICD result a run's final state maps to (docs/mapping.md, "One span per run")."""
    if state_type == "COMPLETED":
        return "success"
    if state_type == "CANCELLED":
        return "cancellation"
    if state_type == "CRASHED":
        return "error"
    return "timeout" if state_name == "TimedOut" else "failure"


def converted_spans(server: LocalPrefectServer, since: datetime, resource_ids: set[str],
                    tmp_path: Path, name: str, leave_out: frozenset[str] = frozenset()
                    ) -> dict[str, dict]:
    """`otel-bridge convert` of the server's stored events of these runs: the
    spans the batch path makes from the complete record (less the events
    `leave_out`, by id), by span id."""

    def stored():
        # Once each run's final state event is stored (the server's persister
        # trails its API by seconds).
        events = [e for e in read_events(server.api_url, since - timedelta(seconds=5),
                                         datetime.now(timezone.utc) + timedelta(seconds=5),
                                         event_prefixes=["prefect.task-run.", "prefect.flow-run."])
                  if e["resource"]["prefect.resource.id"] in resource_ids]
        final = {e["resource"]["prefect.resource.id"] for e in events
                 if e["resource"].get("prefect.state-type") in FINAL_STATES}
        return events if final >= resource_ids else None

    events = [e for e in backends.wait_until(stored, 90, interval=1.0,
                                             what="the server to store every run's final event")
              if e["id"] not in leave_out]
    events_path = tmp_path / f"{name}.events.jsonl"
    events_path.write_text("".join(json.dumps(e) + "\n" for e in events))
    out_path = tmp_path / f"{name}.converted.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "PREFECT_"))}
    # The same server as the bridge's, so the same UI address on the spans.
    env["PREFECT_API_URL"] = server.api_url
    done = subprocess.run([sys.executable, "-m", "otel_bridge", "convert", str(events_path),
                           "-o", str(out_path)], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spans = {}
    for line in out_path.read_text().splitlines():
        for span in backends.otlp_json_spans(json.loads(line)):
            spans[span_hex(span)] = span
    return spans


# ---------------------------------------------------------------- spans


def span_hex(span: dict) -> str:
    return backends.otlp_id_hex(span["spanId"], 8)


def parent_hex(span: dict) -> str:
    return backends.otlp_id_hex(span["parentSpanId"], 8) if span.get("parentSpanId") else ""


def trace_hex(span: dict) -> str:
    return backends.otlp_id_hex(span["traceId"], 16)


def hex8(resource_id: str) -> str:
    return format(span_id_for(resource_id), "016x")


def hex16(resource_id: str) -> str:
    return format(trace_id_for(resource_id), "032x")


def status_code(span: dict) -> str:
    code = (span.get("status") or {}).get("code", 0)
    return {0: "unset", 1: "ok", 2: "error", "STATUS_CODE_UNSET": "unset",
            "STATUS_CODE_OK": "ok", "STATUS_CODE_ERROR": "error"}[code]


def comparable(span: dict) -> dict:
    """What a span says, independent of how its JSON was written."""
    return {
        "trace": trace_hex(span), "span": span_hex(span), "parent": parent_hex(span),
        "name": span["name"],
        "start": int(span["startTimeUnixNano"]), "end": int(span["endTimeUnixNano"]),
        "attributes": backends.otlp_attrs(span.get("attributes")),
        "status": status_code(span), "message": (span.get("status") or {}).get("message", ""),
        "events": [(e["name"], int(e["timeUnixNano"]), backends.otlp_attrs(e.get("attributes")))
                   for e in span.get("events", [])],
        "resource": span["resource"],
    }


def by_span_id(spans: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        out[span_hex(span)].append(span)
    return out


def one_content_per_id(seen: dict[str, list[dict]]) -> int:
    """Assert no span id was sent with two contents; return how many ids were
    received more than once (the same bytes again: allowed, at-least-once)."""
    repeated = 0
    for sid, copies in seen.items():
        contents = {json.dumps(c, sort_keys=True) for c in copies}
        assert len(contents) == 1, f"span {sid} exported with {len(contents)} different contents"
        repeated += len(copies) > 1
    return repeated


def check_runs_exported(fruns: list[dict], truns: list[dict], seen: dict[str, list[dict]],
                        converted: dict[str, dict]) -> dict[str, int]:
    """Every run of the server is there as its one span, in its final state,
    under the right parent, and as the batch conversion makes it."""
    same_as_batch = 0
    for r in fruns:
        rid = f"prefect.flow-run.{r['id']}"
        sid = hex8(rid)
        assert sid in seen, f"flow run {r['name']} ({r['flow_name']}) was not exported"
        span = seen[sid][0]
        attrs = backends.otlp_attrs(span["attributes"])
        assert span["name"] == f"RUN {r['flow_name']}"
        assert attrs["prefect.run.name"] == r["name"]
        assert attrs["cicd.pipeline.run.id"] == r["id"]
        assert attrs["cicd.pipeline.run.url.full"].endswith(f"/runs/flow-run/{r['id']}")
        assert attrs["prefect.state-type"] == r["state_type"], (r["name"], attrs)
        assert attrs["cicd.pipeline.result"] == expected_result(r["state_type"], r["state_name"])
        assert trace_hex(span) == hex16(rid) and parent_hex(span) == ""
        assert "otel_bridge.synthetic.end" not in attrs
    flow_ids = {r["id"] for r in fruns}
    for t in truns:
        rid = f"prefect.task-run.{t['id']}"
        sid = hex8(rid)
        assert sid in seen, f"task run {t['name']} ({t['state_type']}) was not exported"
        span = seen[sid][0]
        attrs = backends.otlp_attrs(span["attributes"])
        assert attrs["prefect.resource.id"] == rid
        assert attrs["cicd.pipeline.task.run.id"] == t["id"]
        assert attrs["prefect.run.name"] == t["name"]
        assert span["name"] == re.sub(r"-[0-9a-f]{8}$", "", t["task_key"]), t["name"]
        assert attrs["cicd.pipeline.task.run.url.full"].endswith(f"/runs/task-run/{t['id']}")
        assert attrs["prefect.state-type"] == t["state_type"], (t["name"], attrs)
        want = expected_result(t["state_type"], t["state_name"])
        assert attrs["cicd.pipeline.task.run.result"] == want, (t["name"], attrs)
        assert status_code(span) == ("error" if want in ("failure", "error", "timeout") else "unset")
        assert "otel_bridge.synthetic.end" not in attrs
        assert t["flow_run_id"] in flow_ids
        flow_rid = f"prefect.flow-run.{t['flow_run_id']}"
        assert parent_hex(span) == hex8(flow_rid), t["name"]
        assert trace_hex(span) == hex16(flow_rid), t["name"]
        assert attrs["prefect.related.flow-run.id"] == t["flow_run_id"]
    ours = {hex8(f"prefect.flow-run.{r['id']}") for r in fruns} | {
        hex8(f"prefect.task-run.{t['id']}") for t in truns}
    assert set(converted) == ours, "the batch conversion of the server's events differs in runs"
    for sid in ours:
        mine, batch = comparable(seen[sid][0]), comparable(converted[sid])
        for key in ("trace", "parent", "name", "status"):
            assert mine[key] == batch[key], (sid, key, mine[key], batch[key])
        same_as_batch += mine == batch
    return {"runs": len(ours), "same_as_batch": same_as_batch}


def sample(metrics: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= set(ls))


def subscription_counters(metrics: dict) -> dict[str, float]:
    out = {}
    for (name, labels), value in metrics.items():
        if name.startswith("otel_bridge_prefect_subscription"):
            out[dict(labels)["counter"]] = value
    return out


# ---------------------------------------------------------------- 1. kill -9 and an outage


@pytest.mark.timeout(480)
@explained
def test_500_tasks_and_scenarios_through_kill9_and_collector_outage(
        server, tmp_path, fleet):
    """A 500-task flow and four scenario flows (a failure, retries, two
    crashes), all at once. In the middle of the big flow the Collector stops;
    exports fail; the bridge is killed -9, with undelivered spans and open
    runs in its store; it restarts on the same store and fails too; a new
    Collector comes up on the same ports. In the end every run the server has
    is one span id, in its final state, under its flow run, never with two
    contents; nothing dropped."""
    since = datetime.now(timezone.utc)
    started = time.monotonic()
    collector = ManagedCollector(tmp_path).start()
    fleet.collectors.append(collector)
    bridge = Bridge(tmp_path, "bridge", bridge_env(server, "http/protobuf", collector.http_traces_url),
                    ["--backfill-seconds", "5", "--retry-max-seconds", "2",
                     "--shutdown-grace-seconds", "10"])
    fleet.bridges.append(bridge)
    bridge.start()
    assert bridge.get("/healthz")[0] == 200
    # A bridge emits a run once REST has given it every event from before the
    # run's end (its watermark, settle 8 s behind): so that the flows run
    # while it is in full swing, they start once the watermark passed its start.
    backends.wait_until(
        lambda: bridge.metric("otel_bridge_prefect_watermark_seconds") >= since.timestamp(), 60,
        what="the bridge to catch up", proc=bridge.proc, log_path=bridge.log_path)

    # Everything starts at once: the 500-task flow and the scenarios.
    flow_env = server.env()
    # Spans leave ~10 s after their run ends (the watermark), and the outage
    # and the kill must land mid-flow: each task sleeps 0.3 s, 8 at a time
    # (unbounded threads by default), so the flow takes about 20 s.
    big = fleet.run("big_map", [sys.executable, "-m", "tests.support.prefect_flows.big_map", str(N_TASKS),
                                "serve-big-map", "0.3"],
                    {**flow_env, "PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS": "8"}, tmp_path)
    for name in SCENARIOS:
        fleet.run(name, [sys.executable, "-m", "tests.support.prefect_flows.scenarios", name], flow_env,
                  tmp_path)

    def exported() -> float:
        return bridge.metric("otel_bridge_exported_total", sink="otlp")

    def export_failures() -> float:
        return bridge.metric("otel_bridge_export_failures_total", sink="otlp")

    # Once spans are flowing, the Collector goes away, in the middle of the
    # flow, and the bridge is killed -9 (500 small tasks take seconds: no
    # time to lose), with runs open and spans it could not deliver.
    backends.wait_until(lambda: exported() >= 5, 120, interval=0.05, what="5 spans exported",
                        proc=bridge.proc, log_path=bridge.log_path)
    collector.stop()
    outage_started = time.monotonic()
    assert big.poll() is None, "the 500-task flow ended before the outage"
    backends.wait_until(lambda: bridge.metric("otel_bridge_outbox_items", kind="span") >= 1, 30,
                        interval=0.05, what="a span waiting for the Collector", proc=bridge.proc,
                        log_path=bridge.log_path)
    first = bridge.metrics()
    first_failures = export_failures()
    first_exported = exported()
    bridge.kill9()
    killed_at = time.monotonic()
    assert big.poll() is None, "the 500-task flow ended before the kill -9"
    time.sleep(0.5)  # the flow goes on without the bridge
    bridge.start()
    restarted_at = time.monotonic()
    stored = bridge.log_records("store opened")[-1]
    # The restarted bridge runs a few seconds with its exports failing, then
    # a new Collector comes up on the same ports.
    backends.wait_until(lambda: export_failures() >= 1
                        and time.monotonic() - restarted_at >= 3, 60, interval=0.1,
                        what="exports to fail after the restart", proc=bridge.proc,
                        log_path=bridge.log_path)
    outbox_during_outage = bridge.metric("otel_bridge_outbox_items", kind="span")
    flow_running_at_recovery = big.poll() is None
    collector.start()  # a new Collector, same ports, a new file
    outage_seconds = time.monotonic() - outage_started

    assert big.wait(300) == 0, fleet.report()
    flow_done = time.monotonic()
    for name, proc, _ in fleet.procs:
        proc.wait(120)

    flows = {"big-map": 1, "s-failure": 1, "s-retries-immediate": 1, "s-crash-baseexception": 1,
             "s-crash-sigterm": 1}
    fruns, truns = settled_runs(server, flows, {"big-map": N_TASKS}, timeout=150)
    big_run = next(r["id"] for r in fruns if r["flow_name"] == "big-map")
    big_tasks = [t for t in truns if t["flow_run_id"] == big_run]
    if len(big_tasks) != N_TASKS:
        names = defaultdict(list)
        for t in big_tasks:
            names[t["name"]].append((t["id"], t["state_name"], t["start_time"], t["task_inputs"]))
        print("big-map task runs by name, the repeated ones:",
              {n: v for n, v in names.items() if len(v) > 1})
    assert len(big_tasks) >= N_TASKS
    want = {hex8(f"prefect.flow-run.{r['id']}") for r in fruns} | {
        hex8(f"prefect.task-run.{t['id']}") for t in truns}

    def all_exported():
        return want <= set(by_span_id(collector.spans()))

    # Reconciliation reads REST 8 s behind, then again at +20 s and +90 s.
    backends.wait_until(all_exported, 180, interval=1.0, what="every run's span at the Collector",
                        proc=bridge.proc, log_path=bridge.log_path)
    complete = time.monotonic()
    backends.wait_until(lambda: bridge.metric("otel_bridge_outbox_items", kind="span") == 0
                        and bridge.metric("otel_bridge_open_runs") == 0, 60,
                        what="an empty outbox and no open run", proc=bridge.proc,
                        log_path=bridge.log_path)
    time.sleep(1.5)  # the Collector's file exporter flushes every second

    seen = by_span_id(collector.spans())
    assert set(seen) == want, f"spans of unknown runs: {len(set(seen) - want)}"
    repeated = one_content_per_id(seen)
    resource_ids = {f"prefect.flow-run.{r['id']}" for r in fruns} | {
        f"prefect.task-run.{t['id']}" for t in truns}
    figures = check_runs_exported(fruns, truns, seen,
                                  converted_spans(server, since, resource_ids, tmp_path, "test1"))
    # 500 runs of one task: one span name (what a backend indexes by).
    assert {seen[hex8(f"prefect.task-run.{t['id']}")][0]["name"] for t in big_tasks} == {"work"}
    # A span may lack an event that came after the span had left (with a
    # linger of 1 s, more often than in production): the bridge counts it
    # as set aside ("late") and logs it. Those events aside, every span is
    # exactly the one the batch conversion makes from the server's record.
    late = bridge.log_records("event set aside (late)")
    assert {r["resource_id"] for r in late} <= resource_ids
    explained = check_runs_exported(
        fruns, truns, seen, converted_spans(server, since, resource_ids, tmp_path, "test1-less-late",
                                            frozenset(r["event_id"] for r in late)))
    assert explained["same_as_batch"] == explained["runs"], (
        f"{explained['runs'] - explained['same_as_batch']} spans differ from the server's record "
        "by more than the events the bridge set aside")

    # The two processes' counters: before the kill -9 (`first`) and now.
    last = bridge.metrics()
    both = (first, last)
    failures = [sample(m, "otel_bridge_export_failures_total", sink="otlp") for m in both]
    dropped = [sample(m, "otel_bridge_dropped_total") for m in both]
    rejected = [sample(m, "otel_bridge_inputs_rejected_total") for m in both]
    set_aside = [{dict(ls)["reason"]: v for (n, ls), v in m.items()
                  if n == "otel_bridge_events_set_aside_total"} for m in both]
    retried = [sample(m, "otel_bridge_export_retries_total", sink="otlp") for m in both]
    duplicates = [sample(m, "otel_bridge_events_duplicate_total") for m in both]
    sub = [subscription_counters(m) for m in both]
    by_state = defaultdict(int)
    for t in truns:
        by_state[t["state_type"]] += 1

    print(f"\n[serve: 500 tasks + scenarios, Collector outage and kill -9 mid-flow] "
          f"{len(fruns)} flow runs, {len(truns)} task runs ({dict(by_state)}) -> "
          f"{len(seen)} span ids at the Collector, {sum(map(len, seen.values()))} spans received "
          f"({repeated} ids received more than once, same content each time), "
          f"{figures['same_as_batch']}/{figures['runs']} identical to `otel-bridge convert` of the "
          f"server's events, the others short of {len(late)} events logged as set aside (late) "
          f"({len({r['resource_id'] for r in late})} runs). Collector down {outage_seconds:.1f}s from {outage_started - started:.1f}s "
          f"in; bridge killed -9 {killed_at - started:.1f}s in, after {first_exported:.0f} spans "
          f"exported and {first_failures:.0f} failed exports; the restart "
          f"({restarted_at - killed_at:.1f}s later) found "
          f"{stored.get('open_runs')} open runs and {stored.get('outbox_spans')} spans in its "
          f"outbox; outbox {outbox_during_outage:.0f} spans when the Collector came back (flow "
          f"still running: {flow_running_at_recovery}). Counters [before kill, after restart]: "
          f"export failures {failures}, items sent again {retried}, events set aside {set_aside}, "
          f"duplicate events {duplicates}, dropped {dropped}; subscription {sub}. Flow process "
          f"{flow_done - started:.1f}s; every span at the Collector {complete - flow_done:.1f}s "
          f"after it exited, {complete - started:.1f}s in all")

    assert stored.get("open_runs", 0) > 0, "the kill -9 left no open run to restore"
    assert stored.get("outbox_spans", 0) > 0, "the kill -9 left no undelivered span to send"
    assert failures[1] >= 1, "the outage made no export fail"
    assert dropped == [0, 0] and rejected == [0, 0], both
    # Set aside: late events only, each one counted and logged.
    assert all(set(by_reason) <= {"late"} for by_reason in set_aside), set_aside
    assert sum(by_reason.get("late", 0) for by_reason in set_aside) == len(late)

    t0 = bridge.sigterm()
    assert bridge.proc.wait(15) == 0, bridge.log_tail()
    assert time.monotonic() - t0 < 10 + 2
    stopped = bridge.log_records("stopped")[-1]
    assert stopped["delivered_all"] is True and stopped["open_runs_kept"] == 0


# ---------------------------------------------------------------- 2. SIGTERM with a run open


@pytest.mark.timeout(240)
@explained
def test_sigterm_keeps_open_runs_and_exports_them_after_restart(
        server, tmp_path, fleet):
    """SIGTERM while a task runs: exit 0 well within the grace period, the
    open runs kept in the store; the flow finishes while the bridge is down;
    after a restart their spans arrive, each once, complete (OTLP over gRPC)."""
    since = datetime.now(timezone.utc)
    grace = 8.0
    collector = ManagedCollector(tmp_path).start()
    fleet.collectors.append(collector)
    bridge = Bridge(tmp_path, "bridge", bridge_env(server, "grpc", collector.grpc_url),
                    ["--backfill-seconds", "2", "--shutdown-grace-seconds", str(grace)])
    fleet.bridges.append(bridge)
    bridge.start()

    script = tmp_path / "serve_slow.py"
    script.write_text(SLOW_FLOW)
    flow = fleet.run("serve-slow", [sys.executable, str(script), "12"], server.env(), tmp_path)

    # The quick task's span is out and the slow task is running (its run and
    # the flow run are open in the bridge): stop the bridge now.
    backends.wait_until(lambda: bridge.metric("otel_bridge_exported_total", sink="otlp") >= 1
                        and bridge.metric("otel_bridge_open_runs") >= 2, 90, interval=0.1,
                        what="the quick task exported and the slow one open", proc=bridge.proc,
                        log_path=bridge.log_path)
    assert flow.poll() is None
    assert bridge.get("/healthz")[0] == 200 and bridge.get("/readyz")[0] == 200
    t0 = bridge.sigterm()
    rc = bridge.proc.wait(grace + 5)
    took = time.monotonic() - t0
    assert rc == 0, bridge.log_tail()
    assert took < grace, took
    stopped = bridge.log_records("stopped")[-1]
    assert stopped["open_runs_kept"] >= 2 and stopped["delivered_all"] is True

    with sqlite3.connect(f"file:{bridge.store}?mode=ro", uri=True) as db:
        kept = {run for (run,) in db.execute("SELECT DISTINCT run_id FROM run_events")}
        outbox = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert any(r.startswith("prefect.flow-run.") for r in kept), kept
    assert any(r.startswith("prefect.task-run.") for r in kept), kept
    assert outbox == 0

    # The flow finishes while the bridge is down; the next start picks up.
    assert flow.wait(120) == 0, fleet.report()
    stopped_for = time.monotonic() - t0
    bridge.start()
    restarted = time.monotonic()
    stored = bridge.log_records("store opened")[-1]
    assert stored["open_runs"] == len(kept)

    fruns, truns = settled_runs(server, {"serve-slow": 1}, {"serve-slow": 2})
    want = {hex8(f"prefect.flow-run.{r['id']}") for r in fruns} | {
        hex8(f"prefect.task-run.{t['id']}") for t in truns}
    assert {hex8(r) for r in kept} < want
    backends.wait_until(lambda: want <= set(by_span_id(collector.spans())), 120, interval=0.5,
                        what="the open runs' spans after the restart", proc=bridge.proc,
                        log_path=bridge.log_path)
    arrived = time.monotonic() - restarted
    backends.wait_until(lambda: bridge.metric("otel_bridge_open_runs") == 0, 30,
                        what="no open run left")
    time.sleep(1.5)  # the file exporter's flush
    seen = by_span_id(collector.spans())
    assert set(seen) == want
    assert all(len(copies) == 1 for copies in seen.values()), \
        {sid: len(c) for sid, c in seen.items()}  # exactly once: nothing re-sent after a clean stop
    converted = converted_spans(server, since, {f"prefect.flow-run.{r['id']}" for r in fruns}
                                | {f"prefect.task-run.{t['id']}" for t in truns}, tmp_path, "test2")
    figures = check_runs_exported(fruns, truns, seen, converted)
    # Nothing was missed or set aside: each span is the one the whole record makes.
    assert figures["same_as_batch"] == figures["runs"]
    print(f"\n[serve: SIGTERM with runs open, over gRPC] exit 0 in {took:.2f}s (grace {grace:g}s), "
          f"{len(kept)} open runs kept in the store, bridge down {stopped_for:.1f}s; after the "
          f"restart the {len(kept)} spans arrived in {arrived:.1f}s, each once, identical to the "
          f"batch conversion")
    assert bridge.metric("otel_bridge_dropped_total") == 0
    bridge.stop()
    assert bridge.proc.returncode == 0


# ---------------------------------------------------------------- 3. probes


@pytest.mark.timeout(180)
@explained
def test_probes_and_undelivered_spans_survive_sigterm(server, tmp_path, fleet):
    """/healthz and /readyz say 200 while serving; /readyz says 503 once
    SIGTERM begins (the bridge is still draining: the Collector is not there
    yet, so the spans cannot leave); the undelivered spans stay in the store
    and leave after a restart, once the Collector is up."""
    ports = dict(zip(backends.COLLECTOR_PORT_VARS, map(str, backends.free_ports(4))))
    collector = ManagedCollector(tmp_path, ports)
    fleet.collectors.append(collector)
    grace = 4.0
    bridge = Bridge(tmp_path, "bridge", bridge_env(server, "http/protobuf", collector.http_traces_url),
                    ["--backfill-seconds", "2", "--shutdown-grace-seconds", str(grace),
                     "--retry-max-seconds", "1"])
    fleet.bridges.append(bridge)
    bridge.start()
    health, ready = bridge.get("/healthz"), bridge.get("/readyz")
    assert health[0] == 200 and json.loads(health[1])["status"] == "ok"
    assert ready[0] == 200 and json.loads(ready[1])["status"] == "ready"

    flow = fleet.run("success", [sys.executable, "-m", "tests.support.prefect_flows.scenarios", "success"],
                     server.env(), tmp_path)
    assert flow.wait(120) == 0, fleet.report()
    fruns, truns = settled_runs(server, {"s-success": 1}, {"s-success": 2})
    want = {hex8(f"prefect.flow-run.{r['id']}") for r in fruns} | {
        hex8(f"prefect.task-run.{t['id']}") for t in truns}
    backends.wait_until(lambda: bridge.metric("otel_bridge_outbox_items", kind="span") >= len(want)
                        and bridge.metric("otel_bridge_export_failures_total", sink="otlp") >= 1,
                        60, what="spans waiting for the missing Collector", proc=bridge.proc,
                        log_path=bridge.log_path)
    assert bridge.get("/healthz")[0] == 200 and bridge.get("/readyz")[0] == 200

    t0 = bridge.sigterm()
    answers = []
    while bridge.proc.poll() is None and time.monotonic() - t0 < grace + 5:
        answers.append(bridge.get("/readyz")[0])
        time.sleep(0.05)
    rc = bridge.proc.wait(grace + 5)
    took = time.monotonic() - t0
    assert rc == 0, bridge.log_tail()
    assert 503 in answers, answers
    assert took < grace + 2, took
    stopped = bridge.log_records("stopped")[-1]
    assert stopped["delivered_all"] is False and stopped["outbox_spans_kept"] >= len(want)

    collector.start()
    bridge.start()
    backends.wait_until(lambda: want <= set(by_span_id(collector.spans())), 60, interval=0.5,
                        what="the kept spans at the Collector", proc=bridge.proc,
                        log_path=bridge.log_path)
    time.sleep(1.5)
    seen = {sid: c for sid, c in by_span_id(collector.spans()).items() if sid in want}
    assert all(len(c) == 1 for c in seen.values())
    print(f"\n[serve: probes] /readyz during the {took:.2f}s shutdown: "
          f"{answers.count(503)}x 503, {answers.count(200)}x 200; "
          f"{stopped['outbox_spans_kept']} undelivered spans kept and sent after the restart")
