"""The broker's state machine: presence, names, rooms, sequence numbers, limits.

Pure: no sockets, no clock, no disk. The shell feeds it what arrived (a
subscription, a message body, a disconnect) with the current time and
publishes the `Publish` records it returns, in order. The sender of anything
is the identity ZAP assigned (hex of its CURVE public key), never a name
found in a message body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

import msgspec

from zchat import limits as L
from zchat.accounts import Account
from zchat.flow import TokenBucket
from zchat.protocol import (
    DEFAULT_ROOM,
    PRIVATE_PREFIX,
    RESERVED_ROLE,
    ROOM_PREFIX,
    SYSTEM_TOPIC,
    Action,
    Away,
    AwayNotice,
    Ban,
    BanList,
    Bans,
    Code,
    Direct,
    Enter,
    Error,
    Event,
    Heartbeat,
    HistoryRequest,
    Join,
    Joined,
    KeyReply,
    KeyRequest,
    Kick,
    Leave,
    Left,
    LeftReason,
    Mark,
    Me,
    Message,
    Msg,
    Mute,
    Muted,
    Nick,
    Part,
    Ping,
    Post,
    Posted,
    ProtocolError,
    Renamed,
    RoomList,
    Rooms,
    RoomTopic,
    Say,
    SetTopic,
    Shutdown,
    Since,
    Unban,
    Unbanned,
    Welcome,
    Who,
    WhoReply,
    clean_message,
    clean_text,
    decode_client_message,
    lookalike_key,
    name_key,
    normalize_room,
    private_topic,
    reserved_name,
    room_of_topic,
    room_topic,
    valid_name,
)


def invalid_name_detail(name: str) -> str:
    return (f"invalid name {clean_text(name)!r}: 1-{L.MAX_NAME_CHARS} ASCII letters, digits, '.', '-' "
            "or '_', starting with a letter or digit")


MARKS_AFTER_ACTIVITY = 3  # heartbeats that repeat a room's last seq after its last event


@dataclass(frozen=True, slots=True)
class Limits:
    """Tunable limits; defaults come from zchat.limits."""

    rate_burst: int = L.RATE_BURST
    rate_per_second: float = L.RATE_PER_SECOND
    client_timeout: float = L.CLIENT_TIMEOUT
    heartbeat_interval: float = L.BROKER_HEARTBEAT_INTERVAL
    max_peers: int = L.MAX_PEERS
    max_topics_per_peer: int = L.MAX_TOPICS_PER_PEER
    peer_idle_seconds: float = L.PEER_IDLE_SECONDS
    pings_per_second: int = L.PINGS_PER_SECOND
    max_frames_per_second: int = L.MAX_FRAMES_PER_SECOND
    history_bytes_burst: int = L.HISTORY_BYTES_BURST
    history_bytes_per_second: int = L.HISTORY_BYTES_PER_SECOND
    max_history_page_bytes: int = L.MAX_HISTORY_PAGE_BYTES
    max_backlog_bytes: int = L.MAX_BACKLOG_BYTES  # the shell's: see zchat.limits
    # The frames-per-second ceiling actually applied: never below what the token bucket lets
    # an honest sender do in a second (twice over), so an operator's higher rate limit (or
    # none: 10**9) raises it too.
    frame_ceiling: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "frame_ceiling", max(
            float(self.max_frames_per_second), 2.0 * (self.rate_burst + self.rate_per_second)))


@dataclass(slots=True)
class Publish:
    """One event to publish on one topic."""

    topic: str
    event: Event


@dataclass(slots=True)
class Fetch:
    """Ask the shell for stored events of `room` with after < seq <= upto (the newest
    `limit` of them), to publish as a History event on `identity`'s private stream."""

    identity: str
    room: str
    after: int
    upto: int
    limit: int
    ref: int | None = None


@dataclass(slots=True)
class Mail:
    """Keep a private message for an offline key: `recipient` is the key the sender encrypted
    it to, and only that key gets it. The mailbox may refuse it (the sender's share is used
    up: `mailbox_full`) or push another sender's message out (`mail_dropped` to that one);
    the shell then answers the sender with `copy`, numbered on its stream as it is sent."""

    recipient: str
    sender: str
    event: Direct  # the recipient's copy, as it will be delivered
    copy: Direct  # the sender's copy (its seq is given when it is published)


@dataclass(slots=True)
class DeliverMail:
    """Publish (with `core.reply`) and forget the mail kept for `identity`."""

    identity: str


@dataclass(slots=True)
class Remember:
    """`name` was last held by `identity`: keep it for mail to offline users."""

    name_key: str
    identity: str


@dataclass(slots=True)
class Disconnect:
    """Cut this identity's connections (kicked, banned, or its key was revoked)."""

    identity: str


@dataclass(slots=True)
class Banned:
    """Refuse this identity from now on, across restarts."""

    identity: str


@dataclass(slots=True)
class FindSince:
    """Ask the shell where each room's stored events from wall time `since` on begin (rooms:
    these only, else every room), to answer with a SinceReply on `identity`'s private stream."""

    identity: str
    since: float
    rooms: list[str] | None
    ref: int | None = None


@dataclass(slots=True)
class Pardoned:
    """An admin lifted this identity's ban: forget it across restarts too."""

    identity: str


@dataclass(slots=True)
class KeepTopic:
    """Store `room`'s topic ("" : none) so it survives a restart."""

    room: str
    text: str
    by: str


Out = (Publish | Fetch | Mail | DeliverMail | Remember | Disconnect | Banned | FindSince | Pardoned
       | KeepTopic)


@dataclass(slots=True)
class Member:
    name: str
    rooms: list[str]
    history: int = L.DEFAULT_HISTORY  # events of history wanted when entering a room
    away: str = ""  # its away message ("" : here)
    away_told: set[str] = field(default_factory=set)  # senders told it is away, this away period


@dataclass(slots=True)
class Peer:
    """Everything known about one identity, joined or not."""

    identity: str
    last_seen: float
    bucket: TokenBucket  # its flood control
    topics: set[str] = field(default_factory=set)
    pending_join: Join | None = None
    pending_rooms: dict[str, int] = field(default_factory=dict)  # room -> history, awaiting subscription
    member: Member | None = None
    throttled: bool = False  # told "rate_limited" since the bucket last ran dry
    # The frames-per-second ceiling: frames left in the window that began at `frames_since`
    # (a new one begins when they run out a second or more after it); a member's free pings
    # in the second that began at `pings_since`.
    frames_since: float = float("-inf")
    frames_left: int = 0
    pings_since: float = float("-inf")
    pings: int = 0
    # History answers' bytes: a second token bucket, in bytes (see history_allowance).
    history_bytes: float = 0.0
    history_refilled: float = 0.0
    notice: str | None = None  # why its publish connections were cut: told on resubscribing
    # Its latest posts (ref -> room, seq of the message): a resent post is confirmed again.
    posted: dict[int, tuple[str, int]] = field(default_factory=dict)


def topic_allowed(identity: str, topic: str, closed: bool, role: str) -> bool:
    """The subscription policy (shared by the broker and relays): public prefixes, and of the
    private streams only the subscriber's own. Every public room at once (`r/`) is for taps; in
    closed mode, by role (tap, admin, relay). A `relay` key carries its clients' private
    streams, which are sealed to each client: it may subscribe to any `u/<id>/`."""
    if topic == ROOM_PREFIX:
        return not closed or role in ("tap", "admin", "relay")
    if topic == SYSTEM_TOPIC:
        return True
    if topic.startswith(PRIVATE_PREFIX):
        if role == "relay":
            rest = topic[len(PRIVATE_PREFIX):]
            return len(rest) == 65 and rest.endswith("/") and all(c in "0123456789abcdef" for c in rest[:-1])
        return topic == private_topic(identity)
    return room_of_topic(topic) is not None


class BrokerCore:
    def __init__(self, epoch: str, now: float, limits: Limits | None = None,
                 seqs: dict[str, int] | None = None, known_names: dict[str, str] | None = None,
                 accounts: dict[str, Account] | None = None, banned: set[str] | None = None,
                 stored_seq: Callable[[str], int] | None = None,
                 topics: dict[str, tuple[str, str]] | None = None) -> None:
        """Room numbers come from storage, so numbering continues after a restart: the core
        keeps in memory only the rooms in use (members, or events in the last few heartbeats)
        and asks `stored_seq(topic)` for a room's last number when it is used again; the
        shell has stored everything the core published by then. Without storage (tests),
        `seqs` gives the numbers to start from and those of rooms no longer in use are kept
        here. `known_names` come from storage too. `accounts` (closed mode) fixes who may be
        here, with which name and role; None is open mode. `banned` identities are refused in
        both modes."""
        self.epoch = epoch
        # `now`, in every call, is the shell's monotonic clock: it times heartbeats, expiry,
        # rate buckets and mutes, and a wall-clock step changes none of them. Events carry
        # wall time: now + wall_offset, which the shell keeps current (time.time() - now).
        self.wall_offset = 0.0
        self.accounts = accounts
        self.banned: set[str] = set(banned or ())
        self.muted: dict[str, float] = {}  # identity -> until when it may not speak
        # room -> (topic, who set it), from storage; the most recently set last (bounded).
        self.topics: dict[str, tuple[str, str]] = dict(topics or {})
        self.limits = limits or Limits()
        self.peers: dict[str, Peer] = {}
        self.names: dict[str, str] = {}  # name_key(name) -> identity, online members
        # lookalike_key(name) -> identity, online members: one per key in open mode, where a
        # look-alike of a held name is refused (closed mode's file may list two; unused there).
        self.lookalikes: dict[str, str] = {}
        self.known_names: dict[str, str] = dict(known_names or {})  # name_key -> last identity
        self.rooms: dict[str, set[str]] = {}  # room -> member identities
        # Topics in use -> last seq: rooms with members or recent events, private streams, sys/.
        self.seqs: dict[str, int] = {}
        self._unused_rooms: dict[str, int] | None = None if stored_seq else dict(seqs or {})
        self._stored_seq = stored_seq or self._unused_room_seq
        self.next_heartbeat = now
        self.next_expiry_scan = now
        self.busy_rooms: dict[str, int] = {}  # room topic -> marks still to send after its last event
        # For the broker's stats: frames refused as invalid (by error code); senders refused
        # for rate since the shell last emptied the set, and how many messages that refused.
        self.rejected: dict[str, int] = {}
        self.rate_limited: set[str] = set()
        self.rate_limited_total = 0
        # Peers that are not members, least recently active first. When the table is full the
        # first of them makes room for a new key, so keys that never joined cannot take the
        # places members need. Entries of peers since gone or joined are skipped then.
        self.strangers: dict[str, None] = {}
        self.evictions: list[Out] = []  # what the shell sends for evicted keys (take_evictions)
        self.evicted_total = 0
        self.turned_away = 0  # new keys ignored: every place was held by a member

    # --- queries -----------------------------------------------------------

    def ts(self, now: float) -> float:
        """The wall-clock time stamped on an event published at monotonic `now`."""
        return now + self.wall_offset

    @property
    def online(self) -> int:
        return len(self.names)

    def member_name(self, identity: str) -> str | None:
        peer = self.peers.get(identity)
        return peer.member.name if peer and peer.member else None

    def room_for_new_key(self) -> bool:
        """Whether a key not tracked yet would get a place (a free one, or a non-member's)."""
        return len(self.peers) < self.limits.max_peers or len(self.names) < len(self.peers)

    def take_evictions(self) -> list[Out]:
        """The notices and cuts owed to keys evicted to make room since the last call."""
        out, self.evictions = self.evictions, []
        return out

    # --- subscriptions -----------------------------------------------------

    def on_subscribe(self, identity: str | None, topic: str, now: float) -> tuple[bool, list[Out]]:
        """Decide whether `identity` may receive `topic`; may complete a pending join."""
        if identity is None or not self._topic_allowed(identity, topic):
            return False, []
        peer = self._peer(identity, now)
        if peer is None:
            return False, []
        if topic not in peer.topics:
            if len(peer.topics) >= self.limits.max_topics_per_peer:
                return False, []
            peer.topics.add(topic)
        peer.last_seen = now
        if peer.member is None:
            self._touch(identity)
        told: list[Out] = []
        if peer.notice is not None and topic == private_topic(identity):
            told, peer.notice = self._error(peer, now, Code.SLOW_CONSUMER, peer.notice), None
        if peer.pending_join is not None:
            return True, told + self._try_join(peer, peer.pending_join, now)
        if peer.pending_rooms and peer.member is not None:
            return True, told + self._try_enter(peer, peer.member, now)
        return True, told

    def on_unsubscribed_all(self, identity: str) -> None:
        """Its publish-side connection closed: none of its subscriptions is installed any
        more. A join must now wait for the new connection's subscriptions again, or what
        the welcome brings (history, kept mail) would go nowhere."""
        peer = self.peers.get(identity)
        if peer is not None:
            peer.topics.clear()

    def on_unsubscribe(self, identity: str | None, topic: str) -> None:
        # Unsubscribes without an identity come from closing connections: ignore.
        peer = self.peers.get(identity) if identity else None
        if peer is not None:
            peer.topics.discard(topic)

    def _admitted(self, identity: str) -> bool:
        return identity not in self.banned and (self.accounts is None or identity in self.accounts)

    def _role(self, identity: str) -> str:
        account = self.accounts.get(identity) if self.accounts is not None else None
        return account.role if account is not None else "user"

    def _topic_allowed(self, identity: str, topic: str) -> bool:
        return self._admitted(identity) and topic_allowed(
            identity, topic, self.accounts is not None, self._role(identity))

    # --- messages ------------------------------------------------------------

    def on_message(
        self, identity: str | None, body: bytes | memoryview, frames: int, now: float
    ) -> list[Out]:
        if identity is None or identity in self.banned or (
                self.accounts is not None and identity not in self.accounts):
            return []  # not admitted (_admitted, inlined: this is the hot path): never trust it
        peer = self.peers.get(identity) or self._peer(identity, now)
        if peer is None:
            return []
        peer.last_seen = now
        if peer.member is None:
            self._touch(identity)
        # Every frame counts against a ceiling per second, whatever it is: past it the key is
        # cut and the rest of the second's frames are dropped undecoded.
        left = peer.frames_left - 1
        peer.frames_left = left
        if left < 0 and self._flooding(peer, now):
            return self._flooded(peer, now)
        try:
            message = decode_client_message(body, frames)
        except ProtocolError as exc:
            self.rejected[exc.code] = self.rejected.get(exc.code, 0) + 1
            return self._refuse(peer, now, exc.code, exc.detail)
        if isinstance(message, Ping) and peer.member is not None:
            # A member's pings only keep presence alive: free, a few a second. Beyond that
            # they are charged like any message, and otherwise ignored.
            if now - peer.pings_since >= 1.0:
                peer.pings_since, peer.pings = now, 0
            peer.pings += 1
            if peer.pings <= self.limits.pings_per_second:
                return []
            return self._charge(peer, now, message) or []
        if isinstance(message, Join):
            # Free: clients resend joins until welcomed. Only a rename is charged (below);
            # a join-leave cycle is paid for by its leave.
            return self._join(peer, message, now)
        throttled = self._charge(peer, now, message)
        if throttled is not None:
            return throttled
        if isinstance(message, HistoryRequest):
            return self._history(peer, peer.member, message, now)
        if isinstance(message, Since):
            return self._since(peer, message, now)
        if isinstance(message, Post):
            return self._post(peer, message, now)
        if peer.member is None:
            if isinstance(message, Leave):
                return []  # leaving twice, or after a refused join: nothing to say
            return self._error(peer, now, Code.NOT_JOINED, "join first", getattr(message, "ref", None))
        return self._handlers[type(message)](self, peer, peer.member, message, now)

    def on_oversized(self, identity: str | None, frames: int, size: int, now: float) -> list[Out]:
        """The shell dropped a message past MAX_MESSAGE_PARTS or MAX_MESSAGE_BYTES unread: say
        why and cut the sender."""
        peer = self.peers.get(identity) if identity is not None else None
        if peer is None:
            return [] if identity is None else [Disconnect(identity)]
        code = Code.TOO_MANY_FRAMES if frames > L.MAX_MESSAGE_PARTS else Code.TOO_LARGE
        self.rejected[code] = self.rejected.get(code, 0) + 1
        out = self._error(peer, now, code, f"a message of {frames} frames and {size} bytes (limits "
                          f"{L.MAX_MESSAGE_PARTS} and {L.MAX_MESSAGE_BYTES}): disconnected")
        out.append(Disconnect(identity))  # type: ignore[arg-type]
        return out

    def on_input_flood(self, identity: str, rate: int, now: float) -> list[Out]:
        """The shell cut an input connection of `identity` that sent more than `rate` bytes a
        second (e.g. one endless multipart message): say why and cut the rest of the key."""
        self.rejected[Code.FLOODING] = self.rejected.get(Code.FLOODING, 0) + 1
        peer = self.peers.get(identity)
        out = [] if peer is None else self._error(
            peer, now, Code.FLOODING, f"more than {rate} bytes a second on one connection: disconnected")
        out.append(Disconnect(identity))
        return out

    def slow_consumer(self, identity: str, detail: str) -> None:
        """The shell cut this key's publish connections: too much waited for it unread. It is
        told when it subscribes to its private stream again (nothing queued before could
        reach it)."""
        peer = self.peers.get(identity)
        if peer is not None:
            peer.notice = detail

    def on_disconnect(self, identity: str, now: float) -> list[Out]:
        """The transport saw this identity's connection close (crash or exit)."""
        peer = self.peers.get(identity)
        if peer is None:
            return []
        # The peer record (and its approved topics) stays until it idles out: if only the
        # input connection dropped, the SUB is still subscribed and not_joined must reach it.
        return self._leave(peer, LeftReason.DISCONNECTED, "", now)

    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: the configured interval, longer with thousands online
        (each heartbeat is one delivery per member), never past BROKER_HEARTBEAT_MAX."""
        base = self.limits.heartbeat_interval
        spread = self.online / L.HEARTBEAT_DELIVERIES_PER_SECOND
        return max(base, min(spread, L.BROKER_HEARTBEAT_MAX))

    def tick(self, now: float) -> list[Out]:
        """Heartbeats, member expiry and forgetting idle identities."""
        out: list[Out] = []
        if now >= self.next_heartbeat:
            interval = self.heartbeat_interval()
            self.next_heartbeat = now + interval
            out.append(self._publish(SYSTEM_TOPIC, lambda seq: Heartbeat(
                seq=seq, ts=self.ts(now), epoch=self.epoch, interval=interval, online=self.online)))
            # Marks repeat the last seq of each busy room (taking no number themselves).
            # A few of them after a room's last event, in case a mark is lost with the tail.
            ts = self.ts(now)
            out += [Publish(topic, Mark(seq=self.seqs[topic], ts=ts, room=room_of_topic(topic) or ""))
                    for topic in self.busy_rooms]
            busy: dict[str, int] = {}
            for topic, left in self.busy_rooms.items():
                if left > 1:
                    busy[topic] = left - 1
                elif topic[len(ROOM_PREFIX):-1] not in self.rooms:
                    self._retire(topic)  # quiet and empty: its number lives in storage
            self.busy_rooms = busy
        if now >= self.next_expiry_scan:
            self.next_expiry_scan = now + min(0.5, self.limits.client_timeout / 4)
            member_deadline = now - self.limits.client_timeout
            idle_deadline = now - self.limits.peer_idle_seconds
            if self.muted:  # mutes that ran out
                self.muted = {identity: until for identity, until in self.muted.items() if until > now}
            for peer in list(self.peers.values()):
                if peer.member is not None:
                    if peer.last_seen < member_deadline:
                        out.extend(self._leave(peer, LeftReason.TIMEOUT, "", now))
                elif peer.last_seen < idle_deadline:
                    self._forget(peer.identity)
        return out

    def reply(self, identity: str, make: Callable[[int], Event]) -> Publish:
        """An event for `identity`'s private stream, numbered in its sequence (for the shell's
        answers to Fetch and DeliverMail)."""
        return self._publish(private_topic(identity), make)

    def notify(self, identity: str, make: Callable[[int], Event]) -> Publish | None:
        """Like `reply`, for news a key did not ask for (its kept mail was dropped): None when
        it would reach nobody, so an absent key costs no sequence counter."""
        peer = self.peers.get(identity)
        if peer is None or private_topic(identity) not in peer.topics:
            return None
        return self._publish(private_topic(identity), make)

    def publish_system(self, make: Callable[[int], Event]) -> Publish:
        """An event on sys/, numbered in its sequence (for the shell's stats)."""
        return self._publish(SYSTEM_TOPIC, make)

    def shutdown(self, now: float, detail: str) -> list[Out]:
        return [self._publish(SYSTEM_TOPIC, lambda seq: Shutdown(
            seq=seq, ts=self.ts(now), epoch=self.epoch, detail=detail))]

    # --- handlers ------------------------------------------------------------

    def _join(self, peer: Peer, join: Join, now: float) -> list[Out]:
        if self.accounts is not None:  # closed mode: the operator's file names each key
            join = msgspec.structs.replace(join, name=self.accounts[peer.identity].name)
        if not valid_name(join.name):
            return self._refuse(peer, now, Code.INVALID_NAME, invalid_name_detail(join.name))
        rooms: list[str] = []
        for raw in [DEFAULT_ROOM] if join.rooms is None else join.rooms:
            room = normalize_room(raw)
            if room is None:
                return self._refuse(peer, now, Code.INVALID_ROOM, f"invalid room {raw!r}")
            if room not in rooms:
                rooms.append(room)
        seen = {room: seq for raw, seq in join.seen.items() if (room := normalize_room(raw))}
        return self._try_join(peer, msgspec.structs.replace(join, rooms=rooms, seen=seen), now)

    def _try_join(self, peer: Peer, join: Join, now: float) -> list[Out]:
        """Complete a join once its private stream and rooms are subscribed."""
        needed = [private_topic(peer.identity)]
        if ROOM_PREFIX not in peer.topics:
            needed += [room_topic(room) for room in join.rooms]
        if not all(topic in peer.topics for topic in needed):
            peer.pending_join = join  # the missing subscriptions will retry it
            return []
        peer.pending_join = None
        refused = self._claim_refused(peer, join.name)
        if refused is not None:
            return self._refuse(peer, now, Code.NAME_TAKEN, refused)
        out: list[Out] = []
        member = peer.member
        resumed = member is not None
        if resumed:
            # Only the join that makes a member (or waits for subscriptions) is free:
            # a repeated one costs a welcome, so it is charged like any request.
            throttled = self._charge(peer, now)
            if throttled is not None:
                return throttled
        current = member.rooms if member is not None else []
        new_rooms = [room for room in join.rooms if room not in current]
        if len(current) + len(new_rooms) > L.MAX_ROOMS_PER_MEMBER:  # checked before changing anything
            return self._error(peer, now, Code.TOO_MANY_ROOMS,
                               f"at most {L.MAX_ROOMS_PER_MEMBER} rooms; /leave one first")
        if member is None:
            member = peer.member = Member(name=join.name, rooms=[], history=join.history)
            self.strangers.pop(peer.identity, None)
            self._hold(join.name, peer.identity)
            out += self._remember(join.name, peer.identity)
        elif member.name != join.name:
            out += self._rename(peer, member, join.name, now)
        baseline = {room: self._last_seq(room_topic(room)) for room in member.rooms + new_rooms}
        arriving = resumed is False
        joined: list[Out] = []
        for room in new_rooms:
            joined += self._add_to_room(peer, member, room, now, chat=arriving)
        # History goes out after the welcome and before the joined notices: the seam
        # between what was stored (seq <= baseline) and live traffic is exact.
        # New rooms: recent history (or what came after `seen`); rooms kept across a resumed
        # rejoin: only what came after `seen`, if the client says what it has.
        fetches: list[Out] = [
            Fetch(peer.identity, room, join.seen.get(room, 0), baseline[room], join.history)
            for room in join.rooms
            if join.history and (room in new_rooms or room in join.seen)
            and join.seen.get(room, 0) < baseline[room]]
        if arriving:
            fetches.append(DeliverMail(peer.identity))
        out.append(self._publish(private_topic(peer.identity), lambda seq: Welcome(
            seq=seq, ts=self.ts(now), id=peer.identity, name=member.name, epoch=self.epoch,
            rooms=baseline, online=self.online,
            members=[self.peers[i].member.name for i in islice(self.names.values(), L.MEMBERS_IN_WELCOME)],  # type: ignore[union-attr]
            heartbeat=self.heartbeat_interval(), rate_burst=self.limits.rate_burst,
            rate_per_second=self.limits.rate_per_second, resumed=resumed,
            timeout=self.limits.client_timeout)))
        return out + self._tell_topics(peer, new_rooms, now) + fetches + joined

    def _remember(self, name: str, identity: str) -> list[Out]:
        key = name_key(name)
        if self.known_names.get(key) == identity:
            return []
        self.known_names.pop(key, None)  # re-insert: dict order is our recency order
        self.known_names[key] = identity
        if len(self.known_names) > L.KNOWN_NAMES:
            del self.known_names[next(iter(self.known_names))]
        return [Remember(key, identity)]

    def _rename(self, peer: Peer, member: Member, new: str, now: float,
                 release_old: bool = True) -> list[Out]:
        old = member.name
        remembered: list[Out] = []
        if name_key(old) != name_key(new):
            if release_old:  # set_accounts releases every old name first, itself
                self._release(old, peer.identity)
            self._hold(new, peer.identity)
            remembered = self._remember(new, peer.identity)
        member.name = new
        # Everyone in the member's rooms is told; with no room, the member alone.
        topics = [room_topic(room) for room in member.rooms] or [private_topic(peer.identity)]
        return remembered + [self._publish(topic, lambda seq, topic=topic: Renamed(
            seq=seq, ts=self.ts(now), room=room_of_topic(topic) or "", old=old, new=new)) for topic in topics]

    def _room_of(self, peer: Peer, member: Member, raw: str, now: float,
                 ref: int | None = None) -> tuple[str | None, list[Out]]:
        """The member's room named `raw`, or an error to send instead."""
        room = raw if raw in member.rooms else normalize_room(raw)  # clients send it normalized
        if room is None or room not in member.rooms:
            return None, self._error(peer, now, Code.NOT_IN_ROOM, f"you are not in room {raw!r}", ref)
        return room, []

    def _text(self, peer: Peer, raw: str, now: float, ref: int | None) -> tuple[str, list[Out]]:
        text = clean_message(raw)  # line breaks kept
        return text, ([] if text else self._error(peer, now, Code.EMPTY_TEXT, "message is empty", ref))

    def _say(self, peer: Peer, member: Member, say: Say, now: float) -> list[Out]:
        # The hot path, so written out: the same checks as _me, in the same order.
        if self.muted and self.muted.get(peer.identity, 0.0) > now:
            return self._muted(peer, now, say.ref)
        room = say.room
        if room not in member.rooms:
            checked, error = self._room_of(peer, member, room, now, say.ref)
            if checked is None:
                return error
            room = checked
        text = say.text
        # Printable ASCII has nothing to clean, cheaply known; else clean, keeping line breaks.
        text = text.strip() if text.isascii() and text.isprintable() else clean_message(text)
        if not text:
            return self._error(peer, now, Code.EMPTY_TEXT, "message is empty", say.ref)
        topic = room_topic(room)
        seq = self.seqs.get(topic)  # a room with members is in use: always there
        seq = (self._last_seq(topic) if seq is None else seq) + 1
        self.seqs[topic] = seq
        self.busy_rooms[topic] = MARKS_AFTER_ACTIVITY
        ts = now + self.wall_offset  # self.ts(now), inline on the hot path
        return [Publish(topic, Message(seq=seq, ts=ts, room=room, name=member.name, text=text, ref=say.ref))]

    def _me(self, peer: Peer, member: Member, me: Me, now: float) -> list[Out]:
        if self.muted.get(peer.identity, 0.0) > now:
            return self._muted(peer, now, me.ref)
        room, error = self._room_of(peer, member, me.room, now, me.ref)
        if room is None:
            return error
        text, empty = self._text(peer, me.text, now, me.ref)
        if empty:
            return empty
        return [self._publish(room_topic(room), lambda seq: Action(
            seq=seq, ts=self.ts(now), room=room, name=member.name, text=text, ref=me.ref))]

    def _post(self, peer: Peer, post: Post, now: float) -> list[Out]:
        """A message from a key that need not be a member: nobody joins or leaves. Checked in
        this order: muted, invalid_name, name_taken, invalid_room, no_such_room, empty_text."""
        ref = post.ref
        done = peer.posted.get(ref) if ref is not None else None
        if done is not None:  # a resend (our confirmation was lost): never published twice
            return self._confirm_post(peer, *done, ref, now)
        if self.muted and self.muted.get(peer.identity, 0.0) > now:
            return self._muted(peer, now, ref)
        name, refused = self._post_name(peer, post.name, now, ref)
        if refused:
            return refused
        room = normalize_room(post.room)
        if room is None:
            return self._error(peer, now, Code.INVALID_ROOM, f"invalid room {post.room!r}", ref)
        topic = room_topic(room)
        # The default room always exists (everyone starts there); another must have been used.
        if (not post.create and room != DEFAULT_ROOM and room not in self.rooms
                and self._last_seq(topic) == 0):
            return self._error(peer, now, Code.NO_SUCH_ROOM, self._no_such_room(room), ref)
        text, empty = self._text(peer, post.text, now, ref)
        if empty:
            return empty
        out: list[Out] = [] if peer.member is not None else self._remember(name, peer.identity)
        message = self._publish(topic, lambda seq: Message(seq=seq, ts=self.ts(now), room=room, name=name,
                                                           text=text))
        out.append(message)
        if ref is not None:
            peer.posted[ref] = (room, message.event.seq)
            if len(peer.posted) > L.POSTS_REMEMBERED:
                del peer.posted[next(iter(peer.posted))]
        return out + self._confirm_post(peer, room, message.event.seq, ref, now)

    def _post_name(self, peer: Peer, name: str, now: float, ref: int | None) -> tuple[str, list[Out]]:
        """The name a post goes out under, or the refusal: closed mode's fixed name; a member's
        own name; else a name this key could join with (free, not reserved, no look-alike)."""
        if self.accounts is not None:
            return self.accounts[peer.identity].name, []
        if not valid_name(name):
            return name, self._error(peer, now, Code.INVALID_NAME, invalid_name_detail(name), ref)
        member = peer.member
        if member is not None:
            if name_key(name) != name_key(member.name):
                return name, self._error(peer, now, Code.NAME_TAKEN, (
                    f"this key is online as {member.name!r}: post under that name"), ref)
            return member.name, []
        refused = self._claim_refused(peer, name)
        return name, ([] if refused is None else self._error(peer, now, Code.NAME_TAKEN, refused, ref))

    def _no_such_room(self, room: str) -> str:
        biggest = sorted(self.rooms.items(), key=lambda item: (-len(item[1]), item[0]))
        listed = ", ".join(f"#{name}" for name, _ in biggest[:L.ROOMS_IN_REFUSAL])
        more = len(biggest) - L.ROOMS_IN_REFUSAL
        rooms = f"rooms with people in them: {listed}" if listed else "no room has anyone in it"
        return f"there is no room #{room} ({rooms}{f' and {more} more' if more > 0 else ''})"

    def _confirm_post(self, peer: Peer, room: str, at: int, ref: int | None, now: float) -> list[Out]:
        topic = private_topic(peer.identity)
        if topic not in peer.topics:  # nobody would receive it: the poster resends
            return []
        return [self._publish(topic, lambda seq: Posted(seq=seq, ts=self.ts(now), room=room, at=at, ref=ref))]

    def _bound_key(self, name: str) -> tuple[str | None, str | None]:
        """(the key bound to `name`, the online holder's name): the online holder's key, else
        the key that held the name last; (None, None) for a name nobody has held."""
        target = self.names.get(name_key(name))
        if target is not None:
            return target, self.member_name(target)
        last = self.known_names.get(name_key(name))
        # The last holder may be online under another name (it renamed): it is here, so what
        # is sealed to it goes to it now rather than into a mailbox read on its next arrival.
        return last, self.member_name(last) if last is not None else None

    def _unknown_user(self, peer: Peer, name: str, now: float, ref: int | None) -> list[Out]:
        return self._error(peer, now, Code.NO_SUCH_USER,
                           f"unknown user {clean_text(name)!r}: nobody of that name has been here, "
                           "so there is no key to encrypt to", ref)

    def _key(self, peer: Peer, member: Member, request: KeyRequest, now: float) -> list[Out]:
        key, holder = self._bound_key(request.name)
        if key is None:
            return self._unknown_user(peer, request.name, now, request.ref)
        return [self._publish(private_topic(peer.identity), lambda seq: KeyReply(
            seq=seq, ts=self.ts(now), name=holder or request.name, key=key, online=holder is not None,
            ref=request.ref))]

    def _msg(self, peer: Peer, member: Member, msg: Msg, now: float) -> list[Out]:
        if self.muted.get(peer.identity, 0.0) > now:
            return self._muted(peer, now, msg.ref)
        bound, holder = self._bound_key(msg.to)
        if bound is None:
            return self._unknown_user(peer, msg.to, now, msg.ref)
        if msg.key != bound:
            # Encrypted to a key that no longer holds the name: the sender re-encrypts to this
            # one (and tells its user), or gives up. Nobody gets what was meant for another key.
            name = holder or msg.to
            topic = private_topic(peer.identity)
            if topic not in peer.topics:
                return []
            return [self._publish(topic, lambda seq: Error(
                seq=seq, ts=self.ts(now), code=Code.KEY_CHANGED, key=bound, ref=msg.ref,
                detail=f"{clean_text(name)}'s key changed: another key holds that name now"))]
        sender = peer.identity
        if holder is None:
            # Offline: kept for the key the sender encrypted to, delivered when it joins.
            kept = Direct(seq=0, ts=self.ts(now), name=member.name, to=msg.to, from_=sender, box=msg.box,
                          offline=True)
            copy = Direct(seq=0, ts=self.ts(now), name=member.name, to=msg.to, from_=sender, box=msg.self_box,
                          ref=msg.ref, offline=True)
            return [Mail(bound, sender, kept, copy)]
        # Only on the two private streams: no public topic ever carries it.
        out: list[Out] = [self._publish(private_topic(sender), lambda seq: Direct(
            seq=seq, ts=self.ts(now), name=member.name, to=holder, from_=sender, box=msg.self_box,
            ref=msg.ref))]
        if bound != sender:
            out.append(self._publish(private_topic(bound), lambda seq: Direct(
                seq=seq, ts=self.ts(now), name=member.name, to=holder, from_=sender, box=msg.box)))
            out += self._away_notice(peer, self.peers[bound].member, now)
        return out

    def _away_notice(self, peer: Peer, recipient: Member | None, now: float) -> list[Out]:
        """A private message reached someone away: its sender is told, once per away period.
        (The broker cannot read the message; it knows whom it is for.)"""
        if recipient is None or not recipient.away or peer.identity in recipient.away_told:
            return []
        recipient.away_told.add(peer.identity)
        name, message = recipient.name, recipient.away
        return [self._publish(private_topic(peer.identity), lambda seq: AwayNotice(
            seq=seq, ts=self.ts(now), name=name, message=message))]

    def _away(self, peer: Peer, member: Member, away: Away, now: float) -> list[Out]:
        if away.message and self.muted.get(peer.identity, 0.0) > now:
            return self._muted(peer, now, None)  # its away message would speak for it
        member.away = clean_text(away.message).strip()
        member.away_told = set()  # a new away period: every sender is told again
        name, message = member.name, member.away
        return [self._publish(private_topic(peer.identity), lambda seq: AwayNotice(
            seq=seq, ts=self.ts(now), name=name, message=message))]

    def _topic(self, peer: Peer, member: Member, request: SetTopic, now: float) -> list[Out]:
        """Ask a room's topic (any room), or set it: a member of the room; in closed mode an admin."""
        if request.text is None:
            room = normalize_room(request.room)
            if room is None:
                return self._error(peer, now, Code.INVALID_ROOM, f"invalid room {request.room!r}",
                                   request.ref)
            text, by = self.topics.get(room, ("", ""))
            return [self._publish(private_topic(peer.identity), lambda seq: RoomTopic(
                seq=seq, ts=self.ts(now), room=room, text=text, by=by, ref=request.ref))]
        if self.accounts is not None and self._role(peer.identity) != "admin":
            return self._error(peer, now, Code.FORBIDDEN, "only admins may change a topic here", request.ref)
        if self.muted.get(peer.identity, 0.0) > now:
            return self._muted(peer, now, request.ref)
        room, error = self._room_of(peer, member, request.room, now, request.ref)
        if room is None:
            return error
        text = clean_text(request.text).strip()
        self.topics.pop(room, None)  # re-insert: dict order is the order they were set
        if text:
            self.topics[room] = (text, member.name)
            if len(self.topics) > L.ROOM_TOPICS_KEPT:
                del self.topics[next(iter(self.topics))]
        return [KeepTopic(room, text, member.name), self._publish(room_topic(room), lambda seq: RoomTopic(
            seq=seq, ts=self.ts(now), room=room, text=text, by=member.name, changed=True, ref=request.ref))]

    def _bans(self, peer: Peer, member: Member, request: Bans, now: float) -> list[Out]:
        if self._role(peer.identity) != "admin":
            return self._error(peer, now, Code.FORBIDDEN, "only admins may do that", request.ref)
        names = self._last_names(self.banned)
        listed = {key: names.get(key, "") for key in sorted(self.banned)[:L.MAX_NAMES_IN_REPLY]}
        return [self._publish(private_topic(peer.identity), lambda seq: BanList(
            seq=seq, ts=self.ts(now), bans=listed, count=len(self.banned), ref=request.ref))]

    def _last_names(self, identities: set[str]) -> dict[str, str]:
        """The name (case-folded) each of `identities` held last, where known."""
        found: dict[str, str] = {}
        if identities:
            for key, identity in self.known_names.items():
                if identity in identities:
                    found[identity] = key  # the latest holding wins: the dict is in recency order
        return found

    def _unban(self, peer: Peer, member: Member, request: Unban, now: float) -> list[Out]:
        if self._role(peer.identity) != "admin":
            return self._error(peer, now, Code.FORBIDDEN, "only admins may do that", request.ref)
        target = request.target
        is_key = len(target) == 64 and all(c in "0123456789abcdef" for c in target)
        identity = target if is_key else self.known_names.get(name_key(target.removeprefix("@")))
        if identity is None or identity not in self.banned:
            what = "that key" if is_key else f"{clean_text(target)!r}"
            last = "" if is_key or identity is None else " (the last key to hold that name)"
            return self._error(peer, now, Code.NOT_BANNED, f"{what}{last} is not banned", request.ref)
        self.banned.discard(identity)
        name = self._last_names({identity}).get(identity, "")
        return [Pardoned(identity), self._publish(private_topic(peer.identity), lambda seq: Unbanned(
            seq=seq, ts=self.ts(now), key=identity, name=name, by=member.name, ref=request.ref))]

    def _nick(self, peer: Peer, member: Member, nick: Nick, now: float) -> list[Out]:
        if self.accounts is not None:
            return self._error(peer, now, Code.NAMES_FIXED, "names are fixed by the operator here")
        if not valid_name(nick.name):
            return self._error(peer, now, Code.INVALID_NAME, invalid_name_detail(nick.name))
        if nick.name == member.name:
            return []
        refused = self._claim_refused(peer, nick.name)
        if refused is not None:
            return self._error(peer, now, Code.NAME_TAKEN, refused)
        return self._rename(peer, member, nick.name, now)

    def _who(self, peer: Peer, member: Member, who: Who, now: float) -> list[Out]:
        if who.room is None:
            identities: Iterable[str] = self.names.values()
            room = None
        else:
            room = normalize_room(who.room)
            if room is None:
                return self._error(peer, now, Code.INVALID_ROOM, f"invalid room {who.room!r}", who.ref)
            identities = self.rooms.get(room, ())
        members = sorted((self.peers[i].member for i in identities),  # type: ignore[misc]
                         key=lambda m: m.name.casefold())  # type: ignore[union-attr]
        names = [m.name for m in members]
        away = {m.name: m.away for m in members[:L.MAX_NAMES_IN_REPLY] if m.away}
        return [self._publish(private_topic(peer.identity), lambda seq: WhoReply(
            seq=seq, ts=self.ts(now), room=room, names=names[:L.MAX_NAMES_IN_REPLY], count=len(names),
            ref=who.ref, away=away))]

    def _rooms(self, peer: Peer, member: Member, request: Rooms, now: float) -> list[Out]:
        biggest = sorted(self.rooms.items(), key=lambda item: (-len(item[1]), item[0]))
        listed = {room: len(ids) for room, ids in biggest[:L.MAX_ROOMS_IN_REPLY]}
        topics = {room: self.topics[room][0] for room in listed if room in self.topics}
        return [self._publish(private_topic(peer.identity), lambda seq: RoomList(
            seq=seq, ts=self.ts(now), rooms=listed, count=len(self.rooms), ref=request.ref, topics=topics))]

    def _enter(self, peer: Peer, member: Member, enter: Enter, now: float) -> list[Out]:
        room = normalize_room(enter.room)
        if room is None:
            return self._error(peer, now, Code.INVALID_ROOM, f"invalid room {enter.room!r}")
        if room in member.rooms:
            return self._error(peer, now, Code.ALREADY_IN_ROOM, f"you are already in #{room}")
        if len(member.rooms) + len(peer.pending_rooms) >= L.MAX_ROOMS_PER_MEMBER:
            return self._error(peer, now, Code.TOO_MANY_ROOMS,
                               f"you are in {L.MAX_ROOMS_PER_MEMBER} rooms already; /leave one first")
        peer.pending_rooms[room] = enter.history
        return self._try_enter(peer, member, now)

    def _try_enter(self, peer: Peer, member: Member, now: float) -> list[Out]:
        """Enter each pending room whose subscription is installed."""
        out: list[Out] = []
        for room, history in list(peer.pending_rooms.items()):
            if ROOM_PREFIX in peer.topics or room_topic(room) in peer.topics:
                del peer.pending_rooms[room]
                upto = self._last_seq(room_topic(room))
                out += self._tell_topics(peer, [room], now)
                if history and upto:
                    out.append(Fetch(peer.identity, room, 0, upto, history))
                out += self._add_to_room(peer, member, room, now, chat=False)
        return out

    def _history(self, peer: Peer, member: Member | None, request: HistoryRequest, now: float) -> list[Out]:
        """Public rooms' history is open to anyone (taps too), like their live traffic."""
        room = normalize_room(request.room)
        if room is None:
            return self._error(peer, now, Code.INVALID_ROOM, f"invalid room {request.room!r}", request.ref)
        if self._history_bytes(peer, now) <= 0:
            limits = self.limits
            return self._error(peer, now, Code.RATE_LIMITED,
                               f"slow down: history answers are limited to {limits.history_bytes_burst} "
                               f"bytes at once, then {limits.history_bytes_per_second} per second",
                               request.ref)
        last = self._last_seq(room_topic(room))
        upto = last if request.before is None else min(last, max(0, request.before - 1))
        return [Fetch(peer.identity, room, request.after, upto, request.limit, request.ref)]

    def _since(self, peer: Peer, request: Since, now: float) -> list[Out]:
        """A tap's replay from a time: for taps only (closed mode: roles tap and admin), like
        the r/ subscription that shows every room at once."""
        if self.accounts is not None and self._role(peer.identity) not in ("tap", "admin"):
            return self._error(peer, now, Code.FORBIDDEN,
                               "replays from a time are for taps (role tap or admin)", request.ref)
        rooms = None
        if request.rooms is not None:
            rooms = [normalize_room(room) for room in request.rooms]
            if None in rooms:
                return self._error(peer, now, Code.INVALID_ROOM, "invalid room in since", request.ref)
        return [FindSince(peer.identity, request.ts, rooms, request.ref)]  # type: ignore[arg-type]

    def _history_bytes(self, peer: Peer, now: float) -> float:
        """Refill the key's history byte bucket; what it holds now (may be below 0)."""
        limits = self.limits
        peer.history_bytes = min(float(limits.history_bytes_burst), peer.history_bytes
                                 + (now - peer.history_refilled) * limits.history_bytes_per_second)
        peer.history_refilled = now
        return peer.history_bytes

    def history_allowance(self, identity: str, now: float) -> int:
        """Bytes of stored events the shell may put in the next history answer for `identity`:
        at most a page, and what its bucket holds (0 when empty)."""
        peer = self.peers.get(identity)
        page = self.limits.max_history_page_bytes
        return page if peer is None else int(min(page, max(0.0, self._history_bytes(peer, now))))

    def spend_history(self, identity: str, size: int) -> None:
        """The shell answered with `size` bytes of stored events (a page may overdraw by one)."""
        peer = self.peers.get(identity)
        if peer is not None:
            peer.history_bytes -= size

    def _part(self, peer: Peer, member: Member, part: Part, now: float) -> list[Out]:
        room, error = self._room_of(peer, member, part.room, now)
        if room is None:
            return error
        message = self._farewell(peer, part.message, now)
        return [self._remove_from_room(peer, member, room, LeftReason.PART, message, now)]

    # --- moderation ---------------------------------------------------------------

    def _muted(self, peer: Peer, now: float, ref: int | None) -> list[Out]:
        return self._error(peer, now, Code.MUTED,
                           f"you are muted for {self.muted[peer.identity] - now:.0f} more seconds", ref)

    def _moderated(self, peer: Peer, name: str, now: float) -> tuple[Peer | None, list[Out]]:
        """The online member an admin command names, or the error to answer instead."""
        if self._role(peer.identity) != "admin":
            return None, self._error(peer, now, Code.FORBIDDEN, "only admins may do that")
        target = self.names.get(name_key(name))
        if target is None:
            return None, self._error(peer, now, Code.NO_SUCH_USER,
                                     f"nobody called {clean_text(name)!r} is online")
        return self.peers[target], []

    def _kick(self, peer: Peer, member: Member, kick: Kick | Ban, now: float) -> list[Out]:
        target, error = self._moderated(peer, kick.name, now)
        if target is None:
            return error
        banned = isinstance(kick, Ban)
        code, verb = (Code.BANNED, LeftReason.BANNED) if banned else (Code.KICKED, LeftReason.KICKED)
        reason = clean_text(kick.reason)
        said = f": {reason}" if reason else ""
        out = self._error(target, now, code, f"you were {verb} by {member.name}{said}")
        out += self._leave(target, verb, reason, now, by=member.name)
        if banned:
            self.banned.add(target.identity)
            out.append(Banned(target.identity))
        out.append(Disconnect(target.identity))
        return out

    def _mute(self, peer: Peer, member: Member, mute: Mute, now: float) -> list[Out]:
        target, error = self._moderated(peer, mute.name, now)
        if target is None or target.member is None:
            return error
        victim = target.member
        # By key, not membership: leaving and coming back does not lift it.
        self.muted = {key: until for key, until in self.muted.items() if until > now}
        if mute.seconds:
            self.muted[target.identity] = now + mute.seconds
        else:
            self.muted.pop(target.identity, None)
        reason = clean_text(mute.reason)
        topics = [room_topic(room) for room in victim.rooms] or [private_topic(target.identity)]
        if not set(member.rooms) & set(victim.rooms) and target is not peer:
            topics.append(private_topic(peer.identity))  # the admin sees it done, and until when
        until = self.ts(now) + mute.seconds if mute.seconds else 0.0
        return [self._publish(topic, lambda seq, topic=topic: Muted(
            seq=seq, ts=self.ts(now), room=room_of_topic(topic) or "", name=victim.name, by=member.name,
            seconds=mute.seconds, reason=reason, until=until)) for topic in topics]

    def set_accounts(self, accounts: dict[str, Account], now: float) -> list[Out]:
        """Closed mode's file was re-read: revoked keys leave and are cut off; renamed ones
        take their new names. Everyone else stays connected."""
        self.accounts = accounts
        out: list[Out] = []
        renamed: list[tuple[Peer, str]] = []
        for identity, peer in list(self.peers.items()):
            account = accounts.get(identity)
            if account is None:
                if peer.member is not None:
                    out += self._error(peer, now, Code.REVOKED, "your key is no longer authorized here")
                    out += self._leave(peer, LeftReason.REVOKED, "", now)
                del self.peers[identity]
                self.strangers.pop(identity, None)
                out.append(Disconnect(identity))
            else:
                if ROOM_PREFIX in peer.topics and account.role not in ("tap", "admin"):
                    # Demoted: an installed subscription cannot be withdrawn from one peer, so
                    # cut it; it reconnects and subscribes again under the new rules.
                    peer.topics.clear()
                    out.append(Disconnect(identity))
                if peer.member is not None and peer.member.name != account.name:
                    renamed.append((peer, account.name))
        # Names in the file are unique, so once every renamed member lets go of its old
        # name, every new one is free: a chain (bob -> carol, carol -> dave) just works.
        for peer, _ in renamed:
            self._release(peer.member.name, peer.identity)  # type: ignore[union-attr]
        for peer, name in renamed:
            out += self._rename(peer, peer.member, name, now, release_old=False)  # type: ignore[arg-type]
            self._hold(name, peer.identity)  # also when only the case changed
        return out

    def _quit(self, peer: Peer, member: Member, leave: Leave, now: float) -> list[Out]:
        return self._leave(peer, LeftReason.QUIT, self._farewell(peer, leave.message, now), now)

    def _farewell(self, peer: Peer, message: str, now: float) -> str:
        """A part or leave message, as the room sees it: a muted member's is dropped."""
        return "" if self.muted.get(peer.identity, 0.0) > now else clean_text(message)

    def _add_to_room(self, peer: Peer, member: Member, room: str, now: float, chat: bool) -> list[Out]:
        member.rooms.append(room)
        self.rooms.setdefault(room, set()).add(peer.identity)
        return [self._publish(room_topic(room), lambda seq: Joined(
            seq=seq, ts=self.ts(now), room=room, name=member.name, chat=chat, key=peer.identity))]

    def _tell_topics(self, peer: Peer, rooms: Iterable[str], now: float) -> list[Out]:
        """The topics of rooms `peer` enters, on its stream: numbered before the history that
        follows (the shell numbers that as it answers), so they arrive in order."""
        topics = [(room, self.topics[room]) for room in rooms if room in self.topics]
        return [self._publish(private_topic(peer.identity), lambda seq, room=room, topic=topic: RoomTopic(
            seq=seq, ts=self.ts(now), room=room, text=topic[0], by=topic[1])) for room, topic in topics]

    def _remove_from_room(self, peer: Peer, member: Member, room: str, reason: LeftReason, message: str,
                          now: float, by: str = "") -> Publish:
        member.rooms.remove(room)
        occupants = self.rooms.get(room)
        if occupants is not None:
            occupants.discard(peer.identity)
            if not occupants:
                del self.rooms[room]
        return self._publish(room_topic(room), lambda seq: Left(
            seq=seq, ts=self.ts(now), room=room, name=member.name, reason=reason, message=message, by=by))

    def _leave(self, peer: Peer, reason: LeftReason, message: str, now: float, by: str = "") -> list[Out]:
        member = peer.member
        if member is None:
            return []
        peer.member = None
        self.strangers[peer.identity] = None
        peer.pending_rooms.clear()
        # peer.topics stays: libzmq keeps those subscriptions installed until the
        # connection closes, so errors (not_joined) still reach this peer.
        self._release(member.name, peer.identity)
        return [self._remove_from_room(peer, member, room, reason, message, now, by)
                for room in list(member.rooms)]

    _handlers: dict[type, Callable[..., list[Out]]] = {
        Say: _say, Me: _me, Msg: _msg, KeyRequest: _key, Nick: _nick, Who: _who, Rooms: _rooms,
        Enter: _enter, Part: _part, Leave: _quit, Kick: _kick, Ban: _kick, Mute: _mute,
        SetTopic: _topic, Away: _away, Unban: _unban, Bans: _bans,
    }

    # --- helpers -------------------------------------------------------------

    def _claim_refused(self, peer: Peer, name: str) -> str | None:
        """Why `peer` may not take `name` (a valid name), or None. Held by another key; reserved
        (or looking like a reserved name) unless the key's role is admin; in open mode, looking
        like a name another key holds. Offline users' names are not protected: in open mode
        a name belongs to a key only while it is online."""
        holder = self.names.get(name_key(name))
        if holder is not None and holder != peer.identity:
            return f"the name {name!r} is taken"
        reserved = reserved_name(name)
        if reserved is not None and self._role(peer.identity) != RESERVED_ROLE:
            looks = "" if name_key(name) == reserved else f" (it looks like {reserved!r})"
            return f"the name {name!r} is reserved{looks}: only the operator's admin keys may use it"
        if self.accounts is None:  # closed mode: the operator's file decides the names
            other = self.lookalikes.get(lookalike_key(name))
            if other is not None and other != peer.identity and (held := self.member_name(other)):
                return f"the name {name!r} looks like {held!r}, who is online"
        return None

    def _hold(self, name: str, identity: str) -> None:
        self.names[name_key(name)] = identity
        self.lookalikes.setdefault(lookalike_key(name), identity)

    def _release(self, name: str, identity: str) -> None:
        self.names.pop(name_key(name), None)
        key = lookalike_key(name)
        if self.lookalikes.get(key) == identity:
            del self.lookalikes[key]

    def _peer(self, identity: str, now: float) -> Peer | None:
        peer = self.peers.get(identity)
        if peer is None:
            if len(self.peers) >= self.limits.max_peers and not self._evict_stranger(now):
                self.turned_away += 1
                return None
            limits = self.limits
            peer = self.peers[identity] = Peer(identity, now, TokenBucket(limits.rate_burst,
                                                                          limits.rate_per_second, now),
                                               history_bytes=float(limits.history_bytes_burst),
                                               history_refilled=now)
            self.strangers[identity] = None
        return peer

    def _touch(self, identity: str) -> None:
        """A non-member was active: it becomes the last to be evicted."""
        strangers = self.strangers
        strangers.pop(identity, None)
        strangers[identity] = None

    def _evict_stranger(self, now: float) -> bool:
        """Make room: forget the non-member idle longest. It is told why, and cut: libzmq
        keeps its approved subscriptions installed, which a later join would wait for."""
        while self.strangers:
            identity = next(iter(self.strangers))
            del self.strangers[identity]
            peer = self.peers.get(identity)
            if peer is None or peer.member is not None:
                continue
            self.evictions += self._error(peer, now, Code.BUSY, (
                f"the broker tracks {self.limits.max_peers} keys and yours had not joined: it was "
                "dropped to make room; try again"))
            self.evictions.append(Disconnect(identity))
            self._forget(identity)
            self.evicted_total += 1
            return True
        return False

    def _forget(self, identity: str) -> None:
        self.peers.pop(identity, None)
        self.strangers.pop(identity, None)
        self.seqs.pop(private_topic(identity), None)

    def _charge(self, peer: Peer, now: float, message: object = None) -> list[Out] | None:
        """Take one token; on an empty bucket return what to send instead: a refusal naming
        the message's ref when it has one (its sender waits for that ref), else only the
        first refusal since the bucket last had a token."""
        limits = self.limits
        bucket = peer.bucket
        bucket.burst, bucket.rate = float(limits.rate_burst), limits.rate_per_second  # may be reloaded
        if bucket.take(now):
            peer.throttled = False
            return None
        self.rate_limited_total += 1
        if len(self.rate_limited) < self.limits.max_peers:
            self.rate_limited.add(peer.identity)
        ref = getattr(message, "ref", None)
        if peer.throttled and ref is None:
            return []
        peer.throttled = True
        return self._error(peer, now, Code.RATE_LIMITED,
                           f"slow down: {limits.rate_burst} messages at once, then "
                           f"{limits.rate_per_second:g} per second", ref)

    def _flooding(self, peer: Peer, now: float) -> bool:
        """The key's frames for this window ran out: start a new window if a second has gone
        by since this one began, else it is past the ceiling."""
        if now - peer.frames_since < 1.0:
            return True
        peer.frames_since = now
        peer.frames_left = int(self.limits.frame_ceiling) - 1  # this frame is the first
        return False

    def _flooded(self, peer: Peer, now: float) -> list[Out]:
        """Past the frames-per-second ceiling: cut the key (once a window), say why."""
        if peer.frames_left != -1:
            return []  # told and cut already: the rest of the second is dropped unread
        self.rejected[Code.FLOODING] = self.rejected.get(Code.FLOODING, 0) + 1
        out = self._error(peer, now, Code.FLOODING,
                          f"more than {self.limits.frame_ceiling:.0f} frames in one second: disconnected")
        out.append(Disconnect(peer.identity))
        return out

    def _refuse(self, peer: Peer, now: float, code: str, detail: str) -> list[Out]:
        """An error for a request not yet charged: charge it, so errors are rate-limited too."""
        throttled = self._charge(peer, now)
        return throttled if throttled is not None else self._error(peer, now, code, detail)

    def _error(self, peer: Peer, now: float, code: str, detail: str,
               ref: int | None = None) -> list[Out]:
        topic = private_topic(peer.identity)
        if topic not in peer.topics:  # nobody would receive it
            return []
        ts = self.ts(now)
        return [self._publish(topic, lambda seq: Error(seq=seq, ts=ts, code=code, detail=detail, ref=ref))]

    def _last_seq(self, topic: str) -> int:
        """A topic's last number: in memory while in use, else (a room) from storage."""
        seq = self.seqs.get(topic)
        if seq is not None:
            return seq
        return self._stored_seq(topic) if topic.startswith(ROOM_PREFIX) else 0

    def _unused_room_seq(self, topic: str) -> int:
        assert self._unused_rooms is not None
        return self._unused_rooms.get(topic, 0)

    def _retire(self, topic: str) -> None:
        seq = self.seqs.pop(topic, None)
        if seq is not None and self._unused_rooms is not None:  # no storage: keep it here
            self._unused_rooms[topic] = seq

    def _publish(self, topic: str, make) -> Publish:  # type: ignore[no-untyped-def]
        seq = self._last_seq(topic) + 1
        self.seqs[topic] = seq
        if topic.startswith(ROOM_PREFIX):
            self.busy_rooms[topic] = MARKS_AFTER_ACTIVITY
        return Publish(topic, make(seq))
