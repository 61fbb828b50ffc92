"""The `otel-bridge` command line (`main`, and the exit statuses it
returns), its commands one module each."""

from otel_bridge.cli.convert import default_jobs
from otel_bridge.cli.exit_codes import EXIT_OK, EXIT_REJECTED, EXIT_USAGE
from otel_bridge.cli.main import main

__all__ = ["EXIT_OK", "EXIT_REJECTED", "EXIT_USAGE", "default_jobs", "main"]
