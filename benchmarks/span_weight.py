"""How much otel-bridge's spans weigh against Prefect's own spans of the same runs.

    .venv/bin/python benchmarks/span_weight.py [FIXTURE_DIR]

FIXTURE_DIR (default tests/fixtures/prefect-3.9.1-telemetry, made by
`scripts/capture_prefect_events.py --with-prefect-spans`) holds, per scenario,
the Prefect events of real flow runs (<scenario>.jsonl) and the spans Prefect
itself made of the same runs with its telemetry on
(<scenario>.prefect-spans.jsonl, OTLP/JSON lines).

Ours are what `otel-bridge convert` writes for the events (the CLI itself is
run, in process, to OTLP/JSON). Both sides are read back into OTLP protobuf
`Span` messages and weighed with the same yardstick: `Span.ByteSize()`, the
span's serialized size (the resource and scope a request adds once are not
counted). Runs are matched by run id (`prefect.run.type` / `prefect.run.id`);
only runs present on both sides are compared, and those found on one side
only are named. Prefect 3.9.1 exports no span for a run whose span it never
ends: a task TimedOut (sync `handle_timeout` does not end it), NotReady, or
left Running when its process was killed; nor a flow run so killed.

Prints, per scenario, for task runs and then flow runs: runs matched, bytes
ours and Prefect's, the ratio, bytes per span; a TOTAL over all scenarios and
a GOAL total over the scenarios the target is set on (GOAL_SCENARIOS). Target:
our task spans weigh at most 1.2x Prefect's over those (1.5x the floor).

Then where our task spans' bytes go over GOAL, by part, and the FLOOR: the
parts no layout can leave out while it keeps what the compact-span issue
asks for (the final state's labels, `prefect.run.name`, the CI/CD
attributes, the link to Prefect's span) and an exact round trip (each
state's span event with its id; the span's ids, name and times).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from opentelemetry.proto.trace.v1.trace_pb2 import Span

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otel_bridge import cli  # noqa: E402
from otel_bridge.model.otlp import request_from_json  # noqa: E402
from otel_bridge.translate.ids import span_id_for  # noqa: E402

DEFAULT_DIR = ROOT / "tests" / "fixtures" / "prefect-3.9.1-telemetry"
SPANS_SUFFIX = ".prefect-spans.jsonl"
TARGET = 1.2
# Retries, failures, mapped, nested, cached, tags, rollback and timeout flows.
GOAL_SCENARIOS = ("failure", "retries-immediate", "retries-delayed", "mapped", "nested-tasks",
                  "cache-hit", "tags", "rolled-back", "timeout")

RunKey = tuple[str, str]  # ("task" | "flow", run id)


def otlp_spans(path: Path) -> Iterator[Span]:
    """Every span of an OTLP/JSON lines file, as protobuf."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            for resource_spans in request_from_json(json.loads(line)).resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    yield from scope_spans.spans


def _attributes(span: Span) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in span.attributes}


def prefect_runs(path: Path) -> dict[RunKey, Span]:
    out = {}
    for span in otlp_spans(path):
        attrs = _attributes(span)
        key = (attrs["prefect.run.type"], attrs["prefect.run.id"])
        assert key not in out, f"two Prefect spans for {key}"
        out[key] = span
    return out


def our_runs(events_path: Path) -> dict[RunKey, Span]:
    """`otel-bridge convert EVENTS` (OTLP/JSON, the CLI's default output), by run."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "spans.jsonl"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = cli.main(["convert", str(events_path), "-o", str(out_path)])
        if status != cli.EXIT_OK:
            raise RuntimeError(f"convert {events_path.name} failed: {stderr.getvalue()}")
        spans = list(otlp_spans(out_path))
    # A span names its run in its attributes; should a span format leave them
    # out, its id still does (a function of the run's resource id).
    by_span_id = {}
    for line in events_path.read_text(encoding="utf-8").splitlines():
        rid = json.loads(line)["resource"].get("prefect.resource.id", "")
        for kind in ("task", "flow"):
            if rid.startswith(f"prefect.{kind}-run."):
                key = (kind, rid.removeprefix(f"prefect.{kind}-run."))
                by_span_id[span_id_for(rid).to_bytes(8, "big")] = key
    out = {}
    for span in spans:
        attrs = _attributes(span)
        if attrs.get("prefect.run.type") in ("task", "flow") and attrs.get("prefect.run.id"):
            key = (attrs["prefect.run.type"], attrs["prefect.run.id"])
        else:
            key = by_span_id[span.span_id]
        assert key not in out, f"two spans of ours for {key}"
        out[key] = span
    return out


@dataclass
class Weight:
    """One scenario's runs of one kind: matched ones weighed, the rest counted."""

    matched: int = 0
    ours: int = 0
    prefect: int = 0
    only_ours: list[str] = field(default_factory=list)  # run names
    only_prefect: list[str] = field(default_factory=list)

    def add(self, other: "Weight") -> None:
        self.matched += other.matched
        self.ours += other.ours
        self.prefect += other.prefect
        self.only_ours += other.only_ours
        self.only_prefect += other.only_prefect

    @property
    def ratio(self) -> float:
        return self.ours / self.prefect if self.prefect else float("nan")


def weigh(ours: dict[RunKey, Span], prefect: dict[RunKey, Span], kind: str) -> Weight:
    w = Weight()
    for key in sorted(ours.keys() | prefect.keys()):
        if key[0] != kind:
            continue
        if key in ours and key in prefect:
            w.matched += 1
            w.ours += ours[key].ByteSize()
            w.prefect += prefect[key].ByteSize()
        elif key in ours:
            w.only_ours.append(ours[key].name)
        else:
            w.only_prefect.append(prefect[key].name)
    return w


def compare(fixture_dir: Path) -> dict[str, dict[str, Weight]]:
    """Per scenario (sorted), per kind ("task", "flow"): the weights."""
    out = {}
    for spans_path in sorted(fixture_dir.glob(f"*{SPANS_SUFFIX}")):
        scenario = spans_path.name.removesuffix(SPANS_SUFFIX)
        ours = our_runs(fixture_dir / f"{scenario}.jsonl")
        prefect = prefect_runs(spans_path)
        out[scenario] = {kind: weigh(ours, prefect, kind) for kind in ("task", "flow")}
    return out


def _table(title: str, rows: dict[str, Weight]) -> list[str]:
    lines = [title,
             f"  {'scenario':22} {'runs':>5} {'ours B':>9} {'Prefect B':>10} {'ratio':>6}"
             f" {'ours/span':>10} {'Prefect/span':>12}  unmatched"]
    for name, w in [*rows.items(), ("TOTAL", total(rows)), ("GOAL", total(rows, GOAL_SCENARIOS))]:
        n = max(w.matched, 1)
        unmatched = []
        if w.only_ours:
            unmatched.append(f"ours only {len(w.only_ours)} ({_names(w.only_ours)})")
        if w.only_prefect:
            unmatched.append(f"Prefect only {len(w.only_prefect)} ({_names(w.only_prefect)})")
        lines.append(f"  {name:22} {w.matched:5} {w.ours:9} {w.prefect:10} {w.ratio:6.2f}"
                     f" {w.ours / n:10.0f} {w.prefect / n:12.0f}  {'; '.join(unmatched)}")
    return lines


# Span attributes by part (the rest are what the event builders read).
_LABELS = ("prefect.resource.", "prefect.run-count", "prefect.state-", "prefect.orchestration")
_CONVENTIONS = ("prefect.run.name", "cicd.", "error.type")
_EVENT_FLOOR = ("prefect.state.id",)
FLOOR_PARTS = ("span ids, name, times, status", "final state's labels", "run name, CI/CD",
               "links", "state events: name, time, id")


def _field(size: int) -> int:
    """Bytes of a length-delimited protobuf field whose content is `size` bytes."""
    return 1 + len(_varint(size)) + size


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def parts(span: Span) -> dict[str, int]:
    """Our span's bytes by part; they add up to `span.ByteSize()`."""
    out: dict[str, int] = {}

    def add(part: str, size: int) -> None:
        out[part] = out.get(part, 0) + size

    for kv in span.attributes:
        part = ("final state's labels" if kv.key.startswith(_LABELS)
                else "run name, CI/CD" if kv.key.startswith(_CONVENTIONS)
                else "run facts for the builders")
        add(part, _field(kv.ByteSize()))
    for event in span.events:
        whole = _field(event.ByteSize())
        rest = 0
        for kv in event.attributes:
            if kv.key not in _EVENT_FLOOR:
                size = _field(kv.ByteSize())
                rest += size
                add("state events: patches" if kv.key == "otel_bridge.event.patch"
                    else "state events: type, message, details, data", size)
        add("state events: name, time, id", whole - rest)
    for link in span.links:
        add("links", _field(link.ByteSize()))
    add("span ids, name, times, status", span.ByteSize() - sum(out.values()))
    return out


def breakdown(results: dict[str, dict[str, "Weight"]], fixture_dir: Path) -> dict[str, int]:
    """Our task spans' bytes over GOAL, by part (matched runs only)."""
    out: dict[str, int] = {}
    for scenario in GOAL_SCENARIOS:
        ours = our_runs(fixture_dir / f"{scenario}.jsonl")
        prefect = prefect_runs(fixture_dir / f"{scenario}{SPANS_SUFFIX}")
        for key, span in ours.items():
            if key[0] == "task" and key in prefect:
                for part, size in parts(span).items():
                    out[part] = out.get(part, 0) + size
    return out


def total(rows: dict[str, Weight], scenarios=None) -> Weight:
    out = Weight()
    for name, w in rows.items():
        if scenarios is None or name in scenarios:
            out.add(w)
    return out


def _names(names: list[str]) -> str:
    """Run names without their random suffix, counted: `square x50`."""
    counts: dict[str, int] = {}
    for name in names:
        base = name.rsplit("-", 1)[0] if "-" in name else name
        counts[base] = counts.get(base, 0) + 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())


def main(argv: list[str]) -> int:
    fixture_dir = Path(argv[0]) if argv else DEFAULT_DIR
    results = compare(fixture_dir)
    if not results:
        print(f"no *{SPANS_SUFFIX} in {fixture_dir}", file=sys.stderr)
        return 2
    print(f"Span.ByteSize() of matched runs, otel-bridge vs Prefect 3.9.1's own spans ({fixture_dir})")
    for kind in ("task", "flow"):
        print()
        print("\n".join(_table(f"{kind} runs", {s: r[kind] for s, r in results.items()})))
    goal = total({s: r["task"] for s, r in results.items()}, GOAL_SCENARIOS)
    verdict = "met" if goal.ratio <= TARGET else "NOT met"
    print(f"\nGOAL = {', '.join(GOAL_SCENARIOS)}")
    print(f"task spans over GOAL: ours {goal.ratio:.2f}x Prefect's; target <= {TARGET}x: {verdict}")
    by_part = breakdown(results, fixture_dir)
    print(f"\nwhere our task spans' bytes go over GOAL ({goal.matched} runs; Prefect's: "
          f"{goal.prefect} B, {goal.prefect / max(goal.matched, 1):.0f} B a span)")
    for part, size in sorted(by_part.items(), key=lambda kv: -kv[1]):
        floor = "  (floor)" if part in FLOOR_PARTS else ""
        print(f"  {part:44} {size:8} B {size / max(goal.matched, 1):6.0f} B a span"
              f" {size / goal.prefect:5.2f}x Prefect's{floor}")
    floor = sum(size for part, size in by_part.items() if part in FLOOR_PARTS)
    print(f"  {'FLOOR (the parts marked)':44} {floor:8} B {floor / max(goal.matched, 1):6.0f} B a span"
          f" {floor / goal.prefect:5.2f}x Prefect's")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
