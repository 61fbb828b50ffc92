"""Prefect's REST API for events: the filter, the paging, the answers.

``POST /events/filter`` returns the first page (``{"events": [...], "total":
n, "next_page": url|null}``) and ``GET /events/filter/next?page-token=...``
the following ones.  The server encodes the whole filter (with its absolute
``occurred`` window) into the page token, so a paged read is a consistent
query even while new events arrive.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Generator, Optional, Sequence, Union
from urllib.parse import parse_qs, urlsplit

import httpx

from otel_bridge.prefect_client.errors import refusal_for_status

__all__ = ["PAGE_SIZE", "Timestamp", "build_event_filter", "check_response", "page_requests",
           "page_token"]

# The server's maximum (INTERACTIVE_PAGE_SIZE); larger limits are rejected (422).
PAGE_SIZE = 50

Timestamp = Union[datetime, str]


def _iso(ts: Timestamp) -> str:
    if isinstance(ts, str):
        return ts
    if ts.tzinfo is None:
        # Prefect compares in UTC; a naive datetime is taken to be UTC rather
        # than local time, which is what a caller almost always means here.
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).isoformat()


def build_event_filter(
    since: Optional[Timestamp] = None,
    until: Optional[Timestamp] = None,
    *,
    event_prefixes: Optional[Sequence[str]] = None,
    resource_ids: Optional[Sequence[str]] = None,
    resource_id_prefixes: Optional[Sequence[str]] = None,
    related_resource_ids: Optional[Sequence[str]] = None,
    order: str = "ASC",
) -> dict[str, Any]:
    """An ``EventFilter`` as JSON (see prefect/server/events/filters.py).

    Prefect's defaults would be ``since`` = 180 days ago and ``until`` = the
    moment the server parses the filter; we always send both so that the
    window is the caller's, and ``order`` ASC (Prefect defaults to newest
    first).  ``related_resource_ids`` matches events that name one of these
    ids as a *related* resource (e.g. all task runs of a flow run).
    """
    now = datetime.now(timezone.utc)
    flt: dict[str, Any] = {
        "occurred": {
            "since": _iso(since if since is not None else now - timedelta(days=1)),
            "until": _iso(until if until is not None else now),
        },
        "order": order,
    }
    if event_prefixes:
        flt["event"] = {"prefix": list(event_prefixes)}
    resource: dict[str, Any] = {}
    if resource_ids:
        resource["id"] = list(resource_ids)
    if resource_id_prefixes:
        resource["id_prefix"] = list(resource_id_prefixes)
    if resource:
        flt["resource"] = resource
    if related_resource_ids:
        flt["related"] = {"id": list(related_resource_ids)}
    return flt


def page_requests(api_url: str, event_filter: dict[str, Any], page_size: int = PAGE_SIZE,
                  ) -> Generator[tuple[str, str, dict[str, Any]], dict[str, Any], None]:
    """The requests of a paged read, as (method, URL, httpx arguments); send
    each page's JSON back in to get the next request. The one place that
    knows the protocol, for the sync reader below and the subscription's
    async one."""
    page = yield "POST", f"{api_url}/events/filter", {
        "json": {"filter": event_filter, "limit": page_size}}
    while page.get("next_page"):
        page = yield "GET", f"{api_url}/events/filter/next", {
            "params": {"page-token": page_token(page["next_page"])}}


def page_token(next_page: str) -> str:
    # The server builds next_page from the URL *it* was reached at, which is
    # wrong behind a proxy; take only the token and ask our own api_url.
    values = parse_qs(urlsplit(next_page).query).get("page-token")
    if not values:
        raise ValueError(f"next_page without a page-token: {next_page!r}")
    return values[0]


def check_response(response: httpx.Response) -> None:
    """Raise for an answer that is not a success: `PrefectRefused` (or
    `PrefectAuthFailed`) when a retry would get the same answer,
    `httpx.HTTPStatusError` for a server in trouble (5xx, 408, 429)."""
    if response.is_success:
        return
    refusal = refusal_for_status(response.status_code, str(response.request.url),
                                 response.text[:200])
    if refusal is not None:
        raise refusal
    response.raise_for_status()
