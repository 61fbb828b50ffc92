"""The pure core: events <-> spans, no I/O."""
