"""The programs in examples/ run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT, SAMPLES


def test_bridge_a_file_prints_the_trees_without_an_endpoint(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text((SAMPLES / "task_retries.jsonl").read_text() + "{broken\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "bridge_a_file.py"),
                             str(events)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "4 spans, 1 lines skipped" in result.stderr
    assert "task flaky_delayed" in result.stdout and "AwaitingRetry" in result.stdout
