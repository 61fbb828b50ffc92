"""An open run's events, kept packed: their JSON, zstd-compressed together
with a dictionary trained on real Prefect events.

A run is open from its first state to its final one, and a sidecar or a
conversion holds thousands at once. As parsed `Event`s a task run's Pending
and Running states took 12.5 kB. Packed, a few hundred bytes: the events of
one run repeat each other (they are compressed together), and those of all
runs share keys, labels and shapes, which the dictionary holds already
(scripts/train-event-dictionary.py makes it from the Prefect 3.9.1 captures
in tests/fixtures). Packing takes a few microseconds an event, unpacking a
parse at the run's end; and bytes are nothing the cyclic garbage collector
walks. Each event is unpacked to exactly the `Event` it was: from the very
JSON it was read from when the caller has it, else from its serialisation.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Optional

import zstandard
from pydantic_core import PydanticSerializationError

from otel_bridge.model.events import Event, parse_wire_event

__all__ = ["EventPacker", "event_text"]

_DICTIONARY = zstandard.ZstdCompressionDict(
    resources.files(__package__).joinpath("prefect-events.zdict").read_bytes())
# A run's events go in one compressed frame until it holds this much JSON,
# then a new frame starts: a long run is not compressed again whole at each
# event.
_FRAME_BYTES = 16 * 1024


def event_text(event: Event) -> bytes:
    """JSON that `parse_wire_event` reads back to exactly `event`."""
    try:
        return event.model_dump_json().encode()
    except PydanticSerializationError:  # text UTF-8 cannot carry: JSON's escapes can
        return json.dumps(event.model_dump(mode="json")).encode()


class EventPacker:
    """Packs a run's events into a tuple of compressed frames, and back.
    One per thread: zstd's contexts are not shared between threads."""

    def __init__(self) -> None:
        self._compress = zstandard.ZstdCompressor(
            level=3, dict_data=_DICTIONARY, write_checksum=False, write_content_size=True,
            write_dict_id=False).compress
        self._decompress = zstandard.ZstdDecompressor(dict_data=_DICTIONARY).decompress

    def append(self, frames: tuple[bytes, ...], event: Event,
               raw: Optional[bytes] = None) -> tuple[bytes, ...]:
        """A run's `frames` with `event` added. `raw`: the JSON text it was
        parsed from (`parse_wire_event`), when the caller has it."""
        if raw is None:
            raw = event_text(event)
        record = len(raw).to_bytes(4, "big") + raw
        if frames and zstandard.frame_content_size(frames[-1]) + len(record) <= _FRAME_BYTES:
            record = self._decompress(frames[-1]) + record
            frames = frames[:-1]
        # (zstd leaves room for the worst case in the bytes it returns: copied
        # to their size, since they are kept)
        return (*frames, bytes(memoryview(self._compress(record))))

    def unpack(self, frames: tuple[bytes, ...]) -> list[Event]:
        """A run's events, in the order they were added."""
        events = []
        for frame in frames:
            records = self._decompress(frame)
            at = 0
            while at < len(records):
                size = int.from_bytes(records[at:at + 4], "big")
                event = parse_wire_event(records[at + 4:at + 4 + size])
                assert event is not None  # it was packed from an event
                events.append(event)
                at += 4 + size
        return events
