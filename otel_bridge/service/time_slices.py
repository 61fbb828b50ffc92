"""Long work on the event loop, a slice of time at a time.

A big request (thousands of spans or events) is handled by a loop that
runs on the event loop itself; `await slices.turn()` inside it hands the
loop over to the other requests (`/healthz` among them) once the loop has
run for its slice. Slices are measured in time, not in items: a span of a
thousand states costs what a hundred small ones do.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["SLICE_SECONDS", "TimeSlices"]

# /healthz must answer within 100 ms while any request is handled, and an
# HTTP request takes the event loop three or four turns (read, handle,
# write), each after a slice: 20 ms slices made 70 ms answers, 5 ms slices
# leave room for an item that runs over and a loaded machine. A turn costs
# about 20 us.
SLICE_SECONDS = 0.005


class TimeSlices:
    def __init__(self, seconds: float = SLICE_SECONDS):
        self._seconds = seconds
        self._started = time.perf_counter()

    async def turn(self) -> None:
        """Give the event loop to others if this slice is over."""
        if time.perf_counter() - self._started >= self._seconds:
            await asyncio.sleep(0)
            self._started = time.perf_counter()
