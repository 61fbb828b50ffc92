"""Prefect events pushed in an HTTP body (webhooks, scripts).

A body is one JSON event, a JSON array of events, or JSON lines; each item
may be any of the three wire forms `parse_wire_event` reads. Every item is
judged on its own: the good ones are taken even when others are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from otel_bridge.model.events import Event, EventRejected, parse_wire_event

__all__ = ["BodyItemRejected", "events_from_body"]


@dataclass(frozen=True)
class BodyItemRejected:
    item: int  # 1-based: array index + 1, or line number
    reason: str
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"item": self.item, "reason": self.reason, "detail": self.detail}


def events_from_body(body: bytes) -> tuple[list[tuple[int, Event]], list[BodyItemRejected]]:
    """The body's events, each with its 1-based item number, and what was not."""
    try:
        whole = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        whole = None
        if body.lstrip()[:1] == b"[":  # an array that does not parse: nothing to split
            return [], [BodyItemRejected(1, "malformed_json", "the body is not valid JSON")]
    if isinstance(whole, list):
        return _judge(((i, item) for i, item in enumerate(whole, 1)), parsed=True)
    if whole is not None:
        return _judge([(1, whole)], parsed=True)
    lines = ((n, line) for n, line in enumerate(body.split(b"\n"), 1) if line.strip())
    return _judge(lines, parsed=False)


def _judge(items, parsed: bool) -> tuple[list[tuple[int, Event]], list[BodyItemRejected]]:
    """`parsed`: the items are JSON values already, so a string among them is
    a JSON string, not JSON text to parse again."""
    events: list[tuple[int, Event]] = []
    rejected: list[BodyItemRejected] = []
    for number, item in items:
        if parsed and isinstance(item, str):
            rejected.append(BodyItemRejected(number, "not_an_object", "expected a JSON object, got str"))
            continue
        try:
            event = parse_wire_event(item)
        except EventRejected as exc:
            rejected.append(BodyItemRejected(number, exc.reason, exc.detail))
            continue
        if event is None:
            rejected.append(BodyItemRejected(number, "not_an_event", "a websocket control frame"))
        else:
            events.append((number, event))
    return events, rejected
