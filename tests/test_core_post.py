"""The `post` message (a one-shot `zchat send`): a message without presence, in the pure core."""

from __future__ import annotations

from corekit import LOBBY, SYS, error, kinds, send, sub, subscribe_all, u

from zchat import limits as L
from zchat.accounts import Account
from zchat.core import BrokerCore, Limits, Publish
from zchat.protocol import Code, Message, Posted, Welcome

A = "a1" * 32
B = "b2" * 32
C = "c3" * 32
EPOCH = "epoch-1"


def make(now: float = 0.0, accounts: dict[str, Account] | None = None, seqs: dict[str, int] | None = None,
         **limits: float) -> BrokerCore:
    return BrokerCore(EPOCH, now, Limits(**limits) if limits else None,  # type: ignore[arg-type]
                      seqs=seqs, accounts=accounts)


def joined(core: BrokerCore, identity: str, name: str, now: float = 0.0) -> None:
    subscribe_all(core, identity, now)
    out = send(core, identity, now, type="join", name=name)
    assert isinstance(out[0].event, Welcome)


def poster(core: BrokerCore, identity: str, now: float = 0.0) -> None:
    """What `zchat send` subscribes to: sys/ and its private stream, no room."""
    for topic in (SYS, u(identity)):
        assert sub(core, identity, topic, now) == (True, [])


def post(core: BrokerCore, identity: str, text: str = "hello", name: str = "bob", room: str = "lobby",
         ref: int | None = 7, now: float = 1.0, **fields: object) -> list[Publish]:
    return send(core, identity, now, type="post", room=room, text=text, name=name, ref=ref, **fields)


def test_a_post_is_one_message_in_the_room_and_a_confirmation_without_presence() -> None:
    core = make()
    joined(core, A, "alice")
    poster(core, B)
    out = post(core, B, "hi all", now=2.0)
    assert kinds(out) == [(LOBBY, "Message"), (u(B), "Posted")]
    message, posted = out[0].event, out[1].event
    assert message == Message(seq=2, ts=2.0, room="lobby", name="bob", text="hi all")
    assert posted == Posted(seq=1, ts=2.0, room="lobby", at=2, ref=7)
    assert core.member_name(B) is None  # nobody joined: no joined, no left
    assert core.online == 1


def test_a_resent_post_is_confirmed_again_not_published_twice() -> None:
    core = make()
    joined(core, A, "alice")
    # Sent before its private stream was approved: published, but nobody hears the confirmation.
    assert kinds(post(core, B, now=1.0)) == [(LOBBY, "Message")]
    poster(core, B, 1.1)
    out = post(core, B, now=1.2)
    assert kinds(out) == [(u(B), "Posted")]
    assert out[0].event.at == 2 and out[0].event.ref == 7
    assert kinds(post(core, B, ref=8, now=1.3)) == [(LOBBY, "Message"), (u(B), "Posted")]


def test_post_names_follow_the_rules_of_joining() -> None:
    core = make()
    joined(core, A, "alice")
    poster(core, B)
    for name, why in [("alice", "taken"), ("ALICE", "taken"), ("aIice", "looks like 'alice'"),
                      ("admin", "reserved")]:
        refusal = error(post(core, B, name=name), B)
        assert (refusal.code, refusal.ref) == (Code.NAME_TAKEN, 7)
        assert why in refusal.detail
    assert error(post(core, B, name="no/slash"), B).code == Code.INVALID_NAME
    # Alice's own key may post under her name, as she has it (not as typed), and no other.
    poster(core, A)
    out = post(core, A, name="ALICE")
    assert out[0].event.name == "alice"
    assert "online as 'alice'" in error(post(core, A, name="carol", ref=9), A).detail


def test_closed_mode_posts_under_the_fixed_name() -> None:
    core = make(accounts={A: Account("alice"), B: Account("bob")})
    joined(core, A, "whoever")
    poster(core, B)
    out = post(core, B, name="alice")
    assert out[0].event.name == "bob"


def test_posts_are_rate_limited_and_refusals_name_the_ref() -> None:
    core = make(rate_burst=3, rate_per_second=1.0)
    joined(core, A, "alice")
    poster(core, B)
    for ref in range(3):
        assert kinds(post(core, B, ref=ref, now=1.0))[0] == (LOBBY, "Message")
    refusal = error(post(core, B, ref=3, now=1.0), B)
    assert (refusal.code, refusal.ref) == (Code.RATE_LIMITED, 3)


def test_muted_and_banned_keys_cannot_post() -> None:
    core = make(accounts={A: Account("alice", "admin"), B: Account("bob")})
    joined(core, A, "alice")
    joined(core, B, "bob")
    send(core, A, 1.0, type="mute", name="bob", seconds=60)
    refusal = error(post(core, B, now=2.0), B)
    assert (refusal.code, refusal.ref) == (Code.MUTED, 7)
    send(core, A, 3.0, type="ban", name="bob")
    assert post(core, B, now=4.0) == []


def test_a_room_that_does_not_exist_is_refused_with_the_rooms_unless_created() -> None:
    core = make(seqs={"r/old/": 5})  # stored history, nobody in it: it exists
    joined(core, A, "alice")
    subscribe_all(core, C, topics=("r/dev/",))
    send(core, C, type="join", name="carol", rooms=["dev"])
    poster(core, B)
    refusal = error(post(core, B, room="opps"), B)
    assert (refusal.code, refusal.ref) == (Code.NO_SUCH_ROOM, 7)
    assert refusal.detail == "there is no room #opps (rooms with people in them: #dev, #lobby)"
    assert kinds(post(core, B, room="old", ref=8)) == [("r/old/", "Message"), (u(B), "Posted")]
    out = post(core, B, room="#Opps", ref=9, create=True)
    assert kinds(out) == [("r/opps/", "Message"), (u(B), "Posted")]
    assert out[0].event.seq == 1
    assert kinds(post(core, B, room="opps", ref=10)) == [("r/opps/", "Message"), (u(B), "Posted")]


def test_the_default_room_always_exists() -> None:
    """A fresh broker, nobody in: `zchat send hello` goes to the lobby, where everyone starts."""
    core = make()
    poster(core, B)
    out = post(core, B, room="lobby")
    assert kinds(out) == [("r/lobby/", "Message"), (u(B), "Posted")]


def test_the_refusal_lists_a_bounded_number_of_rooms() -> None:
    core = make()
    for i in range(L.ROOMS_IN_REFUSAL + 3):
        identity = f"{i:02x}" * 32
        subscribe_all(core, identity, topics=(f"r/room{i:02d}/",))
        send(core, identity, type="join", name=f"user{i}", rooms=[f"room{i:02d}"])
    poster(core, B)
    detail = error(post(core, B, room="nosuch"), B).detail
    assert detail.count("#room") == L.ROOMS_IN_REFUSAL
    assert detail.endswith(" and 3 more)")


def test_empty_and_invalid_posts_are_refused_in_order() -> None:
    core = make()
    joined(core, A, "alice")
    poster(core, B)
    assert error(post(core, B, room="bad room"), B).code == Code.INVALID_ROOM
    assert error(post(core, B, text=" \x1b[2J "), B).code == Code.EMPTY_TEXT
    assert error(post(core, B, name="alice", room="bad room"), B).code == Code.NAME_TAKEN
