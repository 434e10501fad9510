"""Unit tests of zchat.core.BrokerCore: pure, driven with explicit `now` values."""

from __future__ import annotations

import pytest
from corekit import LOBBY, SYS, body, checked, error, kinds, raw, send, sub, subscribe_all, u

from zchat import limits as L
from zchat.core import BrokerCore, Limits, Publish
from zchat.protocol import (
    Code,
    Heartbeat,
    Joined,
    Left,
    Message,
    Renamed,
    Shutdown,
    Welcome,
)

A = "a1" * 32
B = "b2" * 32
C = "c3" * 32
D = "d4" * 32
EPOCH = "epoch-1"


def make(now: float = 0.0, **limits: float) -> BrokerCore:
    return BrokerCore(EPOCH, now, Limits(**limits) if limits else None)  # type: ignore[arg-type]


def join(core: BrokerCore, identity: str, name: str, now: float = 0.0, **fields: object) -> list[Publish]:
    """Subscribe to sys/, u/<id>/ and r/lobby/, then send a join."""
    subscribe_all(core, identity, now)
    return send(core, identity, now, type="join", name=name, **fields)


def joined(core: BrokerCore, identity: str, name: str, now: float = 0.0) -> None:
    out = join(core, identity, name, now)
    assert [type(p.event) for p in out] == [Welcome, Joined]
    assert core.member_name(identity) == name


# --- join handshake --------------------------------------------------------------------


def test_join_after_subscriptions_completes_at_once() -> None:
    core = make(heartbeat_interval=2.0, rate_burst=7, rate_per_second=3.5, client_timeout=6.0)
    out = join(core, A, "alice", now=10.0)
    assert kinds(out) == [(u(A), "Welcome"), (LOBBY, "Joined")]
    welcome, note = out[0].event, out[1].event
    assert welcome == Welcome(seq=1, ts=10.0, id=A, name="alice", epoch=EPOCH, rooms={"lobby": 0},
                              online=1, members=["alice"], heartbeat=2.0, rate_burst=7,
                              rate_per_second=3.5, timeout=6.0)
    assert note == Joined(seq=1, ts=10.0, room="lobby", name="alice", chat=True, key=A)
    assert core.online == 1
    assert core.member_name(A) == "alice"


def test_join_before_subscriptions_waits_for_all_of_them() -> None:
    core = make()
    assert send(core, A, 1.0, type="join", name="alice") == []
    assert core.member_name(A) is None
    assert sub(core, A, SYS, 1.1) == (True, [])
    assert sub(core, A, u(A), 1.2) == (True, [])  # the room is still missing
    assert core.member_name(A) is None
    ok, out = sub(core, A, LOBBY, 1.3)
    assert ok is True
    assert kinds(out) == [(u(A), "Welcome"), (LOBBY, "Joined")]
    assert out[0].event.ts == 1.3
    assert core.member_name(A) == "alice"
    assert core.online == 1


def test_join_waits_for_private_stream_even_with_rooms_subscribed() -> None:
    core = make()
    assert sub(core, A, LOBBY) == (True, [])
    assert send(core, A, type="join", name="alice") == []
    assert sub(core, A, SYS) == (True, [])
    assert core.member_name(A) is None
    ok, out = sub(core, A, u(A))
    assert kinds(out) == [(u(A), "Welcome"), (LOBBY, "Joined")]


def test_join_with_every_room_subscription_needs_only_private_stream() -> None:
    core = make()
    assert sub(core, A, "r/") == (True, [])
    assert send(core, A, type="join", name="alice", rooms=["dev", "#Ops"]) == []
    ok, out = sub(core, A, u(A))
    assert ok is True
    assert kinds(out) == [(u(A), "Welcome"), ("r/dev/", "Joined"), ("r/ops/", "Joined")]
    assert out[0].event.rooms == {"dev": 0, "ops": 0}


def test_join_rooms_are_normalized_and_deduplicated() -> None:
    core = make()
    subscribe_all(core, A, topics=("r/dev/",))
    out = send(core, A, type="join", name="alice", rooms=["#Dev", "dev", "DEV"])
    assert kinds(out) == [(u(A), "Welcome"), ("r/dev/", "Joined")]
    assert out[0].event.rooms == {"dev": 0}


def test_welcome_baseline_is_the_room_seq_before_the_joined_notice() -> None:
    core = make()
    joined(core, A, "alice")                                   # r/lobby/ seq 1
    send(core, A, type="say", room="lobby", text="one")       # seq 2
    send(core, A, type="say", room="lobby", text="two")       # seq 3
    out = join(core, B, "bob", now=1.0)
    welcome, note = out[0].event, out[1].event
    assert out[0].topic == u(B)
    assert welcome.rooms == {"lobby": 3}
    assert welcome.online == 2
    assert welcome.members == ["alice", "bob"]
    assert welcome.seq == 1  # bob's private stream has its own numbering
    assert out[1].topic == LOBBY
    assert note == Joined(seq=4, ts=1.0, room="lobby", name="bob", chat=True, key=B)


def test_rejoin_is_idempotent() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    out = send(core, A, 5.0, type="join", name="alice")
    assert kinds(out) == [(u(A), "Welcome")]
    assert out[0].event.seq == 2
    assert out[0].event.rooms == {"lobby": 2}
    assert out[0].event.online == 2
    assert core.online == 2
    assert core.seqs[LOBBY] == 2  # no second joined notice


def test_rejoin_with_an_extra_room_announces_only_the_new_room() -> None:
    core = make()
    joined(core, A, "alice")
    assert send(core, A, type="join", name="alice", rooms=["lobby", "dev"]) == []  # r/dev/ not subscribed
    ok, out = sub(core, A, "r/dev/")
    assert ok is True
    assert kinds(out) == [(u(A), "Welcome"), ("r/dev/", "Joined")]
    assert out[0].event.rooms == {"lobby": 1, "dev": 0}
    assert core.seqs[LOBBY] == 1


def test_duplicate_name_from_another_key_is_refused_privately() -> None:
    core = make()
    joined(core, A, "alice")
    for name in ("alice", "ALICE", "Alice"):
        out = join(core, B, name, now=1.0)
        err = error(out, B)
        assert err.code == Code.NAME_TAKEN
        assert name in err.detail
    assert core.member_name(B) is None
    assert core.member_name(A) == "alice"
    assert core.online == 1
    assert core.seqs[LOBBY] == 1  # nothing was announced
    assert core.seqs.get(u(A)) == 1  # alice got nothing but her own welcome


def test_duplicate_name_detected_when_the_pending_join_completes() -> None:
    core = make()
    joined(core, A, "alice")
    assert send(core, B, type="join", name="alice") == []
    sub(core, B, SYS)
    sub(core, B, u(B))
    ok, out = sub(core, B, LOBBY)
    assert ok is True
    assert error(out, B).code == Code.NAME_TAKEN
    # The refused join is not retried by later subscriptions.
    assert sub(core, B, "r/dev/") == (True, [])
    assert core.member_name(B) is None


def test_name_is_free_again_after_its_holder_leaves() -> None:
    core = make()
    joined(core, A, "alice")
    send(core, A, type="leave")
    joined(core, B, "alice")


def test_same_key_rejoining_with_another_name_is_a_rename() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, 2.0, type="join", name="alicia")
    assert kinds(out) == [(LOBBY, "Renamed"), (u(A), "Welcome")]
    assert out[0].event == Renamed(seq=2, ts=2.0, room="lobby", old="alice", new="alicia")
    assert out[1].event.name == "alicia"
    assert out[1].event.members == ["alicia"]
    assert core.member_name(A) == "alicia"
    assert core.online == 1
    joined(core, B, "alice")  # the old name is free
    err = error(join(core, C, "ALICIA"), C)
    assert err.code == Code.NAME_TAKEN


def test_rename_changing_only_case_keeps_the_name_held() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, type="join", name="Alice")
    assert kinds(out) == [(LOBBY, "Renamed"), (u(A), "Welcome")]
    assert core.member_name(A) == "Alice"
    assert error(join(core, B, "alice"), B).code == Code.NAME_TAKEN


def test_rename_to_a_taken_name_is_refused() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    assert error(send(core, A, type="join", name="bob"), A).code == Code.NAME_TAKEN
    assert core.member_name(A) == "alice"


@pytest.mark.parametrize("name", ["", "a b", "-x", "a/b", ".hidden", "x\x1b[31m", "🎉"])
def test_invalid_name_is_refused(name: str) -> None:
    core = make()
    err = error(join(core, A, name), A)
    assert err.code == Code.INVALID_NAME
    assert core.member_name(A) is None
    assert core.online == 0
    assert LOBBY not in core.seqs


def test_name_with_a_trailing_newline_is_refused() -> None:
    core = make()
    err = error(join(core, A, "alice\n"), A)
    assert err.code == Code.INVALID_NAME
    assert core.member_name(A) is None


@pytest.mark.parametrize("room", ["bad room", "a/b", "", "#", "-x", "r" * (L.MAX_ROOM_CHARS + 1)])
def test_invalid_room_is_refused(room: str) -> None:
    core = make()
    err = error(join(core, A, "alice", rooms=["lobby", room]), A)
    assert err.code == Code.INVALID_ROOM
    assert core.member_name(A) is None
    assert core.rooms == {}


def test_welcome_lists_a_bounded_number_of_members_but_an_exact_count() -> None:
    core = make()
    total = L.MEMBERS_IN_WELCOME + 3
    for i in range(total - 1):
        ident = f"{i:064x}"
        subscribe_all(core, ident)
        send(core, ident, type="join", name=f"user{i}")
    welcome = join(core, A, "alice")[0].event
    assert welcome.online == total
    assert len(welcome.members) == L.MEMBERS_IN_WELCOME
    assert welcome.members[:2] == ["user0", "user1"]


# --- say ------------------------------------------------------------------------------------


def test_say_publishes_a_message_with_the_registered_name() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, 3.0, type="say", room="lobby", text="hello", ref=12)
    assert kinds(out) == [(LOBBY, "Message")]
    assert out[0].event == Message(seq=2, ts=3.0, room="lobby", name="alice", text="hello", ref=12)


def test_a_forged_name_in_the_body_is_ignored() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    out = send(core, A, type="say", room="lobby", text="I am bob", name="bob", id=B)
    assert len(out) == 1
    assert out[0].event.name == "alice"
    assert out[0].event.text == "I am bob"


def test_say_room_is_normalized() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, type="say", room="#Lobby", text="hi")
    assert kinds(out) == [(LOBBY, "Message")]
    assert out[0].event.room == "lobby"


def test_say_text_is_cleaned_and_trimmed() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, type="say", room="lobby", text="  \x1b[31mred\x1b[0m\u202e and\x07 plain\n ")
    assert out[0].event.text == "red and plain"


def test_say_before_join_is_not_joined() -> None:
    core = make()
    subscribe_all(core, A)
    err = error(send(core, A, type="say", room="lobby", text="hi", ref=5), A)
    assert err.code == Code.NOT_JOINED
    assert err.ref == 5
    assert LOBBY not in core.seqs


@pytest.mark.parametrize("room", ["dev", "bad room", "#elsewhere"])
def test_say_to_a_room_you_are_not_in(room: str) -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="say", room=room, text="hi", ref=3), A)
    assert err.code == Code.NOT_IN_ROOM
    assert err.ref == 3
    assert core.seqs[LOBBY] == 1


@pytest.mark.parametrize("text", [
    "", " ", "   \t  ", "\n\r", "\x00\x07\x1b", "\x1b[2J\x1b[H", "\u202e", "\x9b0m"])
def test_empty_text_is_refused(text: str) -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="say", room="lobby", text=text, ref=1), A)
    assert err.code == Code.EMPTY_TEXT
    assert err.ref == 1
    assert core.seqs[LOBBY] == 1


# --- bad input through the core ----------------------------------------------------------------


@pytest.mark.parametrize("data, frames, code", [
    (b"\xff\xfe", 1, Code.BAD_REQUEST),
    (b"not json", 1, Code.BAD_REQUEST),
    (b"[1]", 1, Code.BAD_REQUEST),
    (b'{"type":"shout"}', 1, Code.BAD_REQUEST),
    (b'{"type":"say","room":"lobby"}', 1, Code.BAD_REQUEST),
    (b'{"type":"say","room":"lobby","text":7}', 1, Code.BAD_REQUEST),
    (b'{"type":"say","room":"lobby","text":"\xff"}', 1, Code.BAD_REQUEST),
    (b" " * (L.MAX_BODY_BYTES + 1), 1, Code.TOO_LARGE),
    (b'{"type":"ping"}', 2, Code.TOO_MANY_FRAMES),
])
def test_bad_input_gets_an_error_on_the_private_stream(data: bytes, frames: int, code: str) -> None:
    core = make()
    joined(core, A, "alice")
    err = error(raw(core, A, data, frames=frames), A)
    assert err.code == code
    assert err.detail
    assert core.member_name(A) == "alice"
    assert core.seqs[LOBBY] == 1


def test_errors_without_a_private_subscription_produce_nothing() -> None:
    core = make()
    assert sub(core, A, SYS) == (True, [])
    assert sub(core, A, LOBBY) == (True, [])
    assert raw(core, A, b"garbage") == []
    assert raw(core, A, b'{"type":"ping"}', frames=3) == []
    assert send(core, A, type="ping") == []
    assert send(core, A, type="say", room="lobby", text="hi") == []
    assert send(core, A, type="join", name="bad name") == []
    assert send(core, A, type="join", name="alice", rooms=["bad room"]) == []
    assert u(A) not in core.seqs
    assert core.seqs == {}


# --- leave and disconnect ------------------------------------------------------------------------


def test_leave_announces_quit_with_the_message_in_every_room() -> None:
    core = make()
    subscribe_all(core, A, topics=(LOBBY, "r/dev/"))
    send(core, A, type="join", name="alice", rooms=["lobby", "dev"])
    joined(core, B, "bob")
    out = send(core, A, 4.0, type="leave", message="bye \x1b[31mall")
    assert kinds(out) == [(LOBBY, "Left"), ("r/dev/", "Left")]
    assert out[0].event == Left(seq=3, ts=4.0, room="lobby", name="alice", reason="quit", message="bye all")
    assert out[1].event == Left(seq=2, ts=4.0, room="dev", name="alice", reason="quit", message="bye all")
    assert core.member_name(A) is None
    assert core.online == 1
    assert "dev" not in core.rooms
    assert core.rooms["lobby"] == {B}


def test_leave_without_message_and_leave_twice() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, type="leave")
    assert [p.event.message for p in out] == [""]
    assert out[0].event.reason == "quit"
    assert send(core, A, type="leave") == []


def test_leave_from_a_non_member_publishes_nothing() -> None:
    core = make()
    subscribe_all(core, A)
    assert send(core, A, type="leave", message="x") == []
    assert core.seqs == {}


def test_after_leave_errors_still_reach_the_peer_and_rejoin_is_immediate() -> None:
    # libzmq keeps the peer's subscriptions until its connection closes.
    core = make()
    joined(core, A, "alice")
    send(core, A, type="leave")
    err = error(send(core, A, type="say", room="lobby", text="hi", ref=2), A)
    assert err.code == Code.NOT_JOINED
    assert err.ref == 2
    out = send(core, A, type="join", name="alice")
    assert kinds(out) == [(u(A), "Welcome"), (LOBBY, "Joined")]
    assert out[1].event.seq == 3  # joined 1, left 2, joined 3
    assert out[0].event.rooms == {"lobby": 2}


def test_disconnect_announces_left_disconnected_and_keeps_the_peer_reachable() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    out = checked(core.on_disconnect(A, 6.0))
    assert kinds(out) == [(LOBBY, "Left")]
    assert out[0].event == Left(seq=3, ts=6.0, room="lobby", name="alice", reason="disconnected")
    assert core.member_name(A) is None
    assert core.online == 1
    joined(core, C, "alice")
    # Only the input connection may have dropped: its SUB is still subscribed, so a
    # ping must still be answered with not_joined (the client then rejoins).
    assert error(send(core, A, 7.0, type="ping"), A).code == Code.NOT_JOINED
    # An identity that stays silent is forgotten after peer_idle_seconds.
    core.tick(8.0 + core.limits.peer_idle_seconds)
    assert A not in core.peers


def test_disconnect_of_a_non_member_or_unknown_identity_publishes_nothing() -> None:
    core = make()
    subscribe_all(core, A)
    assert core.on_disconnect(A, 1.0) == []
    assert core.on_disconnect(B, 1.0) == []
    assert core.seqs == {}


# --- tick: heartbeats, expiry, forgetting ------------------------------------------------------------


def test_heartbeats_on_sys_at_the_interval_with_epoch() -> None:
    core = make(now=100.0, heartbeat_interval=1.0)
    out = checked(core.tick(100.0))
    assert kinds(out) == [(SYS, "Heartbeat")]
    assert out[0].event == Heartbeat(seq=1, ts=100.0, epoch=EPOCH, interval=1.0, online=0)
    assert core.tick(100.4) == []
    assert core.tick(100.99) == []
    joined(core, A, "alice", now=100.99)
    out = checked(core.tick(101.0))
    assert out[0].event == Heartbeat(seq=2, ts=101.0, epoch=EPOCH, interval=1.0, online=1)
    assert core.tick(101.5) == []
    out = checked(core.tick(102.0))
    assert [(p.topic, p.event.seq) for p in out] == [(SYS, 3), (LOBBY, 1)]  # a mark still follows the join


def test_member_silent_longer_than_client_timeout_is_timed_out() -> None:
    core = make(client_timeout=3.0, heartbeat_interval=100.0)
    joined(core, A, "alice", now=0.0)
    joined(core, B, "bob", now=2.0)
    assert kinds(core.tick(0.0)) == [(SYS, "Heartbeat"), (LOBBY, "Mark")]  # the joins made lobby busy
    assert core.tick(1.0) == []
    assert core.tick(3.0) == []  # exactly at the limit: not yet
    out = checked(core.tick(3.6))
    assert kinds(out) == [(LOBBY, "Left")]
    assert out[0].event == Left(seq=3, ts=3.6, room="lobby", name="alice", reason="timeout")
    assert core.member_name(A) is None
    assert core.member_name(B) == "bob"
    assert core.online == 1
    out = checked(core.tick(5.1))
    assert [(p.event.name, p.event.reason) for p in out] == [("bob", "timeout")]
    assert core.tick(10.0) == []


def test_ping_keeps_a_member_alive() -> None:
    core = make(client_timeout=3.0, heartbeat_interval=100.0)
    joined(core, A, "alice", now=0.0)
    core.tick(0.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        assert send(core, A, t, type="ping") == []
        assert core.tick(t + 0.5) == []
    assert core.member_name(A) == "alice"
    assert core.tick(7.9) == []  # last seen at 5.0: 2.9 s of silence
    out = checked(core.tick(8.5))
    assert [(p.event.name, p.event.reason) for p in out] == [("alice", "timeout")]


def test_any_message_keeps_a_member_alive() -> None:
    core = make(client_timeout=3.0, heartbeat_interval=100.0)
    joined(core, A, "alice", now=0.0)
    core.tick(0.0)
    send(core, A, 2.5, type="say", room="lobby", text="still here")
    assert core.tick(4.0) == []
    assert core.member_name(A) == "alice"


def test_ping_from_a_non_member_is_not_joined() -> None:
    core = make()
    subscribe_all(core, A)
    err = error(send(core, A, type="ping"), A)
    assert err.code == Code.NOT_JOINED


def test_ping_from_a_member_publishes_nothing_and_costs_no_token() -> None:
    core = make(rate_burst=2, rate_per_second=0.001)
    joined(core, A, "alice")
    for second in range(10):  # the allowance, every second
        for _ in range(L.PINGS_PER_SECOND):
            assert send(core, A, 1.0 + second, type="ping") == []
    assert kinds(send(core, A, 10.5, type="say", room="lobby", text="hi")) == [(LOBBY, "Message")]


def test_idle_non_member_is_forgotten_after_peer_idle_seconds() -> None:
    core = make(peer_idle_seconds=5.0, heartbeat_interval=100.0)
    assert sub(core, A, SYS, 0.0) == (True, [])
    assert sub(core, B, SYS, 3.0) == (True, [])
    core.tick(0.0)
    assert core.tick(4.9) == []
    assert set(core.peers) == {A, B}
    assert core.tick(5.5) == []
    assert set(core.peers) == {B}
    core.tick(8.5)
    assert core.peers == {}


def test_forgetting_a_peer_resets_its_private_sequence() -> None:
    core = make(peer_idle_seconds=5.0, heartbeat_interval=100.0)
    sub(core, A, u(A))
    assert error(raw(core, A, b"x"), A).seq == 1
    assert error(raw(core, A, b"x"), A).seq == 2
    core.tick(0.0)
    core.tick(6.0)
    assert A not in core.peers
    assert u(A) not in core.seqs


def test_members_are_not_forgotten_as_idle() -> None:
    core = make(peer_idle_seconds=1.0, client_timeout=100.0, heartbeat_interval=1000.0)
    joined(core, A, "alice")
    core.tick(0.0)
    assert core.tick(50.0) == []
    assert core.member_name(A) == "alice"


def test_timed_out_member_is_later_forgotten() -> None:
    core = make(client_timeout=1.0, peer_idle_seconds=4.0, heartbeat_interval=1000.0)
    joined(core, A, "alice")
    core.tick(0.0)
    assert len(core.tick(1.5)) == 1
    assert A in core.peers
    core.tick(4.5)
    assert A not in core.peers


# --- subscription policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["", "u/", f"u/{B}/", f"u/{A}", f"u/{A}/x/", "u/x/", "x/", "r/bad room/",
                                   "r", "sys", "r/a/b/", "r/lobby", "sys/x/", "u"])
def test_subscriptions_refused(topic: str) -> None:
    core = make()
    assert sub(core, A, topic) == (False, [])
    peer = core.peers.get(A)
    assert peer is None or topic not in peer.topics


@pytest.mark.parametrize("topic", ["sys/", "r/", "r/lobby/", "r/dev-ops/", f"u/{A}/"])
def test_subscriptions_allowed(topic: str) -> None:
    core = make()
    assert sub(core, A, topic) == (True, [])
    assert topic in core.peers[A].topics


def test_identity_none_is_refused_and_ignored() -> None:
    core = make()
    assert sub(core, None, SYS) == (False, [])
    assert raw(core, None, body(type="join", name="alice")) == []
    assert raw(core, None, b"garbage") == []
    core.on_unsubscribe(None, SYS)
    assert core.peers == {}
    assert core.seqs == {}
    assert core.online == 0


def test_unsubscribe_forgets_the_topic() -> None:
    core = make()
    sub(core, A, u(A))
    core.on_unsubscribe(A, u(A))
    assert u(A) not in core.peers[A].topics
    assert raw(core, A, b"garbage") == []  # errors would reach nobody now


# --- sequence numbers --------------------------------------------------------------------------------


def test_sequence_numbers_are_per_topic_and_consecutive() -> None:
    core = make(rate_burst=100, heartbeat_interval=1.0)
    subscribe_all(core, A, topics=(LOBBY, "r/dev/"))
    send(core, A, type="join", name="alice", rooms=["lobby", "dev"])
    joined(core, B, "bob")
    seen: dict[str, list[int]] = {}
    out: list[Publish] = []
    out += core.tick(0.0)
    for i in range(5):
        t = 0.5 + i
        out += send(core, A, t, type="say", room="lobby", text=f"l{i}")
        out += send(core, A, t, type="say", room="dev", text=f"d{i}")
        out += send(core, B, t, type="say", room="lobby", text=f"b{i}")
        out += send(core, B, t, type="say", room="dev", text="not in dev")  # error on u/B/
        out += core.tick(1.0 + i)
    assert [type(p.event).__name__ for p in out].count("Left") == 0
    for pub in checked(out):
        if type(pub.event).__name__ != "Mark":  # marks repeat a seq: tested below
            seen.setdefault(pub.topic, []).append(pub.event.seq)
    assert seen[LOBBY] == list(range(3, 13))      # joined alice 1, joined bob 2
    assert seen["r/dev/"] == list(range(2, 7))    # joined alice 1
    assert seen[u(B)] == list(range(2, 7))        # welcome 1
    assert seen[SYS] == list(range(1, 7))
    assert u(A) not in seen
    assert core.seqs == {LOBBY: 12, "r/dev/": 6, u(A): 1, u(B): 6, SYS: 6}


# --- rate limit ---------------------------------------------------------------------------------------


def test_rate_limit_one_error_then_silence_then_refill() -> None:
    core = make(rate_burst=3, rate_per_second=2.0)
    joined(core, A, "alice", now=0.0)                                 # joins are free
    for i in range(3):                                                 # tokens 1, 2, 3
        assert kinds(send(core, A, type="say", room="lobby", text=f"m{i}")) == [(LOBBY, "Message")]
    err = error(send(core, A, type="say", room="lobby", text="x"), A)
    assert err.code == Code.RATE_LIMITED
    for _ in range(5):
        assert send(core, A, type="say", room="lobby", text="x") == []
    assert send(core, A, 0.4, type="say", room="lobby", text="x") == []  # 0.8 token: not yet
    out = send(core, A, 0.5, type="say", room="lobby", text="refilled")  # 1.0 token
    assert kinds(out) == [(LOBBY, "Message")]
    assert out[0].event.text == "refilled"
    assert error(send(core, A, 0.5, type="say", room="lobby", text="x"), A).code == Code.RATE_LIMITED
    assert send(core, A, 0.5, type="say", room="lobby", text="x") == []
    assert core.seqs[LOBBY] == 5  # joined + 4 messages
    assert core.seqs[u(A)] == 3   # welcome + 2 rate_limited errors


def test_rate_limit_refill_is_capped_at_the_burst() -> None:
    core = make(rate_burst=3, rate_per_second=2.0)
    joined(core, A, "alice", now=0.0)
    results = [kinds(send(core, A, 1000.0, type="say", room="lobby", text="x")) for _ in range(5)]
    assert results == [[(LOBBY, "Message")]] * 3 + [[(u(A), "Error")], []]


def test_joins_waiting_for_subscriptions_and_the_first_are_free_repeats_are_charged() -> None:
    core = make(rate_burst=2, rate_per_second=1.0)
    sub(core, A, u(A))
    for _ in range(5):  # clients resend joins until welcomed: waiting costs nothing
        assert send(core, A, type="join", name="alice") == []
    sub(core, A, SYS)
    _, out = sub(core, A, LOBBY)
    assert kinds(out) == [(u(A), "Welcome"), (LOBBY, "Joined")]  # the completing join: free
    assert kinds(send(core, A, type="join", name="alice")) == [(u(A), "Welcome")]  # token 1
    assert kinds(send(core, A, type="join", name="alicia")) == [(LOBBY, "Renamed"), (u(A), "Welcome")]
    assert error(send(core, A, type="join", name="alice"), A).code == Code.RATE_LIMITED
    assert send(core, A, type="leave") == []  # already told: silence
    assert core.member_name(A) == "alicia"


def test_rate_limit_applies_to_bad_input_then_goes_silent() -> None:
    core = make(rate_burst=2, rate_per_second=1.0)
    sub(core, A, u(A))
    assert error(raw(core, A, b"junk"), A).code == Code.BAD_REQUEST
    assert error(raw(core, A, b"junk"), A).code == Code.BAD_REQUEST
    assert error(raw(core, A, b"junk"), A).code == Code.RATE_LIMITED
    for _ in range(5):
        assert raw(core, A, b"junk") == []
    assert core.seqs[u(A)] == 3


def test_rate_limits_are_per_identity() -> None:
    core = make(rate_burst=2, rate_per_second=1.0)
    joined(core, A, "alice")
    joined(core, B, "bob")
    send(core, A, type="say", room="lobby", text="a1")
    send(core, A, type="say", room="lobby", text="a2")
    assert error(send(core, A, type="say", room="lobby", text="a3"), A).code == Code.RATE_LIMITED
    assert kinds(send(core, B, type="say", room="lobby", text="b1")) == [(LOBBY, "Message")]


# --- bounds -------------------------------------------------------------------------------------------


def test_max_peers_bound() -> None:
    core = make(max_peers=2)
    joined(core, A, "alice")
    assert sub(core, B, SYS) == (True, [])
    assert sub(core, C, SYS) == (True, [])  # B had not joined: it made room
    assert set(core.peers) == {A, C}
    assert len(core.peers) <= 2


def test_full_of_members_a_new_key_is_turned_away() -> None:
    core = make(max_peers=2)
    joined(core, A, "alice")
    joined(core, B, "bob")
    assert core.room_for_new_key() is False
    assert sub(core, C, SYS) == (False, [])
    assert raw(core, C, body(type="join", name="carol")) == []
    assert set(core.peers) == {A, B}
    assert core.turned_away == 2
    assert core.take_evictions() == []  # members are never evicted
    core.on_message(A, body(type="leave"), 1, 1.0)  # alice leaves: her place can be taken
    assert core.room_for_new_key() is True
    assert sub(core, C, SYS, 1.0) == (True, [])
    assert set(core.peers) == {B, C}


def test_the_non_member_idle_longest_is_evicted_told_and_cut() -> None:
    core = make(max_peers=3)
    joined(core, A, "alice")
    assert sub(core, B, u(B), 1.0) == (True, [])  # B subscribed its stream: it can be told
    assert sub(core, C, SYS, 2.0) == (True, [])
    send(core, B, 3.0, type="ping")  # B was active last: C is now the one idle longest
    assert sub(core, D, SYS, 4.0) == (True, [])
    assert set(core.peers) == {A, B, D}
    assert checked(core.take_evictions()) == []  # C had no private stream to be told on
    assert core.evictions == []
    assert sub(core, C, SYS, 5.0) == (True, [])  # C again: now B is idle longest
    evictions = core.take_evictions()
    assert [type(item).__name__ for item in evictions] == ["Publish", "Disconnect"]
    assert error(checked(evictions), B).code == Code.BUSY
    assert evictions[1].identity == B
    assert set(core.peers) == {A, C, D}
    assert core.evicted_total == 2


def test_a_joiner_resending_its_join_outlives_a_flood_of_new_keys() -> None:
    core = make(max_peers=10)
    assert sub(core, A, SYS) == (True, [])
    assert send(core, A, 0.0, type="join", name="alice") == []  # waits for its subscriptions
    now = 0.0
    for n in range(200):  # throwaway keys, a handshake and a ping each
        now += 0.01
        key = f"{n:064x}"
        sub(core, key, SYS, now)
        send(core, key, now, type="ping")
        if n % 5 == 4:  # the joining client resends its join (fewer new keys meanwhile than places)
            assert send(core, A, now, type="join", name="alice") == []
        assert core.peers[A].pending_join is not None
    assert sub(core, A, u(A), now) == (True, [])
    ok, out = sub(core, A, LOBBY, now)
    assert [type(p.event) for p in out] == [Welcome, Joined]
    assert len(core.peers) == 10
    assert core.evicted_total == 200 - 9  # every throwaway key but the 9 newest


def test_max_topics_per_peer_bound() -> None:
    core = make(max_topics_per_peer=2)
    assert sub(core, A, SYS) == (True, [])
    assert sub(core, A, u(A)) == (True, [])
    assert sub(core, A, LOBBY) == (False, [])
    assert sub(core, A, SYS) == (True, [])  # already held: still fine
    assert core.peers[A].topics == {SYS, u(A)}
    core.on_unsubscribe(A, SYS)
    assert sub(core, A, LOBBY) == (True, [])
    assert core.peers[A].topics == {u(A), LOBBY}


# --- shutdown -----------------------------------------------------------------------------------------


def test_shutdown_publishes_on_sys() -> None:
    core = make(heartbeat_interval=1.0)
    core.tick(0.0)
    out = checked(core.shutdown(9.5, "broker stopping"))
    assert kinds(out) == [(SYS, "Shutdown")]
    assert out[0].event == Shutdown(seq=2, ts=9.5, epoch=EPOCH, detail="broker stopping")


def test_marks_repeat_the_last_seq_of_busy_rooms_once_per_heartbeat() -> None:
    core = make(heartbeat_interval=1.0, client_timeout=100.0)
    joined(core, A, "alice")
    core.tick(0.0)  # the join's mark
    send(core, A, 0.2, type="say", room="lobby", text="one")
    send(core, A, 0.3, type="say", room="lobby", text="two")
    out = checked(core.tick(1.0))
    marks = [p for p in out if p.topic != SYS]
    assert [(p.topic, type(p.event).__name__, p.event.seq) for p in marks] == [(LOBBY, "Mark", 3)]
    assert core.seqs[LOBBY] == 3  # a mark takes no number
    # Repeated for a few heartbeats after the room's last event (a mark may be lost too)...
    assert [p.topic for p in checked(core.tick(2.0))] == [SYS, LOBBY]
    assert [p.topic for p in checked(core.tick(3.0))] == [SYS, LOBBY]
    assert [p.topic for p in checked(core.tick(4.0))] == [SYS]  # ...then idle rooms cost nothing
