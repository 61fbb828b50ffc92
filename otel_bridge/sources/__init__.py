"""What comes in: Prefect events (JSON lines, the REST and websocket APIs) and OTLP/JSON."""
