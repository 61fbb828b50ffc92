"""`convert --metrics`: the batch's run metrics as OTLP/JSON, each run once."""

from __future__ import annotations

import json

import pytest
from support.helpers import FIXTURES, measured_runs

from otel_bridge.cli import main

CAPTURES = [FIXTURES / f"{name}.jsonl" for name in
            ("failure", "crash-sigterm", "timeout", "cancelled", "retries-immediate", "not-ready")]


def _points(path) -> dict:
    """(metric, attributes) -> (count or value, sum) from an OTLP/JSON metrics file."""
    (line,) = path.read_text().splitlines()
    request = json.loads(line)
    out = {}
    for scope in request["resourceMetrics"][0]["scopeMetrics"]:
        for metric in scope["metrics"]:
            kind = "histogram" if "histogram" in metric else "sum"
            for point in metric[kind]["dataPoints"]:
                attributes = tuple(sorted((a["key"], a["value"]["stringValue"])
                                          for a in point["attributes"]))
                if kind == "histogram":
                    value = (int(point["count"]), round(point["sum"], 6))
                else:
                    value = (int(point["asInt"]), None)
                out[(metric["name"], metric["unit"], attributes)] = value
    return out


def _expected() -> dict:
    out = {}
    for found in measured_runs(CAPTURES):
        for m in found.measurements:
            key = (m.instrument.name, m.instrument.unit, m.attributes)
            n, total = out.get(key, (0, 0.0))
            out[key] = (n + 1, total + m.value)
    return {k: (n, round(total, 6) if k[0].endswith("duration") else None)
            for k, (n, total) in out.items()}


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_convert_writes_each_run_once_whatever_repeats(tmp_path, jobs):
    spans, metrics = tmp_path / "spans.jsonl", tmp_path / "metrics.jsonl"
    inputs = [str(c) for c in CAPTURES]
    # Every capture twice: the second copy's events are duplicates.
    code = main(["convert", *inputs, *inputs, "-o", str(spans), "--metrics", str(metrics),
                 "--jobs", jobs])
    assert code == 0
    got = _points(metrics)
    assert got == _expected()
    assert ("cicd.pipeline.run.errors", "{error}",
            (("cicd.pipeline.name", "s-crash-sigterm"), ("error.type", "Crashed"))) in got
    assert spans.read_text()  # the spans are still written


def test_metrics_is_refused_where_there_are_no_runs_to_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["convert", str(CAPTURES[0]), "--to", "events", "--metrics", str(tmp_path / "m")])
    assert exited.value.code == 2
    assert "--metrics counts runs from events" in capsys.readouterr().err
