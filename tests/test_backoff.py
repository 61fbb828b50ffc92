"""One backoff, with each caller's numbers: the subscription's (jittered,
capped, for ever unless bounded) and the Prefect sink's (two at once, then
exponential, a budget per stall). The deliveries' (exponential, capped,
reset by a success): service/test_pipeline."""

from __future__ import annotations

from otel_bridge.backoff import Backoff
from otel_bridge.sinks.prefect_events import PrefectEventSink


def test_the_subscriptions_backoff_is_capped_and_jittered():
    b = Backoff(initial=0.5, maximum=4.0, jitter=0.5)
    delays = [b.delay(n) for n in range(1, 2000)]
    assert max(delays) <= 4.0 and min(delays) >= 0.25
    assert len(set(round(d, 6) for d in delays[10:50])) > 1
    assert 0.25 <= b.delay(1) <= 0.5 and 2.0 <= b.delay(4) <= 4.0


def test_unbounded_never_gives_up_and_bounded_gives_up_at_max_attempts():
    assert not Backoff(max_attempts=None).exhausted(10_000)
    bounded = Backoff(max_attempts=3)
    assert not bounded.exhausted(2) and bounded.exhausted(3)


def test_the_sink_retries_twice_at_once_then_backs_off_within_its_budget():
    sink = PrefectEventSink("http://h:1/api", backoff=0.25, max_backoff=1.0,
                            reconnection_attempts=5)
    assert [sink.backoff.delay(n) for n in range(1, 7)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    # reconnection_attempts counts the retries: the sixth failure in a row is the last
    assert not sink.backoff.exhausted(5) and sink.backoff.exhausted(6)
    assert PrefectEventSink("http://h:1/api", reconnection_attempts=0).backoff.exhausted(1)
