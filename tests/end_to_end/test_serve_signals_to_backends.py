"""Traces, run metrics and logs from one `otel-bridge serve`, into real
backends (issue #14's test): real Prefect flows with retries, a failure, a
stuck task and logging in tasks; the bridge exports spans to a real Jaeger,
metrics to a real Prometheus (its OTLP receiver) and log records to a real
VictoriaLogs, and is restarted while a flow runs.

Ground truth is the server: its task-run and flow-run records give each
histogram's count and sum and each error count, exactly; its stored log
lines are every record VictoriaLogs must hold, each on the trace and span
Jaeger holds for its run.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from datetime import datetime

import pytest
from test_serve_logs_to_collector import stored_logs
from test_serve_prefect_to_collector import (  # noqa: F401
    Bridge,
    bridge_env,
    expected_result,
    explained,
    fleet,
    server,
    settled_runs,
)

from otel_bridge.translate.ids import span_id_for, trace_id_for
from support import backends

pytestmark = [pytest.mark.prefect_server, pytest.mark.backend]

SIGNALS_FLOW = """\
import sys, time
from pathlib import Path
from prefect import flow, task, get_run_logger
from prefect.runtime import task_run

@task
def work(n: int) -> int:
    get_run_logger().info("work %d", n)
    return n

@task(retries=1, retry_delay_seconds=0)
def flaky() -> str:
    logger = get_run_logger()
    if task_run.run_count < 2:
        logger.warning("first attempt: failing on purpose")
        raise RuntimeError("the first attempt fails")
    logger.info("second attempt: fine")
    return "ok"

@task
def broken() -> None:
    get_run_logger().error("about to fail")
    raise ValueError("broken on purpose")

@task
def stuck(marker: str, seconds: float) -> None:
    get_run_logger().info("stuck for %.0f s", seconds)
    Path(marker).write_text("running")
    time.sleep(seconds)

@flow(name=sys.argv[1])
def signals_flow(marker: str, seconds: float, fail: bool) -> None:
    get_run_logger().info("flow starts")
    for n in range(3):
        work(n)
    flaky()
    broken(return_state=True)
    if seconds:
        stuck(marker, seconds)
    if fail:
        raise RuntimeError("the flow fails at its end")

if __name__ == "__main__":
    signals_flow(sys.argv[2], float(sys.argv[3]), sys.argv[4] == "fail")
"""

STUCK_SECONDS = 30.0
STUCK_AFTER = 2.0  # metrics_stuck_running_seconds


def _seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def settle(read, want, timeout: float):
    """What `read` gives once it gives `want`, or at the timeout (for the
    assertion to show the difference)."""
    deadline = time.monotonic() + timeout
    while True:
        got = read()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(1)


def _by_series(samples: list[dict], *labels: str) -> dict[tuple, float]:
    return {tuple(s["metric"].get(label, "") for label in labels): s["value"] for s in samples}


@explained
def test_serve_carries_traces_metrics_and_logs_into_real_backends(server, fleet, tmp_path):  # noqa: F811
    with backends.jaeger() as jaeger, backends.prometheus() as prometheus, \
            backends.victorialogs() as victoria:
        env = bridge_env(server, "http/protobuf", jaeger.otlp_http_traces_url)
        env.update({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": prometheus.otlp_http_metrics_url,
                    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": victoria.otlp_http_logs_url,
                    "OTEL_METRIC_EXPORT_INTERVAL": "1000", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "5",
                    "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "5"})
        bridge = Bridge(tmp_path, "bridge", env, [
            "--metrics", "--metrics-stuck-running-seconds", str(STUCK_AFTER),
            "--logs", "--logs-poll-seconds", "0.5", "--logs-lateness-seconds", "6"])
        fleet.bridges.append(bridge)
        bridge.start()

        # 1. A flow with a stuck task: seen stuck while it runs, and the
        #    bridge restarted on its store meanwhile.
        script = tmp_path / "signals_flow.py"
        script.write_text(SIGNALS_FLOW)
        marker = tmp_path / "stuck.marker"
        flow = fleet.run("signals-first", [sys.executable, str(script), "signals-first",
                                           str(marker), str(STUCK_SECONDS), "ok"],
                         server.env(), tmp_path)
        backends.wait_until(marker.exists, 120, what="the stuck task running", proc=flow)
        stuck = prometheus.wait_for(
            'prefect_task_run_stuck{cicd_pipeline_task_name="stuck",prefect_state_name="Running"} > 0',
            timeout=STUCK_SECONDS - 5)
        assert stuck[0]["value"] == 1
        active = prometheus.query('cicd_pipeline_run_active{cicd_pipeline_name="signals-first"}')
        assert {s["metric"]["cicd_pipeline_run_state"]: s["value"] for s in active}["executing"] == 1
        bridge.kill9()  # mid-flow: runs open, counts and log lines in the store
        bridge.start()
        assert flow.wait(STUCK_SECONDS + 60) == 0, "the first flow failed"

        # 2. A flow that fails, while the bridge runs.
        second = fleet.run("signals-second", [sys.executable, str(script), "signals-second",
                                              str(marker), "0", "fail"], server.env(), tmp_path)
        assert second.wait(120) == 1, "the second flow should fail"

        flows, tasks = settled_runs(server, {"signals-first": 1, "signals-second": 1},
                                    {"signals-first": 6, "signals-second": 5})
        flow_names = {r["id"]: r["flow_name"] for r in flows}

        # -- metrics: every histogram count and sum, every error count, as the server records
        want_count: Counter = Counter()
        want_sum: dict = defaultdict(float)
        want_errors: Counter = Counter()
        for t in tasks:
            name = t["task_key"].rsplit("-", 1)[0]
            result = expected_result(t["state_type"], t["state_name"])
            want_count[name, result] += 1
            want_sum[name, result] += _seconds(t["end_time"]) - _seconds(t["start_time"])
            if result != "success":
                want_errors[name] += 1
        flow_want = Counter((r["flow_name"], expected_result(r["state_type"], r["state_name"]))
                            for r in flows)

        labels = ("cicd_pipeline_task_name", "cicd_pipeline_task_run_result")
        executing = 'prefect_task_run_state="executing"'

        def task_counts():
            return _by_series(prometheus.query(
                f"sum by ({','.join(labels)}) (prefect_task_run_duration_seconds_count{{{executing}}})"),
                *labels)

        assert settle(task_counts, dict(want_count), 90) == dict(want_count)
        sums = _by_series(prometheus.query(
            f"sum by ({','.join(labels)}) (prefect_task_run_duration_seconds_sum{{{executing}}})"),
            *labels)
        assert set(sums) == set(want_sum)
        for key, seconds in want_sum.items():
            assert sums[key] == pytest.approx(seconds, abs=1e-3), key
        errors = _by_series(prometheus.query(
            "sum by (cicd_pipeline_task_name) (prefect_task_run_errors_total)"),
            "cicd_pipeline_task_name")
        assert errors == {(k,): float(v) for k, v in want_errors.items()}
        assert want_errors == {"broken": 2}
        assert _by_series(prometheus.query("sum by (error_type) (prefect_task_run_errors_total)"),
                          "error_type") == {("ValueError",): 2.0}
        # The task's flow is a label too: each flow's share is its own runs'.
        assert _by_series(prometheus.query("prefect_task_run_errors_total"), "cicd_pipeline_name") \
            == {("signals-first",): 1.0, ("signals-second",): 1.0}
        # A flow run's span leaves after its tasks' (its end is later).
        flows_seen = settle(lambda: _by_series(prometheus.query(
            'cicd_pipeline_run_duration_seconds_count{cicd_pipeline_run_state="executing"}'),
            "cicd_pipeline_name", "cicd_pipeline_result"), dict(flow_want), 60)
        assert flows_seen == {k: float(v) for k, v in flow_want.items()}
        assert _by_series(prometheus.query("cicd_pipeline_run_errors_total"),
                          "cicd_pipeline_name", "error_type") == {("signals-second", "RuntimeError"): 1.0}
        # The stuck task has ended: none stuck now, said as 0, not as nothing.
        backends.wait_until(lambda: prometheus.query(
            'prefect_task_run_stuck{cicd_pipeline_task_name="stuck"}')[0]["value"] == 0, 30,
            what="the stuck gauge back at 0")

        # -- logs: every line the server stored, once, on its run's span in Jaeger
        stored = stored_logs(server, list(flow_names))
        assert {log["task_run_id"] for log in stored} >= {t["id"] for t in tasks}  # each logs
        records = backends.wait_until(
            lambda: (got := victoria.query("*")) and len(got) >= len(stored) and got, 90,
            what=f"{len(stored)} log records in VictoriaLogs")
        by_uid = Counter(r["log.record.uid"] for r in records)
        assert {uid for uid, n in by_uid.items() if n != 1} == set()
        assert set(by_uid) == {log["id"] for log in stored}
        spans = {}
        for flow_run_id in flow_names:
            runs = 1 + sum(t["flow_run_id"] == flow_run_id for t in tasks)
            trace = jaeger.wait_for_trace(trace_id_for(f"prefect.flow-run.{flow_run_id}"),
                                          min_spans=runs, timeout=60)
            for span in trace["spans"]:
                tags = {t["key"]: t["value"] for t in span["tags"]}
                if "prefect.resource.id" in tags:
                    spans[tags["prefect.resource.id"]] = (int(span["traceID"], 16),
                                                          int(span["spanID"], 16))
        assert len(spans) == len(flows) + len(tasks)
        wanted = {log["id"]: log for log in stored}
        for record in records:
            log = wanted[record["log.record.uid"]]
            run = (f"prefect.task-run.{log['task_run_id']}" if log["task_run_id"]
                   else f"prefect.flow-run.{log['flow_run_id']}")
            assert (int(record["trace_id"], 16), int(record["span_id"], 16)) == spans[run], run
            assert int(record["span_id"], 16) == span_id_for(run)
            assert record["_msg"] == log["message"]
        bridge.stop()
