"""The Prefect client: how otel-bridge talks to a Prefect server, without
Prefect itself (the `prefect` package is not a dependency).

One place for what the sources and the sinks share:

- `settings`: where the API is and how to authenticate, from Prefect's own
  settings (PREFECT_API_URL, PREFECT_API_KEY, ...);
- `events_socket`: the websockets, opened and authenticated: the event
  websockets, both directions (events/out for the subscription, events/in
  for the sink), and the logs websocket (logs/out, for the log follower);
- `rest`: the REST API's event filter, paging and answers;
- `errors`: one family of errors, `PrefectError`, for all of them.

The socket and REST modules are imported by name (they load websockets and
httpx); this package itself loads only the settings and the errors.
"""

from otel_bridge.prefect_client.errors import (
    PrefectAuthFailed,
    PrefectConfigError,
    PrefectError,
    PrefectRefused,
    PrefectUnavailable,
)
from otel_bridge.prefect_client.settings import (
    PrefectApi,
    events_socket_url,
    logs_socket_url,
    resolve_api,
    ui_url,
)

__all__ = [
    "PrefectApi",
    "PrefectAuthFailed",
    "PrefectConfigError",
    "PrefectError",
    "PrefectRefused",
    "PrefectUnavailable",
    "events_socket_url",
    "logs_socket_url",
    "resolve_api",
    "ui_url",
]
