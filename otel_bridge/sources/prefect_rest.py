"""Read stored events from a Prefect server's REST API, every page of them.

The REST API is the complete record: the live websocket drops events when a
subscriber falls behind, the database does not.  ``POST /events/filter`` returns
the first page (``{"events": [...], "total": n, "next_page": url|null}``) and
``GET /events/filter/next?page-token=...`` the following ones.  The server
encodes the whole filter (with its absolute ``occurred`` window) into the page
token, so a paged read is a consistent query even while new events arrive.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Generator, Iterator, Optional, Sequence, Union
from urllib.parse import parse_qs, urlsplit

import httpx

from otel_bridge.prefect_client import resolve_api

__all__ = ["build_event_filter", "page_requests", "page_token", "read_events",
           "read_all_events", "PAGE_SIZE"]

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


def read_events(
    api_url: str,
    since: Optional[Timestamp] = None,
    until: Optional[Timestamp] = None,
    *,
    event_prefixes: Optional[Sequence[str]] = None,
    resource_ids: Optional[Sequence[str]] = None,
    resource_id_prefixes: Optional[Sequence[str]] = None,
    related_resource_ids: Optional[Sequence[str]] = None,
    event_filter: Optional[dict[str, Any]] = None,
    api_key: Optional[str] = None,
    headers: Optional[dict[str, str]] = None,
    page_size: int = PAGE_SIZE,
    timeout: float = 30.0,
    client: Optional[httpx.Client] = None,
) -> Iterator[dict[str, Any]]:
    """Yield every stored event matching the filter, as the raw JSON dicts.

    Pass either the keyword criteria or a ready ``event_filter`` (EventFilter
    JSON, used as is).  Events come in the server's order (``occurred``
    ascending by default); ties in ``occurred`` have no defined order.
    """
    flt = (
        event_filter
        if event_filter is not None
        else build_event_filter(
            since,
            until,
            event_prefixes=event_prefixes,
            resource_ids=resource_ids,
            resource_id_prefixes=resource_id_prefixes,
            related_resource_ids=related_resource_ids,
        )
    )
    api = resolve_api(api_url, api_key)  # with the rest of Prefect's settings
    base = api.url
    all_headers = {"Accept": "application/json", **api.http_headers(), **(headers or {})}

    own_client = client is None
    http = client or httpx.Client(timeout=timeout, verify=api.ssl_context() or True)
    requests = page_requests(base, flt, page_size)
    try:
        request = next(requests)
        while True:
            method, url, arguments = request
            resp = http.request(method, url, headers=all_headers, **arguments)
            resp.raise_for_status()
            page = resp.json()
            yield from page["events"]
            try:
                request = requests.send(page)
            except StopIteration:
                return
    finally:
        if own_client:
            http.close()


def read_all_events(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """``list(read_events(...))``, for callers that want the whole set."""
    return list(read_events(*args, **kwargs))

