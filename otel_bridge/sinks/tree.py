"""A trace as a tree on the terminal, for people."""

from __future__ import annotations

from typing import IO, Mapping, Optional, Sequence

from opentelemetry.trace import StatusCode

from otel_bridge.model.spans import Span
from otel_bridge.sinks import Sink
from otel_bridge.sinks.otlp_json import group_by_trace

__all__ = ["TreeWriter", "render_trace"]


def render_trace(spans: Sequence[Span],
                 notes: Optional[Mapping[int, Sequence[str]]] = None) -> str:
    """The trace as a tree of lines, a span's children by start time; the
    `notes` of a span (by span id: its log lines, say) on lines of their
    own right under it, indented past its children's branches."""
    notes = notes or {}
    by_id = {s.span_id: s for s in spans}
    children: dict[int | None, list[Span]] = {}
    for span in spans:
        parent = span.parent_span_id if span.parent_span_id in by_id else None
        children.setdefault(parent, []).append(span)
    lines = [f"trace {spans[0].trace_id_hex}"]

    def walk(parent: int | None, prefix: str) -> None:
        kids = sorted(children.get(parent, ()), key=lambda s: (s.start_time_unix_nano, s.span_id))
        for i, span in enumerate(kids):
            last = i == len(kids) - 1
            lines.append(prefix + ("└─ " if last else "├─ ") + _describe(span, parent, by_id))
            below = prefix + ("   " if last else "│  ")
            # The branch down to its first child runs past its notes.
            beside = "│  " if children.get(span.span_id) else "   "
            lines.extend(below + beside + note for note in notes.get(span.span_id, ()))
            walk(span.span_id, below)

    walk(None, "")
    return "\n".join(lines)


_KINDS = (("prefect.task-run.", "task"), ("prefect.flow-run.", "flow"))


def _describe(span: Span, parent: int | None, by_id: dict) -> str:
    resource_id = str(span.attributes.get("prefect.resource.id", ""))
    kind = next((k for prefix, k in _KINDS if resource_id.startswith(prefix)), "span")
    state = span.attributes.get("prefect.state-name", "?")
    duration = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
    # The run's own name ("add-50d", "whimsical-loris"); the span's name
    # ("add", "RUN my-flow") where it adds something: the task of a run
    # named otherwise, a flow run's flow.
    run_name = str(span.attributes.get("prefect.run.name") or span.name)
    text = f"{kind} {run_name}"
    if span.name and not run_name.startswith(span.name):
        text += f" ({span.name})"
    text += f" [{state}] {_seconds(duration)}"
    tags = span.attributes.get("prefect.tags")
    if isinstance(tags, (list, tuple)) and tags:
        text += " " + " ".join(f"#{tag}" for tag in tags)
    # A span event per state, named after it; why a run is retried (the
    # exception Prefect's engine wrote) beside the retry.
    states = []
    for event in span.events:
        message = event.attributes.get("prefect.state.message")
        if event.name in _RETRIES and isinstance(message, str) and message:
            states.append(f"{event.name} ({_short(message)})")
        else:
            states.append(event.name)
    if states:
        text += "  " + " > ".join(states)
    if span.status_code is StatusCode.ERROR:
        message = span.status_message.splitlines()[0] if span.status_message else ""
        text += f"  ERROR {message[:120]}"
    if span.parent_span_id and parent is None:
        text += f"  (parent {span.parent_span_id:016x} not in this output)"
    synthetic = [
        f"{k.rsplit('.', 1)[-1]}={v}" for k, v in span.attributes.items()
        if k.startswith("otel_bridge.synthetic.")
    ]
    if synthetic:
        text += "  synthetic " + ",".join(synthetic)
    return text


_RETRIES = frozenset({"Retrying", "AwaitingRetry"})


def _short(message: str) -> str:
    """A state message's gist: Prefect's engine prefixes the exception."""
    first = message.splitlines()[0].removeprefix("Task run encountered an exception ")
    return first if len(first) <= 60 else first[:57] + "..."


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"


class TreeWriter(Sink[Span]):
    def __init__(self, stream: IO[str], notes: Optional[Mapping[int, Sequence[str]]] = None):
        self._stream = stream
        self._notes = notes or {}
        self.spans_written = 0

    def export(self, spans: Sequence[Span]) -> None:
        for trace in group_by_trace(spans):
            self._stream.write(render_trace(trace, self._notes) + "\n\n")
            self.spans_written += len(trace)
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()
