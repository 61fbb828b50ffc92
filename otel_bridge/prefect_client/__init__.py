"""The Prefect client: how otel-bridge talks to a Prefect server, without
Prefect itself (the `prefect` package is not a dependency).

One place for what the sources and the sinks share: Prefect's connection
settings (`settings`) and the errors (`errors`).
"""

from otel_bridge.prefect_client.errors import PrefectConfigError, PrefectError
from otel_bridge.prefect_client.settings import (
    PrefectApi,
    events_socket_url,
    resolve_api,
    ui_url,
)

__all__ = [
    "PrefectApi",
    "PrefectConfigError",
    "PrefectError",
    "events_socket_url",
    "resolve_api",
    "ui_url",
]
