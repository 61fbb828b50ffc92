"""Settings of the Python process that `convert` and `serve` run in."""

from __future__ import annotations

import gc

__all__ = ["tune_gc"]


def tune_gc() -> None:
    """Both make millions of short-lived objects beside a set of long-lived
    ones (open runs, a big request's spans). At the default gen-0 threshold
    (700) the cyclic collector walked the long-lived ones so often that it
    took a third of convert's time, and in serve its full walks held the
    event loop for 100 ms at a time while a big request was handled. What
    is loaded by now stays for the process's life: frozen, never walked."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
