"""How long `/healthz` waits while `serve` makes a big OTLP request into events.

    .venv/bin/python benchmarks/responsiveness.py [ROUNDS]

Starts a real `otel-bridge serve` (OTLP receiver on, events to a file),
sends it ROUNDS times the largest request it takes whole: 50 task spans of
990 states each, 4 MB of OTLP protobuf that make 50,000 events. While each
request is handled, `/healthz` is asked every 20 ms from another thread;
prints the time each answer took (median, 99th percentile, slowest) and the
time the request took. The goal (#13): every answer within 100 ms.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.factories import FlowRun, task_run_events  # noqa: E402
from support.helpers import convert  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402

from otel_bridge.service.pipeline import MAX_EVENTS_PER_REQUEST, MAX_EVENTS_PER_SPAN  # noqa: E402
from otel_bridge.sinks.sdk import to_readable_spans  # noqa: E402

PROTOBUF = "application/x-protobuf"


def big_request() -> bytes:
    flow_run = FlowRun()
    states = MAX_EVENTS_PER_SPAN - 10
    retries = (states - 3) // 2
    runs = [convert(task_run_events(["Pending", "Running"] + ["AwaitingRetry", "Retrying"] * retries
                                    + ["Completed"], name=f"long-{i}", flow_run=flow_run))[0]
            for i in range(MAX_EVENTS_PER_REQUEST // states)]
    resource = Resource({"service.name": "prefect"})
    return encode_spans(to_readable_spans(runs, resource)).SerializeToString()


def serve(tmp: Path) -> tuple[subprocess.Popen, dict]:
    log = tmp / "serve.log"
    argv = [sys.executable, "-m", "otel_bridge", "serve", "--log-format", "json",
            "--http-port", "0", "--otlp-receiver", "--otlp-grpc-port", "0", "--otlp-http-port", "0",
            "--store-path", str(tmp / "store.sqlite3"), "--reverse-to", "file",
            "--reverse-file", str(tmp / "events.jsonl")]
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"serving"' in line:
                return proc, json.loads(line)
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"serve did not start:\n{log.read_text()}")


def main(rounds: int) -> None:
    body = big_request()
    with tempfile.TemporaryDirectory() as tmp:
        proc, ports = serve(Path(tmp))
        try:
            admin = httpx.Client(base_url=f"http://127.0.0.1:{ports['http_port']}", timeout=30)
            url = f"http://127.0.0.1:{ports['otlp_http_port']}/v1/traces"
            waits: list[float] = []
            took: list[float] = []
            for _ in range(rounds):
                done = threading.Event()

                def send() -> None:
                    started = time.perf_counter()
                    response = httpx.post(url, content=body, headers={"Content-Type": PROTOBUF},
                                          timeout=300)
                    response.raise_for_status()
                    took.append(time.perf_counter() - started)
                    done.set()

                sender = threading.Thread(target=send)
                sender.start()
                while not done.is_set():
                    started = time.perf_counter()
                    admin.get("/healthz").raise_for_status()
                    waits.append(time.perf_counter() - started)
                    time.sleep(0.02)
                sender.join()
        finally:
            proc.terminate()
            proc.wait(60)
    waits.sort()
    ms = [w * 1000 for w in waits]
    print(f"{rounds} request(s) of {len(body):,} bytes (50,000 events each): "
          f"{statistics.median(took):.2f} s each (median)")
    print(f"/healthz while they were handled, {len(ms)} answers: median {statistics.median(ms):.1f} ms, "
          f"p99 {ms[int(len(ms) * 0.99)]:.1f} ms, slowest {ms[-1]:.1f} ms (goal: 100 ms)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
