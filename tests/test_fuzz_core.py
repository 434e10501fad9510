"""Property-based tests (hypothesis) of the protocol decoder and the broker core: any bytes,
any message, any sequence of subscriptions, messages, disconnects, ticks and reloads give a
valid result or a clean error, never an exception, and the core's invariants hold throughout.

Pure and bounded: modest example counts, no deadline (CI machines vary), well under 20 s.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from corekit import BOX, SELF_BOX
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from zchat import limits as L
from zchat.auth import Account
from zchat.core import (
    Banned,
    BrokerCore,
    DeliverMail,
    Disconnect,
    Fetch,
    Limits,
    Mail,
    Out,
    Publish,
    Remember,
)
from zchat.protocol import (
    PRIVATE_PREFIX,
    ROOM_PREFIX,
    SYSTEM_TOPIC,
    ClientMessage,
    Code,
    Direct,
    Error,
    Heartbeat,
    History,
    Mark,
    Muted,
    ProtocolError,
    Renamed,
    Shutdown,
    Welcome,
    decode_client_message,
    decode_publication,
    encode_publication,
    lookalike_key,
    name_key,
    private_topic,
    room_of_topic,
)

pytestmark = pytest.mark.timeout(120)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ------------------------------------------------------------------------

A, B, C, D, E = ("a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32, "e5" * 32)
IDENTITIES = [A, B, C, D, E]
TYPES = ["join", "say", "me", "msg", "key", "nick", "who", "rooms", "enter", "history", "part", "kick", "ban",
         "mute", "leave", "ping"]
NAMES = ["alice", "Alice", "ALICE", "bob", "carol", "dave", "tapper", "x" * 32, "x" * 33, "bad name",
         "", "-dash", "a.b-c_d", "\u00e9mile", "alice\n", "\x1b[31mred", "aIice", "b0b", "root"]
ROOMS = ["lobby", "#lobby", "#Lobby", "ops", "OPS", "dev", "", "#", "../x", "a" * 32, "a" * 33,
         "r/lobby/", "lobby/", "\x1b]0;x\x07"]

json_leaf = (st.none() | st.booleans() | st.integers() | st.floats()
             | st.text(max_size=20))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
texts = st.text(max_size=60) | st.sampled_from(["hi", " ", "\x1b[2J", "a" * L.MAX_TEXT_CHARS,
                                                 "a" * (L.MAX_TEXT_CHARS + 1), "\u202e evil"])
names = st.sampled_from(NAMES) | st.text(max_size=40)
rooms = st.sampled_from(ROOMS) | st.text(max_size=40)
counts = st.integers(min_value=-2, max_value=2**54) | st.integers(min_value=-1, max_value=600)

FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": names, "to": names, "room": rooms, "rooms": st.lists(rooms, max_size=20),
    "text": texts, "message": texts, "reason": texts, "ref": counts | st.none(),
    "history": counts, "limit": counts, "after": counts, "before": counts | st.none(),
    "seconds": st.integers(min_value=-1, max_value=8 * 86400),
    "seen": st.dictionaries(rooms, counts, max_size=20),
    "key": st.sampled_from(IDENTITIES) | st.text(max_size=70),
    "box": st.sampled_from([BOX, SELF_BOX, "", "=", "A" * (L.MAX_BOX_CHARS + 4)]) | st.text(max_size=80),
    "self_box": st.sampled_from([BOX, SELF_BOX]) | st.text(max_size=80),
}


@st.composite
def message_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A message-like JSON object: mostly plausible fields, sometimes anything at all."""
    kind = draw(st.sampled_from(TYPES) | st.text(max_size=10) | json_value)
    message: dict[str, Any] = {"type": kind}
    for key in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=6, unique=True)):
        values = FIELD_VALUES[key] | json_value if draw(st.booleans()) else FIELD_VALUES[key]
        message[key] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        message.update(draw(st.dictionaries(st.text(max_size=8), json_value, max_size=3)))
    return message


def to_json(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN/Infinity come out as (invalid JSON) tokens: fine


bodies = st.one_of(
    message_dicts().map(to_json),
    json_value.map(to_json),
    st.binary(max_size=300),
    message_dicts().map(lambda m: to_json(m)[: len(to_json(m)) // 2]),  # truncated
)

# --- checks shared by all properties ------------------------------------------------------

RECORDS = (Publish, Fetch, Mail, DeliverMail, Remember, Disconnect, Banned)


def check_records(out: object) -> list[Out]:
    """A list of known records whose publications survive the wire encoding."""
    assert isinstance(out, list), out
    for item in out:
        assert isinstance(item, RECORDS), item
        if isinstance(item, Publish):
            topic, event = decode_publication(encode_publication(item.topic.encode(), item.event))
            assert (topic, event) == (item.topic, item.event)
    return out


def check_core(core: BrokerCore) -> None:
    """Structural invariants of the core's state."""
    limits = core.limits
    assert len(core.peers) <= limits.max_peers
    # The eviction order holds exactly the non-members, so members are never evicted.
    assert set(core.strangers) == {i for i, peer in core.peers.items() if peer.member is None}
    for key, identity in core.names.items():
        peer = core.peers.get(identity)
        assert peer is not None and peer.member is not None, (key, identity)
        assert name_key(peer.member.name) == key
    for identity, peer in core.peers.items():
        assert peer.identity == identity
        assert len(peer.topics) <= limits.max_topics_per_peer
        if peer.member is not None:
            assert core.names.get(name_key(peer.member.name)) == identity
            assert len(set(peer.member.rooms)) == len(peer.member.rooms)
            assert len(peer.member.rooms) <= L.MAX_ROOMS_PER_MEMBER
            for room in peer.member.rooms:
                assert identity in core.rooms.get(room, ()), (identity, room)
            assert identity not in core.banned
            if core.accounts is not None:
                assert identity in core.accounts
                assert peer.member.name == core.accounts[identity].name
    for room, identities in core.rooms.items():
        assert identities, f"empty room {room} kept"
        for identity in identities:
            peer = core.peers.get(identity)
            assert peer is not None and peer.member is not None, (room, identity)
            assert room in peer.member.rooms
    assert core.online == len(core.names)
    for key, identity in core.lookalikes.items():  # no stale entry: each is an online holder's
        name = core.member_name(identity)
        assert name is not None and lookalike_key(name) == key, (key, identity, name)
    if core.accounts is None:  # open mode: look-alikes refused, so one holder per key
        assert len(core.lookalikes) == core.online


# --- decoding ----------------------------------------------------------------------------


def decode_or_error(data: bytes | memoryview, frames: int) -> ClientMessage | ProtocolError:
    try:
        message = decode_client_message(data, frames)
    except ProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code
        assert isinstance(exc.detail, str)
        return exc
    assert isinstance(message, ClientMessage)
    return message


@FAST
@given(st.binary(max_size=L.MAX_BODY_BYTES + 64), st.integers(min_value=-3, max_value=10_000))
def test_decode_any_bytes_any_frame_count(data: bytes, frames: int) -> None:
    result = decode_or_error(data, frames)
    if frames != 1:
        assert isinstance(result, ProtocolError) and result.code == Code.TOO_MANY_FRAMES
    elif len(data) > L.MAX_BODY_BYTES:
        assert isinstance(result, ProtocolError) and result.code == Code.TOO_LARGE


@FAST
@given(bodies, st.sampled_from([1, 1, 1, 2, 0]), st.booleans())
def test_decode_message_like_json(data: bytes, frames: int, as_view: bool) -> None:
    result = decode_or_error(memoryview(data) if as_view else data, frames)
    if isinstance(result, ClientMessage):
        # What decodes re-encodes and decodes to the same message.
        again = decode_client_message(msgspec.json.encode(result))
        assert again == result


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(TYPES), st.integers(min_value=L.MAX_BODY_BYTES - 40, max_value=L.MAX_BODY_BYTES + 40))
def test_decode_size_limit_is_exact(kind: str, size: int) -> None:
    head = to_json({"type": kind, "pad": ""})[:-2]
    data = head + b"x" * max(0, size - len(head) - 2) + b'"}'
    result = decode_or_error(data, 1)
    if len(data) > L.MAX_BODY_BYTES:
        assert isinstance(result, ProtocolError) and result.code == Code.TOO_LARGE
    else:
        assert not (isinstance(result, ProtocolError) and result.code == Code.TOO_LARGE)


# --- the core, one message at a time -------------------------------------------------------


def populated(closed: bool) -> BrokerCore:
    """A core with alice (admin in closed mode), bob and carol joined; dave only subscribed."""
    accounts = ({A: Account("alice", "admin"), B: Account("bob"), C: Account("carol", "tap"),
                 D: Account("dave")} if closed else None)
    core = BrokerCore("epoch", 0.0, Limits(max_peers=8), accounts=accounts)
    for identity, name in ((A, "alice"), (B, "bob"), (C, "carol")):
        for topic in (SYSTEM_TOPIC, private_topic(identity), "r/lobby/", "r/ops/"):
            core.on_subscribe(identity, topic, 0.0)
        core.on_message(identity, to_json({"type": "join", "name": name, "rooms": ["lobby", "ops"]}), 1, 0.0)
    core.on_subscribe(D, private_topic(D), 0.0)
    assert core.online == 3
    return core


@FAST
@given(st.lists(st.tuples(st.sampled_from(IDENTITIES + [None]), bodies, st.sampled_from([1, 1, 1, 2])),
                min_size=1, max_size=8),
       st.booleans())
def test_core_on_message_any_dict_gives_a_list(messages: list[tuple[str | None, bytes, int]],
                                               closed: bool) -> None:
    core = populated(closed)
    now = 1.0
    for identity, data, frames in messages:
        now += 0.01
        check_records(core.on_message(identity, data, frames, now))
        check_core(core)


@FAST
@given(st.sampled_from(IDENTITIES + [None]),
       st.text(max_size=80) | st.sampled_from(["", "r/", "u/", "sys/", "r/lobby", "r/../", f"u/{B}/"]))
def test_core_on_subscribe_any_topic(identity: str | None, topic: str) -> None:
    core = populated(True)
    allowed, out = core.on_subscribe(identity, topic, 1.0)
    assert isinstance(allowed, bool)
    check_records(out)
    if allowed:
        assert identity is not None
        ok_topic = (topic in (SYSTEM_TOPIC, ROOM_PREFIX, private_topic(identity))
                    or room_of_topic(topic) is not None)
        assert ok_topic, topic
    core.on_unsubscribe(identity, topic)
    check_core(core)


# --- the core, driven by random sequences ---------------------------------------------------

TOPIC_CHOICES = ["sys/", "SELF", "OTHER", "r/", "r/lobby/", "r/ops/", "r/dev/", "r/Lobby/", "r/../",
                 "r/lobby", "u/", "", "r//", "u/x/", "sys", "r/" + "a" * 33 + "/"]
SAFE_STREAM_EVENTS = (Welcome, Error, History, Direct, Muted, Renamed)


class CoreMachine(RuleBasedStateMachine):
    """Five identities against one core (open or closed mode) with tight limits, so the peer
    bound, idle forgetting, member expiry and the rate limit are all reached."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.core: BrokerCore | None = None
        self.last_seq: dict[str, int] = {}
        self.fetches = 0

    @initialize(closed=st.booleans(), max_peers=st.integers(min_value=3, max_value=6))
    def start(self, closed: bool, max_peers: int) -> None:
        accounts = ({A: Account("alice", "admin"), B: Account("bob"), C: Account("tapper", "tap"),
                     D: Account("dave")} if closed else None)
        limits = Limits(max_peers=max_peers, max_topics_per_peer=6, peer_idle_seconds=20.0,
                        client_timeout=3.0, rate_burst=8, rate_per_second=4.0)
        self.core = BrokerCore("epoch", self.now, limits, accounts=accounts)
        # Start with two members (in closed mode: the admin and a user), so that private
        # messages and moderation happen from the first step.
        self.full_join(A, "alice", [])
        self.full_join(B, "bob", ["lobby", "ops"])

    # --- the harness ------------------------------------------------------------------

    def _names_by_identity(self) -> dict[str, str]:
        assert self.core is not None
        return {identity: peer.member.name for identity, peer in self.core.peers.items() if peer.member}

    def _apply(self, actor: str | None, out: object, kind: str) -> None:
        """Check what one call returned, then play the shell's part (answer fetches and mail)."""
        core = self.core
        assert core is not None
        self._evicted(core)
        records = check_records(out)
        names = self._names_by_identity()
        publications = [item for item in records if isinstance(item, Publish)]
        for item in records:
            if isinstance(item, (Fetch, DeliverMail)):
                assert item.identity == actor, (kind, item)  # answers go to the asker only
                if isinstance(item, Fetch):
                    publications.append(core.reply(item.identity, lambda seq, f=item, now=self.now: History(
                        seq=seq, ts=now, room=f.room, events=[], after=f.after, upto=f.upto, ref=f.ref)))
            elif isinstance(item, Mail):
                assert kind == "message" and isinstance(item.event, Direct) and item.event.offline
                # Kept for the key it was sealed to, which holds the name no more (offline).
                assert item.sender == actor == item.event.from_ == item.copy.from_
                recipient = core.peers.get(item.recipient)
                assert item.recipient in IDENTITIES and (recipient is None or recipient.member is None)
        for publication in publications:
            self._check_publication(actor, kind, publication, names)

    def _check_publication(self, actor: str | None, kind: str, publication: Publish,
                           names: dict[str, str]) -> None:
        topic, event = publication.topic, publication.event
        # Numbering: each topic's seqs are consecutive; marks repeat the last one.
        last = self.last_seq.get(topic, 0)
        if isinstance(event, Mark):
            assert kind == "tick" and topic.startswith(ROOM_PREFIX)
            assert event.seq == last and last > 0, (topic, event.seq, last)
        else:
            assert event.seq == last + 1, (topic, event, last)
            self.last_seq[topic] = event.seq
        # Where events may go.
        if topic == SYSTEM_TOPIC:
            assert isinstance(event, (Heartbeat, Shutdown)), event
            return
        if topic.startswith(ROOM_PREFIX):
            room = room_of_topic(topic)
            assert room is not None, topic
            assert getattr(event, "room", room) == room, (topic, event)
            assert not isinstance(event, (Welcome, Error, Direct, History, Heartbeat)), (topic, event)
            return
        assert topic.startswith(PRIVATE_PREFIX), topic
        owner = topic[len(PRIVATE_PREFIX):-1]
        assert private_topic(owner) == topic and owner in IDENTITIES, topic
        if isinstance(event, Welcome):
            assert event.id == owner and owner == actor
        if owner == actor:
            return
        # Someone else's private stream: only events about its owner.
        assert isinstance(event, SAFE_STREAM_EVENTS) and not isinstance(event, (Welcome, History)), event
        owner_name = names.get(owner)
        if isinstance(event, Direct):  # the recipient's copy
            assert kind == "message" and event.ref is None and not event.offline
            assert owner_name is not None and event.to == owner_name
        elif isinstance(event, Error):  # removed by an admin, or by the operator's reload
            assert event.code in (Code.KICKED, Code.BANNED, Code.REVOKED), event
            assert event.ref is None
        elif isinstance(event, Muted):
            assert kind == "message" and event.room == "" and event.name == owner_name
        elif isinstance(event, Renamed):
            assert kind == "accounts" and event.room == "" and event.new == owner_name

    def _evicted(self, core: BrokerCore) -> None:
        """Keys evicted to make room (made while handling the call): told `busy` on their own
        stream, in its numbering, and cut; their numbering may then start over."""
        for item in check_records(core.take_evictions()):
            if isinstance(item, Publish):
                owner = item.topic[len(PRIVATE_PREFIX):-1]
                assert isinstance(item.event, Error) and item.event.code == Code.BUSY, item
                assert owner not in core.peers and owner not in core.names.values()
                assert item.event.seq == self.last_seq.get(item.topic, 0) + 1, item
            else:
                assert isinstance(item, Disconnect) and item.identity not in core.peers, item
        self._forgotten()

    def _forgotten(self) -> None:
        """A forgotten identity's private numbering may start over: only then drop it."""
        assert self.core is not None
        for topic in [t for t in self.last_seq if t.startswith(PRIVATE_PREFIX)]:
            if topic not in self.core.seqs:
                assert topic[len(PRIVATE_PREFIX):-1] not in self.core.peers, topic
                del self.last_seq[topic]

    def _topic(self, identity: str | None, choice: str, other: str) -> str:
        if choice == "SELF":
            return private_topic(identity or other)
        if choice == "OTHER":
            return private_topic(other)
        return choice

    # --- rules ------------------------------------------------------------------------------

    @rule(identity=st.sampled_from(IDENTITIES + [None]),
          choice=st.sampled_from(TOPIC_CHOICES) | st.text(max_size=12),
          other=st.sampled_from(IDENTITIES))
    def subscribe(self, identity: str | None, choice: str, other: str) -> None:
        assert self.core is not None
        topic = self._topic(identity, choice, other)
        allowed, out = self.core.on_subscribe(identity, topic, self.now)
        assert isinstance(allowed, bool)
        if allowed:
            assert identity is not None
            assert (topic in (SYSTEM_TOPIC, ROOM_PREFIX, private_topic(identity))
                    or room_of_topic(topic) is not None), topic
            if topic == ROOM_PREFIX and self.core.accounts is not None:
                assert self.core.accounts[identity].role in ("tap", "admin")
        else:
            assert out == []
        self._apply(identity, out, "subscribe")

    @rule(identity=st.sampled_from(IDENTITIES + [None]), choice=st.sampled_from(TOPIC_CHOICES),
          other=st.sampled_from(IDENTITIES))
    def unsubscribe(self, identity: str | None, choice: str, other: str) -> None:
        assert self.core is not None
        assert self.core.on_unsubscribe(identity, self._topic(identity, choice, other)) is None

    @rule(identity=st.sampled_from(IDENTITIES + [None]), data=bodies,
          frames=st.sampled_from([1, 1, 1, 1, 2, 0]))
    def message(self, identity: str | None, data: bytes, frames: int) -> None:
        assert self.core is not None
        self._apply(identity, self.core.on_message(identity, data, frames, self.now), "message")

    @rule(identity=st.sampled_from(IDENTITIES), name=st.sampled_from(NAMES[:7]),
          room_list=st.lists(st.sampled_from(["lobby", "ops", "dev", "#Lobby"]), max_size=3))
    def full_join(self, identity: str, name: str, room_list: list[str]) -> None:
        """What a well-behaved client does: subscribe, then join."""
        assert self.core is not None
        wanted = [room.lstrip("#").lower() for room in room_list] or ["lobby"]
        for topic in [SYSTEM_TOPIC, private_topic(identity)] + [f"r/{room}/" for room in wanted]:
            self._apply(identity, self.core.on_subscribe(identity, topic, self.now)[1], "subscribe")
        body = to_json({"type": "join", "name": name, "rooms": room_list})
        self._apply(identity, self.core.on_message(identity, body, 1, self.now), "message")

    @precondition(lambda self: self.core is not None and self.core.online > 0)
    @rule(data=st.data(), kind=st.sampled_from(["say", "say", "me", "msg", "msg", "msg", "key", "kick", "ban",
                                                 "mute", "mute", "who", "rooms", "enter", "part", "nick"]),
          room=st.sampled_from(["lobby", "ops", "dev"]), seconds=st.sampled_from([0, 1, 60]))
    def command(self, data: st.DataObject, kind: str, room: str, seconds: int) -> None:
        """Well-formed commands from members, about members, so that moderation and messaging
        paths are actually taken."""
        assert self.core is not None
        members = sorted(self._names_by_identity().items())
        admins = [identity for identity, _ in members
                  if self.core.accounts is not None and self.core.accounts[identity].role == "admin"]
        if admins and data.draw(st.booleans(), label="as admin"):
            identity = data.draw(st.sampled_from(admins), label="admin")
        else:
            identity = data.draw(st.sampled_from([identity for identity, _ in members]), label="identity")
        own_rooms = self.core.peers[identity].member.rooms  # type: ignore[union-attr]
        if own_rooms and data.draw(st.booleans(), label="own room"):
            room = data.draw(st.sampled_from(own_rooms), label="room")
        someone = data.draw(st.sampled_from([name for _, name in members] + ["nobody"]), label="someone")
        bound = self.core.names.get(someone.casefold()) or self.core.known_names.get(someone.casefold())
        key = data.draw(st.sampled_from([bound or A] * 3 + IDENTITIES), label="key")
        fields = {"say": {"room": room, "text": "hello", "ref": 7}, "me": {"room": room, "text": "waves"},
                  "msg": {"to": someone, "key": key, "box": BOX, "self_box": SELF_BOX, "ref": 8},
                  "key": {"name": someone, "ref": 9}, "kick": {"name": someone, "reason": "r"},
                  "ban": {"name": someone}, "mute": {"name": someone, "seconds": seconds},
                  "who": {"room": room}, "rooms": {}, "enter": {"room": room}, "part": {"room": room},
                  "nick": {"name": someone if seconds else "renamed"}}[kind]
        body = to_json({"type": kind, **fields})
        self._apply(identity, self.core.on_message(identity, body, 1, self.now), "message")

    @rule(identity=st.sampled_from(IDENTITIES))
    def disconnect(self, identity: str) -> None:
        assert self.core is not None
        self._apply(None, self.core.on_disconnect(identity, self.now), "disconnect")

    @rule(dt=st.floats(min_value=0.0, max_value=1.0) | st.sampled_from([2.0, 3.5, 25.0]))
    def tick(self, dt: float) -> None:
        assert self.core is not None
        self.now += dt
        self._apply(None, self.core.tick(self.now), "tick")
        self._forgotten()

    @precondition(lambda self: self.core is not None and self.core.accounts is not None)
    @rule(listed=st.lists(st.booleans(), min_size=4, max_size=4),
          order=st.permutations(["alice", "bob", "tapper", "dave", "erin"]),
          roles=st.lists(st.sampled_from(["user", "tap", "admin"]), min_size=4, max_size=4))
    def reload_accounts(self, listed: list[bool], order: list[str], roles: list[str]) -> None:
        """The operator edits the file (valid: unique names) and sends SIGHUP."""
        assert self.core is not None
        accounts = {identity: Account(order[i], roles[i])
                    for i, identity in enumerate((A, B, C, D)) if listed[i]}
        self._apply(None, self.core.set_accounts(accounts, self.now), "accounts")
        self._forgotten()

    @invariant()
    def consistent(self) -> None:
        if self.core is not None:
            check_core(self.core)


CoreMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.pytestmark = [pytest.mark.timeout(120)]  # type: ignore[attr-defined]
