"""A whole chat in one process, without sockets: the broker core and its dispatcher (with an
in-memory history store), and for each user a client core under the real terminal session
(`zchat.tui.Session`), whose lines are collected as that user's screen.

Time is virtual (`World.advance`); the wall clock can be stepped on its own. What a client
sends goes through the wire encoding to the broker core; what the broker publishes goes
through the wire encoding to every client whose approved subscriptions match it. A link or
the broker can go down: what a client sends meanwhile waits in its PUSH queue (as libzmq
keeps it) and arrives, in order, when the link is back; publications meanwhile are lost.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from corekit import Unsealed
from nacl.public import PrivateKey

from zchat import limits as L
from zchat.accounts import Account
from zchat.client import JoinError
from zchat.clientcore import (
    ClientApi,
    ClientCore,
    Effect,
    HandshakeFailed,
    IgnoresChanged,
    JoinChat,
    JoinDone,
    LinkDown,
    Now,
    RequestType,
    Send,
    Show,
    Stopped,
    Subscribe,
    Unsubscribe,
)
from zchat.clientcore import Close as CloseRequest
from zchat.core import BrokerCore, Limits
from zchat.dispatch import Dispatcher
from zchat.e2e import Keyring
from zchat.events import ClientEvent
from zchat.history import HistoryStore
from zchat.protocol import (
    ClientMessage,
    Event,
    Welcome,
    decode_client_message,
    decode_publication,
    encode_client_message,
)
from zchat.tui import Session

START_MONO = 5000.0
START_WALL = 1_800_000_000.0
STEP = 0.05  # seconds of virtual time per step of `advance`
CLOCK = re.compile(r"^\[\d\d:\d\d:\d\d\] ")
CLEARED = "=== screen cleared ==="  # a buffered user's screen drawn again from the top


_SECRETS: dict[str, bytes] = {}  # identity -> its secret key, for the clients' keyrings


def identity_of(name: str) -> str:
    """A fixed key pair per user name (a real one: private messages are sealed end to end);
    returns the identity, the hex of its public key."""
    secret = PrivateKey(hashlib.sha256(name.encode()).digest())
    identity = secret.public_key.encode().hex()
    _SECRETS[identity] = secret.encode()
    return identity


def chatkit_secret(identity: str) -> bytes:
    """The secret key of an identity made by identity_of."""
    return _SECRETS[identity]



@dataclass
class User:
    name: str
    client: LoopClient
    session: Session
    screen: list[str] = field(default_factory=list)  # every line shown, clock stripped
    raw: list[str] = field(default_factory=list)  # every line shown, as written

    def lines(self, start: int = 0) -> list[str]:
        return self.screen[start:]


class LoopClient(ClientApi):
    """The client shell of this in-process world: the same API as ChatClient, a client core,
    and a link to the world instead of sockets."""

    def __init__(self, world: World, identity: str, rooms: list[str],
                 on_event: Callable[[ClientEvent], None], history: int = L.DEFAULT_HISTORY,
                 ignored: dict[str, str] | None = None) -> None:
        super().__init__(rooms)
        self.world = world
        self.identity = identity
        self.core = ClientCore(identity, rooms, history, keyring=Keyring(chatkit_secret(identity)),
                               ignored=ignored)
        self.ignored_file: dict[str, str] | None = None  # what the shell would keep on disk
        self.on_event = on_event
        self.subscribed: dict[str, int] = {}  # what the SUB asks for
        self.approved: set[str] = set()  # what the broker installed
        self.pipe: deque[bytes] = deque()  # sent while the link is down: delivered when it is up
        self.inbox: deque[tuple[str, Event]] = deque()
        self.link_up = True
        self.refused = False  # the broker refuses our key at the handshake
        self.join_result: JoinDone | None = None
        self.stopped = False
        self.sent: list[ClientMessage] = []  # everything handed to the PUSH socket, in order

    def _submit(self, request: RequestType) -> None:
        self.carry_out(self.core.request(request, self.world.now()))
        self.world.settle()

    def start(self) -> None:
        self.carry_out(self.core.start())

    def join(self, name: str, timeout: float = 5.0) -> Welcome:
        self.join_result = None
        self._submit(JoinChat(name))
        self.world.advance_until(lambda: self.join_result is not None, timeout)
        result = self.join_result
        if result is None:
            raise JoinError("timeout", "no answer")
        if result.welcome is None:
            raise JoinError(result.code, result.detail)
        return result.welcome

    def wait_delivered(self, timeout: float) -> bool:
        return self.world.advance_until(lambda: self.core.pending == 0, timeout)

    def close(self, message: str = "", linger: float = 1.0, leave: bool = True) -> None:
        self._submit(CloseRequest(message if leave else None))

    def carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.sent.append(effect.message)
                self.world.push(self, encode_client_message(effect.message))
            elif isinstance(effect, Show):
                self.snapshot = effect.view
                self.on_event(effect.event)
            elif isinstance(effect, Subscribe):
                self.subscribed[effect.topic] = self.subscribed.get(effect.topic, 0) + 1
                self.world.subscribe(self, effect.topic)
            elif isinstance(effect, Unsubscribe):
                count = self.subscribed.get(effect.topic, 0) - 1
                if count <= 0:
                    self.subscribed.pop(effect.topic, None)
                    self.approved.discard(effect.topic)
                    self.world.unsubscribe(self, effect.topic)
                else:
                    self.subscribed[effect.topic] = count
            elif isinstance(effect, JoinDone):
                self.join_result = effect
            elif isinstance(effect, Stopped):
                self.stopped = True
            elif isinstance(effect, IgnoresChanged):
                self.ignored_file = dict(effect.ignored)
        self.snapshot = self.core.snapshot()

    def receive(self) -> bool:
        """Hand what arrived to the core; True if there was anything."""
        if not self.inbox:
            return False
        while self.inbox:
            topic, event = self.inbox.popleft()
            self.carry_out(self.core.publication(topic, event, self.world.now()))
        return True

    def sent_of(self, kind: type) -> list:
        return [message for message in self.sent if isinstance(message, kind)]


class World:
    def __init__(self, limits: Limits | None = None, accounts: dict[str, Account] | None = None) -> None:
        self.mono = START_MONO
        self.wall = START_WALL
        self.limits = limits or Limits()
        self.accounts = accounts
        self.store = HistoryStore(":memory:")
        self.banned: set[str] = set()
        self.users: dict[str, User] = {}
        self.clients: list[LoopClient] = []
        self.broker: BrokerCore | None = None
        self.dispatch: Dispatcher | None = None
        self.inbox: deque[tuple[LoopClient, bytes]] = deque()  # what the broker has yet to read
        self.read: list[tuple[LoopClient, bytes]] = []  # what it read, in order
        self.busy = False  # True: the broker reads nothing (what arrives waits in its queue)
        self.published: list[tuple[str, Event]] = []  # everything any broker published
        self.drops: list[tuple[LoopClient, Callable[[str, Event], bool], list[int]]] = []
        self.epochs = 0
        self._next_tick = 0.0
        self.start_broker()

    def now(self) -> Now:
        return Now(self.mono, self.wall)

    # --- the broker -------------------------------------------------------------------

    def start_broker(self) -> None:
        self.epochs += 1
        self.broker = BrokerCore(f"epoch{self.epochs}", self.mono, self.limits, seqs=self.store.last_seqs(),
                                 known_names=self.store.known_names(), accounts=self.accounts,
                                 banned=self.banned, topics=self.store.topics())
        self.broker.wall_offset = self.wall - self.mono
        self.dispatch = Dispatcher(self.broker, self.store, self._published, Unsealed(),  # type: ignore[arg-type]
                                   self._cut, self.banned.add, self.banned.discard)
        self._next_tick = self.mono
        for client in self.clients:  # every SUB resends its subscriptions, every PUSH its queue
            self._connect(client)
        self.settle()

    def kill_broker(self, noticed: bool = True) -> None:
        """kill -9: what it had not read is gone. `noticed`: each client's socket monitor sees
        its connection close (as with a killed process; not with a dead network)."""
        self.broker = None
        self.dispatch = None
        self.inbox.clear()
        for client in self.clients:
            client.approved.clear()
            if noticed:
                client.carry_out(client.core.request(LinkDown(), self.now()))
        self.settle()

    def _connect(self, client: LoopClient) -> None:
        accounts = self.accounts
        if client.identity in self.banned or (accounts is not None and client.identity not in accounts):
            client.refused = True  # the monitor sees the handshake refused
            client.carry_out(client.core.request(HandshakeFailed("auth", "the broker refused this key"),
                                                 self.now()))
            return
        for topic in client.subscribed:
            self.subscribe(client, topic)
        while client.pipe:
            self.inbox.append((client, client.pipe.popleft()))

    def _cut(self, identity: str) -> None:
        """The broker shut a key's connections: libzmq reconnects them at once."""
        for client in self.clients:
            if client.identity == identity and self.broker is not None:
                client.receive()  # the notice left first (the broker waits CUT_GRACE)
                client.approved.clear()
                self.broker.on_unsubscribed_all(identity)
                self._connect(client)

    def _published(self, frame: bytes) -> None:
        topic, event = decode_publication(frame)
        self.published.append((topic, event))
        for client in self.clients:
            if not any(topic.startswith(t) for t in client.approved) or not client.link_up:
                continue
            if self._dropped(client, topic, event):
                continue
            client.inbox.append((topic, event))

    def _dropped(self, client: LoopClient, topic: str, event: Event) -> bool:
        for target, match, left in self.drops:
            if target is client and left[0] > 0 and match(topic, event):
                left[0] -= 1
                return True
        return False

    def _reachable(self, client: LoopClient) -> bool:
        return self.broker is not None and client.link_up and not client.refused

    def push(self, client: LoopClient, body: bytes) -> None:
        if self._reachable(client):
            self.inbox.append((client, body))
        elif not client.refused and len(client.pipe) < L.CLIENT_SNDHWM:
            client.pipe.append(body)

    def push_raw(self, client: LoopClient, body: bytes) -> None:
        """A frame `client`'s PUSH socket never made (a bug in a client), then settle."""
        self.push(client, body)
        self.settle()

    def subscribe(self, client: LoopClient, topic: str) -> None:
        if not self._reachable(client):
            return
        assert self.broker is not None and self.dispatch is not None
        allowed, out = self.broker.on_subscribe(client.identity, topic, self.mono)
        if allowed:
            client.approved.add(topic)
        self.dispatch.add(out)

    def unsubscribe(self, client: LoopClient, topic: str) -> None:
        if self._reachable(client):
            assert self.broker is not None
            self.broker.on_unsubscribe(client.identity, topic)

    def received(self, client: LoopClient) -> list[ClientMessage]:
        """What the broker read from `client` so far (decoded)."""
        return [decode_client_message(body) for who, body in self.read if who is client]

    # --- running --------------------------------------------------------------------

    def settle(self) -> None:
        """Deliver everything in flight, without letting time pass."""
        for _ in range(10_000):
            busy = False
            if self.broker is not None and self.dispatch is not None:
                self.broker.wall_offset = self.wall - self.mono
                while self.inbox and not self.busy:
                    client, body = self.inbox.popleft()
                    self.read.append((client, body))
                    self.dispatch.add(self.broker.on_message(client.identity, body, 1, self.mono))
                    busy = True
                if self.dispatch.pending:
                    self.dispatch.flush(self.wall)
                    busy = True
            for client in self.clients:
                busy = client.receive() or busy
            if not busy:
                return
        raise AssertionError("the world never settled")

    def step(self, seconds: float = STEP) -> None:
        self.mono += seconds
        self.wall += seconds
        if self.broker is not None and self.dispatch is not None and self.mono >= self._next_tick:
            self._next_tick = self.mono + L.TICK_INTERVAL
            self.broker.wall_offset = self.wall - self.mono
            self.dispatch.add(self.broker.tick(self.mono))
        self.settle()
        for client in self.clients:
            deadline = client.core.deadline()
            if deadline is not None and deadline <= self.mono and not client.stopped:
                client.carry_out(client.core.tick(self.now()))
        self.settle()

    def advance(self, seconds: float) -> None:
        end = self.mono + seconds
        while self.mono < end - 1e-9:
            self.step(min(STEP, end - self.mono))

    def advance_until(self, done: Callable[[], bool], timeout: float) -> bool:
        end = self.mono + timeout
        while not done():
            if self.mono >= end:
                return False
            self.step()
        return True

    # --- users ----------------------------------------------------------------------

    def join(self, name: str, rooms: list[str] | None = None, history: int = L.DEFAULT_HISTORY,
             key: str | None = None, own_arrival: bool = True,
             ignored: dict[str, str] | None = None, buffers: bool = False) -> User:
        """A new user types `name` at the prompt (`key`: whose key, if not the name's own).
        `buffers`: the interactive client's view, one buffer per conversation; a buffer drawn
        again shows on the screen as CLEARED, then its lines."""
        holder: list[User] = []

        def show(text: str) -> None:
            for line in text.split("\n"):
                holder[0].raw.append(line)
                holder[0].screen.append(CLOCK.sub("", line))

        session = Session(color=False, write=show, own_arrival=own_arrival, now=lambda: self.wall)
        if buffers:
            session.use_buffers(lambda lines: show("\n".join([CLEARED, *lines])))
        client = LoopClient(self, identity_of(key or name), rooms or ["lobby"], session.on_event, history,
                            ignored)
        user = User(name, client, session)
        holder.append(user)
        self.users[key or name] = user
        self.clients.append(client)
        session.attach(client)
        client.start()
        client.join(name)
        session.attach(client)
        return user

    def type(self, name: str, line: str) -> str | None:
        """`name` types `line` (and presses Enter; typing takes a moment); the world settles."""
        self.step(0.01)
        said = self.users[name].session.execute(line)
        self.settle()
        return said

    def press(self, name: str, key: str) -> None:
        """`name` presses a buffer key (alt-1..alt-9, c-n, c-p, pageup, pagedown)."""
        self.step(0.01)
        self.users[name].session.press(key)
        self.settle()

    def drop(self, name: str, match: Callable[[str, Event], bool], count: int = 1) -> None:
        """Lose the next `count` publications to `name` that `match` (a full queue, say)."""
        self.drops.append((self.users[name].client, match, [count]))

    def close(self) -> None:
        self.store.close()
