"""Structured logs for the service: one JSON object per line on stderr.

Fields passed with ``extra=`` become keys of the object, so a log pipeline can
filter on ``event_id``, ``sink``, ``reason``... without parsing messages.
``text`` keeps the same fields, as ``key=value`` after the message.

Secrets never reach a log line: the credentials in a URL
(``https://user:password@host``) and the configured tokens and API key are
replaced by ``***`` in the finished line, whatever put them there (a
message, a field, an exception from a library).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Iterable

__all__ = ["redact", "setup_logging"]

_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@\"']+@")
_secrets: list[str] = []


def redact(text: str) -> str:
    """`text` without URL credentials or the configured secrets."""
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text

# Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line = f"{line} {extra}" if extra else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def setup_logging(fmt: str = "json", level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """`secrets`: values no line may show (tokens, API keys); as written and
    as JSON escapes them."""
    _secrets[:] = sorted({form for secret in secrets if len(secret) >= 4
                          for form in (secret, json.dumps(secret)[1:-1])}, key=len, reverse=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The OTLP exporters log every retry of theirs; the deliveries say, once,
    # that the endpoint does not take output, with the exporter's reason.
    logging.getLogger("opentelemetry.exporter.otlp").propagate = False
    # Third-party chatter at INFO (every websocket connect) is not ours to log.
    for noisy in ("websockets", "httpx", "httpcore", "aiohttp.access", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
