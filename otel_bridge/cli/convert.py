"""`otel-bridge convert`: Prefect events into spans (in worker processes,
streamed), spans back into events, log lines into log records, and a
batch's run metrics."""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Optional

from otel_bridge.cli.exit_codes import EXIT_OK, EXIT_REJECTED
from otel_bridge.model.events import EventRejected
from otel_bridge.prefect_client import ui_url
from otel_bridge.runtime import tune_gc
from otel_bridge.sinks.factory import EVENT_SINKS, FILE_SINKS, LOG_SINKS, open_sink
from otel_bridge.sources.jsonl import Line, parse_events, read_lines
from otel_bridge.translate.assembler import Assembler, AssemblerOptions
from otel_bridge.translate.forward import ForwardOptions

__all__ = ["convert_command", "count", "default_jobs"]

def convert_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    parser = args.command_parser  # errors show convert's usage, not the top level's
    missing = [p for p in args.inputs if p != "-" and not os.path.isfile(p)]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    if args.to not in FILE_SINKS and args.output != "-":
        parser.error(f"--output does not apply to --to {args.to}")

    if args.metrics is not None and (args.logs or args.to in EVENT_SINKS):
        parser.error("--metrics counts runs from events: not with --logs or --to "
                     f"{' or '.join(EVENT_SINKS)}")
    if args.metrics == "-":
        parser.error("--metrics needs a file (or otlp): '-' is where the spans go")
    if args.logs:
        return _convert_logs(args, parser)
    tune_gc()
    rejected = 0

    def reject(line: Line, error: EventRejected) -> None:
        nonlocal rejected
        rejected += 1
        print(f"otel-bridge: {line.where}: rejected ({error.reason}): {error.detail}",
              file=sys.stderr)

    metrics = None
    try:
        sink = open_sink(args.to, args.output, on_unencodable=_report_unencodable)
        if args.metrics is not None:
            metrics = _open_metrics(args.metrics)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    try:
        if args.to in EVENT_SINKS:
            items, summary = _reverse(args.inputs, reject)
            sink.export(items)
            late = 0
        else:
            summary, late = _forward(read_lines(args.inputs), reject, args, sink, metrics)
        sink.close()
        if metrics is not None:
            metrics.close()
            if metrics.exports is not None and metrics.exports.failed:
                raise RuntimeError("the metrics' endpoint refused them or could not be reached "
                                   f"({metrics.exports.failed} exports failed)")
            summary += f", {metrics.runs_recorded} finished runs counted in the metrics"
    except Exception as exc:  # an output's failure must not look like success
        print(f"otel-bridge: output failed: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    if args.to in EVENT_SINKS and rejected and _looks_like_events(args.inputs):
        print("otel-bridge: this input looks like Prefect events, not OTLP spans: the forward "
              "direction reads events (--to otlp-json, otlp or tree)", file=sys.stderr)
    if args.to not in EVENT_SINKS and rejected and _looks_like_logs(args.inputs):
        print("otel-bridge: this input looks like Prefect log lines, not events: read them "
              "with --logs", file=sys.stderr)
    unencodable = getattr(sink, "spans_unencodable", 0)
    if unencodable:
        summary += f", {unencodable} spans OTLP cannot carry set aside (see above)"
    print(f"otel-bridge: {summary}, {rejected} lines rejected", file=sys.stderr)
    return EXIT_REJECTED if rejected or unencodable or late else EXIT_OK


# Spans are handed to the sink in chunks of this many, as runs finish.
_CHUNK_SPANS = 2048
# Closed runs sent to a worker process at a time, and batches in flight.
_BATCH_RUNS = 256
_IN_FLIGHT_PER_WORKER = 4


def _open_metrics(destination: str):
    from otel_bridge.sinks.otlp_metrics import OTLP, open_run_metrics
    from otel_bridge.sinks.sdk import resource_from_env

    if destination == OTLP:
        return open_run_metrics(OTLP, resource_from_env())
    return open_run_metrics("file", resource_from_env(),
                            open(destination, "w", encoding="utf-8"))


def _forward(lines, reject, args: argparse.Namespace, sink, metrics=None) -> tuple[str, int]:
    """Events -> spans, streamed: a run's span leaves once `--linger-events`
    more events have been read after its final state, so memory is bounded
    by the runs open at a time, not by the input. A tree needs its whole
    trace, so it is written at the end. With `--jobs` over 1 the spans are
    built in worker processes (`translate.span_workers`), in order."""
    read = 0
    options = ForwardOptions(prefect_trace_context=args.prefect_trace_context, ui_url=ui_url())
    jobs = args.jobs if args.to != "tree" else 1
    assembler = Assembler(
        AssemblerOptions(
            linger_seconds=args.linger_events,  # the clock counts events read
            run_timeout_seconds=float("inf"),  # a file's runs end at its end
            forward=options),
        clock=lambda: read,
        defer_spans=jobs > 1,
    )
    out = _Output(sink, jobs, options, streamed=args.to != "tree", metrics=metrics)
    try:
        for line, event in parse_events(lines, reject):
            read += 1
            try:
                out.take(assembler.add(event, line.data))
            except EventRejected as error:
                reject(line, error)
            out.take(assembler.expire())
        out.take(assembler.flush())
        out.finish()
    finally:
        out.close()
    counts = assembler.counts
    late = counts["events_set_aside_late"]
    unbuildable = counts["runs_unbuildable"] + out.unbuildable
    return (
        f"{counts['events_in']} events -> {out.written} spans, "
        f"{counts['events_duplicate']} duplicates ignored, "
        f"{counts['events_not_run_state']} other events passed over"
        + (f", {late} late events set aside (a state more than --linger-events after its "
           "run's final state; raise it to keep them)" if late else "")
        + (f", {unbuildable} runs whose span could not be made" if unbuildable else "")
    ), late + unbuildable


class _Output:
    """Where `_forward`'s spans go: to the sink in chunks, built here or, with
    several jobs, by worker processes (closed runs in, spans out, in order)."""

    def __init__(self, sink, jobs: int, options: ForwardOptions, streamed: bool, metrics=None):
        self._sink, self._streamed = sink, streamed
        self._metrics = metrics  # a RunMetricsRecorder, or None
        self._pending: list = []  # closed runs, for the workers
        self._chunk: list = []  # spans (or encoded spans) ready for the sink
        self._encoded = hasattr(sink, "export_encoded")
        self._pool = None
        self._in_flight: "collections.deque" = collections.deque()
        self.written = self.unbuildable = 0
        if jobs > 1:
            import concurrent.futures
            import multiprocessing

            from otel_bridge.translate.span_workers import start_worker

            self._jobs = jobs
            self._pool = concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=start_worker, initargs=(options, self._encoded, metrics is not None))

    def take(self, items: list) -> None:
        if not items:
            return
        if self._pool is None:
            self._measure(items)
            self._ready(items)
            return
        self._pending.extend(items)
        while len(self._pending) >= _BATCH_RUNS:
            self._submit(self._pending[:_BATCH_RUNS])
            del self._pending[:_BATCH_RUNS]

    def finish(self) -> None:
        if self._pool is not None:
            if self._pending:
                self._submit(self._pending)
            while self._in_flight:
                self._collect()
        self._pending = []
        self._write(self._chunk)  # the rest, or (a tree) everything
        self._chunk = []

    def _ready(self, spans: list) -> None:
        """Spans go out in chunks of exactly `_CHUNK_SPANS`, however they
        were built: the output is the same with any number of jobs."""
        self._chunk.extend(spans)
        while self._streamed and len(self._chunk) >= _CHUNK_SPANS:
            self._write(self._chunk[:_CHUNK_SPANS])
            del self._chunk[:_CHUNK_SPANS]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def _measure(self, spans: list) -> None:
        if self._metrics is not None:
            from otel_bridge.translate.run_metrics import run_measurements

            for span in spans:
                self._metrics.record(run_measurements(span))

    def _submit(self, batch: list) -> None:
        from otel_bridge.translate.span_workers import build_spans

        while len(self._in_flight) >= self._jobs * _IN_FLIGHT_PER_WORKER:
            self._collect()
        self._in_flight.append(self._pool.submit(build_spans, batch))

    def _collect(self) -> None:
        built = self._in_flight.popleft().result()
        spans = []
        for span, why, unencodable, measured in built:
            if self._metrics is not None:
                self._metrics.record(measured)
            if span is not None:
                spans.append(span)
            elif unencodable is not None:
                self._sink.spans_unencodable += 1
                _report_unencodable(unencodable, why)
            else:
                self.unbuildable += 1
        self._ready(spans)

    def _write(self, spans: list) -> None:
        if self._pool is not None and self._encoded:
            self._sink.export_encoded(spans)
        else:
            self._sink.export(spans)
        self.written += len(spans)


# Log records handed to the sink at a time.
_CHUNK_LOGS = 2048
# A page of /api/logs/filter is one line: up to 200 lines of up to a million
# characters each, in principle; pages that big are refused, line and all.
_MAX_LOG_PAGE_BYTES = 64 * 1024 * 1024


def _convert_logs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Prefect log lines -> OTLP log records, each on its run's span."""
    from otel_bridge.sinks.factory import open_log_sink
    from otel_bridge.translate.logs import log_record, parse_log_lines

    if args.to not in LOG_SINKS:
        parser.error(f"--logs writes log records: --to {' or '.join(LOG_SINKS)}, not {args.to}")
    try:
        sink = open_log_sink(args.to, args.output)
    except (OSError, ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    read = written = no_run = rejected = 0
    chunk: list = []
    try:
        for line in read_lines(args.inputs, _MAX_LOG_PAGE_BYTES):
            try:
                if line.data is None:
                    raise EventRejected("too_large", f"line of {line.size} bytes is over the limit")
                logs = parse_log_lines(line.data)
            except EventRejected as error:
                rejected += 1
                print(f"otel-bridge: {line.where}: rejected ({error.reason}): {error.detail}",
                      file=sys.stderr)
                continue
            for index, log in enumerate(logs):
                read += 1
                where = line.where if len(logs) == 1 else f"{line.where}[{index}]"
                try:
                    record = log_record(log)
                except EventRejected as error:
                    rejected += 1
                    print(f"otel-bridge: {where}: rejected ({error.reason}): {error.detail}",
                          file=sys.stderr)
                    continue
                if record is None:
                    no_run += 1
                    continue
                chunk.append(record)
                if len(chunk) >= _CHUNK_LOGS:
                    sink.export(chunk)
                    written, chunk = written + len(chunk), []
        sink.export(chunk)
        written += len(chunk)
        sink.close()
    except Exception as exc:  # an output's failure must not look like success
        print(f"otel-bridge: output failed: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    print(f"otel-bridge: {read} log lines -> {written} log records, {no_run} lines of no run "
          f"passed over, {rejected} lines rejected", file=sys.stderr)
    return EXIT_REJECTED if rejected else EXIT_OK


def _first_line(inputs: list[str]) -> Optional[bytes]:
    """The first line of the first file (not stdin, which is read once), for a hint."""
    first = next((path for path in inputs if path != "-"), None)
    if first is None:
        return None
    with open(first, "rb") as stream:
        return stream.readline(2_000_000)


def _looks_like_events(inputs: list[str]) -> bool:
    """Whether the first line of the first file is a Prefect event."""
    from otel_bridge.model.events import parse_wire_event

    line = _first_line(inputs)
    try:
        return line is not None and parse_wire_event(line) is not None
    except EventRejected:
        return False


def _looks_like_logs(inputs: list[str]) -> bool:
    """Whether the first line of the first file holds a Prefect log line."""
    from otel_bridge.translate.logs import looks_like_log, parse_log_lines

    line = _first_line(inputs)
    try:
        values = parse_log_lines(line) if line is not None else []
    except EventRejected:
        return False
    return bool(values) and looks_like_log(values[0])


def default_jobs() -> int:
    """The CPUs this process may use, up to 4 (each worker holds ~45 MB)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


def count(text: str) -> int:
    """A count given on the command line: a whole number, not negative."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _reverse(inputs, reject):
    from otel_bridge.sources.otlp_json import read_spans
    from otel_bridge.translate.reverse import events_from_span

    located = list(read_spans(inputs, reject))
    # A Prefect task span finds its flow run through its parent span, which
    # may be in another request of the input.
    by_id = {span.span_id: span for _, span in located}
    events = []
    for line, span in located:
        try:
            events.extend(events_from_span(span, by_id))
        except EventRejected as error:
            reject(line, error)
        except Exception as error:  # what no rule foresaw: this span alone, not the file
            reject(line, EventRejected("invalid_span", f"{type(error).__name__}: {error}"))
    return events, f"{len(located)} spans -> {len(events)} events"


def _report_unencodable(span, error) -> None:
    print(f"otel-bridge: span {span.span_id_hex} of trace {span.trace_id_hex} "
          f"({span.attributes.get('prefect.resource.id', span.name)}) set aside "
          f"(unencodable): {error}", file=sys.stderr)

