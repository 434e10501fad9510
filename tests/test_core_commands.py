"""Unit tests of zchat.core.BrokerCore's conversation commands: pure, explicit `now` values.

say, me, msg, nick, who, rooms, enter, part and leave, each with its errors. The helpers
are copied from tests/test_core.py (which does not expose them as a module).
"""

from __future__ import annotations

import pytest
from corekit import BOX, LOBBY, SELF_BOX, SYS, body, checked, dm, error, kinds, send, sub, subscribe_all, u

from zchat import limits as L
from zchat.core import BrokerCore, DeliverMail, Limits, Mail, Publish
from zchat.protocol import (
    Action,
    Code,
    Direct,
    Error,
    Joined,
    KeyReply,
    Left,
    Message,
    Renamed,
    RoomList,
    Welcome,
    WhoReply,
)

A = "a1" * 32
B = "b2" * 32
C = "c3" * 32
D = "d4" * 32
EPOCH = "epoch-1"
EVERY_ROOM = "r/"


def r(room: str) -> str:
    return f"r/{room}/"


def make(now: float = 0.0, **limits: float) -> BrokerCore:
    """A core whose rate limit stays out of the way unless a test sets it."""
    limits.setdefault("rate_burst", 100_000)
    return BrokerCore(EPOCH, now, Limits(**limits))  # type: ignore[arg-type]


def joined(core: BrokerCore, identity: str, name: str, now: float = 0.0,
           rooms: tuple[str, ...] = ("lobby",)) -> list[Publish]:
    """Subscribe to sys/, u/<id>/ and each room, join, and check it completed."""
    subscribe_all(core, identity, now, topics=tuple(r(room) for room in rooms))
    out = send(core, identity, now, type="join", name=name, rooms=list(rooms))
    assert kinds(out) == [(u(identity), "Welcome")] + [(r(room), "Joined") for room in rooms]
    assert core.member_name(identity) == name
    return out


def rooms_of(core: BrokerCore, identity: str) -> list[str]:
    member = core.peers[identity].member
    assert member is not None
    return list(member.rooms)


def ident(i: int) -> str:
    return f"{i:064x}"


# --- join: arrival and resumption --------------------------------------------------------------


def test_first_join_announces_arrival_in_the_chat() -> None:
    core = make()
    out = joined(core, A, "alice", now=1.0)
    assert out[0].event.resumed is False
    assert out[1].event == Joined(seq=1, ts=1.0, room="lobby", name="alice", chat=True, key=A)


def test_first_join_in_several_rooms_announces_arrival_in_each() -> None:
    core = make()
    out = joined(core, A, "alice", rooms=("lobby", "rust"))
    assert [(p.event.room, p.event.chat) for p in out[1:]] == [("lobby", True), ("rust", True)]


def test_rejoin_is_a_resumed_welcome_without_a_new_joined() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    out = send(core, A, 2.0, type="join", name="alice", rooms=["lobby"])
    assert kinds(out) == [(u(A), "Welcome")]
    welcome = out[0].event
    assert isinstance(welcome, Welcome)
    assert welcome.resumed is True
    assert welcome.name == "alice"
    assert welcome.rooms == {"lobby": 2}
    assert core.seqs[LOBBY] == 2


def test_rejoin_with_an_extra_room_enters_it_as_one_more_room() -> None:
    core = make()
    joined(core, A, "alice")
    sub(core, A, r("rust"))
    out = send(core, A, type="join", name="alice", rooms=["lobby", "rust"])
    assert kinds(out) == [(u(A), "Welcome"), (r("rust"), "Joined")]
    assert out[0].event.resumed is True
    assert out[1].event.chat is False


# --- say ---------------------------------------------------------------------------------------


def test_say_in_a_second_room_goes_to_that_room_only() -> None:
    core = make()
    joined(core, A, "alice", rooms=("lobby", "rust"))
    out = send(core, A, 3.0, type="say", room="#Rust", text="fearless", ref=4)
    assert kinds(out) == [(r("rust"), "Message")]
    assert out[0].event == Message(seq=2, ts=3.0, room="rust", name="alice", text="fearless", ref=4)


def test_say_not_in_room() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob", rooms=("rust",))
    err = error(send(core, A, type="say", room="rust", text="hi", ref=9), A)
    assert err.code == Code.NOT_IN_ROOM
    assert err.ref == 9
    assert core.seqs[r("rust")] == 1


def test_say_empty_text() -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="say", room="lobby", text=" \x1b[2J ", ref=2), A)
    assert err.code == Code.EMPTY_TEXT
    assert err.ref == 2


# --- me ----------------------------------------------------------------------------------------


def test_me_publishes_an_action_in_the_room() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, 5.0, type="me", room="lobby", text=" waves\x07 ", ref=7)
    assert kinds(out) == [(LOBBY, "Action")]
    assert out[0].event == Action(seq=2, ts=5.0, room="lobby", name="alice", text="waves", ref=7)


def test_me_without_ref() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, type="me", room="LOBBY", text="waves")
    assert out[0].event.ref is None
    assert out[0].event.room == "lobby"


@pytest.mark.parametrize("text", ["", "   ", "\x1b[31m", "\u202e\x07"])
def test_me_with_empty_text(text: str) -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="me", room="lobby", text=text, ref=3), A)
    assert err.code == Code.EMPTY_TEXT
    assert err.ref == 3
    assert core.seqs[LOBBY] == 1


@pytest.mark.parametrize("room", ["rust", "bad room", "#nowhere"])
def test_me_not_in_room(room: str) -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="me", room=room, text="waves", ref=6), A)
    assert err.code == Code.NOT_IN_ROOM
    assert err.ref == 6
    assert core.seqs[LOBBY] == 1


# --- msg ---------------------------------------------------------------------------------------


def test_msg_is_published_only_on_the_two_private_streams() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    joined(core, C, "carol")
    seqs_before = dict(core.seqs)
    out = send(core, A, 4.0, **dm("bob", B, ref=11))
    assert kinds(out) == [(u(A), "Direct"), (u(B), "Direct")]
    for pub in out:
        assert pub.topic.startswith("u/")
        assert not pub.topic.startswith("r/")
        assert pub.topic != SYS
    sender_copy, recipient_copy = out[0].event, out[1].event
    # Each reader gets the box sealed for it, and the key that sealed it.
    assert sender_copy == Direct(seq=2, ts=4.0, name="alice", to="bob", from_=A, box=SELF_BOX, ref=11)
    assert recipient_copy == Direct(seq=2, ts=4.0, name="alice", to="bob", from_=A, box=BOX)
    assert recipient_copy.ref is None
    # Nothing else moved: no room, no sys/, not carol.
    changed = {topic for topic, seq in core.seqs.items() if seqs_before.get(topic) != seq}
    assert changed == {u(A), u(B)}


def test_msg_recipient_name_is_case_insensitive_and_canonical() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "Bob")
    out = send(core, A, **dm("BOB", B))
    assert kinds(out) == [(u(A), "Direct"), (u(B), "Direct")]
    assert [p.event.to for p in out] == ["Bob", "Bob"]


def test_msg_reaches_a_member_in_no_shared_room() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob", rooms=("rust",))
    out = send(core, A, **dm("bob", B))
    assert kinds(out) == [(u(A), "Direct"), (u(B), "Direct")]


@pytest.mark.parametrize("to", ["nobody", "bad name", "dave"])
def test_msg_to_unknown_name_is_no_such_user_to_the_sender_only(to: str) -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    seqs_before = dict(core.seqs)
    err = error(send(core, A, **dm(to, B, ref=8)), A)
    assert err.code == Code.NO_SUCH_USER
    assert err.ref == 8
    assert "no key to encrypt to" in err.detail
    assert core.seqs == {**seqs_before, u(A): seqs_before[u(A)] + 1}


def test_msg_to_someone_who_left_is_kept_for_their_key() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    send(core, B, type="leave")
    core.on_disconnect(B, 1.0)
    out = core.on_message(A, body(**dm("bob", B, ref=1)), 1, 2.0)
    assert checked(out) == []  # the shell answers the sender once the mailbox has taken it
    [mail] = [item for item in out if isinstance(item, Mail)]
    assert (mail.recipient, mail.sender) == (B, A)
    assert mail.event == Direct(seq=0, ts=2.0, name="alice", to="bob", from_=A, box=BOX, offline=True)
    assert mail.copy == Direct(seq=0, ts=2.0, name="alice", to="bob", from_=A, box=SELF_BOX, ref=1,
                               offline=True)
    # A name nobody ever held is an error, to the sender only.
    assert error(send(core, A, **dm("ghost", B)), A).code == Code.NO_SUCH_USER


def test_msg_to_yourself_is_published_once() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, 2.0, **dm("ALICE", A, ref=3))
    assert kinds(out) == [(u(A), "Direct")]
    assert out[0].event == Direct(seq=2, ts=2.0, name="alice", to="alice", from_=A, box=SELF_BOX, ref=3)


# --- keys and end-to-end binding -------------------------------------------------------------


def test_key_request_answers_the_key_bound_to_a_name() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "Bob")
    out = send(core, A, 3.0, type="key", name="BOB", ref=4)
    assert kinds(out) == [(u(A), "KeyReply")]
    assert out[0].event == KeyReply(seq=2, ts=3.0, name="Bob", key=B, online=True, ref=4)
    send(core, B, type="leave")  # offline: the key that held the name last
    out = send(core, A, 4.0, type="key", name="bob", ref=5)
    assert out[0].event == KeyReply(seq=3, ts=4.0, name="bob", key=B, online=False, ref=5)


def test_key_request_for_a_name_nobody_held_is_no_such_user() -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="key", name="dave", ref=6), A)
    assert (err.code, err.ref) == (Code.NO_SUCH_USER, 6)
    assert "nobody of that name has been here" in err.detail


def test_key_request_needs_a_join() -> None:
    core = make()
    subscribe_all(core, A)
    assert error(send(core, A, type="key", name="alice", ref=1), A).code == Code.NOT_JOINED


def test_msg_sealed_to_a_key_that_lost_the_name_is_refused_with_the_new_key() -> None:
    """mallory took the name bob while bob was away: what alice sealed to bob's key goes to
    nobody, and alice learns which key holds the name now (to re-seal, after a warning)."""
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    send(core, B, type="leave")
    joined(core, D, "bob")  # mallory's key
    seqs_before = dict(core.seqs)
    out = send(core, A, 5.0, **dm("BOB", B, ref=9))
    assert kinds(out) == [(u(A), "Error")]
    assert out[0].event == Error(seq=seqs_before[u(A)] + 1, ts=5.0, code=Code.KEY_CHANGED, ref=9,
                                 key=D,
                                 detail="bob's key changed: another key holds that name now")
    assert core.seqs == {**seqs_before, u(A): seqs_before[u(A)] + 1}  # nothing reached mallory
    # Offline now too: the binding is the last holder's key, mallory's, and still not bob's.
    send(core, D, type="leave")
    out = core.on_message(A, body(**dm("bob", B, ref=10)), 1, 6.0)
    assert not any(isinstance(item, Mail) for item in out)
    assert error(checked(out), A).key == D
    # Sealed to the key bound now, it is kept for that key only.
    [mail] = [item for item in core.on_message(A, body(**dm("bob", D)), 1, 7.0) if isinstance(item, Mail)]
    assert mail.recipient == D


def test_mail_kept_for_a_key_is_delivered_to_that_key_not_to_the_next_holder_of_the_name() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    send(core, B, type="leave")
    [mail] = [item for item in core.on_message(A, body(**dm("bob", B)), 1, 2.0) if isinstance(item, Mail)]
    assert mail.recipient == B
    subscribe_all(core, D, 3.0)
    out = core.on_message(D, body(type="join", name="bob"), 1, 3.0)  # mallory takes the name
    assert DeliverMail(D) in out and DeliverMail(B) not in out  # the store has nothing for D
    send(core, D, type="leave")
    out = core.on_message(B, body(type="join", name="robert"), 1, 4.0)  # bob's key, any name
    assert DeliverMail(B) in out


# --- nick --------------------------------------------------------------------------------------


def test_nick_renames_in_every_room_of_the_member() -> None:
    core = make()
    joined(core, A, "alice", rooms=("lobby", "rust", "go"))
    joined(core, B, "bob")
    out = send(core, A, 6.0, type="nick", name="alicia")
    assert kinds(out) == [(LOBBY, "Renamed"), (r("rust"), "Renamed"), (r("go"), "Renamed")]
    assert out[0].event == Renamed(seq=3, ts=6.0, room="lobby", old="alice", new="alicia")
    assert out[1].event == Renamed(seq=2, ts=6.0, room="rust", old="alice", new="alicia")
    assert out[2].event == Renamed(seq=2, ts=6.0, room="go", old="alice", new="alicia")
    assert core.member_name(A) == "alicia"
    assert core.online == 2


def test_nick_with_no_rooms_tells_the_member_privately() -> None:
    core = make()
    joined(core, A, "alice")
    send(core, A, type="part", room="lobby")
    out = send(core, A, 2.0, type="nick", name="alicia")
    assert kinds(out) == [(u(A), "Renamed")]
    assert out[0].event.old == "alice"
    assert out[0].event.new == "alicia"
    assert out[0].event.room == ""


def test_after_nick_the_old_name_is_free_and_the_new_one_taken() -> None:
    core = make()
    joined(core, A, "alice")
    send(core, A, type="nick", name="alicia")
    joined(core, B, "alice")  # the old name is free for someone else
    subscribe_all(core, C)
    err = error(send(core, C, type="join", name="ALICIA"), C)
    assert err.code == Code.NAME_TAKEN
    assert error(send(core, B, type="nick", name="alicia"), B).code == Code.NAME_TAKEN
    # Messages now carry the new name, and the new name is how to reach the member.
    assert send(core, A, type="say", room="lobby", text="hi")[0].event.name == "alicia"
    out = send(core, B, **dm("alicia", A))
    assert kinds(out) == [(u(B), "Direct"), (u(A), "Direct")]
    assert out[0].event.name == "alice"
    who = send(core, C, type="who")
    assert error(who, C).code == Code.NOT_JOINED  # carol never joined


def test_nick_to_a_taken_name_is_refused() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    for name in ("bob", "BOB", "Bob"):
        err = error(send(core, A, type="nick", name=name), A)
        assert err.code == Code.NAME_TAKEN
        assert name in err.detail
    assert core.member_name(A) == "alice"
    assert core.member_name(B) == "bob"
    assert core.seqs[LOBBY] == 2


@pytest.mark.parametrize("name", ["", "a b", "-x", "_x", ".x", "a/b", "x\x1b[31m", "alice\n", "🎉"])
def test_nick_to_an_invalid_name_is_refused(name: str) -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="nick", name=name), A)
    assert err.code == Code.INVALID_NAME
    assert "\x1b" not in err.detail
    assert core.member_name(A) == "alice"
    assert core.seqs[LOBBY] == 1


def test_nick_to_the_same_name_does_nothing() -> None:
    core = make()
    joined(core, A, "alice")
    assert send(core, A, type="nick", name="alice") == []
    assert core.member_name(A) == "alice"
    assert core.seqs == {LOBBY: 1, u(A): 1}


def test_nick_changing_only_case_is_allowed_and_keeps_the_name_held() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, type="nick", name="Alice")
    assert kinds(out) == [(LOBBY, "Renamed")]
    assert (out[0].event.old, out[0].event.new) == ("alice", "Alice")
    assert core.member_name(A) == "Alice"
    assert core.online == 1
    subscribe_all(core, B)
    assert error(send(core, B, type="join", name="alice"), B).code == Code.NAME_TAKEN


def test_nick_to_a_free_name_then_back() -> None:
    core = make()
    joined(core, A, "alice")
    send(core, A, type="nick", name="alicia")
    out = send(core, A, type="nick", name="alice")
    assert kinds(out) == [(LOBBY, "Renamed")]
    assert (out[0].event.old, out[0].event.new) == ("alicia", "alice")
    assert core.names == {"alice": A}


# --- who ---------------------------------------------------------------------------------------


def test_who_lists_everyone_online_sorted() -> None:
    core = make()
    joined(core, C, "carol", rooms=("rust",))
    joined(core, A, "alice")
    joined(core, B, "bob", rooms=("go",))
    out = send(core, A, 3.0, type="who", ref=21)
    assert kinds(out) == [(u(A), "WhoReply")]
    assert out[0].event == WhoReply(seq=2, ts=3.0, room=None, names=["alice", "bob", "carol"], count=3,
                                    ref=21)


def test_who_in_a_room() -> None:
    core = make()
    joined(core, A, "alice", rooms=("lobby", "rust"))
    joined(core, B, "bob")
    joined(core, C, "carol", rooms=("rust",))
    out = send(core, B, type="who", room="#Rust", ref=2)
    assert kinds(out) == [(u(B), "WhoReply")]
    reply = out[0].event
    assert (reply.room, reply.names, reply.count, reply.ref) == ("rust", ["alice", "carol"], 2, 2)


def test_who_in_an_unknown_room_is_empty() -> None:
    core = make()
    joined(core, A, "alice")
    reply = send(core, A, type="who", room="nowhere")[0].event
    assert isinstance(reply, WhoReply)
    assert (reply.room, reply.names, reply.count) == ("nowhere", [], 0)


def test_who_in_an_invalid_room() -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="who", room="bad room", ref=4), A)
    assert err.code == Code.INVALID_ROOM
    assert err.ref == 4


def test_who_does_not_list_those_who_left() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob")
    send(core, B, type="leave")
    assert send(core, A, type="who")[0].event.names == ["alice"]
    assert send(core, A, type="who", room="lobby")[0].event.names == ["alice"]


def test_who_names_are_capped_but_the_count_is_exact() -> None:
    core = make()
    total = L.MAX_NAMES_IN_REPLY + 7
    for i in range(total):
        joined(core, ident(i), f"user{i:04d}", rooms=("lobby",) if i % 2 else ("lobby", "rust"))
    reply = send(core, ident(0), type="who")[0].event
    assert reply.count == total
    assert len(reply.names) == L.MAX_NAMES_IN_REPLY
    assert reply.names == [f"user{i:04d}" for i in range(L.MAX_NAMES_IN_REPLY)]
    in_lobby = send(core, ident(0), type="who", room="lobby")[0].event
    assert (len(in_lobby.names), in_lobby.count) == (L.MAX_NAMES_IN_REPLY, total)
    in_rust = send(core, ident(0), type="who", room="rust")[0].event
    assert in_rust.count == len(in_rust.names) == (total + 1) // 2


# --- rooms -------------------------------------------------------------------------------------


def test_rooms_lists_sizes_biggest_first_then_by_name() -> None:
    core = make()
    joined(core, A, "alice", rooms=("lobby", "rust", "go"))
    joined(core, B, "bob", rooms=("lobby", "zig", "go"))
    joined(core, C, "carol", rooms=("lobby", "ada"))
    out = send(core, C, 7.0, type="rooms", ref=13)
    assert kinds(out) == [(u(C), "RoomList")]
    reply = out[0].event
    assert reply == RoomList(seq=2, ts=7.0, rooms={"lobby": 3, "go": 2, "ada": 1, "rust": 1, "zig": 1},
                             count=5, ref=13)
    assert list(reply.rooms) == ["lobby", "go", "ada", "rust", "zig"]


def test_rooms_forgets_empty_rooms() -> None:
    core = make()
    joined(core, A, "alice", rooms=("lobby", "rust"))
    send(core, A, type="part", room="rust")
    assert send(core, A, type="rooms")[0].event.rooms == {"lobby": 1}


def test_rooms_are_capped_but_the_count_is_exact() -> None:
    core = make()
    per_member = L.MAX_ROOMS_PER_JOIN
    total = L.MAX_ROOMS_IN_REPLY + 5
    names = [f"room{i:04d}" for i in range(total)]
    for m, start in enumerate(range(0, total, per_member)):
        joined(core, ident(m), f"user{m}", rooms=tuple(names[start:start + per_member]))
    joined(core, A, "alice", rooms=("zzz",))
    joined(core, B, "bob", rooms=("zzz",))
    reply = send(core, A, type="rooms")[0].event
    assert reply.count == total + 1
    assert len(reply.rooms) == L.MAX_ROOMS_IN_REPLY
    assert list(reply.rooms) == ["zzz", *names[:L.MAX_ROOMS_IN_REPLY - 1]]
    assert reply.rooms["zzz"] == 2


# --- enter -------------------------------------------------------------------------------------


def test_enter_after_subscribing_completes_at_once() -> None:
    core = make()
    joined(core, A, "alice")
    assert sub(core, A, r("rust")) == (True, [])
    out = send(core, A, 2.0, type="enter", room="#Rust")
    assert kinds(out) == [(r("rust"), "Joined")]
    assert out[0].event == Joined(seq=1, ts=2.0, room="rust", name="alice", chat=False, key=A)
    assert rooms_of(core, A) == ["lobby", "rust"]
    assert core.rooms["rust"] == {A}


def test_enter_before_subscribing_waits_for_the_subscription() -> None:
    core = make()
    joined(core, A, "alice")
    assert send(core, A, type="enter", room="rust") == []
    assert rooms_of(core, A) == ["lobby"]
    assert "rust" not in core.rooms
    # Unrelated subscriptions do not complete it.
    assert sub(core, A, r("go")) == (True, [])
    assert rooms_of(core, A) == ["lobby"]
    ok, out = sub(core, A, r("rust"), 3.0)
    assert ok is True
    assert kinds(out) == [(r("rust"), "Joined")]
    assert out[0].event == Joined(seq=1, ts=3.0, room="rust", name="alice", chat=False, key=A)
    assert rooms_of(core, A) == ["lobby", "rust"]
    # Only once.
    assert sub(core, A, r("rust")) == (True, [])
    assert sub(core, A, SYS) == (True, [])


def test_enter_with_every_room_subscribed_completes_at_once() -> None:
    core = make()
    joined(core, A, "alice")
    sub(core, A, EVERY_ROOM)
    out = send(core, A, type="enter", room="rust")
    assert kinds(out) == [(r("rust"), "Joined")]
    assert out[0].event.chat is False


def test_enter_pending_then_every_room_subscription_completes_it() -> None:
    core = make()
    joined(core, A, "alice")
    assert send(core, A, type="enter", room="rust") == []
    assert send(core, A, type="enter", room="go") == []
    ok, out = sub(core, A, EVERY_ROOM)
    assert ok is True
    assert kinds(out) == [(r("rust"), "Joined"), (r("go"), "Joined")]
    assert rooms_of(core, A) == ["lobby", "rust", "go"]


def test_enter_is_announced_to_the_others_in_that_room_only() -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob", rooms=("lobby", "rust"))
    sub(core, A, r("rust"))
    out = send(core, A, type="enter", room="rust")
    assert kinds(out) == [(r("rust"), "Joined")]
    assert core.seqs[LOBBY] == 2
    assert core.rooms["rust"] == {A, B}


def test_enter_a_room_you_are_already_in() -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="enter", room="#LOBBY"), A)
    assert err.code == Code.ALREADY_IN_ROOM
    assert rooms_of(core, A) == ["lobby"]


@pytest.mark.parametrize("room", ["bad room", "", "#", "-x", "a/b", "r" * (L.MAX_ROOM_CHARS + 1)])
def test_enter_an_invalid_room(room: str) -> None:
    core = make()
    joined(core, A, "alice")
    err = error(send(core, A, type="enter", room=room), A)
    assert err.code == Code.INVALID_ROOM
    assert rooms_of(core, A) == ["lobby"]


def test_enter_too_many_rooms() -> None:
    core = make()
    joined(core, A, "alice")
    sub(core, A, EVERY_ROOM)
    for i in range(L.MAX_ROOMS_PER_MEMBER - 1):
        assert kinds(send(core, A, type="enter", room=f"room{i}")) == [(r(f"room{i}"), "Joined")]
    assert len(rooms_of(core, A)) == L.MAX_ROOMS_PER_MEMBER
    err = error(send(core, A, type="enter", room="onemore"), A)
    assert err.code == Code.TOO_MANY_ROOMS
    assert "onemore" not in core.rooms
    send(core, A, type="part", room="room0")
    assert kinds(send(core, A, type="enter", room="onemore")) == [(r("onemore"), "Joined")]


def test_enter_too_many_rooms_counts_pending_rooms() -> None:
    core = make()
    joined(core, A, "alice")
    for i in range(L.MAX_ROOMS_PER_MEMBER - 1):
        assert send(core, A, type="enter", room=f"room{i}") == []  # none subscribed yet
    assert error(send(core, A, type="enter", room="onemore"), A).code == Code.TOO_MANY_ROOMS
    assert rooms_of(core, A) == ["lobby"]


def test_rejoin_cannot_exceed_the_room_limit() -> None:
    # A member at MAX_ROOMS_PER_MEMBER must not get around the limit by re-sending
    # its join with more rooms (each re-join may add MAX_ROOMS_PER_JOIN rooms).
    core = make()
    joined(core, A, "alice")
    sub(core, A, EVERY_ROOM)
    for i in range(L.MAX_ROOMS_PER_MEMBER - 1):
        send(core, A, type="enter", room=f"room{i}")
    assert len(rooms_of(core, A)) == L.MAX_ROOMS_PER_MEMBER
    extra = [f"extra{i}" for i in range(L.MAX_ROOMS_PER_JOIN)]
    out = send(core, A, type="join", name="alice", rooms=extra)
    assert not any(isinstance(p.event, Joined) for p in out), kinds(out)
    assert len(rooms_of(core, A)) <= L.MAX_ROOMS_PER_MEMBER


# --- part --------------------------------------------------------------------------------------


def test_part_announces_left_in_that_room_only() -> None:
    core = make()
    joined(core, A, "alice", rooms=("lobby", "rust"))
    joined(core, B, "bob", rooms=("lobby", "rust"))
    out = send(core, A, 4.0, type="part", room="#Rust", message="back \x1b[31mlater\x07")
    assert kinds(out) == [(r("rust"), "Left")]
    assert out[0].event == Left(seq=3, ts=4.0, room="rust", name="alice", reason="part",
                                message="back later")
    assert rooms_of(core, A) == ["lobby"]
    assert core.rooms["rust"] == {B}
    assert core.rooms["lobby"] == {A, B}
    assert core.member_name(A) == "alice"
    assert core.online == 2
    # Still a member: can talk in the room it stayed in, not in the one it left.
    assert kinds(send(core, A, type="say", room="lobby", text="hi")) == [(LOBBY, "Message")]
    assert error(send(core, A, type="say", room="rust", text="hi"), A).code == Code.NOT_IN_ROOM


def test_part_without_message() -> None:
    core = make()
    joined(core, A, "alice")
    out = send(core, A, type="part", room="lobby")
    assert kinds(out) == [(LOBBY, "Left")]
    assert (out[0].event.reason, out[0].event.message) == ("part", "")


def test_part_deletes_an_emptied_room() -> None:
    core = make()
    joined(core, A, "alice", rooms=("lobby", "rust"))
    send(core, A, type="part", room="rust")
    assert "rust" not in core.rooms
    assert set(core.rooms) == {"lobby"}


@pytest.mark.parametrize("room", ["rust", "bad room", "#nowhere"])
def test_part_a_room_you_are_not_in(room: str) -> None:
    core = make()
    joined(core, A, "alice")
    joined(core, B, "bob", rooms=("rust",))
    err = error(send(core, A, type="part", room=room), A)
    assert err.code == Code.NOT_IN_ROOM
    assert rooms_of(core, A) == ["lobby"]
    assert core.rooms["rust"] == {B}


def test_part_then_enter_again() -> None:
    core = make()
    joined(core, A, "alice")
    send(core, A, type="part", room="lobby")
    assert rooms_of(core, A) == []
    assert error(send(core, A, type="part", room="lobby"), A).code == Code.NOT_IN_ROOM
    out = send(core, A, type="enter", room="lobby")
    assert kinds(out) == [(LOBBY, "Joined")]
    assert out[0].event.chat is False


# --- leave (quit) ------------------------------------------------------------------------------


def test_leave_announces_quit_with_the_message_in_every_room() -> None:
    core = make()
    joined(core, A, "alice", rooms=("lobby", "rust", "go"))
    joined(core, B, "bob", rooms=("lobby", "go"))
    out = send(core, A, 9.0, type="leave", message="good\x1b]0;pwned\x07 night")
    assert kinds(out) == [(LOBBY, "Left"), (r("rust"), "Left"), (r("go"), "Left")]
    for pub in out:
        assert isinstance(pub.event, Left)
        assert (pub.event.name, pub.event.reason, pub.event.message) == ("alice", "quit", "good night")
        assert pub.event.room == pub.topic[2:-1]
    assert core.member_name(A) is None
    assert core.online == 1
    assert set(core.rooms) == {"lobby", "go"}
    assert "alice" not in core.names


def test_leave_with_no_rooms_publishes_nothing_but_frees_the_name() -> None:
    core = make()
    joined(core, A, "alice")
    send(core, A, type="part", room="lobby")
    assert send(core, A, type="leave", message="bye") == []
    assert core.member_name(A) is None
    joined(core, B, "alice")


# --- everything needs a join ---------------------------------------------------------------------


@pytest.mark.parametrize("fields, ref", [
    ({"type": "say", "room": "lobby", "text": "hi", "ref": 31}, 31),
    ({"type": "say", "room": "lobby", "text": "hi"}, None),
    ({"type": "me", "room": "lobby", "text": "waves", "ref": 32}, 32),
    (dm("bob", B, ref=33), 33),
    ({"type": "key", "name": "bob", "ref": 37}, 37),
    ({"type": "nick", "name": "alicia"}, None),
    ({"type": "who", "ref": 34}, 34),
    ({"type": "who", "room": "lobby", "ref": 35}, 35),
    ({"type": "rooms", "ref": 36}, 36),
    ({"type": "enter", "room": "rust"}, None),
    ({"type": "part", "room": "lobby"}, None),
    ({"type": "ping"}, None),
])
def test_every_command_from_a_non_member_is_not_joined(fields: dict[str, object], ref: int | None) -> None:
    core = make()
    joined(core, B, "bob")
    subscribe_all(core, A, topics=(LOBBY, EVERY_ROOM))
    seqs_before = dict(core.seqs)
    err = error(send(core, A, **fields), A)
    assert err.code == Code.NOT_JOINED
    assert err.ref == ref
    assert core.member_name(A) is None
    assert core.seqs == {**seqs_before, u(A): 1}
    assert core.peers[A].pending_rooms == {}


def test_commands_after_leaving_are_not_joined() -> None:
    core = make()
    joined(core, A, "alice")
    send(core, A, type="leave")
    assert error(send(core, A, type="who", ref=3), A).code == Code.NOT_JOINED
    assert error(send(core, A, type="nick", name="bob"), A).code == Code.NOT_JOINED


def test_leave_from_a_non_member_is_silent() -> None:
    core = make()
    subscribe_all(core, A)
    assert send(core, A, type="leave", message="bye") == []
    assert core.seqs == {}
