"""The client library: the sockets and the one I/O thread around `ClientCore`.

Usable without the terminal UI (tests, bots, `zchat send`). All protocol logic
(join handshake, heartbeats, pacing, resend, dedup, gap recovery) is in
zchat/clientcore.py; this shell only moves bytes and requests:

- the I/O thread owns every socket and the core. Other threads hand it typed
  requests through a queue and a wake-up socket, so no ZeroMQ socket and no
  core state is ever shared between threads;
- what a UI may read is `snapshot` (an immutable `Snapshot`, replaced as a
  whole) and the events handed to `on_event`, each seen with the snapshot of
  its moment;
- it sleeps on its poller until a socket, a request or the core's next
  deadline wakes it: nothing is busy while the broker is away.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from zchat import limits as L
from zchat.clientcore import (
    CancelJoin,
    ClientApi,
    ClientCore,
    Close,
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
from zchat.clientcore import SendError as SendError  # re-exported: what the UI catches
from zchat.e2e import Keyring
from zchat.endpoints import Endpoints
from zchat.events import ClientEvent, Gap, Pending, Replay, Snapshot, Status, StatusState  # noqa: F401
from zchat.keys import KeyPair
from zchat.protocol import (
    DEFAULT_ROOM,
    Event,
    ProtocolError,
    Welcome,
    decode_publication,
    encode_client_message,
)
from zchat.sealing import SealError, box_for, key_bytes, open_publication
from zchat.transport import BUSY_STATUS, HandshakeWatch, curve_client

log = logging.getLogger("zchat.client")
MAX_POLL_MS = 1000  # wake up at least this often, whatever the core's deadline
FAILOVER_AFTER = 2.0  # seconds lost (no heartbeat) before trying the next endpoint
SWITCH_MIN = 1.0  # least seconds between two switches of endpoint
REDIAL_FIRST = 1.0  # seconds before dialling again after a refusal "for now" at a reconnection...
REDIAL_MAX = 8.0  # ...doubling up to this


def read_ignored(path: Path | None) -> dict[str, str]:
    """The ignore list: one "KEY NAME" line per ignored key (missing file: nobody)."""
    ignored: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines() if path is not None else []
    except OSError:
        return ignored
    for line in lines:
        words = line.split()
        if len(words) >= 2 and len(words[0]) == 64:
            ignored[words[0]] = words[1]
    return ignored


def write_ignored(path: Path | None, ignored: dict[str, str]) -> None:
    """Replace the ignore list on disk (whole: a crash leaves the old file or the new one)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".new")
        temporary.write_text("".join(f"{key} {name}\n" for key, name in ignored.items()))
        os.replace(temporary, path)
    except OSError as exc:
        log.error("cannot keep the ignore list in %s: %s", path, exc.strerror or exc)


class JoinError(Exception):
    """Joining failed; `code` is a protocol error code or unreachable/auth/handshake/timeout."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ClientSettings:
    endpoints: Endpoints
    server_key: bytes  # z85
    keypair: KeyPair
    rooms: list[str] = field(default_factory=lambda: [DEFAULT_ROOM])
    history: int = L.DEFAULT_HISTORY  # events of each room's history shown on joining it
    max_unconfirmed: int = 1000
    broker_key: bytes | None = None  # z85; through a relay, the broker's (it seals u/<id>/), else server_key
    # Other endpoints (relays) with their server keys: tried in turn when the link is lost.
    alternates: list[tuple[Endpoints, bytes]] = field(default_factory=list)
    ignore_file: Path | None = None  # /ignore's list, kept across restarts ("KEY NAME" lines)


class ChatClient(ClientApi):
    def __init__(self, settings: ClientSettings, on_event: Callable[[ClientEvent], None] | None = None):
        super().__init__(settings.rooms)
        self.settings = settings
        self.identity = settings.keypair.identity
        self.events: queue.Queue[ClientEvent] = queue.Queue()
        self._on_event = on_event or self.events.put
        # The broker seals our private stream to our key (PROTOCOL.md "Sealed private streams"),
        # and private messages are sealed end to end with the same key pair (zchat.e2e).
        self._box = box_for(settings.keypair.secret, settings.broker_key or settings.server_key)
        self.unopened = 0  # u/ publications that did not open with our key: dropped
        self.core = ClientCore(self.identity, settings.rooms, settings.history, settings.max_unconfirmed,
                               keyring=Keyring(key_bytes(settings.keypair.secret)),
                               ignored=read_ignored(settings.ignore_file))
        self.ctx = zmq.Context()
        self._requests: deque[RequestType] = deque()
        self._wake_lock = threading.Lock()
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(f"inproc://wake-{id(self)}")
        self._wake_tx.connect(f"inproc://wake-{id(self)}")
        self._settled = threading.Condition()  # notified when requests were handled
        self._unhandled = 0  # requests submitted and not yet handled by the I/O thread
        self._join_done = threading.Event()
        self._join_result: JoinDone | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        # Where the sockets are connected: settings.endpoints, then each alternate in turn.
        self._paths = [(settings.endpoints, settings.server_key), *settings.alternates]
        self._path = 0
        self._switched_at = 0.0
        self._redial_at: float | None = None  # when to dial again after a refusal for now
        self._redial_wait = REDIAL_FIRST

    # --- API (any thread) --------------------------------------------------------

    def start(self) -> None:
        """Create the sockets, connect, and start the I/O thread."""
        self._thread = threading.Thread(target=self._run, name="zchat-io", daemon=True)
        self._thread.start()

    def join(self, name: str, timeout: float = 5.0) -> Welcome:
        """Join as `name`; raise JoinError with a reason the user can act on."""
        self._join_done.clear()
        if self.failure is not None:  # (if it dies after this test, _failed wakes the wait)
            raise JoinError("failed", self.failure)
        self._submit(JoinChat(name))
        if not self._join_done.wait(timeout):
            self._submit(CancelJoin())
            raise JoinError(*self._diagnose())
        result = self._join_result
        assert result is not None
        if result.welcome is None:
            raise JoinError(result.code, result.detail)
        return result.welcome

    def wait_delivered(self, timeout: float) -> bool:
        """Block until the broker has confirmed (or refused) every message said so far."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._unhandled or self.snapshot.pending:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread or not self._thread.is_alive():
                    return False
                self._settled.wait(left)
        return True

    def close(self, message: str = "", linger: float = 1.0, leave: bool = True) -> None:
        """Send a leave (if joined and `leave`), stop the I/O thread, close the sockets."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._submit(Close(message if leave else None))
            except SendError:
                pass  # it died just now: nothing to send the leave with
            self._thread.join(linger + 2.0)  # a dead one has closed its sockets on the way out
        elif self._thread is None:
            self._wake_rx.close(0)  # never started: no I/O thread owns it
        self._wake_tx.close(0)
        self.ctx.term()

    def _submit(self, request: RequestType) -> None:
        if self.failure is not None:
            raise SendError(self.failure)
        with self._settled:
            self._unhandled += 1
            self._requests.append(request)
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already pending, or we are closing

    def diagnose(self) -> tuple[str, str]:
        """Why the broker has not answered, as (code, one line for the user)."""
        return self._diagnose()

    def _diagnose(self) -> tuple[str, str]:
        """Why a join failed or timed out, as (code, message), from what the monitor saw."""
        return self._watch.explain(self.settings.endpoints.input, self.settings.endpoints.flags())

    # --- the I/O thread ------------------------------------------------------------

    def _make_sockets(self) -> None:
        settings, ep = self.settings, self.settings.endpoints
        # A linger on PUSH lets a final leave reach the broker after close.
        self.push = curve_client(self.ctx, zmq.PUSH, ep, settings.server_key, settings.keypair, linger=1000)
        self.push.sndhwm = L.CLIENT_SNDHWM
        self.sub = curve_client(self.ctx, zmq.SUB, ep, settings.server_key, settings.keypair)
        self._watch = HandshakeWatch(self.push, settings.keypair.identity)
        self._sub_watch = HandshakeWatch(self.sub, settings.keypair.identity)  # only for refusals
        self._carry_out(self.core.start())  # subscribe before connecting
        self.sub.connect(ep.publish)
        self.push.connect(ep.input)

    def _run(self) -> None:
        try:
            self._make_sockets()
            poller = zmq.Poller()
            for sock in (self.sub, self._watch.monitor, self._sub_watch.monitor, self._wake_rx):
                poller.register(sock, zmq.POLLIN)
            while not self._stopped:
                ready = dict(poller.poll(self._poll_timeout_ms()))
                if self.sub in ready:
                    self._drain_sub()
                if self._watch.monitor in ready or self._sub_watch.monitor in ready:
                    self._drain_monitor()
                if self._wake_rx in ready:
                    self._drain_wake()
                self._handle_requests()
                if not self._stopped:
                    self._carry_out(self.core.tick(self._now()))
                    if len(self._paths) > 1 and self.core.lost_since is not None \
                            and time.monotonic() - self._switched_at > FAILOVER_AFTER:
                        self._switch()  # silent (hung, or its link died quietly): try the next one
                    if self._redial_at is not None and time.monotonic() >= self._redial_at:
                        self._redial_at = None
                        self._redial()
        except BaseException as exc:  # whatever kills it is reported, and close() cannot hang
            self._failed(exc)
        finally:
            with self._settled:
                self._settled.notify_all()
            self._close_sockets()

    def _failed(self, exc: BaseException) -> None:
        log.debug("the I/O thread died", exc_info=exc)
        self.failure = f"the client stopped working ({type(exc).__name__}: {exc})"
        self._join_result = JoinDone(None, "failed", self.failure)
        self._join_done.set()
        self._emit(Status(StatusState.FAILED, self.failure, time.time()))

    def _close_sockets(self) -> None:
        for watch_name, sock_name in (("_watch", "push"), ("_sub_watch", "sub")):
            watch = getattr(self, watch_name, None)
            if watch is not None:
                watch.close(getattr(self, sock_name))
        for name in ("sub", "_wake_rx"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
        push = getattr(self, "push", None)
        if push is not None:
            push.close()  # linger lets a final leave reach the broker

    @staticmethod
    def _now() -> Now:
        return Now(time.monotonic(), time.time())

    def _poll_timeout_ms(self) -> int:
        deadline = self.core.deadline()
        if self._redial_at is not None:
            deadline = self._redial_at if deadline is None else min(deadline, self._redial_at)
        if deadline is None:
            return MAX_POLL_MS
        return max(0, min(MAX_POLL_MS, int((deadline - time.monotonic()) * 1000) + 1))

    def _drain_monitor(self) -> None:
        disconnects = self._watch.disconnects
        failures = self._watch.drain()
        if "auth" in failures:  # our key refused
            self._carry_out(self.core.request(HandshakeFailed(*self._diagnose()), self._now()))
        if "refused" in failures:
            self._refused_again(self._watch.status)
        if "refused" in self._sub_watch.drain():
            self._refused_again(self._sub_watch.status)
        if self._watch.disconnects > disconnects:  # the broker went away: no need to wait for silence
            self._carry_out(self.core.request(LinkDown(), self._now()))
            if len(self._paths) > 1 and time.monotonic() - self._switched_at > SWITCH_MIN:
                self._switch()

    def _refused_again(self, status: int) -> None:
        """The broker refused our key at a reconnection, and libzmq will not try again. Not
        now (a limit: too many connections of this key, evicted to make room): dial again
        after a pause, longer each time. For good (banned, or taken off the authorized
        keys, with the notice saying so missed): say so."""
        if status == BUSY_STATUS:
            if self._redial_at is None:
                self._redial_at = time.monotonic() + self._redial_wait
                self._redial_wait = min(REDIAL_MAX, 2 * self._redial_wait)
            return
        detail = ("the broker refused this key at a reconnection: it was banned, or taken off "
                  "the authorized keys")
        self._carry_out(self.core.request(HandshakeFailed("auth", detail), self._now()))

    def _switch(self) -> None:
        """Move both sockets to the next endpoint (a relay of the same broker). The SUB keeps
        its subscriptions and sends them there; the core rejoins when heartbeats come back and
        recovers what it missed (seq gaps, history)."""
        old, _ = self._paths[self._path]
        self._switched_at = time.monotonic()
        self._dial((self._path + 1) % len(self._paths))
        log.info("endpoint %s lost: trying %s", old.input, self._paths[self._path][0].input)

    def _redial(self) -> None:
        """Connect both sockets to the current endpoint afresh."""
        self._dial(self._path)
        log.info("refused for now at a reconnection: dialled %s again", self._paths[self._path][0].input)

    def _dial(self, path: int) -> None:
        """Disconnect both sockets from the current endpoint and connect them to `path`'s."""
        old, _ = self._paths[self._path]
        self._path = path
        new, key = self._paths[path]
        for sock, was, endpoint in ((self.sub, old.publish, new.publish), (self.push, old.input, new.input)):
            try:
                sock.disconnect(was)
            except zmq.ZMQError:
                pass  # not connected any more
            sock.curve_serverkey = key  # taken at connect time
            sock.connect(endpoint)

    def _drain_wake(self) -> None:
        while True:
            try:
                self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _handle_requests(self) -> None:
        while self._requests and not self._stopped:
            request = self._requests.popleft()
            self._carry_out(self.core.request(request, self._now()))
            with self._settled:
                self._unhandled -= 1
                self._settled.notify_all()

    def _drain_sub(self) -> None:
        while True:
            try:
                data = self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            decoded = self.decode(data)
            if decoded is not None:
                self._carry_out(self.core.publication(*decoded, self._now()))

    def decode(self, data: bytes) -> tuple[str, Event] | None:
        """One published frame as (topic, event); None for what cannot be read (a newer broker's
        event type, or garbage). The one place a frame's body is opened."""
        try:
            data = open_publication(self._box, data)  # u/ only; the rest as it is
        except SealError:
            self.unopened += 1  # not sealed to us (or damaged): never shown
            return None
        try:
            return decode_publication(data)
        except ProtocolError:
            return None

    def _carry_out(self, effects: list[Effect]) -> None:
        shown = False
        for effect in effects:
            if isinstance(effect, Send):
                try:
                    self.push.send(encode_client_message(effect.message), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # queue full while the broker is away: the rejoin and resend recover
            elif isinstance(effect, Show):
                self.snapshot = effect.view
                self._emit(effect.event)
                shown = True
            elif isinstance(effect, Subscribe):
                self.sub.setsockopt(zmq.SUBSCRIBE, effect.topic.encode())
            elif isinstance(effect, Unsubscribe):
                self.sub.setsockopt(zmq.UNSUBSCRIBE, effect.topic.encode())
            elif isinstance(effect, JoinDone):
                self.snapshot = self.core.snapshot()
                self._join_result = effect
                self._join_done.set()
            elif isinstance(effect, Stopped):
                self._stopped = True
            elif isinstance(effect, IgnoresChanged):
                write_ignored(self.settings.ignore_file, effect.ignored)
        # After a Show too: its view may already be the core's, and a waiter (wait_delivered)
        # must wake once on_event has seen what settled a message, not at its timeout.
        if shown or self.snapshot is not self.core.snapshot():
            with self._settled:
                self.snapshot = self.core.snapshot()
                self._settled.notify_all()

    def _emit(self, event: ClientEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # a display bug must not kill the I/O thread
            log.exception("event handler failed")
