"""`otel-bridge serve`: the long-running sidecar (see `app` for the wiring)."""
