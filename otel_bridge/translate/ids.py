"""Deterministic trace and span ids.

Every id is a pure function of a Prefect resource id, so any process or replica
that sees any one event of a run computes the same ids, in whatever order the
events come, and a child can name its parent before the parent's events arrive
(the approach of the Collector's githubreceiver):

    trace_id(root) = sha256("otel-bridge/v1 trace " + root)[:16]
    span_id(run)   = sha256("otel-bridge/v1 span "  + run )[:8]

where `run` is the run's `prefect.resource.id` (`prefect.task-run.<uuid>` or
`prefect.flow-run.<uuid>`) and `root` is the resource id of the run at the root
of the trace: the flow run for a task in a flow, the task run itself for a task
with no flow run. The bytes are read big-endian. The version word in the
prefix lets a future scheme coexist with this one. Prefect's own spans use
random ids, so these can only collide with them by chance (2^-64 per pair).
"""

from __future__ import annotations

import functools
import hashlib
from uuid import UUID

__all__ = ["span_id_for", "trace_id_for", "uuid_for"]

_PREFIX = "otel-bridge/v1"


def _digest(kind: str, resource_id: str) -> bytes:
    return hashlib.sha256(f"{_PREFIX} {kind} {resource_id}".encode()).digest()


# The ids of the runs many others sit under (a flow run: every task's trace
# and, unnested, its parent) are asked for again and again: cached.
@functools.lru_cache(maxsize=4096)
def trace_id_for(root_resource_id: str) -> int:
    digest = _digest("trace", root_resource_id)
    # An all-zero id is invalid in W3C trace context; the next bytes stand in.
    return int.from_bytes(digest[:16], "big") or int.from_bytes(digest[16:], "big")


@functools.lru_cache(maxsize=4096)
def span_id_for(run_resource_id: str) -> int:
    digest = _digest("span", run_resource_id)
    return int.from_bytes(digest[:8], "big") or int.from_bytes(digest[8:16], "big")


def uuid_for(kind: str, *parts: str) -> UUID:
    """A UUIDv8 (RFC 9562, "custom") from the same hash, for Prefect ids that
    the reverse direction must make: the same span gives the same task run
    and event ids every time, so sending it twice makes no new objects."""
    raw = bytearray(_digest(kind, " ".join(parts))[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
    return UUID(bytes=bytes(raw))
