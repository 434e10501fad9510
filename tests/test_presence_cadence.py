"""Issue 11: what keeps 10,000 members cheap for the broker, in the pure cores.

A member pings only after CLIENT_PING_INTERVAL without sending anything (never while it
talks), a member pinging at that cadence is never timed out, and a join the broker does not
answer is resent less and less often (no resend storm when thousands join at once).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from chatkit import World, identity_of

from zchat import limits as L
from zchat.clientcore import ClientCore, JoinChat, Now
from zchat.core import Limits
from zchat.events import Connection
from zchat.protocol import Heartbeat, Join, Left, Ping

WALL = 5e9


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


def test_a_talking_member_never_pings_and_an_idle_one_pings_at_the_interval(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    start = len(alice.client.sent)
    for i in range(8):  # a line a second: well inside the rate limit
        world.type("alice", f"line {i}")
        world.advance(1.0)
    assert not [m for m in alice.client.sent[start:] if isinstance(m, Ping)]
    idle = len(alice.client.sent)
    quiet = 5 * L.CLIENT_PING_INTERVAL
    world.advance(quiet)
    pings = [m for m in alice.client.sent[idle:] if isinstance(m, Ping)]
    assert len(pings) == len(alice.client.sent[idle:])  # idle: nothing but pings
    assert quiet / L.CLIENT_PING_INTERVAL - 1 <= len(pings) <= quiet / L.CLIENT_PING_INTERVAL
    assert not [e for _, e in world.published if isinstance(e, Left)], "a pinging member timed out"
    assert bob.client.core.snapshot().online == 2


def test_pings_at_the_interval_outlast_many_timeouts(world: World) -> None:
    world.join("alice")
    bob = world.join("bob")
    world.advance(4 * L.CLIENT_TIMEOUT)
    assert not [e for _, e in world.published if isinstance(e, Left)]
    assert L.CLIENT_TIMEOUT - L.CLIENT_PING_INTERVAL >= 1.5, "slack for a late ping under load"
    assert bob.client.core.snapshot().online == 2


def join_sends(core: ClientCore, start: float, seconds: float, step: float = 0.01) -> list[float]:
    """When the core sends its join, ticking it every `step` from `start` (nobody answers)."""
    sent = []
    for i in range(1, int(seconds / step) + 1):
        now = start + i * step
        if any(isinstance(getattr(e, "message", None), Join) for e in core.tick(Now(now, WALL))):
            sent.append(now)
    return sent


def test_an_unanswered_join_is_resent_backing_off_to_join_retry_max() -> None:
    core = ClientCore(identity_of("solo"))
    core.start()
    core.request(JoinChat("solo"), Now(100.0, WALL))
    times = [100.0] + join_sends(core, 100.0, 12.0)
    gaps = [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]
    expected = [L.JOIN_RETRY_INTERVAL * 2**i for i in range(3)]  # 0.2, 0.4, 0.8
    assert gaps[:3] == pytest.approx(expected, abs=0.02)
    assert max(gaps) == pytest.approx(L.JOIN_RETRY_MAX, abs=0.02)
    assert gaps[-3:] == pytest.approx([L.JOIN_RETRY_MAX] * 3, abs=0.02)
    assert len(times) <= 10  # 12 s unanswered: 9 joins, where a steady 0.2 s would send 60


def test_a_new_join_starts_again_from_the_short_wait() -> None:
    core = ClientCore(identity_of("solo"))
    core.start()
    core.request(JoinChat("solo"), Now(100.0, WALL))
    join_sends(core, 100.0, 6.0)  # backed off to the longest wait
    core.request(JoinChat("other"), Now(106.0, WALL))
    again = join_sends(core, 106.0, 1.0)
    assert again[0] == pytest.approx(106.0 + L.JOIN_RETRY_INTERVAL, abs=0.02)


def heartbeats(world: World) -> list[Heartbeat]:
    return [e for _, e in world.published if isinstance(e, Heartbeat)]


def test_heartbeats_space_out_with_many_online_and_clients_count_silence_in_intervals(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "HEARTBEAT_DELIVERIES_PER_SECOND", 1.25)  # 2 online: 1.6 s apart
    alice = world.join("alice")
    world.join("bob")
    assert alice.client.core.snapshot().connection == Connection.CONNECTED
    before = len(heartbeats(world))
    world.advance(10.0)
    beats = heartbeats(world)[before:]
    assert [b.interval for b in beats] == pytest.approx([1.6] * len(beats))
    assert len(beats) in (6, 7)  # 10 s / 1.6 s
    monkeypatch.setattr(L, "HEARTBEAT_DELIVERIES_PER_SECOND", 0.1)  # 2 online: 20 s, capped
    world.advance(5.0)
    assert heartbeats(world)[-1].interval == L.BROKER_HEARTBEAT_MAX
    # Heartbeats BROKER_HEARTBEAT_MAX apart are no loss; their silence for 3.5 of them is.
    world.advance(3 * L.BROKER_HEARTBEAT_MAX)
    assert alice.client.core.snapshot().connection == Connection.CONNECTED
    world.kill_broker(noticed=False)  # a hung broker or a dead network: only silence tells
    silence = L.BROKER_SILENCE_LOST * L.BROKER_HEARTBEAT_MAX / L.BROKER_HEARTBEAT_INTERVAL
    world.advance(silence - L.BROKER_HEARTBEAT_MAX - 0.2)  # the last one came up to an interval ago
    assert alice.client.core.snapshot().connection == Connection.CONNECTED
    world.advance(L.BROKER_HEARTBEAT_MAX + 0.4)
    assert alice.client.core.snapshot().connection == Connection.RECONNECTING


def test_a_small_broker_keeps_its_one_second_heartbeat(world: World) -> None:
    world.join("alice")
    world.join("bob")
    before = len(heartbeats(world))
    world.advance(5.0)
    beats = heartbeats(world)[before:]
    assert {b.interval for b in beats} == {L.BROKER_HEARTBEAT_INTERVAL}
    assert len(beats) in (4, 5)


def test_a_broker_with_a_short_client_timeout_is_pinged_within_it() -> None:
    """--client-timeout 1: the welcome says so, and the client pings every 0.5 s, not 2 s."""
    world = World(limits=Limits(client_timeout=1.0))
    try:
        alice, bob = world.join("alice"), world.join("bob")
        idle = len(alice.client.sent)
        world.advance(5.0)
        assert 8 <= len([m for m in alice.client.sent[idle:] if isinstance(m, Ping)]) <= 10
        assert not [e for _, e in world.published if isinstance(e, Left)]
        assert bob.client.core.snapshot().online == 2
    finally:
        world.close()
