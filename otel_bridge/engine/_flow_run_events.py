"""A flow run's state events, read back from Prefect's server.

Prefect 3.9's flow engine sends no flow-run events: the server emits them
when it accepts each state. So the span of a flow run, made in process, is
made from the events the server stored, as a sidecar would make it from the
same events (the same span, field by field). They are read over the REST
API once the flow run has ended, waiting for the final one: the server
persists events in batches, a few seconds behind.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Optional
from uuid import UUID

import httpx

from otel_bridge.backoff import Backoff
from otel_bridge.model.events import Event, EventRejected, parse_wire_event
from otel_bridge.prefect_client import PrefectError
from otel_bridge.sources.prefect_rest import read_events
from otel_bridge.translate.forward import is_final, run_key

# How long a flow run's final state event may take to reach the server's
# event store (its persister flushes every few seconds) before the flow run's
# span is given up on (a sidecar still makes it).
FINAL_EVENT_WAIT_SECONDS = 60.0


class FlowRunEventsMissing(RuntimeError):
    """The flow run's final state event was not found in time."""


def prefect_api() -> tuple[Optional[str], Optional[str]]:
    """The API URL and key of the Prefect settings this process runs with
    (a profile's too, not only the environment's); no URL: an ephemeral
    server in process, which nothing outside the process can read."""
    from prefect.settings import get_current_settings

    settings = get_current_settings().api
    key = settings.key.get_secret_value() if settings.key is not None else None
    return (str(settings.url) if settings.url else None), key


def flow_run_events(flow_run_id: UUID, since: datetime, *, api_url: str,
                    api_key: Optional[str],
                    wait: float = FINAL_EVENT_WAIT_SECONDS) -> list[Event]:
    """The flow run's state events once its final one is stored. Raises
    `FlowRunEventsMissing` after `wait` seconds without it."""
    resource_id = f"prefect.flow-run.{flow_run_id}"
    deadline = time.monotonic() + wait
    backoff = Backoff(initial=0.25, maximum=2.0)
    failures = 0
    why = "its final state event is not in the server's event store"
    while True:
        try:
            events = _state_events(read_events(
                api_url, since=since - timedelta(minutes=5),
                until=datetime.now(timezone.utc) + timedelta(minutes=5),
                resource_ids=[resource_id], api_key=api_key, timeout=10.0))
            if events and any(is_final(event) for event in events):
                return events
            why = "its final state event is not in the server's event store"
        except (PrefectError, httpx.HTTPError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        failures += 1
        pause = backoff.delay(failures)
        if time.monotonic() + pause > deadline:
            raise FlowRunEventsMissing(f"flow run {flow_run_id}: {why} after {wait:.0f} s")
        time.sleep(pause)


def _state_events(raw) -> list[Event]:
    out = []
    for obj in raw:
        try:
            event = parse_wire_event(obj)
        except EventRejected:  # the sidecar would set it aside too
            continue
        if event is not None and run_key(event) is not None:
            out.append(event)
    return out
