"""Train the zstd dictionary open runs are compressed with.

    .venv/bin/python scripts/train-event-dictionary.py

From the run-state events of the real Prefect 3.9.1 captures in
tests/fixtures/prefect-3.9.1 (not the benchmarks' map-500 flow, so that the
benchmark does not measure its own training set), one JSON line each, as
`convert` reads them. Writes otel_bridge/translate/prefect-events.zdict.
Training is deterministic: the same captures give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "tests" / "fixtures" / "prefect-3.9.1"
OUT = ROOT / "otel_bridge" / "translate" / "prefect-events.zdict"
SIZE = 4096


def samples() -> list[bytes]:
    out = []
    for path in sorted(CAPTURES.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            event = event.get("event", event) if event.get("type") == "event" else event
            if ".task-run." in event.get("event", "") or ".flow-run." in event.get("event", ""):
                out.append(line.encode())
    return out


def main() -> None:
    dictionary = zstandard.train_dictionary(SIZE, samples(), threads=0)
    OUT.write_bytes(dictionary.as_bytes())
    print(f"{OUT.relative_to(ROOT)}: {len(dictionary.as_bytes())} bytes")


if __name__ == "__main__":
    main()
