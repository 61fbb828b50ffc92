"""`serve --logs` end to end, real parts only (issue #14).

A real Prefect 3.9.1 server runs a real flow whose flow and tasks log
through `get_run_logger()`; `otel-bridge serve --logs` runs as its own
process and exports spans and log records over OTLP/HTTP to a real
OpenTelemetry Collector, whose `file` exporter writes what it received.
Ground truth is the server: every log line it stored for the flow's runs
(POST /api/logs/filter) must arrive exactly once, on the trace and span the
bridge gave that run.

Two servers: one with default settings, whose logs websocket accepts the
subscription and sends nothing (the bridge stays in mode rest, and says the
socket is silent), across a restart of the bridge on the same store; and
one that streams its logs (PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED and
PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED true), where the lines come by
the socket and the bridge says mode websocket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_serve_prefect_to_collector import Bridge, api_post, bridge_env, fleet, server  # noqa: F401

from otel_bridge.demo.server import LocalPrefectServer
from otel_bridge.translate.ids import span_id_for, trace_id_for
from support import backends

pytestmark = [pytest.mark.prefect_server, pytest.mark.backend]

STREAMING = {"PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
             "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"}


@pytest.fixture(scope="module")
def streaming_server():
    with LocalPrefectServer(extra_env=STREAMING) as srv:
        yield srv

LOGGING_FLOW = """\
import sys
from prefect import flow, task, get_run_logger

@task
def inner(n: int) -> int:
    get_run_logger().debug("inner %d", n)
    return n

@task
def outer(n: int) -> int:
    logger = get_run_logger()
    logger.info("outer %d starts", n)
    logger.warning("outer %d is nesting", n)
    return inner(n) + 1

@task
def complain() -> None:
    get_run_logger().error("something went wrong, on purpose")

@flow(name=sys.argv[1], log_prints=True)
def logging_flow() -> None:
    get_run_logger().info("flow says hello")
    print("a print, logged by log_prints")
    for n in range(3):
        outer(n)
    complain()

if __name__ == "__main__":
    logging_flow()
"""


def collector_config(path: Path) -> Path:
    """OTLP in; traces and logs out to $COPY_FILE (JSON is YAML)."""
    config = backends.test_collector_config(backends.FILE_EXPORTER, ["file"])
    config["service"]["pipelines"]["logs"] = dict(config["service"]["pipelines"]["traces"])
    path.write_text(json.dumps(config))
    return path


def received(copy_file: Path) -> tuple[list[dict], list[dict]]:
    """(spans, log records) the Collector wrote so far, attributes as dicts."""
    spans, records = [], []
    if not copy_file.is_file():
        return spans, records
    for line in copy_file.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # being written
        for rs in doc.get("resourceSpans", ()):
            for ss in rs.get("scopeSpans", ()):
                spans += [_flat(s) for s in ss.get("spans", ())]
        for rl in doc.get("resourceLogs", ()):
            for sl in rl.get("scopeLogs", ()):
                records += [{**_flat(r), "scope": sl["scope"].get("name")}
                            for r in sl.get("logRecords", ())]
    return spans, records


def _flat(item: dict) -> dict:
    attributes = {a["key"]: next(iter(a["value"].values()), None)
                  for a in item.get("attributes", ())}
    return {**item, "attributes": attributes}


def stored_logs(server, flow_run_ids: list[str]) -> list[dict]:
    logs: list[dict] = []
    while True:
        page = api_post(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids}},
                                                 "limit": 200, "offset": len(logs)})
        logs += page
        if len(page) < 200:
            return logs


def run_logging_flow(server, name: str, tmp_path: Path) -> str:
    script = tmp_path / "logging_flow.py"
    script.write_text(LOGGING_FLOW)
    done = subprocess.run([sys.executable, str(script), name], env=server.env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = api_post(server, "/flow_runs/filter", {"flows": {"name": {"any_": [name]}}})
    assert len(runs) == 1
    return runs[0]["id"]


def logs_bridge(server, collector, fleet, tmp_path: Path, poll_seconds: float) -> Bridge:
    """`serve --logs` following `server`, spans and log records to `collector`, started."""
    endpoint = f"http://127.0.0.1:{collector.ports['OTELCOL_OTLP_HTTP_PORT']}"
    env = bridge_env(server, "http/protobuf", f"{endpoint}/v1/traces")
    env["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] = f"{endpoint}/v1/logs"
    bridge = Bridge(tmp_path, "bridge", env, ["--logs", "--logs-poll-seconds", str(poll_seconds),
                                              "--logs-lateness-seconds", "6"])
    fleet.bridges.append(bridge)
    return bridge.start()


def test_every_stored_log_line_arrives_once_on_its_runs_span_across_a_restart(
        server, fleet, tmp_path):  # noqa: F811
    copy_file = tmp_path / "received.jsonl"
    with backends.collector(collector_config(tmp_path / "collector.yaml"),
                            {"COPY_FILE": str(copy_file)}) as collector:
        bridge = logs_bridge(server, collector, fleet, tmp_path, poll_seconds=0.5)
        assert bridge.metric("otel_bridge_logs_mode", mode="rest") == 1
        said = [r for r in bridge.log().splitlines() if '"logs_mode": "rest"' in r]
        assert said, bridge.log_tail()
        backends.wait_until(lambda: counter(bridge, "socket_connections") >= 1, 30,
                            what="the logs websocket subscribed", proc=bridge.proc,
                            log_path=bridge.log_path)

        flow_runs = [run_logging_flow(server, "logs-first", tmp_path)]
        expect_all_once(server, flow_runs, copy_file, bridge)
        # The socket is subscribed and silent: that is not taken for "no
        # logs". REST brought every line, the socket none; once the grace has
        # gone by the bridge says so, and stays in mode rest.
        backends.wait_until(lambda: counter(bridge, "socket_missed") > 0, 30,
                            what="the silent socket noticed", proc=bridge.proc,
                            log_path=bridge.log_path)
        assert (counter(bridge, "live"), counter(bridge, "socket_lines")) == (0, 0)
        assert counter(bridge, "reconciled") == counter(bridge, "taken") > 0
        assert bridge.metric("otel_bridge_logs_mode", mode="rest") == 1
        assert bridge.metric("otel_bridge_logs_mode", mode="websocket") == 0
        hint = [r for r in bridge.log().splitlines()
                if "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true" in r]
        assert len(hint) == 1, bridge.log_tail()
        assert not [r for r in bridge.log().splitlines() if '"logs_mode": "websocket"' in r]

        # A restart on the same store: the lines already sent are not sent
        # again, and those of a flow run while the bridge was down all come.
        bridge.stop()
        flow_runs.append(run_logging_flow(server, "logs-second", tmp_path))
        bridge.start()
        expect_all_once(server, flow_runs, copy_file, bridge)
        assert bridge.metric("otel_bridge_prefect_logs_total", counter="taken") > 0


def test_a_server_that_streams_its_logs_sends_them_by_the_websocket_each_once(
        streaming_server, fleet, tmp_path):  # noqa: F811
    copy_file = tmp_path / "received.jsonl"
    with backends.collector(collector_config(tmp_path / "collector.yaml"),
                            {"COPY_FILE": str(copy_file)}) as collector:
        # REST polled slowly: what comes at once comes by the socket.
        bridge = logs_bridge(streaming_server, collector, fleet, tmp_path, poll_seconds=3)
        # Nothing has come on the socket yet: rest, until it proves to deliver.
        assert bridge.metric("otel_bridge_logs_mode", mode="rest") == 1
        backends.wait_until(lambda: counter(bridge, "socket_connections") >= 1, 30,
                            what="the logs websocket subscribed", proc=bridge.proc,
                            log_path=bridge.log_path)

        flow_runs = [run_logging_flow(streaming_server, "logs-streamed", tmp_path)]
        stored = expect_all_once(streaming_server, flow_runs, copy_file, bridge)

        assert bridge.metric("otel_bridge_logs_mode", mode="websocket") == 1
        assert bridge.metric("otel_bridge_logs_mode", mode="rest") == 0
        changes = bridge.log_records("Prefect's log lines: mode websocket")
        assert len(changes) == 1 and changes[0]["logs_mode"] == "websocket", bridge.log_tail()
        live = counter(bridge, "live")
        assert live > 0
        # REST reads them all again, and passes over what the socket brought.
        backends.wait_until(lambda: counter(bridge, "duplicates") >= live, 30,
                            what="REST reading the socket's lines again", proc=bridge.proc,
                            log_path=bridge.log_path)
        live, reconciled = counter(bridge, "live"), counter(bridge, "reconciled")
        assert live + reconciled == counter(bridge, "taken") == len(stored)
        assert counter(bridge, "socket_lines") >= live
        print(f"\nstreaming server: {len(stored)} lines stored, {live:g} live, "
              f"{reconciled:g} reconciled, {counter(bridge, 'duplicates'):g} duplicates")
        assert counter(bridge, "socket_missed") == 0
        assert not bridge.log_records("Prefect's log lines: mode rest")


def counter(bridge: Bridge, name: str) -> float:
    return bridge.metric("otel_bridge_prefect_logs_total", counter=name)


def expect_all_once(server, flow_runs: list[str], copy_file: Path, bridge: Bridge) -> list[dict]:
    stored = stored_logs(server, flow_runs)
    assert len({log["task_run_id"] for log in stored if log["task_run_id"]}) >= 7  # 3+3+1 tasks
    wanted = {log["id"]: log for log in stored}

    def arrived():
        _, records = received(copy_file)
        got = {r["attributes"].get("log.record.uid") for r in records}
        return set(wanted) <= got

    backends.wait_until(arrived, 60, what="every stored log line at the Collector",
                        proc=bridge.proc, log_path=bridge.log_path)
    # A poll or two more: what would come twice has had its chance to.
    backends.wait_until(lambda: bridge.metric("otel_bridge_outbox_items", kind="log") == 0, 30,
                        what="the log outbox empty")
    time.sleep(2)
    spans, records = received(copy_file)
    counts = Counter(r["attributes"]["log.record.uid"] for r in records)
    assert {uid: n for uid, n in counts.items() if n != 1} == {}
    assert set(counts) == set(wanted)  # nothing but the lines of these runs

    span_of = {s["attributes"]["prefect.resource.id"]: s for s in spans
               if "prefect.resource.id" in s["attributes"]}
    for record in records:
        log = wanted[record["attributes"]["log.record.uid"]]
        run = (f"prefect.task-run.{log['task_run_id']}" if log["task_run_id"]
               else f"prefect.flow-run.{log['flow_run_id']}")
        assert record["traceId"] == format(trace_id_for(f"prefect.flow-run.{log['flow_run_id']}"),
                                           "032x")
        assert record["spanId"] == format(span_id_for(run), "016x")
        span = span_of.get(run)
        if span is not None:  # the run's span, made of its events, is the same span
            assert (span["traceId"], span["spanId"]) == (record["traceId"], record["spanId"])
        assert record["body"]["stringValue"] == log["message"]
        assert record["scope"] == log["name"]
        assert record["severityNumber"] == {10: 5, 20: 9, 30: 13, 40: 17, 50: 21}[log["level"]]
    # Every run whose lines came has its span there too (the flow runs have
    # ended, and the bridge lingers a second).
    backends.wait_until(lambda: {f"prefect.flow-run.{f}" for f in flow_runs}
                        <= set(s["attributes"].get("prefect.resource.id")
                               for s in received(copy_file)[0]), 30, what="the flow runs' spans")
    return stored
