"""Byte relays for the tests' loopback proxies."""

from __future__ import annotations

import asyncio


async def relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter, *,
                abort: bool = False) -> None:
    """Copy `src` to `dst` until either side goes away, then close `dst`
    (reset it with `abort`: no goodbye, as a lost connection)."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        if abort:
            dst.transport.abort()
        else:
            dst.close()
