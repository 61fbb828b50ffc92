"""Prefect events pushed in an HTTP body (webhooks, scripts).

A body is one JSON event, a JSON array of events, or JSON lines; each item
may be any of the three wire forms `parse_wire_event` reads. Every item is
judged on its own: the good ones are taken even when others are not. Each
item is parsed once, from its own JSON text, which is handed on with its
event (the sidecar keeps it as it is, instead of serialising the event).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import msgspec

from otel_bridge.model.events import Event, EventRejected, parse_wire_event

__all__ = ["BodyItem", "BodyItemRejected", "events_from_body"]


@dataclass(frozen=True)
class BodyItemRejected:
    item: int  # 1-based: array index + 1, or line number
    reason: str
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"item": self.item, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class BodyItem:
    number: int  # 1-based: array index + 1, or line number
    event: Event
    raw: Optional[bytes]  # the item's JSON text (None: only its parsed value is known)


_items_of_array = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode = msgspec.json.Decoder().decode


def events_from_body(body: bytes) -> tuple[list[BodyItem], list[BodyItemRejected]]:
    """The body's events and what was not."""
    lines = [(n, line) for n, line in enumerate(body.split(b"\n"), 1) if line.strip()]
    if body.lstrip()[:1] == b"[":
        try:
            raws = _items_of_array(body)
        except (msgspec.DecodeError, RecursionError):
            try:  # what msgspec refuses that json takes (NaN, ...)
                values = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                if len(lines) > 1 and _is_json(lines[0][1]):  # JSON lines, the first a list
                    return _judge(lines, parsed=False)
                return [], [BodyItemRejected(1, "malformed_json", "the body is not valid JSON")]
            if not isinstance(values, list):
                return _judge([(1, values)], parsed=True)
            return _judge(enumerate(values, 1), parsed=True)
        return _judge(((i, bytes(raw)) for i, raw in enumerate(raws, 1)), parsed=True)
    if len(lines) > 1 and not _is_json(lines[0][1]) and _is_json(body):
        return _judge([(1, body)], parsed=False)  # one JSON document over several lines
    return _judge(lines, parsed=False)


def _is_json(text: bytes) -> bool:
    try:
        _decode(text)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _judge(items: Iterable[tuple[int, Union[bytes, Any]]],
           parsed: bool) -> tuple[list[BodyItem], list[BodyItemRejected]]:
    """Items are JSON text (bytes) or, where only the whole body could be
    parsed, JSON values. `parsed`: each item is one JSON value of an array,
    so a JSON string is a string, not JSON text to parse again."""
    events: list[BodyItem] = []
    rejected: list[BodyItemRejected] = []
    for number, item in items:
        if parsed and (isinstance(item, str) or (type(item) is bytes and item[:1] == b'"')):
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
            events.append(BodyItem(number, event, item if type(item) is bytes else None))
    return events, rejected
