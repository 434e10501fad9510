"""zchat.flow: the one token bucket (broker, client, tap) and the settings of the one gap
tracker that only the chat client uses. The tracker's common behaviour is tested with the
tap's settings in tests/test_tap_unit.py."""

from __future__ import annotations

import pytest

from zchat import limits as L
from zchat import tap
from zchat.clientcore import ClientCore
from zchat.core import BrokerCore
from zchat.flow import Gap, Request, SeqTracker, TokenBucket, Write

T = "r/lobby/"


def test_the_tap_and_the_client_use_the_one_tracker_and_bucket() -> None:
    assert tap.SeqTracker is SeqTracker
    core = ClientCore("ab" * 32)
    assert isinstance(core.tracker, SeqTracker) and core.tracker.bucket is core.bucket
    broker = BrokerCore("e", 0.0)
    broker.on_message("cd" * 32, b'{"type":"ping"}', 1, 0.0)
    assert isinstance(broker.peers["cd" * 32].bucket, TokenBucket)


def test_bucket_refills_on_the_clock_it_is_given() -> None:
    bucket = TokenBucket(2, 4.0)
    assert bucket.take(10.0) and bucket.take(10.0) and not bucket.take(10.0)
    assert bucket.ready_at() == pytest.approx(10.25)
    assert not bucket.take(10.2)
    assert bucket.take(10.25)
    bucket.configure(1, 1.0)
    assert bucket.tokens <= 1.0


def test_bucket_never_goes_below_empty_when_time_runs_forward_only() -> None:
    bucket = TokenBucket(L.RATE_BURST, L.RATE_PER_SECOND, now=100.0)
    for _ in range(L.RATE_BURST):
        assert bucket.take(100.0)
    assert not bucket.take(100.0)
    assert bucket.tokens >= 0.0
    assert bucket.take(100.0 + 1 / L.RATE_PER_SECOND)


def test_client_settings_drop_repeats_instead_of_resetting() -> None:
    t = SeqTracker(resets=False)
    t.baseline(T, 10)
    assert t.event(T, 9, "old", 0.0) == []
    assert t.event(T, 10, "same", 0.0) == []
    assert [w.seq for w in t.event(T, 11, "new", 0.0)] == [11]


def test_a_topic_that_cannot_be_recovered_reports_gaps_at_once() -> None:
    t = SeqTracker()
    t.baseline("u/x/", 3, recover=False)
    out = t.event("u/x/", 6, "e6", 0.0)
    assert out == [Gap("u/x/", 4, 5), Write("u/x/", 6, "e6")]
    assert t.mark("u/x/", 8, 0.0) == [Gap("u/x/", 7, 8)]
    assert t.deadline() is None


def test_a_gap_wider_than_max_recover_fetches_only_its_newest_part() -> None:
    t = SeqTracker(max_recover=1000, burst=100)
    t.baseline(T, 0)
    out = t.event(T, 3001, "live", 0.0)
    assert out[0] == Gap(T, 1, 2000)
    request = out[1]
    assert isinstance(request, Request)
    assert (request.after, request.before) == (2000, 2000 + 1 + L.MAX_HISTORY_PER_REQUEST)


def test_baseline_and_forget_drop_what_was_held_and_asked() -> None:
    t = SeqTracker()
    t.baseline(T, 1)
    (request,) = t.event(T, 5, "e5", 0.0)
    t.baseline(T, 7)  # a welcome: from here on
    assert t.history(request.ref, T, 1, [(2, "x")], 0.1) == []
    assert t.deadline() is None
    assert [w.seq for w in t.event(T, 8, "e8", 0.2)] == [8]
    t.forget(T)
    assert t.last(T) is None
