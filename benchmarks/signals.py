"""What run metrics and log lines add to the sidecar's cost per event, side
by side with them off, in one run.

    .venv/bin/python benchmarks/signals.py [N] [ROUNDS] [CAPTURE|-] [EXTRA_LINES]

One real Prefect server (its own home, a free port) is the source of every
configuration: before timing, the log lines Prefect 3.9.1 writes for the
replicated capture's runs with default settings (one per task run, two per
flow run: what a real server stored for the real 500-task flow), and
EXTRA_LINES more per task run (default 0: a task's own logging), are put
into it through its REST API (POST /api/logs/), timestamped as the runs'
states were, moved to a few minutes ago. Then, ROUNDS times (default 4),
alternating, one fresh `otel-bridge serve` process (its own store) per
configuration, following that server, each round starting one
configuration further along:

    off | --metrics | --logs | --metrics --logs

CAPTURE (default: the real 500-task flow
tests/fixtures/prefect-3.9.1-telemetry/map-500.jsonl) replicated N times
(default 40: 60,200 events, 20,040 runs, 20,080 log lines) by the shared
yardstick's replicator (`shared/perf/` beside the repo), pushed to `POST
/v1/events` by its push load (4 clients, 500 a batch); spans go to its
counting receiver over OTLP/gRPC, metrics and log records to a small
OTLP/gRPC receiver here that counts data points and log records
(OTEL_EXPORTER_OTLP_TRACES_/_METRICS_/_LOGS_ENDPOINT). Metrics are exported
every 5 s (OTEL_METRIC_EXPORT_INTERVAL=5000, twelve times the default rate,
so that periodic exports fall inside the timed window).

For each process:
- CPU: its user + system seconds (/proc/PID/stat), read once every span has
  been counted (and every log record, with logs on), just before it is
  stopped: start-up included ("total"), and without what it had used when
  it was ready ("from ready");
- wall: seconds from the first push until every span has been counted (and
  every log record, with logs on); the push's own seconds, and the spans
  counted when it ended, are printed beside it. With logs on, the wall time
  includes the Prefect server answering the follower's pages, on the same
  2 cores.

Prints each configuration's medians and their ratio to "off" (goal of issue
#14: CPU per event at most 1.2x). Asserts nothing but that every span and
log record arrived.

Each log line is read twice by the follower, as in steady state (the fresh
pass, then the late pass `logs_lateness_seconds` later for lines stored
late): the lines' timestamps are older than the lateness, so both passes
read them within the timed window; the second read finds them taken.

With SIGNALS_PYSPY=/path/to/py-spy, the last round's processes are
profiled from ready to stopped (collapsed stacks, native frames too, in
$TMPDIR/signals-profiles/); the profiler's pauses then skew that round's
figures.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# (fast_path puts the repo and tests/ on the path too)
from fast_path import (  # noqa: E402
    DEFAULT_CAPTURE,
    PERF,
    Receiver,
    _ready,
    convert_spans,
    replicated,
)

from otel_bridge.demo.server import LocalPrefectServer  # noqa: E402

CONFIGURATIONS = (("off", []), ("metrics", ["--metrics"]), ("logs", ["--logs"]),
                  ("metrics+logs", ["--metrics", "--logs"]))
TOKEN = "benchmark-token"
# The log lines end this long before the first serve starts: older than the
# follower's lateness (120 s), so that both of its passes read them at once.
LOGS_AGE = timedelta(minutes=5)
# How far back serve reads (events and log lines) on its first start: the
# log lines, however long the rounds take.
BACKFILL_SECONDS = 6 * 3600
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- a counting OTLP/gRPC receiver for metrics and logs ----------------------------------

class SignalsReceiver:
    """OTLP/gRPC MetricsService and LogsService in this process, counting
    data points and log records (the counting trace receiver's twin)."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb

        self.points = self.log_records = self.metric_requests = 0
        self._lock = threading.Lock()

        def export_metrics(body: bytes, context) -> bytes:
            request = metrics_pb.ExportMetricsServiceRequest.FromString(body)
            points = 0
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        data = getattr(metric, metric.WhichOneof("data"))
                        points += len(data.data_points)
            with self._lock:
                self.points += points
                self.metric_requests += 1
            return metrics_pb.ExportMetricsServiceResponse().SerializeToString()

        def export_logs(body: bytes, context) -> bytes:
            request = logs_pb.ExportLogsServiceRequest.FromString(body)
            records = sum(len(sl.log_records) for rl in request.resource_logs
                          for sl in rl.scope_logs)
            with self._lock:
                self.log_records += records
            return logs_pb.ExportLogsServiceResponse().SerializeToString()

        def handler(service: str, export) -> grpc.GenericRpcHandler:
            return grpc.method_handlers_generic_handler(service, {
                "Export": grpc.unary_unary_rpc_method_handler(
                    export, request_deserializer=None, response_serializer=None)})

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.max_receive_message_length", 64 << 20)])
        self.server.add_generic_rpc_handlers((
            handler("opentelemetry.proto.collector.metrics.v1.MetricsService", export_metrics),
            handler("opentelemetry.proto.collector.logs.v1.LogsService", export_logs)))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def counts(self) -> tuple[int, int, int]:
        with self._lock:
            return self.points, self.metric_requests, self.log_records

    def stop(self) -> None:
        self.server.stop(0)


# -- the log lines ---------------------------------------------------------------------

def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def log_lines(events: Path, end: datetime, extra_per_task_run: int = 0) -> list[dict]:
    """The lines Prefect 3.9.1 writes for these runs with default settings
    (as a real server stored them for the real 500-task flow: one per task
    run, "Finished in state Completed()", and two per flow run, "Beginning
    flow run ..." and its final state), plus `extra_per_task_run` lines of a
    task's own logging each; timestamped as those states, all moved so that
    the last one is at `end`."""
    runs: dict[str, dict] = {}
    for line in events.read_bytes().splitlines():
        event = json.loads(line)
        resource = event["resource"]
        rid = resource["prefect.resource.id"]
        kind = "task" if rid.startswith("prefect.task-run.") else \
            "flow" if rid.startswith("prefect.flow-run.") else None
        if kind is None:
            continue
        run = runs.setdefault(rid, {"kind": kind, "id": rid.rsplit(".", 1)[1],
                                    "name": resource.get("prefect.resource.name", "")})
        for related in event.get("related", ()):
            if related.get("prefect.resource.role") == "flow-run":
                run["flow_run_id"] = related["prefect.resource.id"].rsplit(".", 1)[1]
            if related.get("prefect.resource.role") == "flow":
                run["flow"] = related.get("prefect.resource.name", "")
        state = resource.get("prefect.state-type")
        if state == "RUNNING" and "running" not in run:
            run["running"] = _when(event["occurred"])
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            run["final"] = (_when(event["occurred"]), resource.get("prefect.state-name", ""))
    latest = max(run["final"][0] for run in runs.values() if "final" in run)
    shift = end - latest
    lines = []
    for run in runs.values():
        if "running" not in run or "final" not in run:
            continue
        final_at, final_name = run["final"]
        said = [(final_at, f"Finished in state {final_name}()")]
        if run["kind"] == "task":
            said[:0] = [(run["running"], f"Processing input {n} of {run['name']}")
                        for n in range(extra_per_task_run)]
            ids = {"flow_run_id": run.get("flow_run_id"), "task_run_id": run["id"]}
            name = "prefect.task_runs"
        else:
            said.insert(0, (run["running"], f"Beginning flow run {run['name']!r} for flow "
                                            f"{run.get('flow', '')!r}"))
            ids = {"flow_run_id": run["id"], "task_run_id": None}
            name = "prefect.flow_runs"
        for at, message in said:
            lines.append({"name": name, "level": 20, "message": message,
                          "timestamp": (at + shift).isoformat(), **ids})
    return lines


def post_logs(api_url: str, lines: list[dict], batch: int = 1000) -> None:
    for start in range(0, len(lines), batch):
        request = urllib.request.Request(
            f"{api_url}/logs/", data=json.dumps(lines[start:start + batch]).encode(),
            method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status in (200, 201), response.status


# -- one serve process -----------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system seconds of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def one_serve(flags: list[str], server: LocalPrefectServer, events: Path, spans: int,
              log_records: int, receiver: Receiver, signals: SignalsReceiver,
              workdir: Path, profile: str | None = None) -> dict:
    from support.backends import free_port, wait_until

    port = free_port()
    store = Path(tempfile.mkdtemp(dir=workdir)) / "store.sqlite3"
    env = dict(server.env(), OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_INSECURE="true",
               OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://{receiver.endpoint}",
               OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=signals.endpoint,
               OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=signals.endpoint,
               OTEL_METRIC_EXPORT_INTERVAL="5000", OTEL_BRIDGE_PUSH_TOKEN=TOKEN)
    command = [sys.executable, "-m", "otel_bridge", "serve", "--http-port", str(port),
               "--store-path", str(store), "--linger-seconds", "1",
               "--backfill-seconds", str(BACKFILL_SECONDS), "--log-level", "WARNING", *flags]
    spans_before = receiver.count()
    points_before, _, records_before = signals.counts()
    service = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    spy = None
    try:
        wait_until(lambda: _ready(port), timeout=60, interval=0.05)
        ready_cpu = cpu_seconds(service.pid)
        if profile:
            spy = subprocess.Popen([profile, "record", "-p", str(service.pid), "-o",
                                    str(workdir / f"profile-{'-'.join(flags) or 'off'}.txt"),
                                    "-f", "raw", "-r", "200", "-n"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        started = time.perf_counter()
        pushed = subprocess.run([sys.executable, str(PERF / "push_load.py"), str(events),
                                 f"http://127.0.0.1:{port}/v1/events", TOKEN, "500", "4"],
                                check=True, stdout=subprocess.PIPE, text=True)
        acked = int(pushed.stdout.split()[0])
        push = time.perf_counter() - started
        spans_at_push = receiver.count() - spans_before
        wait_until(lambda: receiver.count() - spans_before >= spans, timeout=900, interval=0.1,
                   what="every span at the receiver")
        if log_records:
            wait_until(lambda: signals.counts()[2] - records_before >= log_records, timeout=900,
                       interval=0.1, what="every log record at the receiver")
        wall = time.perf_counter() - started
        cpu = cpu_seconds(service.pid)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        service.terminate()
        service.wait(60)
    points_after, _, records_after = signals.counts()
    return {"events": acked, "cpu": cpu, "cpu_ready": cpu - ready_cpu, "wall": wall, "push": push,
            "spans_at_push": spans_at_push,
            "spans": receiver.count() - spans_before,
            "points": points_after - points_before, "records": records_after - records_before}


# -- the whole ---------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    copies = int(argv[0]) if argv else 40
    rounds = int(argv[1]) if len(argv) > 1 else 4
    capture = Path(argv[2]) if len(argv) > 2 and argv[2] != "-" else DEFAULT_CAPTURE
    # Lines a task logs itself, beyond Prefect's own one per task run.
    extra_lines = int(argv[3]) if len(argv) > 3 else 0
    # A py-spy executable: the last round's processes profiled, one file each.
    profile = os.environ.get("SIGNALS_PYSPY")
    if not (PERF / "push_load.py").exists():
        print(f"the shared yardstick is not at {PERF}", file=sys.stderr)
        return 2
    begun = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, LocalPrefectServer() as server:
        workdir = Path(tmp)
        events = replicated(capture, copies, workdir)
        lines = events.read_bytes().splitlines()
        spans = len(convert_spans(lines))
        logs = log_lines(events, datetime.now(timezone.utc) - LOGS_AGE, extra_lines)
        posted = time.perf_counter()
        post_logs(server.api_url, logs)
        print(f"{len(lines)} events, {spans} runs: {capture.name} x {copies}; "
              f"{len(logs)} log lines put into Prefect in {time.perf_counter() - posted:.1f} s")
        receiver, signals = Receiver(workdir), SignalsReceiver()
        results: dict[str, list[dict]] = {name: [] for name, _ in CONFIGURATIONS}
        try:
            for round_ in range(rounds):
                # Each round starts one further along (ABCD, BCDA, ...): whatever the
                # machine does after a configuration (the Prefect server's own
                # work after the logs were read) falls on each one in turn.
                shift = round_ % len(CONFIGURATIONS)
                for name, flags in CONFIGURATIONS[shift:] + CONFIGURATIONS[:shift]:
                    result = one_serve(flags, server, events, spans,
                                       len(logs) if "--logs" in flags else 0,
                                       receiver, signals, workdir,
                                       profile if round_ == rounds - 1 else None)
                    assert result["events"] == len(lines), (result, len(lines))
                    results[name].append(result)
                    print(f"  round {round_ + 1} {name:13s} cpu {result['cpu']:6.2f} s "
                          f"(from ready {result['cpu_ready']:6.2f})  wall {result['wall']:6.2f} s "
                          f"(push {result['push']:5.2f}, {result['spans_at_push']} spans by then)  "
                          f"spans {result['spans']}  metric points {result['points']}  "
                          f"log records {result['records']}", flush=True)
            if profile:
                target = Path(tempfile.gettempdir()) / "signals-profiles"
                target.mkdir(exist_ok=True)
                for path in sorted(workdir.glob("profile-*.txt")):
                    (target / path.name).write_bytes(path.read_bytes())
                print(f"py-spy profiles (collapsed stacks) of the last round in {target}")
        finally:
            receiver.stop()
            signals.stop()
    print(f"median of {rounds} rounds, {len(lines)} events pushed each "
          f"(with logs, {len(logs)} log lines read too):")
    print(f"  {'':13s} {'CPU µs/event':>13s} {'ratio':>6s} {'from ready':>11s} {'ratio':>6s} "
          f"{'wall s':>7s} {'ratio':>6s}")
    base = None
    for name, _ in CONFIGURATIONS:
        runs = results[name]
        cpu = statistics.median(r["cpu"] for r in runs) / len(lines) * 1e6
        ready = statistics.median(r["cpu_ready"] for r in runs) / len(lines) * 1e6
        wall = statistics.median(r["wall"] for r in runs)
        base = base or (cpu, ready, wall)
        print(f"  {name:13s} {cpu:13.1f} {cpu / base[0]:6.2f} {ready:11.1f} {ready / base[1]:6.2f} "
              f"{wall:7.2f} {wall / base[2]:6.2f}")
    print(f"(goal: CPU per event at most 1.20x off; {time.perf_counter() - begun:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
