"""Prefect log lines -> OpenTelemetry log records joined to their run's span (pure).

A log line as `POST /api/logs/filter` returns it (`id`, `created`,
`updated`, `name`, `level`, `message`, `timestamp`, `flow_run_id`,
`task_run_id`, and `worker_id` from Prefect Cloud) becomes one `LogRecord`
whose trace id and span id are those the forward bridge gives the run's
span. They are derived from the run ids alone (`translate.ids`), so a line
is placed right before, after or without its run's span:

- a task run's line: the span `prefect.task-run.<id>`, in the trace of its
  flow run (`prefect.flow-run.<id>`), or of the task run itself when it ran
  outside a flow. A nested task run's span sits under its parent task, but
  its trace is still the flow run's, so its lines need no parent;
- a flow run's line: the flow run's own trace and span.

A line of no run (a server accepts them) is passed over: `log_record`
returns None. Everything else that is not a log line raises `EventRejected`
with a reason fit for a metric label.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Optional
from uuid import UUID

from otel_bridge.model.events import EventRejected
from otel_bridge.model.logs import MAX_LOG_MESSAGE_CHARS, LogRecord
from otel_bridge.model.spans import AttributeValue
from otel_bridge.translate.ids import span_id_for, trace_id_for
from otel_bridge.translate.span_layout import FLOW_RUN, TASK_RUN
from otel_bridge.translate.times import to_unix_nano

__all__ = ["ATTR_LOG_ID", "ATTR_FLOW_RUN_ID", "ATTR_TASK_RUN_ID", "ATTR_WORKER_ID",
           "checked_log", "log_placement", "log_record", "looks_like_log", "parse_log_lines",
           "record_of_checked", "severity"]

# Semantic conventions: `log.record.uid` says that two records with the same
# value are one (a line read twice); the run ids under the CI/CD names the
# spans carry them under.
ATTR_LOG_ID = "log.record.uid"
ATTR_FLOW_RUN_ID = "cicd.pipeline.run.id"
ATTR_TASK_RUN_ID = "cicd.pipeline.task.run.id"
ATTR_WORKER_ID = "cicd.worker.id"

# The server's column for `level` is a SMALLINT.
_MAX_LEVEL = 32_767
# Python's level names (what `logging.getLevelName` gives without
# `addLevelName`); others are written as it writes them, "Level 25".
_LEVEL_NAMES = {0: "NOTSET", 10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR",
                50: "CRITICAL"}


def severity(level: int) -> tuple[int, str]:
    """(SeverityNumber, severity text) of a Python logging level.

    10/20/30/40/50 are DEBUG 5 / INFO 9 / WARN 13 / ERROR 17 / FATAL 21; a
    level between two is its band's next numbers, at most three up (21 is
    INFO2, 29 INFO4), as the SDK's own logging handler maps them, so the
    same line gets the same severity either way; 1..9 are TRACE, past 53
    FATAL4, 0 (NOTSET) unspecified."""
    text = _LEVEL_NAMES.get(level, f"Level {level}")
    if level <= 0:
        return 0, text
    if level < 10:
        return 1, text
    if level > 53:
        return 24, text
    band, step = divmod(level, 10)
    return 1 + 4 * band + min(step, 3), text


def log_placement(flow_run_id: Optional[str], task_run_id: Optional[str]) -> Optional[tuple[int, int]]:
    """(trace id, span id) of the run a line belongs to, as
    `translate.forward.placement` places that run's span; None for no run."""
    if task_run_id:
        run = f"prefect.{TASK_RUN}.{task_run_id}"
        root = f"prefect.{FLOW_RUN}.{flow_run_id}" if flow_run_id else run
    elif flow_run_id:
        run = root = f"prefect.{FLOW_RUN}.{flow_run_id}"
    else:
        return None
    return trace_id_for(root), span_id_for(run)


def looks_like_log(obj: Any) -> bool:
    """Whether a JSON value has a Prefect log line's shape (an event has
    `event` and `resource`, a log line `level`, `message` and `timestamp`)."""
    return (isinstance(obj, dict) and "event" not in obj
            and all(key in obj for key in ("level", "message", "timestamp")))


def checked_log(obj: Any) -> dict[str, Any]:
    """The fields of a log line the bridge reads, checked and in canonical
    form (UUIDs as Prefect writes them), as a JSON-ready dict. Raises
    `EventRejected`."""
    if not isinstance(obj, dict):
        raise EventRejected("invalid_log", f"a log line is a JSON object, not {_kind(obj)}")
    level = obj.get("level")
    if type(level) is not int:
        raise EventRejected("invalid_level", f"level is {_kind(level)}, not an integer")
    if not 0 <= level <= _MAX_LEVEL:
        raise EventRejected("invalid_level", f"level {level} is outside 0..{_MAX_LEVEL}")
    message, name = obj.get("message"), obj.get("name")
    for field, value in (("message", message), ("name", name)):
        if not isinstance(value, str):
            raise EventRejected("invalid_log", f"{field} is {_kind(value)}, not a string")
    if len(message) > MAX_LOG_MESSAGE_CHARS:
        raise EventRejected("too_large", f"a message of {len(message)} characters, over "
                                         f"{MAX_LOG_MESSAGE_CHARS}")
    for field, value in (("message", message), ("name", name)):
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): OTLP cannot carry it
                raise EventRejected("invalid_log", f"{field} is text that is not Unicode") from None
    out: dict[str, Any] = {"name": name, "level": level, "message": message,
                           "timestamp": _time(obj.get("timestamp"), "timestamp")}
    if obj.get("created") is not None:
        out["created"] = _time(obj["created"], "created")
    for field in ("id", "flow_run_id", "task_run_id", "worker_id"):
        if obj.get(field) is not None:
            out[field] = _uuid(obj[field], field)
    return out


def log_record(obj: Any) -> Optional[LogRecord]:
    """The log record of a Prefect log line, or None for a line of no run.
    Raises `EventRejected`."""
    return record_of_checked(checked_log(obj))


def record_of_checked(log: dict[str, Any]) -> Optional[LogRecord]:
    """`log_record` of what `checked_log` made (as `serve` keeps a line in
    its outbox), without checking it again: the check is a third of the
    cost of a record."""
    placed = log_placement(log.get("flow_run_id"), log.get("task_run_id"))
    if placed is None:
        return None
    time_ns = to_unix_nano(datetime.fromisoformat(log["timestamp"]))
    created = log.get("created")
    number, text = severity(log["level"])
    attributes: dict[str, AttributeValue] = {}
    for field, attribute in (("id", ATTR_LOG_ID), ("flow_run_id", ATTR_FLOW_RUN_ID),
                             ("task_run_id", ATTR_TASK_RUN_ID), ("worker_id", ATTR_WORKER_ID)):
        if field in log:
            attributes[attribute] = log[field]
    return LogRecord(
        time_unix_nano=time_ns,
        # When the server stored it: what the data model calls observed.
        observed_time_unix_nano=(to_unix_nano(datetime.fromisoformat(created))
                                 if created else time_ns),
        severity_number=number,
        severity_text=text,
        body=log["message"],
        trace_id=placed[0],
        span_id=placed[1],
        logger_name=log["name"],
        attributes=attributes,
    )


# What Prefect writes, in the form `_time` gives it back (a UTC time within
# OTLP's range, microseconds unless none): taken as it is, as `_uuid` takes
# a UUID in Prefect's form. Parsing each cost a third of a line's check.
_CANONICAL_TIME = re.compile(
    r"(19[7-9]\d|2[0-4]\d\d|25[0-4]\d|255[0-3])-\d\d-\d\dT\d\d:\d\d:\d\d(\.(?!000000)\d{6})?"
    r"(\+00:00|Z)\Z")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def _time(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise EventRejected("invalid_log", f"{field} is {_kind(value)}, not a time")
    found = _CANONICAL_TIME.match(value)
    if found is not None:
        try:  # (month 13, day 32: the slow way says why)
            datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return value if found.group(3) == "+00:00" else value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
        moment = (moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None  # as Prefect reads it
                  else moment.astimezone(timezone.utc))
        if not 0 <= to_unix_nano(moment) < 1 << 64:
            raise ValueError("OTLP's unsigned 64-bit nanoseconds since 1970 cannot carry it")
    except (ValueError, OverflowError) as exc:
        raise EventRejected("invalid_log", f"{field} {value[:40]!r} is not a time: {exc}") from None
    return moment.isoformat()


def _uuid(value: Any, field: str) -> str:
    if type(value) is str and _CANONICAL_UUID.match(value):
        return value
    try:
        return str(UUID(value))
    except (TypeError, ValueError, AttributeError):
        raise EventRejected("invalid_log", f"{field} {str(value)[:40]!r} is not a UUID") from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_log_lines(text: bytes) -> list[Any]:
    """The log lines of one line of input: a JSON object, or an array of them
    (a page of `/api/logs/filter`). Raises `EventRejected`."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EventRejected("malformed_json", str(exc)[:200]) from None
    return value if isinstance(value, list) else [value]
