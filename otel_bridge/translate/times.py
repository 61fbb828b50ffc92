"""Times as spans and Prefect's JSON write them (pure)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

__all__ = ["from_unix_nano", "prefect_json_time", "to_unix_nano"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def to_unix_nano(moment: datetime) -> int:
    """Nanoseconds since 1970 of an aware time, exact to the microsecond."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def from_unix_nano(nanos: int) -> datetime:
    # Integer arithmetic: a float of nanoseconds since 1970 loses microseconds.
    return _EPOCH + timedelta(microseconds=nanos // 1000)


def prefect_json_time(moment: datetime) -> str:
    """Prefect's JSON form of its DateTime: UTC with a Z."""
    moment = moment.astimezone(timezone.utc)
    if moment.year >= 1000:  # what strftime writes, in a third of the time
        return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
