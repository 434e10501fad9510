"""The client library: a PUSH sender and a SUB receiver driven by one I/O thread.

Usable without the terminal UI (tests, bots, the tap). The I/O thread owns
every socket; other threads hand it work through a queue and a wake-up
socket, so no ZeroMQ socket is ever shared between threads.

What it takes care of:
- the join handshake: subscribe first, resend the join every 200 ms until the
  welcome arrives (PUB/SUB drops anything published before a subscription is
  live, so a single join could go unanswered);
- heartbeats both ways: a ping every second, and a watchdog on the broker's
  heartbeat that reports "connection lost" and rejoins when the broker is
  back (a changed epoch means the broker restarted);
- pacing: sends no faster than the broker's announced rate, so a paste or a
  pipe is delayed, never refused; unconfirmed messages are resent after a
  rejoin;
- per-topic sequence numbers: a jump is reported as a gap, never silent.
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from zchat import limits as L
from zchat.endpoints import Endpoints
from zchat.keys import KeyPair
from zchat.protocol import (
    DEFAULT_ROOM,
    ROOM_PREFIX,
    SYSTEM_TOPIC,
    Action,
    Ban,
    ClientMessage,
    Code,
    Direct,
    Enter,
    Error,
    Event,
    Heartbeat,
    History,
    HistoryRequest,
    Join,
    Joined,
    Kick,
    Leave,
    Left,
    Mark,
    Me,
    Message,
    Msg,
    Mute,
    Nick,
    Part,
    Ping,
    ProtocolError,
    Renamed,
    RoomList,
    Rooms,
    Say,
    Shutdown,
    Welcome,
    Who,
    WhoReply,
    decode_event,
    decode_publication,
    encode_client_message,
    private_topic,
    room_topic,
)
from zchat.transport import HandshakeWatch, curve_client

JOIN_ERRORS = {Code.NAME_TAKEN, Code.INVALID_NAME, Code.INVALID_ROOM}
REMOVED = {Code.KICKED, Code.BANNED, Code.REVOKED}


@dataclass(frozen=True)
class Status:
    """A change in the connection, made up by the client (not published)."""

    state: str  # lost | reconnected | shutdown | rejoin_failed | removed | failed (the client stopped)
    detail: str
    ts: float


@dataclass(frozen=True)
class Gap:
    """Sequence numbers on `topic` jumped: `missing` events never arrived."""

    topic: str
    missing: int
    ts: float


@dataclass(frozen=True)
class Replay:
    """Stored events shown out of the live flow: `kind` is history (on joining a room or
    /history), missed (while we were away) or backfill (recovering a gap)."""

    kind: str
    room: str
    events: list[Event]
    lost: int  # events of the range that storage no longer has
    ts: float
    skipped: int = 0  # older events of the range not fetched (past the request limit)


ClientEvent = Event | Status | Gap | Replay

BACKFILL_WAIT = 3.0  # seconds to hold a room's live events while a gap is being recovered
RESEND_WAIT = 2.0  # seconds to wait for missed-event replays before resending after a rejoin
REF_START_SPAN = 1 << 39  # message refs stay below the backfill refs (from 1 << 40)
BACKFILL_PAGES = 20  # history requests per gap (of up to MAX_HISTORY_PER_REQUEST events each)


@dataclass
class _Backfill:
    """A gap (after, before) on a room being recovered from storage, page by page."""

    room: str
    after: int
    before: int
    ref: int
    deadline: float
    held: list[Event]  # live events after the gap, shown once it is filled
    recovered: list[Event] = field(default_factory=list)
    pages: int = 1

    @property
    def missing(self) -> int:
        return self.before - self.after - 1


class JoinError(Exception):
    """Joining failed; `code` is a protocol error code or unreachable/auth/handshake."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SendError(Exception):
    pass


@dataclass
class ClientSettings:
    endpoints: Endpoints
    server_key: bytes  # z85
    keypair: KeyPair
    rooms: list[str] = field(default_factory=lambda: [DEFAULT_ROOM])
    history: int = L.DEFAULT_HISTORY  # events of each room's history shown on joining it
    max_unconfirmed: int = 1000


class ChatClient:
    def __init__(self, settings: ClientSettings, on_event: Callable[[ClientEvent], None] | None = None):
        self.settings = settings
        self.identity = settings.keypair.identity
        self.private_topic = private_topic(self.identity)
        self.events: queue.Queue[ClientEvent] = queue.Queue()
        self._on_event = on_event or self.events.put
        self.ctx = zmq.Context()
        self.name: str | None = None
        self.rooms: list[str] = list(settings.rooms)
        self.epoch: str | None = None
        self.connected = False  # welcomed and hearing the broker
        self.lost_since: float | None = None  # wall-clock time the connection was lost
        self.online = 0  # members online, from the latest welcome or heartbeat
        # Work handed to the I/O thread.
        self._commands: deque[tuple[str, object]] = deque()
        self._wake_lock = threading.Lock()
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(f"inproc://wake-{id(self)}")
        self._wake_tx.connect(f"inproc://wake-{id(self)}")
        # Refs start at a random point: another session with the same key (an earlier
        # `zchat send`, a second terminal) shares our private stream and our words in room
        # history, and its refs must not be mistaken for confirmations of ours.
        self._refs = itertools.count(secrets.randbelow(REF_START_SPAN) + 1)
        # Messages (say, me, msg) the broker has not yet echoed back, by ref.
        self._unconfirmed: dict[int, ClientMessage] = {}
        self.members: set[str] = set()  # names known to be online, for completion
        self.known_rooms: set[str] = set(settings.rooms)
        self._confirmed = threading.Condition()
        self._join_done = threading.Event()
        self._join_result: Welcome | JoinError | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        # Why the I/O thread died, if it did: then nothing more can be sent or received.
        self.failure: str | None = None

    # --- API (any thread) --------------------------------------------------

    def start(self) -> None:
        """Create the sockets, connect, and start the I/O thread."""
        self._thread = threading.Thread(target=self._run, name="zchat-io", daemon=True)
        self._thread.start()

    def join(self, name: str, timeout: float = 5.0) -> Welcome:
        """Join as `name`; raise JoinError with a reason the user can act on."""
        self._join_done.clear()
        self._join_result = None
        if self.failure is not None:  # (if it dies after this test, _failed wakes the wait)
            raise JoinError("failed", self.failure)
        self._command("join", name)
        if not self._join_done.wait(timeout):
            self._command("cancel_join", None)
            raise JoinError(*self._diagnose())
        result = self._join_result
        if isinstance(result, JoinError):
            raise result
        assert isinstance(result, Welcome)
        return result

    def say(self, text: str, room: str | None = None) -> int:
        """Queue `text` for `room` (default: the first room); returns its ref."""
        return self._tracked(lambda ref: Say(room=room or self._default_room(), text=text, ref=ref))

    def action(self, text: str, room: str | None = None) -> int:
        return self._tracked(lambda ref: Me(room=room or self._default_room(), text=text, ref=ref))

    def direct(self, to: str, text: str) -> int:
        return self._tracked(lambda ref: Msg(to=to, text=text, ref=ref))

    def nick(self, name: str) -> None:
        self._command("nick", name)

    def moderate(self, action: str, name: str, reason: str = "",
                 seconds: int = L.MUTE_DEFAULT_SECONDS) -> None:
        """Admin commands: kick, ban or mute `name`."""
        message: ClientMessage
        if action == "kick":
            message = Kick(name=name, reason=reason)
        elif action == "ban":
            message = Ban(name=name, reason=reason)
        else:
            message = Mute(name=name, seconds=seconds, reason=reason)
        self._command("send", message)

    def history(self, room: str, count: int = L.DEFAULT_HISTORY) -> None:
        """Ask for the last `count` stored events of `room`; they arrive as a Replay."""
        self._command("send", HistoryRequest(room=room, limit=min(count, L.MAX_HISTORY_PER_REQUEST)))

    def who(self, room: str | None = None) -> None:
        self._command("send", Who(room=room))

    def list_rooms(self) -> None:
        self._command("send", Rooms())

    def enter(self, room: str) -> None:
        """Join one more room; a `joined` event with our name confirms it."""
        self._command("enter", room)

    def part(self, room: str, message: str = "") -> None:
        self._command("send", Part(room=room, message=message))

    def _default_room(self) -> str:
        if not self.rooms:
            raise SendError("you are in no room: /join one first")
        return self.rooms[0]

    def _tracked(self, make: Callable[[int], ClientMessage]) -> int:
        ref = next(self._refs)
        message = make(ref)
        with self._confirmed:
            if self.failure is not None:
                raise SendError(self.failure)
            if len(self._unconfirmed) >= self.settings.max_unconfirmed:
                raise SendError("too many messages waiting for the broker; is it reachable?")
            self._unconfirmed[ref] = message
        self._command("send", message)
        return ref

    def wait_delivered(self, timeout: float) -> bool:
        """Block until the broker has confirmed every message said so far."""
        deadline = time.monotonic() + timeout
        with self._confirmed:
            while self._unconfirmed and self.failure is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._confirmed.wait(left):
                    return not self._unconfirmed
        return not self._unconfirmed

    def close(self, message: str = "", linger: float = 1.0, leave: bool = True) -> None:
        """Send a leave (if joined and `leave`), stop the I/O thread, close the sockets."""
        if self._thread is not None:
            if self._thread.is_alive() and self.failure is None:
                try:
                    self._command("close", message if leave else None)
                except SendError:
                    pass  # it died just now: nothing to send the leave with
            self._thread.join(linger + 2.0)  # a dead one has closed its sockets on the way out
        else:
            self._wake_rx.close(0)  # never started: no I/O thread owns it
        self._wake_tx.close(0)
        self.ctx.term()

    def _command(self, kind: str, arg: object) -> None:
        if self.failure is not None:
            raise SendError(self.failure)
        self._commands.append((kind, arg))
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already pending, or we are closing

    # --- the I/O thread --------------------------------------------------------

    def _make_sockets(self) -> None:
        settings, ep = self.settings, self.settings.endpoints
        # A linger on PUSH lets a final leave reach the broker after close.
        self.push = curve_client(self.ctx, zmq.PUSH, ep, settings.server_key, settings.keypair, linger=1000)
        self.push.sndhwm = L.CLIENT_SNDHWM
        self.sub = curve_client(self.ctx, zmq.SUB, ep, settings.server_key, settings.keypair)
        self._watch = HandshakeWatch(self.push)
        self.monitor = self._watch.monitor
        self._subscribed: dict[str, int] = {}
        for topic in [SYSTEM_TOPIC, self.private_topic] + [room_topic(r) for r in self.rooms]:
            self._subscribe(topic)
        self.sub.connect(ep.publish)
        self.push.connect(ep.input)

    def _subscribe(self, topic: str) -> None:
        # A SUB forwards duplicate subscriptions; the broker may have forgotten us.
        self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._subscribed[topic] = self._subscribed.get(topic, 0) + 1

    def _run(self) -> None:
        """The I/O thread. Whatever kills it is reported (a Status "failed" event, a failed
        join, woken waiters), and its sockets are closed in any case, so close() cannot hang."""
        try:
            self._serve()
        except BaseException as exc:
            self._failed(exc)
        finally:
            self._close_sockets()

    def _failed(self, exc: BaseException) -> None:
        import logging

        logging.getLogger("zchat.client").debug("the I/O thread died", exc_info=exc)
        self.failure = f"the client stopped working ({type(exc).__name__}: {exc})"
        self.connected = False
        self._join_result = JoinError("failed", self.failure)
        self._join_done.set()
        with self._confirmed:
            self._confirmed.notify_all()  # wait_delivered: nothing more will be confirmed
        self._emit(Status("failed", self.failure, time.time()))

    def _close_sockets(self) -> None:
        push = getattr(self, "push", None)
        if push is not None:
            try:
                push.disable_monitor()
            except zmq.ZMQError:
                pass
        for name in ("sub", "monitor"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
        self._wake_rx.close(0)
        if push is not None:
            push.close()  # linger lets a final leave reach the broker

    def _serve(self) -> None:
        self._make_sockets()
        self._pending_join: Join | None = None
        self._join_attempts = 0
        self._next_join = 0.0
        self._last_heartbeat = time.monotonic()
        self._next_ping = 0.0
        self._lost = False
        self._rejoin_reason = ""
        self._rejoin_failed = False
        self._removed = False
        self._replays_due: set[str] = set()  # rooms whose missed-events replay is on its way
        self._resend_at: float | None = None  # resend unconfirmed messages then (after a rejoin)
        self._resend_refs: set[int] = set()
        self._backfills: dict[str, _Backfill] = {}  # by room topic
        self._backfill_refs = itertools.count(1 << 40)  # apart from message refs
        self._last_seq: dict[str, int] = {}
        self._outbox: deque[ClientMessage] = deque()
        self._recent_notices: deque[tuple[object, ...]] = deque(maxlen=64)
        # Rooms asked for with /join and not yet confirmed: their live events before our
        # `joined` are also in the history that precedes it, so they are not shown live.
        self._entering: set[str] = set()
        self._tokens = float(L.RATE_BURST)
        self._rate = (float(L.RATE_BURST), L.RATE_PER_SECOND)
        self._refilled = time.monotonic()
        poller = zmq.Poller()
        for sock in (self.sub, self.monitor, self._wake_rx):
            poller.register(sock, zmq.POLLIN)
        while not self._stop:
            ready = dict(poller.poll(self._poll_timeout_ms()))
            if self.sub in ready:
                self._drain_sub()
            if self.monitor in ready:
                self._drain_monitor()
            if self._wake_rx in ready:
                while True:
                    try:
                        self._wake_rx.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            self._run_commands()
            self._timers()

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        deadlines = [self._next_ping, self._last_heartbeat + L.BROKER_SILENCE_LOST]
        if self._pending_join is not None:
            deadlines.append(self._next_join)
        if self._outbox and self._tokens < 1:
            deadlines.append(now + (1 - self._tokens) / self._rate[1])
        if self._resend_at is not None:
            deadlines.append(self._resend_at)
        deadlines += [backfill.deadline for backfill in self._backfills.values()]
        return max(0, int((min(deadlines) - now) * 1000) + 1)

    def _run_commands(self) -> None:
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "join":
                self._start_join(str(arg), "")
            elif kind == "cancel_join":
                self._pending_join = None
            elif kind == "send":
                self._outbox.append(arg)  # type: ignore[arg-type]
            elif kind == "enter":
                if str(arg) not in self.rooms:
                    self._entering.add(room_topic(str(arg)))
                self._subscribe(room_topic(str(arg)))  # before the request: the broker waits for it
                self._outbox.append(Enter(room=str(arg), history=self.settings.history))
            elif kind == "nick":
                if self._rejoin_failed:  # our old name was taken while we were away
                    self._start_join(str(arg), "reconnected")
                else:
                    self._outbox.append(Nick(name=str(arg)))
            elif kind == "close":
                if self.epoch is not None and not self._lost:
                    while self._outbox:  # what was asked before closing still goes, in order
                        self._send(self._outbox.popleft())
                if arg is not None and self.name is not None and self.epoch is not None:
                    self._send(Leave(message=str(arg)))
                self._stop = True
                return
        self._flush_outbox()

    def _start_join(self, name: str, reason: str) -> None:
        # Rejoining: `seen` asks for exactly what we missed instead of recent history.
        seen = {}
        for room in self.rooms if reason else []:
            topic = room_topic(room)
            if topic in self._backfills:  # a gap was being recovered: ask from before it
                seen[room] = self._backfills[topic].after
            elif topic in self._last_seq:
                seen[room] = self._last_seq[topic]
        self._pending_join = Join(name=name, rooms=list(self.rooms), history=self.settings.history, seen=seen)
        self._join_attempts = 0
        self._next_join = 0.0
        self._rejoin_reason = reason
        self._rejoin_failed = False

    def _timers(self) -> None:
        now = time.monotonic()
        if self._pending_join is not None and now >= self._next_join:
            self._join_attempts += 1
            if self._join_attempts % 5 == 0:  # the broker may have forgotten our subscriptions
                for topic in [self.private_topic] + [room_topic(r) for r in self.rooms]:
                    self._subscribe(topic)
            self._send(self._pending_join)
            self._next_join = now + L.JOIN_RETRY_INTERVAL
        if self.epoch is not None and now >= self._next_ping:
            self._send(Ping())
            self._next_ping = now + L.CLIENT_PING_INTERVAL
        if self.epoch is not None and not self._lost and now - self._last_heartbeat > L.BROKER_SILENCE_LOST:
            self._lost = True
            self.connected = False
            self.lost_since = time.time()
            self._emit(Status("lost", "connection to the broker lost; reconnecting", self.lost_since))
        if self._backfills:
            self._expire_backfills()
        if self._resend_at is not None and now >= self._resend_at:
            self._resend_unconfirmed()
        self._flush_outbox()

    def _flush_outbox(self) -> None:
        if not self._outbox or self._pending_join is not None or self.epoch is None or self._lost:
            return
        if self._resend_at is not None:
            return  # after a rejoin, earlier messages go first: wait for the resend
        burst, rate = self._rate
        now = time.monotonic()
        self._tokens = min(burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        while self._outbox and self._tokens >= 1:
            self._send(self._outbox.popleft())
            self._tokens -= 1

    def _send(self, message: ClientMessage) -> None:
        try:
            self.push.send(encode_client_message(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # queue full while the broker is away: the join/resend logic recovers

    # --- incoming ----------------------------------------------------------------

    def _drain_sub(self) -> None:
        while True:
            try:
                data = self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                topic, event = decode_publication(data)
            except ProtocolError:
                continue  # a newer broker's event type, or garbage: skip it
            self._handle(topic, event)

    def _handle(self, topic: str, event: Event) -> None:
        if isinstance(event, Heartbeat):
            self._on_heartbeat(topic, event)
            return
        if isinstance(event, Shutdown):
            self._lost = True
            self.connected = False
            self.lost_since = event.ts
            self._emit(Status("shutdown", event.detail, event.ts))
            return
        if topic == SYSTEM_TOPIC:
            return  # other broker notices (stats): not for the chat, and not numbered for us
        if topic == self.private_topic:
            if isinstance(event, Welcome):
                self._on_welcome(event)
                return
            if isinstance(event, Error) and self._on_error(event):
                return
        if self.epoch is None or self._pending_join is not None:
            # Before our (re)welcome: anything up to its baseline comes as history instead.
            return
        if topic in self._entering:
            if not (isinstance(event, Joined) and event.name == self.name):
                return  # before our arrival: the room's history (sent first) has it
            self._entering.discard(topic)
            self._last_seq[topic] = event.seq - 1  # the baseline: live from our arrival on
        if not self._track_seq(topic, event.seq, event.ts, event):
            return
        if isinstance(event, History):
            self._on_history(event)
            return
        backfill = self._backfills.get(topic)
        if backfill is not None:
            backfill.held.append(event)  # shown after the events that fill the gap before it
            return
        self._emit_live(event)

    def _emit_live(self, event: Event) -> None:
        if isinstance(event, Mark):
            return  # only there to reveal lost tails
        if isinstance(event, (Message, Action, Direct)) and event.ref is not None and event.name == self.name:
            self._confirm(event.ref)
        self._follow(event)
        if self._repeated_notice(event):
            return  # the same arrival/departure/rename, seen again through another shared room
        self._emit(event)
        if isinstance(event, Error) and event.ref is not None:
            # Refused: settled too. After the emit, so a waiter sees the refusal first.
            self._confirm(event.ref)

    def _follow(self, event: Event) -> None:
        """Keep our own rooms, name and the list of known names in step with events."""
        if isinstance(event, Joined):
            self.members.add(event.name)
            self.known_rooms.add(event.room)
            if event.name == self.name and event.room not in self.rooms:
                self.rooms.append(event.room)
        elif isinstance(event, Left):
            if event.name == self.name and event.reason == "part" and event.room in self.rooms:
                self.rooms.remove(event.room)
                topic = room_topic(event.room)
                for _ in range(self._subscribed.pop(topic, 0)):
                    self.sub.setsockopt(zmq.UNSUBSCRIBE, topic.encode())
            elif event.reason != "part":
                self.members.discard(event.name)
        elif isinstance(event, Renamed):
            self.members.discard(event.old)
            self.members.add(event.new)
            if event.old == self.name:
                self.name = event.new
        elif isinstance(event, WhoReply) and event.room is None:
            self.members = set(event.names)
        elif isinstance(event, RoomList):
            self.known_rooms.update(event.rooms)

    def _repeated_notice(self, event: Event) -> bool:
        if isinstance(event, Joined) and event.chat:
            key: tuple[object, ...] = ("joined", event.name, event.ts)
        elif isinstance(event, Left) and event.reason != "part":
            key = ("left", event.name, event.ts)
        elif isinstance(event, Renamed):
            key = ("renamed", event.old, event.ts)
        else:
            return False
        if key in self._recent_notices:
            return True
        self._recent_notices.append(key)
        return False

    def _on_history(self, history: History) -> None:
        events = []
        for raw in history.events:
            try:
                events.append(decode_event(raw))
            except ProtocolError:
                continue
        topic = room_topic(history.room)
        backfill = self._backfills.get(topic)
        if backfill is not None and history.ref == backfill.ref:
            self._on_backfill_page(topic, backfill, events, history)
            return
        if history.ref is None and topic in self._entering:
            # The room's past up to our arrival: live from here on (should our `joined` be lost).
            self._entering.discard(topic)
            self._last_seq[topic] = history.upto
        for event in events:  # our own words, published before an echo got lost in a rejoin
            if (isinstance(event, (Message, Action)) and event.ref in self._resend_refs
                    and event.name == self.name):
                self._confirm(event.ref)
        if self._resend_at is not None and history.ref is None:
            self._replays_due.discard(history.room)
            if not self._replays_due:
                self._resend_unconfirmed()
        kind = "missed" if history.after > 0 and history.ref is None else "history"
        skipped = 0
        if history.after > 0 and events and events[0].seq > history.after + 1 + history.lost:
            skipped = events[0].seq - history.after - 1 - history.lost  # more than we asked to see
        self._emit(Replay(kind, history.room, events, history.lost, history.ts, skipped))

    def _on_backfill_page(self, topic: str, backfill: _Backfill, events: list[Event],
                          history: History) -> None:
        backfill.recovered[:0] = events  # pages come newest first
        oldest = events[0].seq if events else backfill.before
        full_page = len(history.events) >= L.MAX_HISTORY_PER_REQUEST  # storage may hold more
        if full_page and oldest > backfill.after + 1 and backfill.pages < BACKFILL_PAGES:
            backfill.pages += 1
            backfill.ref = next(self._backfill_refs)
            backfill.deadline = time.monotonic() + BACKFILL_WAIT
            self._request_range(backfill.room, backfill.after, oldest, backfill.ref)
            return
        del self._backfills[topic]
        lost = max(0, backfill.missing - len(backfill.recovered))  # pruned, or past the pages
        self._emit(Replay("backfill", backfill.room, backfill.recovered, lost, history.ts))
        for held in backfill.held:
            self._emit_live(held)

    def _start_backfill(self, topic: str, last: int, event: Event) -> None:
        """Ask storage for the gap before `event` and hold the room's live events meanwhile."""
        ref = next(self._backfill_refs)
        room = topic[len(ROOM_PREFIX):-1]
        before = event.seq + 1 if isinstance(event, Mark) else event.seq  # a mark's seq was missed too
        self._backfills[topic] = _Backfill(room, last, before, ref, time.monotonic() + BACKFILL_WAIT, [event])
        self._request_range(room, last, before, ref)

    def _request_range(self, room: str, after: int, before: int, ref: int) -> None:
        limit = min(before - after - 1, L.MAX_HISTORY_PER_REQUEST)
        # Paced like everything we say (the broker charges requests too), but ahead of the
        # queue: the room's live events wait for this answer.
        self._outbox.appendleft(HistoryRequest(room=room, after=after, before=before, limit=limit, ref=ref))

    def _expire_backfills(self) -> None:
        now = time.monotonic()
        for topic, backfill in list(self._backfills.items()):
            if now >= backfill.deadline:  # no answer: show what we have, say what is missing
                del self._backfills[topic]
                if backfill.recovered:
                    self._emit(Replay("backfill", backfill.room, backfill.recovered, 0, time.time()))
                missing = backfill.missing - len(backfill.recovered)
                self._emit(Gap(topic, max(missing, 1), backfill.held[0].ts))
                for event in backfill.held:
                    self._emit_live(event)

    def _on_heartbeat(self, topic: str, beat: Heartbeat) -> None:
        self._last_heartbeat = time.monotonic()
        self.online = beat.online
        if self.epoch is None or self._pending_join is not None or self._removed:
            return
        if beat.epoch != self.epoch:
            self._start_join(self.name or "", "restarted")
        elif self._lost:
            self._start_join(self.name or "", "reconnected")

    def _on_welcome(self, welcome: Welcome) -> None:
        if self._pending_join is None and welcome.epoch == self.epoch:
            return  # a repeat: a resent join crossed the first welcome; nothing is new
        first = self.epoch is None
        restarted = not first and welcome.epoch != self.epoch
        if welcome.epoch != self.epoch:
            self._last_seq.clear()
        self._backfills.clear()  # whatever they held is at or below the new baselines
        seen = self._pending_join.seen if self._pending_join is not None else {}
        self.epoch = welcome.epoch
        self.name = welcome.name
        # Stay a little under the broker's bucket: network jitter bunches messages up.
        self._rate = (max(1.0, welcome.rate_burst - 2.0), welcome.rate_per_second * 0.9)
        self._tokens = min(self._tokens, self._rate[0])
        self.members = set(welcome.members)
        self.rooms = [room for room in welcome.rooms]
        self.known_rooms.update(self.rooms)
        for room, seq in welcome.rooms.items():
            self._last_seq[room_topic(room)] = seq
            self._entering.discard(room_topic(room))  # in it: the welcome's baseline counts
        self._last_seq[self.private_topic] = welcome.seq
        self._pending_join = None
        self._lost = False
        self.connected = True
        self.lost_since = None
        self.online = welcome.online
        self._last_heartbeat = time.monotonic()
        self._join_result = welcome
        self._join_done.set()
        if first:
            self._emit(welcome)
        else:
            detail = "the broker restarted; rejoined" if restarted else "rejoined"
            self._emit(Status("reconnected", detail, welcome.ts))
            # What we said may have been published with its echo lost on the way: the replay
            # of what we missed (it follows the welcome) shows it. Resend the rest after that.
            self._replays_due = {room for room, seq in welcome.rooms.items() if seen.get(room, seq) < seq}
            self._resend_at = time.monotonic() + RESEND_WAIT
            with self._confirmed:
                self._resend_refs = set(self._unconfirmed)
            if not self._replays_due:
                self._resend_unconfirmed()
        self._flush_outbox()

    def _resend_unconfirmed(self) -> None:
        """Put what was sent before the rejoin and never confirmed back in front, in order."""
        self._resend_at = None
        queued = {id(message) for message in self._outbox}
        with self._confirmed:
            again = [self._unconfirmed[ref] for ref in sorted(self._resend_refs)
                     if ref in self._unconfirmed and id(self._unconfirmed[ref]) not in queued]
        self._outbox = deque(again + list(self._outbox))
        self._resend_refs = set()

    def _on_error(self, error: Error) -> bool:
        """Handle join-related errors; True when consumed here."""
        if self._pending_join is not None and error.code in JOIN_ERRORS:
            name = self._pending_join.name
            self._pending_join = None
            self._join_result = JoinError(error.code, error.detail)
            self._join_done.set()
            if self.epoch is not None:  # an automatic rejoin failed: say so, offer a way out
                self._rejoin_failed = True
                self._emit(Status("rejoin_failed", f"could not rejoin as {name}: {error.detail}; "
                                  "choose another name with /nick NEW", error.ts))
            return True
        if error.code in REMOVED:
            self._removed = True  # an admin or the operator removed us: do not come back by ourselves
            self.connected = False
            self._emit(Status("removed", error.detail, error.ts))
            return True
        if error.code == Code.NOT_JOINED and self.epoch is not None:
            if self._pending_join is None and not self._removed:
                self._start_join(self.name or "", "reconnected")
            return True
        return False  # shown, then its ref confirmed, by _emit_live

    def _confirm(self, ref: int) -> None:
        with self._confirmed:
            self._unconfirmed.pop(ref, None)
            self._confirmed.notify_all()

    def _track_seq(self, topic: str, seq: int, ts: float, event: Event) -> bool:
        """Record `seq`; report a jump as a gap. False for an old or repeated event."""
        last = self._last_seq.get(topic)
        self._last_seq[topic] = max(seq, last or 0)
        if last is None:
            return True
        if seq <= last:
            return False
        missing = seq - last - (0 if isinstance(event, Mark) else 1)  # a mark's own seq is missing
        if missing > 0:
            if topic.startswith(ROOM_PREFIX) and topic not in self._backfills:
                self._start_backfill(topic, last, event)
                return False  # held: shown once the gap before it is filled
            self._emit(Gap(topic, missing, ts))
        return True

    def _drain_monitor(self) -> None:
        if "auth" in self._watch.drain():
            self._fail_join(*self._diagnose())

    def _fail_join(self, code: str, message: str) -> None:
        if self._pending_join is not None:
            self._pending_join = None
            self._join_result = JoinError(code, message)
            self._join_done.set()

    def _diagnose(self) -> tuple[str, str]:
        """Why a join failed or timed out, as (code, message), from what the monitor saw."""
        return self._watch.explain(self.settings.endpoints.input)

    def _emit(self, event: ClientEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # a display bug must not kill the I/O thread
            import logging

            logging.getLogger("zchat.client").exception("event handler failed")
