"""The programs in examples/ run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys

from support.helpers import ROOT, SAMPLES


def test_bridge_a_file_prints_the_trees_without_an_endpoint(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text((SAMPLES / "task_retries.jsonl").read_text() + "{broken\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "bridge_a_file.py"),
                             str(events)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "4 spans, 1 lines skipped" in result.stderr
    assert "task flaky_delayed" in result.stdout and "AwaitingRetry" in result.stdout


def test_the_serve_config_example_is_valid_settings(monkeypatch):
    from otel_bridge.service.config import ServeSettings, load_settings

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    for name in ServeSettings.model_fields:  # the file alone, not this machine's env
        monkeypatch.delenv("OTEL_BRIDGE_" + name.upper(), raising=False)
    settings = load_settings({}, str(ROOT / "examples" / "otel-bridge-serve.yaml"))
    assert settings.follows_prefect and settings.http_port == 8686
    assert str(settings.store_path) == "/var/lib/otel-bridge/store.sqlite3"
