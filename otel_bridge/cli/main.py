"""The `otel-bridge` command: its parser, and the `serve`, `store` and
`demo` commands (`convert` is `cli.convert`'s)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from otel_bridge._version import __version__
from otel_bridge.cli.convert import convert_command, count, default_jobs
from otel_bridge.cli.exit_codes import EXIT_OK, EXIT_REJECTED, EXIT_USAGE
from otel_bridge.sinks.factory import EVENT_SINKS, SPAN_SINKS

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.run(args, parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-bridge",
        description="Prefect task-run events <-> OpenTelemetry traces.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="convert Prefect events into traces, or traces into Prefect events",
        description=(
            "Forward (--to otlp-json, otlp, tree): read Prefect events, one JSON object per "
            "line (an Event, a ReceivedEvent, or a websocket frame {\"type\": \"event\", "
            "\"event\": {...}}), and write one span per task run and flow run. "
            "Reverse (--to events, prefect): read OTLP/JSON (one ExportTraceServiceRequest "
            "per line, or one JSON document per file) and write Prefect task-run events. "
            "A line that cannot be read is reported on stderr with its file and line number "
            "and skipped. Exit status: 0 when every line was read and written, 1 when any line "
            "was rejected or set aside or the output failed, 2 on a usage error."
        ),
    )
    convert.add_argument("inputs", nargs="*", default=["-"], metavar="INPUT",
                         help="files to read; '-' (the default) is stdin")
    convert.add_argument("--to", choices=SPAN_SINKS + EVENT_SINKS, default="otlp-json",
                         help="otlp-json: OTLP/JSON lines (the Collector file exporter's format); "
                              "otlp: export to the endpoint set by OTEL_EXPORTER_OTLP_*; "
                              "tree: a readable tree per trace; "
                              "events: Prefect events as JSON lines; "
                              "prefect: send the events to PREFECT_API_URL")
    convert.add_argument("-o", "--output", default="-",
                         help="file to write (otlp-json, tree, events); '-' (the default) is stdout")
    convert.add_argument("--prefect-trace-context", choices=("link", "adopt", "ignore"),
                         default="link",
                         help="what to do with the trace context Prefect puts on task runs "
                              "(__OTEL_TRACEPARENT): link to it (default), adopt its trace, ignore it")
    convert.add_argument("--jobs", type=count, default=default_jobs(), metavar="N",
                         help="forward: build spans in N worker processes, about 45 MB each "
                              "(default: %(default)s, the CPUs this process may use, up to 4; "
                              "1 builds them here); the output is the same")
    convert.add_argument("--linger-events", type=count, default=10_000, metavar="N",
                         help="forward: a run's span is written once N more events have been read "
                              "after its final state (default: %(default)s); a state of the run "
                              "read later (a RolledBack far behind) is set aside and counted")
    convert.add_argument("--metrics", metavar="DEST",
                         help="also count the runs as metrics (docs/metrics.md): 'otlp' sends them "
                              "to the endpoint of OTEL_EXPORTER_OTLP_METRICS_* / OTEL_EXPORTER_OTLP_*, "
                              "anything else is a file to write them to as OTLP/JSON ('./otlp' for a "
                              "file of that name); forward direction only")
    convert.add_argument("--logs", action="store_true",
                         help="read Prefect log lines instead of events (what POST "
                              "/api/logs/filter returns: a JSON array per line, or one log "
                              "object per line) and write one OTLP log record each, on its "
                              "run's span; --to otlp-json or otlp")
    convert.set_defaults(run=convert_command, command_parser=convert)

    store = commands.add_parser(
        "store",
        help="check a damaged store, or salvage what can be read of it",
        description=(
            "`check PATH`: what SQLite finds wrong with the store and, table by table, how many "
            "rows can be read (exit 0: no damage, 1: damaged). `salvage PATH NEW`: copy every "
            "row that can be read into a new store at NEW, for `serve --store-path NEW`, and say "
            "what was left behind (exit 0 once NEW is made)."),
    )
    store.add_argument("action", choices=("check", "salvage"))
    store.add_argument("path", help="the store (serve's --store-path)")
    store.add_argument("new_path", nargs="?", metavar="NEW", help="salvage: the new store")
    store.set_defaults(run=_store)

    demo = commands.add_parser(
        "demo",
        help="start a local Prefect server, run an example flow, show its trace",
        description=(
            "The embedded default: starts a real local Prefect server on a free loopback port, "
            "runs a bundled example flow against it, reads the flow's events and log lines back, "
            "and shows the trace as a tree (a failed task run's last log lines under its span, "
            "the run metrics below) and as OTLP/JSON in files. Needs the 'demo' extra (prefect)."
        ),
    )
    demo.add_argument("-o", "--output", default="otel-bridge-demo.otlp.jsonl",
                      help="where to write the OTLP/JSON (default: %(default)s)")
    demo.add_argument("--events-output", default="otel-bridge-demo.events.jsonl",
                      help="where to write the captured Prefect events (default: %(default)s)")
    demo.add_argument("--logs-output", default="otel-bridge-demo.logs.otlp.jsonl",
                      help="where to write the flow's log lines as OTLP/JSON log records "
                           "(default: %(default)s)")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser(
        "serve",
        help="run as a sidecar: follow Prefect, export spans; receive spans, send events",
        description=(
            "The long-running service. Forward: follows the Prefect server at PREFECT_API_URL "
            "(and takes events pushed to POST /v1/events) and exports a span per run over OTLP "
            "(OTEL_EXPORTER_OTLP_*). Reverse, with --otlp-receiver: takes OTLP spans and sends "
            "them to Prefect as events. Open runs and undelivered output are kept in a SQLite "
            "store, so a restart loses nothing. Every setting can also come from the "
            "environment (OTEL_BRIDGE_<NAME>) or a YAML file (--config); flags win, then the "
            "environment, then the file. Exit status: 0 after SIGTERM/SIGINT, 1 on a fatal "
            "error, 2 on a bad setting."
        ),
    )
    serve.add_argument("--config", metavar="FILE",
                       help="YAML file of settings (also OTEL_BRIDGE_CONFIG)")
    _settings_flags(serve)
    serve.set_defaults(run=_serve)
    return parser


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of `ServeSettings`, named after it; only the
    flags given reach the settings, so the environment and file still count."""
    import typing

    from otel_bridge.service.config import ServeSettings

    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + _shown_default(name, field)
        annotation = field.annotation
        if typing.get_origin(annotation) is typing.Union:  # Optional[X]: X
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, dest=name, default=None, metavar="A,B",
                                type=lambda v: [p for p in v.split(",") if p], help=help_text)
        elif typing.get_origin(annotation) is typing.Literal:
            choices = "|".join(str(c).lower() for c in typing.get_args(annotation))
            parser.add_argument(flag, dest=name, default=None, metavar=f"{{{choices}}}",
                                help=help_text + " (any case)")
        else:
            metavar = {int: "N", float: "SECONDS" if "seconds" in name else "N",
                       Path: "PATH"}.get(annotation, "VALUE")
            parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)


def _shown_default(name: str, field) -> str:
    from otel_bridge.service.config import ENV_PREFIX

    env = f"{ENV_PREFIX}{name.upper()}"
    aliases = getattr(field.validation_alias, "choices", ())
    prefect = [a for a in aliases if isinstance(a, str) and a.startswith("PREFECT_")]
    if prefect:
        env = f"{prefect[0]} or {env}"
    if field.default_factory is not None or field.default is None or "token" in name \
            or "key" in name:
        return f"; env {env}"
    default = field.default
    if isinstance(default, list):
        default = ",".join(default)
    return f" (default: {str(default).lower() if isinstance(default, str) else default}; env {env})"


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio

    from otel_bridge.service.app import Service
    from otel_bridge.service.config import ConfigError, ServeSettings, load_settings
    from otel_bridge.service.logs import setup_logging
    from otel_bridge.service.store import StoreError

    flags = {name: getattr(args, name) for name in ServeSettings.model_fields}
    try:
        settings = load_settings(flags, args.config)
    except ConfigError as exc:
        print(f"otel-bridge serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log_format, settings.log_level, settings.secret_values())
    try:
        return asyncio.run(Service(settings).run())
    except (StoreError, OSError) as exc:  # cannot start: store, a port in use
        print(f"otel-bridge serve: {exc}", file=sys.stderr)
        return EXIT_REJECTED


def _store(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:


    from otel_bridge.service.store import StoreError
    from otel_bridge.service.store_repair import check, salvage

    try:
        if args.action == "check":
            report = check(Path(args.path))
        elif args.new_path is None:
            parser.error("salvage needs the new store's path: store salvage PATH NEW")
        else:
            report = salvage(Path(args.path), Path(args.new_path))
    except (OSError, StoreError) as exc:
        print(f"otel-bridge store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(report.lines()))
    if args.action == "salvage":
        print(f"salvaged into {args.new_path}: serve --store-path {args.new_path}")
    return EXIT_OK if report.clean or args.action == "salvage" else EXIT_REJECTED


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from otel_bridge.demo.run import run_demo

    return run_demo(otlp_json_path=args.output, events_path=args.events_output,
                    logs_path=args.logs_output)


if __name__ == "__main__":
    sys.exit(main())
