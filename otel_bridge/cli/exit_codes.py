"""The exit statuses of every `otel-bridge` command."""

EXIT_OK = 0  # every input read and written
EXIT_REJECTED = 1  # some input rejected or set aside, or the output failed
EXIT_USAGE = 2  # a usage or settings error
