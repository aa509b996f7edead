from __future__ import annotations

from app.activity import ActivityTracker
from tests.doubles import FakeClock


def test_requests_are_counted_per_minute_window() -> None:
    clock = FakeClock(start=60 * 1000)
    tracker = ActivityTracker(clock)
    tracker.record()
    clock.advance(60)
    tracker.record()
    tracker.record()
    assert tracker.requests_within(1) == 2
    assert tracker.requests_within(2) == 3
    clock.advance(10 * 60)
    assert tracker.requests_within(5) == 0
    assert tracker.requests_within(15) == 3
    assert tracker.last_request_at == 60 * 1001


def test_a_day_later_old_buckets_do_not_count() -> None:
    clock = FakeClock(start=0)
    tracker = ActivityTracker(clock)
    tracker.record()
    clock.advance(24 * 3600)
    tracker.record()
    assert tracker.requests_within(24 * 60) == 1
