"""Prefect's stored log lines, read from `POST /api/logs/filter` in passes
over windows of their timestamps.

Why REST, not the logs websocket (`/api/logs/out`): on a server with default
settings the websocket is off (PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED and
PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED are both false), and then it
accepts the subscription and sends nothing, with no error and no close:
silence that cannot be told from "no logs". The REST API has every line
the server stored, whatever its settings.

A line's `timestamp` is when the client logged it, and the client sends its
lines in batches (every 2 s by default, `PREFECT_LOGGING_TO_API_BATCH_INTERVAL`)
and again after a lost connection, so a line is stored a little after its
timestamp, sometimes much after. Hence two passes, as the event subscription
reads events (`prefect_subscription`), each with its own mark:

- the *fresh* pass, every `poll_seconds`, reads [mark, now - settle);
- the *late* pass, every quarter of `lateness`, reads [mark, now - lateness)
  again, for lines stored late.

Each line is thus read twice, not once per poll of a sliding window, and a
line stored within `lateness` of its timestamp is read. The caller
deduplicates by id (a line at a window's edge is read by both windows) and
keeps the marks, so a restart neither loses nor repeats lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Optional

import httpx

from otel_bridge.prefect_client import PrefectApi, resolve_api
from otel_bridge.prefect_client.rest import check_response

__all__ = ["LOG_PAGE_SIZE", "LogPass", "PrefectLogReader", "log_filter"]

# PREFECT_SERVER_API_DEFAULT_LIMIT: the most a page may hold (larger is a 422).
LOG_PAGE_SIZE = 200


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def log_filter(since: datetime, until: datetime, offset: int = 0,
               limit: int = LOG_PAGE_SIZE) -> dict[str, Any]:
    """The body of `POST /api/logs/filter` for the lines with since <=
    timestamp <= until (Prefect 3.9's `LogFilterTimestamp` takes both ends),
    oldest first."""
    return {"logs": {"timestamp": {"after_": _iso(since), "before_": _iso(until)}},
            "sort": "TIMESTAMP_ASC", "limit": limit, "offset": offset}


@dataclass
class LogPass:
    """One pass over the log lines: everything with a timestamp before
    `mark` has been read by it; it reads up to `lag` seconds before now,
    every `every` seconds (monotonic `due`)."""

    name: str
    lag: float
    every: float
    mark: datetime
    due: float = 0.0

    def window(self, now: datetime) -> Optional[tuple[datetime, datetime]]:
        upper = now - timedelta(seconds=self.lag)
        return (self.mark, upper) if upper > self.mark else None


class PrefectLogReader:
    """Pages of stored log lines, each a list of the JSON objects the
    server sent. An answer that will not change (credentials, not a Prefect
    API) raises `PrefectRefused`; a server in trouble `httpx.HTTPError`."""

    def __init__(self, api_url: str, api_key: Optional[str] = None, *,
                 page_size: int = LOG_PAGE_SIZE, http_timeout: float = 30.0,
                 api: Optional[PrefectApi] = None):
        self.api = api or resolve_api(api_url, api_key)
        self.page_size = page_size
        self.pages = 0
        self._http = httpx.AsyncClient(timeout=http_timeout, verify=self.api.ssl_context() or True)

    async def close(self) -> None:
        await self._http.aclose()

    async def read_window(self, since: datetime, until: datetime) -> AsyncIterator[list[dict]]:
        """Every line with since <= timestamp <= until, a page at a time.
        Paged by timestamp (the next page starts at the last one's last
        timestamp; the caller drops the lines read twice), as offsets over
        lines of one instant have no defined order between two queries;
        only a page that is all one instant is stepped through by offset."""
        after, offset = since, 0
        headers = {"Accept": "application/json", **self.api.http_headers()}
        while True:
            response = await self._http.post(f"{self.api.url}/logs/filter", headers=headers,
                                             json=log_filter(after, until, offset, self.page_size))
            check_response(response)
            self.pages += 1
            page = response.json()
            if not isinstance(page, list):
                raise httpx.DecodingError(f"/logs/filter answered {type(page).__name__}, not a list")
            yield page
            if len(page) < self.page_size:
                return
            last = _timestamp(page[-1])
            if last is not None and last > after:
                after, offset = last, 0
            else:
                offset += len(page)


def _timestamp(log: Any) -> Optional[datetime]:
    try:
        moment = datetime.fromisoformat(log["timestamp"])
    except (TypeError, KeyError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
