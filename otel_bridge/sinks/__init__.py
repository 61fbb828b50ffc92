"""Where spans go: OTLP export, OTLP/JSON files, a tree on the terminal."""
