"""What the demo prints beside its trace tree, made of plain values (pure:
no server, no clock, no SDK), so tests check the lines without a network.

- `metrics_lines`: the run metrics of the demo's spans, measured by the
  same pure core as `convert --metrics` (`translate.run_metrics`), summed
  into a few lines: durations by flow or task name and result, errors by
  `error.type`;
- `failed_task_notes`: each failed task run's last log lines, as notes for
  `sinks.tree.render_trace` to print under the run's span. A log record is
  matched to its span by the ids both derive from the run ids, as a trace
  backend joins them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Sequence

from opentelemetry.trace import StatusCode

from otel_bridge.model.logs import LogRecord
from otel_bridge.model.spans import Span
from otel_bridge.translate.run_metrics import (
    ATTR_ERROR_TYPE,
    ATTR_PIPELINE_NAME,
    ATTR_PIPELINE_RESULT,
    ATTR_RUN_STATE,
    ATTR_TASK_NAME,
    ATTR_TASK_RESULT,
    ATTR_TASK_RUN_STATE,
    FLOW_RUN_DURATION,
    FLOW_RUN_ERRORS,
    TASK_RUN_DURATION,
    TASK_RUN_ERRORS,
    UNKNOWN_NAME,
    run_measurements,
)
from otel_bridge.translate.span_layout import TASK_RUN

__all__ = ["LAST_LOG_LINES", "failed_task_notes", "log_note", "metrics_lines"]

# How many of a failed task run's log lines the tree shows: its last ones.
LAST_LOG_LINES = 5
# A note's message is cut to its first line and this many characters.
_MESSAGE_CHARS = 120
# Each duration instrument: (its errors counter, its name attribute, its
# result attribute, its phase attribute); flow runs before task runs.
_KINDS = {
    FLOW_RUN_DURATION: (FLOW_RUN_ERRORS, ATTR_PIPELINE_NAME, ATTR_PIPELINE_RESULT, ATTR_RUN_STATE),
    TASK_RUN_DURATION: (TASK_RUN_ERRORS, ATTR_TASK_NAME, ATTR_TASK_RESULT, ATTR_TASK_RUN_STATE),
}
# The phases (docs/metrics.md), executing first: it is the span's duration,
# the one the tree shows.
_PHASES = ("executing", "pending", "finalizing")


def metrics_lines(spans: Iterable[Span]) -> list[str]:
    """The finished runs' measurements, summed: one line per duration
    instrument, flow or task name and result (runs, then seconds by phase),
    one per name and `error.type` of the errors counters, under a heading.
    No lines when no run finished. A stable order: flow runs, task runs,
    their errors; names sorted."""
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    runs: Counter = Counter()
    errors: Counter = Counter()
    for span in spans:
        measured = run_measurements(span)
        if measured is None:
            continue
        durations = [m for m in measured.measurements if m.instrument in _KINDS]
        if not durations:
            continue
        instrument = durations[0].instrument
        _, name_key, result_key, phase_key = _KINDS[instrument]
        # One run: its phases, the last of which carries its result.
        name = durations[0].attribute_map.get(name_key, UNKNOWN_NAME)
        result = durations[-1].attribute_map.get(result_key, UNKNOWN_NAME)
        key = (instrument.name, name, result)
        runs[key] += 1
        phases = rows.setdefault(key, defaultdict(float))
        for m in durations:
            phases[m.attribute_map[phase_key]] += m.value
        for m in measured.measurements:
            if m.instrument not in _KINDS:
                errors[(m.instrument.name, name, m.attribute_map[ATTR_ERROR_TYPE])] += int(m.value)
    if not rows:
        return []
    order = [spec.name for spec in _KINDS] + [errs.name for errs, *_ in _KINDS.values()]
    table = []
    for key in sorted(rows, key=lambda k: (order.index(k[0]), k[1:])):
        count, phases = runs[key], rows[key]
        table.append([*key, f"{count} run{'s' * (count != 1)}",
                      *(f"{phase} {_seconds(phases[phase])}" if phase in phases else ""
                        for phase in _PHASES)])
    for (instrument, name, error_type), count in sorted(
            errors.items(), key=lambda item: (order.index(item[0][0]), item[0][1:])):
        table.append([instrument, name, error_type, f"{count} error{'s' * (count != 1)}"])
    return ["run metrics, as `otel-bridge convert --metrics` records them (durations summed):",
            *_columns(table)]


def _columns(rows: Sequence[list[str]]) -> list[str]:
    """Rows aligned in columns (a short row is blank past its end), an
    instrument's name on its first row only."""
    width = max(len(row) for row in rows)
    rows = [row + [""] * (width - len(row)) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(width)]
    out, previous = [], None
    for row in rows:
        cells = [""] + row[1:] if row[0] == previous else row
        previous = row[0]
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return out


def failed_task_notes(spans: Iterable[Span], records: Iterable[LogRecord],
                      last: int = LAST_LOG_LINES) -> dict[int, list[str]]:
    """span id -> the notes to print under it: for each task run whose span
    is an error, its last `last` log lines (oldest first), preceded by how
    many earlier ones are left out. A failed task run with no lines, and
    every other span, gets no entry."""
    failed = {span.span_id: span for span in spans
              if span.status_code is StatusCode.ERROR
              and str(span.attributes.get("prefect.resource.id", "")).startswith(f"prefect.{TASK_RUN}.")}
    lines: dict[int, list[LogRecord]] = defaultdict(list)
    for record in records:
        span = failed.get(record.span_id)
        if span is not None and record.trace_id == span.trace_id:
            lines[record.span_id].append(record)
    notes = {}
    for span_id, records_of_span in lines.items():
        records_of_span.sort(key=lambda r: r.time_unix_nano)
        shown = records_of_span[-last:] if last > 0 else []
        left_out = len(records_of_span) - len(shown)
        notes[span_id] = ([f"log ... {left_out} earlier line{'s' * (left_out != 1)}"]
                          if left_out else []) + [log_note(r, failed[span_id]) for r in shown]
    return notes


def log_note(record: LogRecord, span: Span) -> str:
    """One log line under its span: time since the span started, severity,
    the message's first line (cut, with how many lines follow)."""
    message_lines = record.body.splitlines() or [""]
    first = message_lines[0]
    if len(first) > _MESSAGE_CHARS:
        first = first[:_MESSAGE_CHARS - 3] + "..."
    more = len(message_lines) - 1
    offset = (record.time_unix_nano - span.start_time_unix_nano) / 1e9
    sign = "+" if offset >= 0 else "-"
    text = f"log {sign}{_seconds(abs(offset))} {record.severity_text} {first}"
    return text + (f" (+{more} line{'s' * (more != 1)})" if more else "")


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"

