"""Relays, the pure parts: the marking frame, the broker's book of relayed clients, and a
relay's reference-counted subscriptions. No sockets, no clock (times are passed in).

A relay forwards each frame a client sends, prefixed with a mark that names the client
(docs/PROTOCOL.md "Relays"):

    byte 0      0x00 (no client message starts with it: bodies are JSON objects)
    byte 1      kind: M message, S subscribed, U unsubscribed, A all unsubscribed, X gone
    bytes 2-33  the client's CURVE public key, raw (its identity is the hex of it)
    bytes 34-   M: the client's frame, unchanged; S, U: the topic; A, X: nothing

The broker believes a mark only on a frame whose User-Id has the role `relay`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MARK = 0x00
MESSAGE, SUBSCRIBED, UNSUBSCRIBED, ALL_UNSUBSCRIBED, GONE = b"M", b"S", b"U", b"A", b"X"
KINDS = frozenset((MESSAGE, SUBSCRIBED, UNSUBSCRIBED, ALL_UNSUBSCRIBED, GONE))
KEY_BYTES = 32
HEADER = 2 + KEY_BYTES
# Topic a relay subscribes to upstream for what its upstream tells it alone ("cut <id>"):
# CONTROL_PREFIX + its identity + "/". No client can ask for it (policy), and no client
# subscription is a prefix of it (the empty one is refused).
CONTROL_PREFIX = "\x00relay/"
CUT = b"cut"
BAN = b"ban"


class MarkError(ValueError):
    """A frame that claims to be marked but is not a valid mark."""


def is_marked(body: bytes | memoryview) -> bool:
    return len(body) > 0 and body[0] == MARK


def mark_prefix(kind: bytes, identity: str) -> bytes:
    """The mark put before a payload: the client `identity` (hex of its public key)."""
    return bytes((MARK,)) + kind + bytes.fromhex(identity)


def mark(kind: bytes, identity: str, payload: bytes = b"") -> bytes:
    return mark_prefix(kind, identity) + payload


@dataclass(frozen=True, slots=True)
class Marked:
    kind: bytes
    identity: str
    payload: memoryview


def parse_mark(body: bytes | memoryview) -> Marked:
    """Split a marked frame; MarkError when it is not one."""
    view = memoryview(body)
    if len(view) < HEADER or view[0] != MARK:
        raise MarkError("too short or not marked")
    kind = bytes(view[1:2])
    if kind not in KINDS:
        raise MarkError(f"unknown kind {kind!r}")
    payload = view[HEADER:]
    if kind in (SUBSCRIBED, UNSUBSCRIBED) and not payload:
        raise MarkError("no topic")
    if kind in (ALL_UNSUBSCRIBED, GONE) and payload:
        raise MarkError("unexpected payload")
    return Marked(kind, bytes(view[2:HEADER]).hex(), payload)


def control_topic(relay: str) -> str:
    return f"{CONTROL_PREFIX}{relay}/"


def cut_notice(relay: str, identity: str, command: bytes = CUT) -> bytes:
    """What the upstream publishes to a relay to have it cut one client's connections (CUT),
    or also refuse its key from now on (BAN)."""
    return f"{control_topic(relay)} ".encode() + command + b" " + identity.encode()


def parse_control(data: bytes) -> tuple[bytes, str] | None:
    """(command, identity) of a control publication, or None."""
    parts = data.split(b" ")
    if len(parts) != 3 or not parts[2]:
        return None
    try:
        return parts[1], parts[2].decode("ascii")
    except UnicodeDecodeError:
        return None


@dataclass
class RelayBook:
    """The broker's view of its relays: which clients came through which relay, which topics
    each relay has installed upstream, and which topics each relayed client asked its relay
    for. A relayed client's subscription counts (for the join handshake) once both are true:
    the relay reported it (S) and the relay's own upstream subscription to it is installed.
    The two travel on different connections, so either may come first."""

    relay_topics: dict[str, set[str]] = field(default_factory=dict)  # relay -> installed here
    wanted: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # relay -> topic -> clients
    via: dict[str, str] = field(default_factory=dict)  # client -> the relay it last came through
    last_seen: dict[str, float] = field(default_factory=dict)  # relay -> last frame from it
    max_entries: int = 1_000_000  # (client, topic) pairs kept per relay

    def seen(self, relay: str, now: float) -> None:
        self.last_seen[relay] = now

    def came_through(self, relay: str, client: str) -> None:
        self.via[client] = relay

    def through(self, relay: str) -> list[str]:
        return [client for client, by in self.via.items() if by == relay]

    def client_subscribed(self, relay: str, client: str, topic: str) -> bool:
        """Recorded; True when it counts now (the relay's own subscription is installed)."""
        self.via.setdefault(client, relay)
        topics = self.wanted.setdefault(relay, {})
        clients = topics.get(topic)
        if clients is None:
            if len(topics) >= self.max_entries:
                return False
            clients = topics[topic] = set()
        clients.add(client)
        return topic in self.relay_topics.get(relay, ())

    def client_unsubscribed(self, relay: str, client: str, topic: str) -> None:
        clients = self.wanted.get(relay, {}).get(topic)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self.wanted[relay][topic]

    def client_unsubscribed_all(self, relay: str, client: str) -> None:
        topics = self.wanted.get(relay, {})
        for topic in [t for t, clients in topics.items() if client in clients]:
            self.client_unsubscribed(relay, client, topic)

    def client_gone(self, relay: str, client: str) -> bool:
        """The relay says the client left it: True when it still counted as connected through
        that relay (it did not move to another one meanwhile)."""
        self.client_unsubscribed_all(relay, client)
        if self.via.get(client) == relay:
            del self.via[client]
            return True
        return False

    def relay_subscribed(self, relay: str, topic: str) -> list[str]:
        """The relay's own subscription is installed: the clients for whom it now counts."""
        self.relay_topics.setdefault(relay, set()).add(topic)
        return list(self.wanted.get(relay, {}).get(topic, ()))

    def relay_unsubscribed(self, relay: str, topic: str) -> list[str]:
        self.relay_topics.get(relay, set()).discard(topic)
        return list(self.wanted.get(relay, {}).get(topic, ()))

    def relay_output_closed(self, relay: str) -> list[str]:
        """Its publish connection closed: nothing is installed for it any more. The clients
        reports are kept (it resubscribes when it reconnects)."""
        self.relay_topics.pop(relay, None)
        return sorted({c for clients in self.wanted.get(relay, {}).values() for c in clients})

    def relay_gone(self, relay: str) -> list[str]:
        """The relay itself is gone: every client that came through it, forgotten here."""
        clients = self.through(relay)
        for client in clients:
            del self.via[client]
        self.wanted.pop(relay, None)
        self.relay_topics.pop(relay, None)
        self.last_seen.pop(relay, None)
        return clients


@dataclass
class Subscriptions:
    """A relay's subscriptions: each subscriber's topics, and how many subscribers want each
    topic (the relay subscribes upstream to a topic while one of them does)."""

    topics_of: dict[str, set[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, subscriber: str, topic: str) -> bool:
        """Recorded; True when it is the topic's first subscriber (subscribe upstream)."""
        topics = self.topics_of.setdefault(subscriber, set())
        if topic in topics:
            return False
        topics.add(topic)
        self.counts[topic] = self.counts.get(topic, 0) + 1
        return self.counts[topic] == 1

    def remove(self, subscriber: str, topic: str) -> bool:
        """Forgotten; True when it was the topic's last subscriber (unsubscribe upstream)."""
        topics = self.topics_of.get(subscriber)
        if topics is None or topic not in topics:
            return False
        topics.discard(topic)
        if not topics:
            del self.topics_of[subscriber]
        left = self.counts[topic] - 1
        if left:
            self.counts[topic] = left
            return False
        del self.counts[topic]
        return True

    def remove_all(self, subscriber: str) -> list[str]:
        """Every topic of the subscriber forgotten: those nobody wants any more."""
        topics = sorted(self.topics_of.get(subscriber, ()))
        return [topic for topic in topics if self.remove(subscriber, topic)]

    def has(self, subscriber: str, topic: str) -> bool:
        return topic in self.topics_of.get(subscriber, ())
