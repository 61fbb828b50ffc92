"""What comes in: Prefect events (JSON lines, the REST and websocket APIs) and OTLP/JSON.

The sources that follow a Prefect server (`prefect_ws.PrefectEventStream`,
`prefect_ws.ReconnectingEventStream`, `prefect_subscription.PrefectSubscription`)
implement `Source`, declared here. The readers of what is already stored
(`jsonl`, `otlp_json`, `prefect_rest`, `event_body`) are plain functions
from their input to an iterator.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, AsyncIterator, Protocol, runtime_checkable

__all__ = ["Source"]


@runtime_checkable
class Source(Protocol):
    """Prefect events as they happen, from a connection that a source holds.

    `events()` yields each event as the JSON object the server sent, until
    the source is closed (then it returns) or fails for good (then it
    raises a `prefect_client.PrefectError`); `close()` ends it and lets go
    of its connections.
    """

    @abstractmethod
    def events(self) -> AsyncIterator[dict[str, Any]]: ...

    @abstractmethod
    async def close(self) -> None: ...
