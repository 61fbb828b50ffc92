"""The fast-path figures, side by side with the straightforward route, in one run.

    .venv/bin/python benchmarks/fast_path.py [N] [CAPTURE]

The yardstick is the project's shared one (`shared/perf/` beside the repo:
the straightforward route, a counting OTLP/gRPC receiver and the replicator),
used as it is. CAPTURE (default: the real 500-task flow
tests/fixtures/prefect-3.9.1-telemetry/map-500.jsonl) is replicated N times
(default 40: about 60,000 events) with fresh ids. Then:

- whole processes, alternating, three times each, against one counting
  receiver: the straightforward route and `otel-bridge convert --to otlp`
  over gRPC; the median time of each and their ratio (goal: convert at least
  5x faster);
- `convert --to otlp-json` to a file, with one process and with the default
  worker processes: time and peak resident memory of the whole process tree
  (goal: 3x faster than before the fast path, under 150 MB);
- open runs: the memory an assembler holds per open task run, by
  tracemalloc over 10,000 runs that have started (goal: at most 1 KiB);
- the pure path on one core, in process: bytes in to encoded OTLP request
  bytes out, events per second (goal: at least 100,000);
- the floor in CPython: decoding alone, then grouping by run, then a bare
  span per run encoded (what any Python translation works under);
- the sidecar: `otel-bridge serve` with its store, the events pushed to
  `POST /v1/events` by the shared push load (4 clients, 500 a batch), time
  from the first push until the receiver has counted every span, against
  the straightforward route's events per second (goal: at least 2x).

Prints figures; asserts nothing but that every span reached the receiver.
"""

from __future__ import annotations

import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT.parent / "shared" / "perf"
DEFAULT_CAPTURE = ROOT / "tests" / "fixtures" / "prefect-3.9.1-telemetry" / "map-500.jsonl"
sys.path.insert(0, str(ROOT))

from otel_bridge.model.events import parse_wire_event  # noqa: E402
from otel_bridge.model.otlp_protobuf import TraceRequest, encode_span  # noqa: E402
from otel_bridge.sinks.otlp import requests_by_size, trace_request  # noqa: E402
from otel_bridge.sinks.sdk import resource_from_env  # noqa: E402
from otel_bridge.translate.assembler import Assembler  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from forward import open_runs_memory  # noqa: E402

from otel_bridge.cli import default_jobs  # noqa: E402

DEFAULT_JOBS = default_jobs()


class Receiver:
    """The shared counting receiver, as a process."""

    def __init__(self, workdir: Path):
        self.portfile = workdir / "receiver.port"
        self.process = subprocess.Popen([sys.executable, str(PERF / "counting_receiver.py"),
                                         str(self.portfile)])
        deadline = time.monotonic() + 30
        while not self.portfile.exists() or not self.portfile.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the counting receiver did not start")
            time.sleep(0.05)
        self.endpoint = f"127.0.0.1:{self.portfile.read_text()}"

    def count(self) -> int:
        counted = Path(f"{self.portfile}.count")
        counted.unlink(missing_ok=True)
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not counted.exists() or not counted.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the counting receiver did not report")
            time.sleep(0.02)
        return int(counted.read_text())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def replicated(capture: Path, copies: int, workdir: Path) -> Path:
    """The shared replicator's copies of a capture, as a JSON-lines file in `workdir`."""
    events = workdir / "events.jsonl"
    with open(events, "w") as out:
        subprocess.run([sys.executable, str(PERF / "replicate.py"), str(capture), str(copies)],
                       stdout=out, check=True)
    return events


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def whole_processes(events: Path, receiver: Receiver, spans: int) -> tuple[float, float]:
    """Median seconds of the straightforward route and of `convert --to otlp`."""
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{receiver.endpoint}",
               OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_INSECURE="true")
    route, bridge = [], []
    for _ in range(3):
        before = receiver.count()
        route.append(timed([sys.executable, str(PERF / "straightforward_route.py"), str(events),
                            receiver.endpoint], env))
        middle = receiver.count()
        bridge.append(timed([sys.executable, "-m", "otel_bridge", "convert", str(events),
                             "--to", "otlp"], env))
        after = receiver.count()
        # The route makes task spans only; the bridge flow spans too.
        assert after - middle == spans, (after - middle, spans)
        assert middle - before > 0
    return statistics.median(route), statistics.median(bridge)


def otlp_json(events: Path, out: Path, jobs: int) -> tuple[float, float]:
    """Seconds and peak resident MB of `convert --to otlp-json --jobs N` to
    a file: the peak of the resident memory of the process and its worker
    processes together, sampled every 20 ms from /proc."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "otel_bridge", "convert", str(events),
                                "-o", str(out), "--jobs", str(jobs)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        peak = max(peak, _tree_rss_kb(process.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    assert process.returncode == 0
    return seconds, peak / 1024


def _tree_rss_kb(pid: int) -> int:
    """Resident kB of a process and its descendants (shared pages counted in
    each: an upper bound)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        child = int(entry.name)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(child)
        rss[child] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, ()))
    return total


def sidecar(events: Path, receiver: Receiver, spans: int, workdir: Path) -> float:
    """Seconds from the first push until the receiver counted every span."""
    from support.backends import free_port, wait_until

    port, token = free_port(), "benchmark-token"
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{receiver.endpoint}",
               OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_INSECURE="true",
               OTEL_BRIDGE_PUSH_TOKEN=token)
    before = receiver.count()
    service = subprocess.Popen(
        [sys.executable, "-m", "otel_bridge", "serve", "--http-port", str(port),
         "--store-path", str(workdir / "store.sqlite3"), "--linger-seconds", "1",
         "--log-level", "WARNING"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _ready(port), timeout=60)
        started = time.perf_counter()
        subprocess.run([sys.executable, str(PERF / "push_load.py"), str(events),
                        f"http://127.0.0.1:{port}/v1/events", token, "500", "4"],
                       check=True, stdout=subprocess.DEVNULL)
        wait_until(lambda: receiver.count() - before >= spans, timeout=600, interval=0.1)
        return time.perf_counter() - started
    finally:
        service.terminate()
        service.wait(30)


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def open_run_bytes(lines: list[bytes], runs: int = 10_000) -> float:
    """Bytes an assembler holds per open task run (its Pending and Running
    states in), events included."""
    chosen, seen = [], set()
    for line in lines:
        event = parse_wire_event(line)
        rid = event.resource["prefect.resource.id"] if event is not None else ""
        if (rid.startswith("prefect.task-run.") and (rid in seen or len(seen) < runs)
                and event.resource.get("prefect.state-type") in ("PENDING", "RUNNING")):
            seen.add(rid)
            chosen.append(line)
    return open_runs_memory(chosen) / max(len(seen), 1)


def convert_spans(lines: list[bytes]) -> list:
    """The spans `convert` makes of these lines (those the cap on open runs
    pushes out included)."""
    assembler = Assembler()
    spans = []
    for line in lines:
        event = parse_wire_event(line)
        if event is not None:
            spans.extend(assembler.add(event, line))  # as convert does: the line is kept
    return spans + assembler.flush()


def pure_path(lines: list[bytes]) -> float:
    """Events per second from bytes in to encoded OTLP request bytes out."""
    request = trace_request(resource_from_env())
    started = time.process_time()
    fields = [TraceRequest.span_field(encode_span(span)) for span in convert_spans(lines)]
    for batch in requests_by_size(fields, request):
        request.encode(batch)
    return len(lines) / (time.process_time() - started)


def cpython_floor(lines: list[bytes]) -> list[tuple[str, float]]:
    """Events per second of the least a translation can do in CPython, one
    piece more each time: decoding (msgspec, the fastest JSON reader here);
    holding the events grouped by run; a bare span per run (its final
    labels, a span event per state, nothing for the round trip) encoded by
    the bridge's encoder. The ceiling any Python translation works under."""
    import msgspec

    from otel_bridge.model.spans import Span, SpanEvent

    decode = msgspec.json.Decoder().decode
    out = []
    gc.collect()
    gc.freeze()  # as convert does: the GC walking what is held is not the floor
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    for work, what in ((0, "decode"), (1, "+ group by run"), (2, "+ a bare span per run, encoded")):
        started = time.process_time()
        runs: dict = {}
        for line in lines:
            event = decode(line)
            if work:
                runs.setdefault(event["resource"]["prefect.resource.id"], []).append(event)
        if work == 2:
            for events in runs.values():
                last = events[-1]
                encode_span(Span(1, 2, 3, last["resource"].get("prefect.resource.name", ""), 1, 2,
                                 attributes=dict(last["resource"]),
                                 events=tuple(SpanEvent(e["resource"].get("prefect.state-name", ""),
                                                        5, {"prefect.state.id": e["id"]})
                                              for e in events)))
        out.append((what, len(lines) / (time.process_time() - started)))
        del runs
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    return out


def main(argv: list[str]) -> int:
    copies = int(argv[0]) if argv else 40
    capture = Path(argv[1]) if len(argv) > 1 else DEFAULT_CAPTURE
    if not (PERF / "straightforward_route.py").exists():
        print(f"the shared yardstick is not at {PERF}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        events = replicated(capture, copies, workdir)
        lines = events.read_bytes().splitlines()
        spans = len(convert_spans(lines))  # every run's span, task and flow
        print(f"{len(lines)} events ({events.stat().st_size / 1e6:.0f} MB), {spans} runs: "
              f"{capture.name} x {copies}")
        receiver = Receiver(workdir)
        try:
            route, bridge = whole_processes(events, receiver, spans)
            served = sidecar(events, receiver, spans, workdir)
        finally:
            receiver.stop()
        print("whole process, OTLP/gRPC to a counting receiver (median of 3):")
        print(f"  straightforward route      {route:7.2f} s  {len(lines) / route:8.0f} events/s")
        print(f"  convert --to otlp --jobs {DEFAULT_JOBS} {bridge:5.2f} s  {len(lines) / bridge:8.0f} events/s"
              f"  {route / bridge:.2f}x the route's speed (goal >= 5x)")
        for jobs in (1, DEFAULT_JOBS):
            seconds, peak = otlp_json(events, workdir / "out.jsonl", jobs)
            print(f"convert --to otlp-json --jobs {jobs} {seconds:5.2f} s  peak {peak:.0f} MB "
                  "(goal: 3x faster than before the fast path, under 150 MB)")
        print(f"open task run held           {open_run_bytes(lines):7.0f} B (goal <= 1024)")
        print(f"pure path, one core          {pure_path(lines):8.0f} events/s (goal >= 100,000)")
        print("the floor in CPython, one core (no round trip):")
        for what, rate in cpython_floor(lines):
            print(f"  {what:32s} {rate:8.0f} events/s")
        print(f"sidecar, push to receiver    {served:7.2f} s  {len(lines) / served:8.0f} events/s"
              f"  {route / served:.2f}x the route's speed (goal >= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
