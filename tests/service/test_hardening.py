"""What no input can make the service do: grow /metrics without bound, or
show a secret in a log line."""

from __future__ import annotations

import json
import logging

import pytest

from otel_bridge.model.states import KNOWN_STATE_NAMES
from otel_bridge.service import logs
from otel_bridge.service.metrics import Metrics, event_label


def test_the_event_label_takes_prefects_run_states_only():
    """3,000 pushed event names once added 3,004 series."""
    metrics = Metrics()
    names = [f"prefect.task-run.Made{i}" for i in range(3000)] + [
        "prefect.flow-run.heartbeat", "x" * 500, "prefect.task-run.Completed"]
    for name in names:
        metrics.events_in.labels("push", event_label(name)).inc()
    series = {s.labels["event"] for s in next(iter(metrics.events_in.collect())).samples}
    assert series == {"other", "prefect.task-run.Completed"}
    assert all(event_label(f"prefect.{k}.{s}") != "other"
               for k in ("task-run", "flow-run") for s in KNOWN_STATE_NAMES)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_log_line_shows_url_credentials_or_a_configured_secret(fmt, capsys):
    logs.setup_logging(fmt, "INFO", secrets=["push-token-1234", 'api"key\\5678'])
    try:
        log = logging.getLogger("otel_bridge.test")
        log.info("following Prefect", extra={"api_url": "https://user:p%40ss@prefect.example/api"})
        log.warning("bad token push-token-1234 and key %s", 'api"key\\5678')
        try:
            raise ConnectionError("cannot reach http://admin:hunter2@10.0.0.1:4200/api")
        except ConnectionError:
            log.exception("subscription failed")
        err = capsys.readouterr().err
    finally:
        logs.setup_logging("json", "INFO")
    for secret in ("p%40ss", "user:", "push-token-1234", "5678", "hunter2", "admin:"):
        assert secret not in err, secret
    assert "https://***@prefect.example/api" in err and "http://***@10.0.0.1:4200" in err
    if fmt == "json":
        assert all(json.loads(line) for line in err.splitlines() if line.startswith("{"))
