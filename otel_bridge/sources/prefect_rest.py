"""Read stored events from a Prefect server's REST API, every page of them.

The REST API is the complete record: the live websocket drops events when a
subscriber falls behind, the database does not.  The protocol (filter,
paging, answers) is `otel_bridge.prefect_client.rest`'s.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import httpx

from otel_bridge.prefect_client import resolve_api
from otel_bridge.prefect_client.rest import (
    PAGE_SIZE,
    Timestamp,
    build_event_filter,
    check_response,
    page_requests,
)

__all__ = ["read_all_events", "read_events"]


def read_events(
    api_url: str,
    since: Optional[Timestamp] = None,
    until: Optional[Timestamp] = None,
    *,
    event_filter: Optional[dict[str, Any]] = None,
    api_key: Optional[str] = None,
    headers: Optional[dict[str, str]] = None,
    page_size: int = PAGE_SIZE,
    timeout: float = 30.0,
    client: Optional[httpx.Client] = None,
    **criteria: Sequence[str],
) -> Iterator[dict[str, Any]]:
    """Yield every stored event matching the filter, as the raw JSON dicts.

    Pass either the criteria of `build_event_filter` (``event_prefixes``,
    ``resource_ids``, ...) or a ready ``event_filter`` (EventFilter JSON, used
    as is).  An answer that will not change (credentials, not a Prefect API)
    raises `PrefectRefused`; a server in trouble (5xx)
    `httpx.HTTPStatusError`.  Events come in the server's order (``occurred``
    ascending by default); ties in ``occurred`` have no defined order.
    """
    flt = event_filter if event_filter is not None else build_event_filter(since, until, **criteria)
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
            check_response(resp)
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

