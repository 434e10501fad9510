"""Unit tests of BrokerCore's closed mode (accounts, roles, bans) and moderation
(kick, ban, mute, authorized-keys reload). Pure: no sockets, explicit `now` values."""

from __future__ import annotations

import msgspec
import pytest
from corekit import LOBBY, SYS, body, dm, u

from zchat.auth import Account
from zchat.core import (
    Banned,
    BrokerCore,
    DeliverMail,
    Disconnect,
    Fetch,
    Mail,
    Out,
    Publish,
    Remember,
)
from zchat.protocol import (
    Action,
    Code,
    Direct,
    Error,
    Joined,
    Left,
    Message,
    Muted,
    Renamed,
    Welcome,
    decode_publication,
    encode_publication,
)

pytestmark = pytest.mark.timeout(30)

A = "a1" * 32  # alice, admin
B = "b2" * 32  # bob, user
C = "c3" * 32  # carol, user
T = "7a" * 32  # tapper, tap
X = "e5" * 32  # a key nobody listed
EPOCH = "epoch-m"
OPS = "r/ops/"



def accounts(**changes: Account | None) -> dict[str, Account]:
    """The default closed-mode file, with entries replaced (or removed with None) by identity
    variable name: accounts(C=None) drops carol."""
    base = {"A": Account("alice", "admin"), "B": Account("bob"), "C": Account("carol"),
            "T": Account("tapper", "tap")}
    ids = {"A": A, "B": B, "C": C, "T": T}
    for key, value in changes.items():
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    return {ids[key]: account for key, account in base.items()}


def closed(now: float = 0.0, banned: set[str] | None = None, **changes: Account | None) -> BrokerCore:
    return BrokerCore(EPOCH, now, accounts=accounts(**changes), banned=banned)


def open_core(now: float = 0.0, banned: set[str] | None = None) -> BrokerCore:
    return BrokerCore(EPOCH, now, banned=banned)


def split(out: list[Out]) -> tuple[list[Publish], list[Out]]:
    """(publications, other records); every publication must survive the wire encoding."""
    assert isinstance(out, list)
    publications: list[Publish] = []
    others: list[Out] = []
    for item in out:
        if isinstance(item, Publish):
            topic, event = decode_publication(encode_publication(item.topic.encode(), item.event))
            assert (topic, event) == (item.topic, item.event)
            publications.append(item)
        else:
            assert isinstance(item, (Fetch, Mail, DeliverMail, Remember, Disconnect, Banned)), item
            others.append(item)
    return publications, others


def pubs(out: list[Out]) -> list[Publish]:
    return split(out)[0]


def control(out: list[Out]) -> list[Out]:
    """Only the Disconnect and Banned records, in order."""
    return [item for item in out if isinstance(item, (Disconnect, Banned))]


def kinds(out: list[Out]) -> list[tuple[str, str]]:
    return [(p.topic, type(p.event).__name__) for p in pubs(out)]



def send(core: BrokerCore, identity: str, now: float = 0.0, **fields: object) -> list[Out]:
    return core.on_message(identity, body(**fields), 1, now)


def subscribe(core: BrokerCore, identity: str, *topics: str, now: float = 0.0) -> None:
    for topic in topics:
        ok, out = core.on_subscribe(identity, topic, now)
        assert ok is True, topic
        assert out == [], out


def join(core: BrokerCore, identity: str, name: str, now: float = 0.0,
         rooms: tuple[str, ...] = ("lobby",)) -> list[Out]:
    subscribe(core, identity, SYS, u(identity), *(f"r/{room}/" for room in rooms), now=now)
    return send(core, identity, now, type="join", name=name, rooms=list(rooms))


def joined(core: BrokerCore, identity: str, name: str, now: float = 0.0,
           rooms: tuple[str, ...] = ("lobby",)) -> str:
    """Join and return the name the broker gave."""
    out = pubs(join(core, identity, name, now, rooms))
    assert type(out[0].event) is Welcome, kinds(out)
    given = core.member_name(identity)
    assert given is not None
    return given


def only_error(out: list[Out], identity: str) -> Error:
    publications, others = split(out)
    assert others == [], others
    assert len(publications) == 1, kinds(out)
    assert publications[0].topic == u(identity)
    assert isinstance(publications[0].event, Error)
    return publications[0].event


def everyone(core: BrokerCore) -> BrokerCore:
    """alice (admin), bob and carol joined in the lobby of a closed core."""
    for identity, name in ((A, "alice"), (B, "bob"), (C, "carol")):
        joined(core, identity, name)
    return core


# --- closed mode: who, with which name -----------------------------------------------


def test_closed_mode_join_gets_the_accounts_name_whatever_it_asks_for() -> None:
    core = closed()
    out = pubs(join(core, B, "queen"))
    assert kinds(out) == [(u(B), "Welcome"), (LOBBY, "Joined")]
    assert out[0].event.name == "bob"
    assert out[1].event.name == "bob"
    assert core.member_name(B) == "bob"
    assert "queen" not in core.names and "bob" in core.names


def test_closed_mode_join_with_an_invalid_name_still_gets_the_accounts_name() -> None:
    core = closed()
    out = pubs(join(core, B, "not a valid name!"))
    assert kinds(out) == [(u(B), "Welcome"), (LOBBY, "Joined")]
    assert out[0].event.name == "bob"


def test_closed_mode_cannot_take_another_accounts_name() -> None:
    core = closed()
    joined(core, A, "bob")  # alice's key asking for bob's name is alice
    assert core.member_name(A) == "alice"
    assert joined(core, B, "bob") == "bob"  # so bob's name is still bob's


def test_closed_mode_nick_is_refused_names_fixed() -> None:
    core = closed()
    joined(core, B, "bob")
    error = only_error(send(core, B, type="nick", name="robert"), B)
    assert error.code == Code.NAMES_FIXED
    assert core.member_name(B) == "bob"
    assert "robert" not in core.names


def test_open_mode_nick_still_works() -> None:
    core = open_core()
    joined(core, B, "bob")
    assert kinds(send(core, B, type="nick", name="robert")) == [(LOBBY, "Renamed")]


@pytest.mark.parametrize("topic", [SYS, u(X), LOBBY, "r/", "r/ops/"])
def test_closed_mode_unknown_identity_subscriptions_are_refused(topic: str) -> None:
    core = closed()
    assert core.on_subscribe(X, topic, 0.0) == (False, [])
    assert X not in core.peers


def test_closed_mode_unknown_identity_messages_are_ignored() -> None:
    core = closed()
    joined(core, A, "alice")
    before = dict(core.seqs)
    for fields in ({"type": "join", "name": "mallory"}, {"type": "say", "room": "lobby", "text": "hi"},
                   {"type": "ping"}, {"type": "who"}, {"type": "kick", "name": "alice"}):
        assert core.on_message(X, body(**fields), 1, 1.0) == []
    assert core.on_message(X, b"\xff garbage", 3, 1.0) == []
    assert X not in core.peers
    assert core.online == 1
    assert core.seqs == before


def test_every_room_at_once_only_for_tap_and_admin_in_closed_mode() -> None:
    core = closed()
    assert core.on_subscribe(B, "r/", 0.0) == (False, [])  # a user
    assert core.on_subscribe(T, "r/", 0.0) == (True, [])
    assert core.on_subscribe(A, "r/", 0.0) == (True, [])
    # The user may still have single rooms.
    assert core.on_subscribe(B, LOBBY, 0.0) == (True, [])


def test_every_room_at_once_for_anyone_in_open_mode() -> None:
    core = open_core()
    assert core.on_subscribe(B, "r/", 0.0) == (True, [])
    assert core.on_subscribe(X, "r/", 0.0) == (True, [])


def test_demoting_a_tap_refuses_its_next_every_room_subscription() -> None:
    core = closed()
    assert core.on_subscribe(T, "r/", 0.0) == (True, [])
    core.set_accounts(accounts(T=Account("tapper", "user")), 1.0)
    assert core.on_subscribe(T, "r/", 1.0) == (False, [])


@pytest.mark.parametrize("make", [open_core, closed], ids=["open", "closed"])
def test_banned_identities_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    core = make(banned={B})
    for topic in (SYS, u(B), LOBBY, "r/"):
        assert core.on_subscribe(B, topic, 0.0) == (False, [])
    assert core.on_message(B, body(type="join", name="bob"), 1, 0.0) == []
    assert core.on_message(B, b"junk", 1, 0.0) == []
    assert B not in core.peers
    assert core.online == 0
    assert joined(core, C, "carol") == "carol"  # others are unaffected


def test_no_identity_is_never_admitted() -> None:
    core = closed()
    assert core.on_subscribe(None, SYS, 0.0) == (False, [])
    assert core.on_message(None, body(type="join", name="alice"), 1, 0.0) == []
    assert core.peers == {}


# --- kick -------------------------------------------------------------------------


def test_admin_kick_tells_the_target_announces_and_disconnects() -> None:
    core = everyone(closed())
    out = send(core, A, 5.0, type="kick", name="bob", reason="be nice")
    publications, others = split(out)
    assert kinds(out) == [(u(B), "Error"), (LOBBY, "Left")]
    error, left = publications[0].event, publications[1].event
    assert isinstance(error, Error) and error.code == Code.KICKED
    assert "alice" in error.detail and "be nice" in error.detail
    assert left == Left(seq=left.seq, ts=5.0, room="lobby", name="bob", reason="kicked",
                        message="be nice", by="alice")
    assert others == [Disconnect(B)]  # and no Banned
    assert out[-1] == Disconnect(B)  # cut off only after the notices
    assert core.member_name(B) is None
    assert "bob" not in core.names
    assert B not in core.rooms["lobby"]
    assert B not in core.banned
    assert core.online == 2


def test_kick_announces_in_every_room_of_the_target() -> None:
    core = closed()
    joined(core, A, "alice")
    joined(core, B, "bob", rooms=("lobby", "ops"))
    out = send(core, A, type="kick", name="BOB")  # names are case-insensitive
    assert kinds(out) == [(u(B), "Error"), (LOBBY, "Left"), (OPS, "Left")]
    assert all(p.event.reason == "kicked" and p.event.by == "alice" for p in pubs(out)[1:])
    assert "ops" not in core.rooms  # emptied


def test_kick_without_reason() -> None:
    core = everyone(closed())
    publications = pubs(send(core, A, type="kick", name="bob"))
    assert publications[0].event.detail == "you were kicked by alice"
    assert publications[1].event.message == ""


def test_kicked_member_may_join_again() -> None:
    core = everyone(closed())
    send(core, A, 1.0, type="kick", name="bob")
    out = pubs(send(core, B, 2.0, type="join", name="bob", rooms=["lobby"]))
    assert kinds(out) == [(u(B), "Welcome"), (LOBBY, "Joined")]
    assert out[0].event.resumed is False


def test_kicked_members_messages_are_not_joined() -> None:
    core = everyone(closed())
    send(core, A, 1.0, type="kick", name="bob")
    error = only_error(send(core, B, 1.5, type="say", room="lobby", text="hey", ref=3), B)
    assert error.code == Code.NOT_JOINED


# --- ban --------------------------------------------------------------------------


def test_admin_ban_tells_announces_bans_and_disconnects() -> None:
    core = everyone(closed())
    out = send(core, A, 7.0, type="ban", name="bob", reason="for good")
    publications, others = split(out)
    assert kinds(out) == [(u(B), "Error"), (LOBBY, "Left")]
    error, left = publications[0].event, publications[1].event
    assert error.code == Code.BANNED
    assert "alice" in error.detail and "for good" in error.detail
    assert (left.reason, left.by, left.message, left.name) == ("banned", "alice", "for good", "bob")
    assert others == [Banned(B), Disconnect(B)]
    assert out[-1] == Disconnect(B)
    assert B in core.banned
    assert core.member_name(B) is None


def test_banned_member_is_refused_from_then_on() -> None:
    core = everyone(closed())
    send(core, A, 1.0, type="ban", name="bob")
    assert core.on_message(B, body(type="join", name="bob"), 1, 2.0) == []
    assert core.on_message(B, body(type="say", room="lobby", text="x"), 1, 2.0) == []
    assert core.on_subscribe(B, SYS, 2.0) == (False, [])
    assert core.on_subscribe(B, u(B), 2.0) == (False, [])
    assert core.member_name(B) is None


def test_ban_in_open_mode_is_forbidden_for_everyone() -> None:
    """Open mode has no accounts, hence no admins."""
    core = open_core()
    joined(core, A, "alice")
    joined(core, B, "bob")
    for kind in ("kick", "ban"):
        assert only_error(send(core, A, type=kind, name="bob"), A).code == Code.FORBIDDEN
    assert only_error(send(core, A, type="mute", name="bob"), A).code == Code.FORBIDDEN
    assert core.member_name(B) == "bob"
    assert core.banned == set()


# --- mute -------------------------------------------------------------------------


def test_admin_mute_is_announced_in_each_of_the_targets_rooms() -> None:
    core = closed()
    joined(core, A, "alice")
    joined(core, B, "bob", rooms=("lobby", "ops"))
    out = send(core, A, 10.0, type="mute", name="bob", seconds=60, reason="calm down")
    publications, others = split(out)
    assert others == []
    assert kinds(out) == [(LOBBY, "Muted"), (OPS, "Muted")]
    for publication, room in zip(publications, ("lobby", "ops"), strict=True):
        assert publication.event == Muted(seq=publication.event.seq, ts=10.0, room=room, name="bob",
                                          by="alice", seconds=60, reason="calm down", until=70.0)
    assert core.member_name(B) == "bob"  # still here


def test_mute_of_a_member_in_no_room_tells_them_privately() -> None:
    core = everyone(closed())
    send(core, B, type="part", room="lobby")
    out = pubs(send(core, A, 1.0, type="mute", name="bob", seconds=30))
    # The admin shares no room with bob: told on its own stream too, with when it ends.
    assert kinds(out) == [(u(B), "Muted"), (u(A), "Muted")]
    assert out[0].event.seconds == 30 and out[0].event.name == "bob"
    assert out[1].event == msgspec.structs.replace(out[0].event, seq=out[1].event.seq)
    assert out[0].event.until == 31.0


@pytest.mark.parametrize("fields", [
    {"type": "say", "room": "lobby", "text": "let me speak"},
    {"type": "me", "room": "lobby", "text": "protests"},
    dm("alice", A),
])
def test_muted_member_cannot_speak_and_gets_the_ref_back(fields: dict[str, object]) -> None:
    core = everyone(closed())
    send(core, A, 10.0, type="mute", name="bob", seconds=60)
    error = only_error(send(core, B, 20.0, ref=41, **fields), B)
    assert error.code == Code.MUTED
    assert error.ref == 41
    assert "50" in error.detail  # seconds left


def test_muted_member_cannot_leave_mail_for_an_offline_key_either() -> None:
    """A mute holds for private messages to offline users too: nothing is kept."""
    core = everyone(closed())
    send(core, C, 5.0, type="leave")
    send(core, A, 10.0, type="mute", name="bob", seconds=60)
    error = only_error(send(core, B, 20.0, ref=42, **dm("carol", C)), B)
    assert (error.code, error.ref) == (Code.MUTED, 42)
    assert not any(isinstance(item, Mail) for item in send(core, B, 21.0, **dm("carol", C)))
    sent = send(core, B, 71.0, **dm("carol", C))  # the mute is over: kept for carol's key
    assert [item.recipient for item in sent if isinstance(item, Mail)] == [C]


def test_muted_member_may_still_do_everything_else() -> None:
    core = everyone(closed())
    send(core, A, 10.0, type="mute", name="bob", seconds=60)
    assert kinds(send(core, B, 11.0, type="who", ref=1)) == [(u(B), "WhoReply")]
    assert kinds(send(core, B, 11.0, type="part", room="lobby")) == [(LOBBY, "Left")]


def test_mute_expires_by_itself() -> None:
    core = everyone(closed())
    send(core, A, 10.0, type="mute", name="bob", seconds=60)
    assert only_error(send(core, B, 69.5, type="say", room="lobby", text="now?"), B).code == Code.MUTED
    out = pubs(send(core, B, 70.5, type="say", room="lobby", text="now!"))
    assert [type(p.event) for p in out] == [Message]


def test_mute_zero_lifts_a_mute() -> None:
    core = everyone(closed())
    send(core, A, 10.0, type="mute", name="bob", seconds=600)
    out = pubs(send(core, A, 11.0, type="mute", name="bob", seconds=0))
    assert kinds(out) == [(LOBBY, "Muted")]
    assert out[0].event.seconds == 0 and out[0].event.by == "alice"
    said = pubs(send(core, B, 11.5, type="say", room="lobby", text="free", ref=2))
    assert [(type(p.event), p.event.text) for p in said] == [(Message, "free")]
    acted = pubs(send(core, B, 11.6, type="me", room="lobby", text="dances"))
    assert [type(p.event) for p in acted] == [Action]
    direct = pubs(send(core, B, 11.7, **dm("carol", C)))
    assert [type(p.event) for p in direct] == [Direct, Direct]


def test_mute_does_not_touch_others() -> None:
    core = everyone(closed())
    send(core, A, 10.0, type="mute", name="bob", seconds=60)
    out = pubs(send(core, C, 11.0, type="say", room="lobby", text="carol speaks"))
    assert [type(p.event) for p in out] == [Message]


def test_mute_survives_a_rejoin_of_the_same_session() -> None:
    core = everyone(closed())
    send(core, A, 10.0, type="mute", name="bob", seconds=60)
    send(core, B, 11.0, type="join", name="bob", rooms=["lobby"])  # a resumed welcome
    assert only_error(send(core, B, 12.0, type="say", room="lobby", text="x"), B).code == Code.MUTED


# --- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"type": "kick", "name": "alice"},
    {"type": "ban", "name": "alice", "reason": "coup"},
    {"type": "mute", "name": "alice", "seconds": 60},
    {"type": "kick", "name": "nobody"},  # forbidden first: a user learns nothing about names
])
@pytest.mark.parametrize("actor", [B, T], ids=["user", "tap"])
def test_moderation_by_a_non_admin_is_forbidden(fields: dict[str, object], actor: str) -> None:
    core = everyone(closed())
    joined(core, T, "tapper")
    seqs = {topic: seq for topic, seq in core.seqs.items() if not topic.startswith("u/")}
    error = only_error(send(core, actor, 3.0, **fields), actor)
    assert error.code == Code.FORBIDDEN
    assert core.member_name(A) == "alice"
    assert core.banned == set()
    assert {t: s for t, s in core.seqs.items() if not t.startswith("u/")} == seqs  # nothing public
    # Not muted either.
    assert [type(p.event) for p in pubs(send(core, A, 4.0, type="say", room="lobby", text="ok"))] == [Message]


@pytest.mark.parametrize("kind", ["kick", "ban", "mute"])
def test_moderation_of_an_unknown_name_is_no_such_user(kind: str) -> None:
    core = everyone(closed())
    error = only_error(send(core, A, type=kind, name="zed"), A)
    assert error.code == Code.NO_SUCH_USER
    assert "zed" in error.detail
    assert core.banned == set()


@pytest.mark.parametrize("kind", ["kick", "ban", "mute"])
def test_moderation_of_someone_who_left_is_no_such_user(kind: str) -> None:
    core = everyone(closed())
    send(core, B, 1.0, type="leave")
    assert only_error(send(core, A, 2.0, type=kind, name="bob"), A).code == Code.NO_SUCH_USER
    assert B not in core.banned


def test_moderation_by_an_admin_who_has_not_joined_is_not_joined() -> None:
    core = closed()
    joined(core, B, "bob")
    subscribe(core, A, u(A))
    error = only_error(send(core, A, type="kick", name="bob"), A)
    assert error.code == Code.NOT_JOINED
    assert core.member_name(B) == "bob"


def test_moderation_messages_are_rate_limited_like_any_other() -> None:
    core = everyone(closed())
    codes = []
    for _ in range(25):
        out = pubs(send(core, A, 1.0, type="mute", name="bob", seconds=5))
        codes += [p.event.code for p in out if isinstance(p.event, Error)]
    assert Code.RATE_LIMITED in codes


# --- authorized-keys reload ------------------------------------------------------------


def test_removed_online_key_is_revoked_announced_and_disconnected() -> None:
    core = everyone(closed())
    out = core.set_accounts(accounts(C=None), 9.0)
    publications, others = split(out)
    assert kinds(out) == [(u(C), "Error"), (LOBBY, "Left")]
    assert publications[0].event.code == Code.REVOKED
    left = publications[1].event
    assert (left.name, left.reason, left.ts) == ("carol", "revoked", 9.0)
    assert others == [Disconnect(C)]
    assert core.member_name(C) is None
    assert C not in core.peers
    assert core.online == 2


def test_reload_leaves_still_listed_members_untouched() -> None:
    core = everyone(closed())
    seqs = dict(core.seqs)
    out = core.set_accounts(accounts(C=None), 9.0)
    for item in out:
        if isinstance(item, Publish):
            assert item.topic in (u(C), LOBBY)
            assert getattr(item.event, "name", "carol") == "carol"
        else:
            assert getattr(item, "identity", None) == C
    assert core.member_name(A) == "alice" and core.member_name(B) == "bob"
    assert {t: s for t, s in core.seqs.items() if t in (u(A), u(B))} == \
        {t: s for t, s in seqs.items() if t in (u(A), u(B))}
    # They go on talking.
    said = pubs(send(core, B, 10.0, type="say", room="lobby", text="hi"))
    assert [type(p.event) for p in said] == [Message]


def test_reload_with_the_same_file_changes_nothing() -> None:
    core = everyone(closed())
    assert core.set_accounts(accounts(), 9.0) == []
    assert core.online == 3


def test_removed_key_that_was_only_subscribed_is_disconnected_silently() -> None:
    core = everyone(closed())
    subscribe(core, T, SYS, "r/")
    out = core.set_accounts(accounts(T=None), 9.0)
    assert out == [Disconnect(T)]
    assert T not in core.peers
    assert core.on_subscribe(T, SYS, 9.5) == (False, [])


def test_revoked_key_is_refused_afterwards() -> None:
    core = everyone(closed())
    core.set_accounts(accounts(C=None), 9.0)
    assert core.on_message(C, body(type="join", name="carol"), 1, 10.0) == []
    assert core.on_subscribe(C, u(C), 10.0) == (False, [])
    assert C not in core.peers


def test_renamed_account_is_announced_as_renamed() -> None:
    core = closed()
    joined(core, A, "alice")
    joined(core, B, "bob", rooms=("lobby", "ops"))
    out = core.set_accounts(accounts(B=Account("robert")), 9.0)
    publications, others = split(out)
    assert others == [Remember("robert", B)]
    assert kinds(out) == [(LOBBY, "Renamed"), (OPS, "Renamed")]
    for publication in publications:
        assert isinstance(publication.event, Renamed)
        assert (publication.event.old, publication.event.new) == ("bob", "robert")
    assert core.member_name(B) == "robert"
    assert core.names.get("robert") == B and "bob" not in core.names
    # The next join keeps the new name.
    welcome = pubs(send(core, B, 10.0, type="join", name="bob", rooms=["lobby", "ops"]))[0].event
    assert welcome.name == "robert"


def test_account_rename_into_a_name_another_listed_member_is_leaving_keeps_both() -> None:
    """bob becomes carol while carol becomes dave, in one reload: both are still listed, so
    both should just be renamed (\"still-listed members untouched\"), whatever the order in
    which the core happens to visit them."""
    core = everyone(closed())
    out = core.set_accounts(accounts(B=Account("carol"), C=Account("dave")), 9.0)
    assert control(out) == [], kinds(out)
    assert not [p for p in pubs(out) if isinstance(p.event, Left)], kinds(out)
    assert core.member_name(B) == "carol"
    assert core.member_name(C) == "dave"


def test_accounts_swapping_names_keep_both_names_held() -> None:
    """alice's key becomes bob and bob's becomes alice in one reload (names stay unique in the
    file). Both must be renamed and both new names held: a name missing from `names` while
    its member is online breaks /msg and /who, and the member's leave then fails."""
    core = everyone(closed())
    out = core.set_accounts(accounts(A=Account("bob", "admin"), B=Account("alice")), 9.0)
    assert control(out) == [], kinds(out)
    assert (core.member_name(A), core.member_name(B)) == ("bob", "alice")
    assert core.names == {"bob": A, "alice": B, "carol": C}
    direct = pubs(send(core, C, 10.0, **dm("bob", A)))
    assert [p.topic for p in direct] == [u(C), u(A)]
    # Leaving, and expiring, work for both.
    assert kinds(send(core, A, 11.0, type="leave")) == [(LOBBY, "Left")]
    out = core.tick(20.0)
    assert {p.event.name for p in pubs(out) if isinstance(p.event, Left)} == {"alice", "carol"}
    assert core.names == {}


def test_role_change_takes_effect_at_once() -> None:
    core = everyone(closed())
    core.set_accounts(accounts(A=Account("alice"), B=Account("bob", "admin")), 9.0)
    assert only_error(send(core, A, 10.0, type="kick", name="carol"), A).code == Code.FORBIDDEN
    assert control(send(core, B, 10.0, type="kick", name="carol")) == [Disconnect(C)]


def test_kick_and_welcome_invariants_hold_after_a_mixed_session() -> None:
    core = everyone(closed())
    joined(core, T, "tapper", rooms=("lobby", "ops"))
    send(core, A, 1.0, type="mute", name="tapper", seconds=5)
    send(core, A, 1.1, type="kick", name="carol")
    send(core, A, 1.2, type="ban", name="bob")
    core.set_accounts(accounts(T=Account("tapper2", "tap")), 2.0)
    for key, identity in core.names.items():
        member = core.peers[identity].member
        assert member is not None and member.name.casefold() == key
    for room, identities in core.rooms.items():
        for identity in identities:
            assert room in core.peers[identity].member.rooms  # type: ignore[union-attr]
    assert sorted(core.names) == ["alice", "tapper2"]
    assert core.banned == {B}
    joined_names = {p.event.name for p in pubs(join(core, C, "carol", 3.0)) if isinstance(p.event, Joined)}
    assert joined_names == {"carol"}
