"""The chat client's protocol logic, without sockets, threads or a clock.

`ClientCore` is to the client what `BrokerCore` is to the broker. The shell
(zchat/client.py) feeds it what happens, each with the time `Now(mono, wall)`:

- `request(r, now)`: something the user asked for (a `Request`: join, say, /nick...);
- `publication(topic, event, now)`: an event decoded from the SUB socket;
- `tick(now)`: time passed (call it by `deadline()`);

and carries out the `Effect`s each call returns, in order: `Send` a message on the
PUSH socket, `Subscribe`/`Unsubscribe` the SUB, `Show` an event to the UI,
`JoinDone` (the join the UI waits for succeeded or failed), `Stopped`.

It owns the join and rejoin handshake, heartbeats both ways, pacing (one token
bucket for all it sends), the resend of unconfirmed messages after a rejoin,
dedup, and per-topic sequence numbers with gap recovery (zchat.flow.SeqTracker,
the tap's tracker). Schedules use `now.mono`; `now.wall` only stamps the events
the client makes up (a loss, a local refusal).

While the broker is out of reach the core sends nothing but its joins once the
broker is heard again: no pings, no messages. What the user says meanwhile is
shown as `Pending`, kept in order and sent, paced, once the rejoin is confirmed.
A message the broker refused (an `error` naming its ref) is settled and never
sent again; one that could never be valid (too long) is refused here and never
sent at all.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from nacl.exceptions import CryptoError

from zchat import limits as L
from zchat.commands import too_long
from zchat.e2e import Keyring, OpenError, fingerprint
from zchat.events import (
    ClientEvent,
    Connection,
    DirectDraft,
    Folded,
    Gap,
    Pending,
    PrivateMessage,
    Replay,
    ReplayKind,
    Snapshot,
    Status,
    StatusState,
)
from zchat.flow import Gap as GapRecord
from zchat.flow import Out, Request, SeqTracker, TokenBucket, Write
from zchat.protocol import (
    DEFAULT_ROOM,
    SYSTEM_TOPIC,
    Action,
    Away,
    Ban,
    Bans,
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
    Nick,
    Part,
    Ping,
    Post,
    Posted,
    ProtocolError,
    Renamed,
    RoomList,
    Rooms,
    Say,
    SetTopic,
    Shutdown,
    Unban,
    Welcome,
    Who,
    WhoReply,
    clean_message,
    clean_text,
    decode_event,
    name_key,
    private_topic,
    room_of_topic,
    room_topic,
)

JOIN_ERRORS = {Code.NAME_TAKEN, Code.INVALID_NAME, Code.INVALID_ROOM}
REMOVED = {Code.KICKED, Code.BANNED, Code.REVOKED}
RESEND_WAIT = 2.0  # seconds to wait for missed-event replays before resending after a rejoin
REF_START_SPAN = 1 << 39  # message refs start below this...
BACKFILL_REFS = 1 << 40  # ...and history requests for gaps from here on, apart from them
BACKFILL_PAGES = 20  # a gap is recovered up to this many full history pages (its newest events)
# Joining: no welcome on our private stream this long after subscribing it means the broker may
# not have installed it (PROTOCOL.md "Sealed private streams"): subscribe it again.
RESUBSCRIBE_WAIT = 1.0
RESUBSCRIBE_RESET = 16  # repeats of one subscription before it is taken down and made afresh
IGNORE_REFS = 1 << 42  # key requests made for /ignore are numbered from here (above the others)
# Mass events (PROTOCOL.md "Folding mass departures"): a room's connection losses and returns
# are folded into one line while they keep coming (each extends the window by FOLD_QUIET, up to
# FOLD_MAX after the first); the notices of the first FOLD_MIN - 1 people show at once, as they
# come, so a lone departure is never held back.
FOLD_QUIET = 3.0
FOLD_MAX = 30.0
FOLD_MIN = 3
_LOST = (LeftReason.DISCONNECTED, LeftReason.TIMEOUT)

SpokenMessage = Say | Me | DirectDraft


class Now(NamedTuple):
    """The time of an input: `mono` (time.monotonic) for every schedule, `wall` (time.time)
    only to stamp events the client makes up."""

    mono: float
    wall: float


def new_ref_counter_start() -> int:
    """Where a session's message refs start. At random: another session with the same key (an
    earlier `zchat send`, a second terminal) shares our private stream and our words in room
    history, and its refs must not be mistaken for confirmations of ours."""
    return secrets.randbelow(REF_START_SPAN) + 1


# --- requests: what the user asks for ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinChat:
    name: str


@dataclass(frozen=True, slots=True)
class CancelJoin:
    """The caller stopped waiting for the join."""


@dataclass(frozen=True, slots=True)
class Speak:
    """A message (say, me, msg) the broker must confirm: by its echo, or by an error with its ref."""

    message: SpokenMessage


@dataclass(frozen=True, slots=True)
class Ask:
    """Anything else for the broker (who, rooms, history, part, kick, ban, mute): sent once."""

    message: ClientMessage


@dataclass(frozen=True, slots=True)
class PostOnce:
    """A `post` (zchat send): sent without joining, again until the broker answers its ref
    (a resend is confirmed, never published twice), settled by `posted` or an error."""

    message: Post


@dataclass(frozen=True, slots=True)
class EnterRoom:
    room: str  # normalized


@dataclass(frozen=True, slots=True)
class ChangeName:
    name: str


@dataclass(frozen=True, slots=True)
class Reconnect:
    """/reconnect: rejoin after a kick (or after a rejoin found our name taken)."""


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The socket monitor saw the broker refuse our key (`code` "auth") or fail the handshake."""

    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class LinkDown:
    """The socket monitor saw our connection to the broker close (a killed broker, a cut link):
    lost at once, before its heartbeats are missed, so nothing more is queued for it."""


@dataclass(frozen=True, slots=True)
class Close:
    """Send what is queued and, unless `message` is None, a leave with it; then stop."""

    message: str | None


@dataclass(frozen=True, slots=True)
class Ignore:
    """/ignore NAME: hide what the key now holding NAME says (its key is asked for if unknown);
    with no name, list whom we ignore."""

    name: str | None


@dataclass(frozen=True, slots=True)
class Unignore:
    name: str


RequestType = (JoinChat | CancelJoin | Speak | Ask | PostOnce | EnterRoom | ChangeName | Reconnect
               | HandshakeFailed | LinkDown | Close | Ignore | Unignore)

# --- effects: what the shell carries out, in order ------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    message: ClientMessage


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic: str


@dataclass(frozen=True, slots=True)
class Show:
    """Hand `event` to the UI; `view` is the client's state as of this event."""

    event: ClientEvent
    view: Snapshot


@dataclass(frozen=True, slots=True)
class JoinDone:
    """The join the caller waits for: welcomed, or refused with (code, detail)."""

    welcome: Welcome | None
    code: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Stopped:
    """Closing is done: stop the I/O loop."""


@dataclass(frozen=True, slots=True)
class IgnoresChanged:
    """The ignore list changed: the shell keeps it (key -> the name it had) across restarts."""

    ignored: dict[str, str]


Effect = Send | Subscribe | Unsubscribe | Show | JoinDone | Stopped | IgnoresChanged


@dataclass(slots=True)
class _Outgoing:
    message: SpokenMessage
    sent: bool = False  # handed to the socket (since the last rejoin)


@dataclass(slots=True)
class _Fold:
    """A room's departures and returns being folded into one line."""

    lost: set[str]  # names that lost their connection
    back: set[str]  # ...and came back since
    held: list[Event]  # the notices folded, in order (shown as they are if few people)
    until: float  # shown when no more come before this (monotonic)...
    ends: float  # ...or at this at the latest


@dataclass(slots=True)
class _Rejoin:
    """After a rejoin: what was sent before it and never confirmed waits for the replays of what
    we missed (they show whether it was published), then goes again, ahead of the rest."""

    refs: set[int]
    rooms_due: set[str] = field(default_factory=set)  # rooms whose missed-events replay is coming
    until: float = 0.0


class ClientCore:
    def __init__(self, identity: str, rooms: Iterable[str] = (DEFAULT_ROOM,),
                 history: int = L.DEFAULT_HISTORY, max_unconfirmed: int = 1000,
                 keyring: Keyring | None = None, ignored: dict[str, str] | None = None) -> None:
        self.identity = identity
        # /ignore, bound to keys (a rename does not escape it): key -> the name it had when
        # ignored; which key each name is held by, as joins, renames and key answers tell us;
        # our key requests for /ignore (ref -> name), and those checking an ignored key's name.
        self.ignored: dict[str, str] = dict(ignored or {})
        self._name_keys: dict[str, str] = {}
        self._ignore_asks: dict[int, str] = {}
        self._ignore_probes: dict[int, str] = {}
        self._ignore_refs = itertools.count(IGNORE_REFS + secrets.randbelow(IGNORE_REFS))
        self._away = ""  # our away message, set again after a rejoin that starts us afresh
        # Who is in each of our rooms (from an automatic `who ROOM`, then joins and departures):
        # what a broker restart took away. Our who requests (ref -> room); folds by room.
        self._occupants: dict[str, set[str]] = {}
        self._who_refs: dict[int, str] = {}
        self._folds: dict[str, _Fold] = {}
        # End-to-end private messages: our key pair (None: this client cannot send or read
        # them), the key of each name we wrote to this session, and key requests in flight (by
        # the ref of the draft that asked: it waits at the head of the queue for the answer).
        self.keyring = keyring
        self._keys: dict[str, str] = {}
        self._key_requests: dict[int, str] = {}
        self.private_topic = private_topic(identity)
        self.history = history  # events of each room's history shown on joining it
        self._join_history = history  # what the pending (or last) join asked for
        self.max_unconfirmed = max_unconfirmed
        self.name: str | None = None
        self.rooms: list[str] = list(rooms)
        self.members: set[str] = set()
        self.known_rooms: set[str] = set(self.rooms)
        self.online = 0
        self.epoch: str | None = None
        self.lost_since: float | None = None  # wall-clock time the connection was lost
        self._lost = False  # the broker went silent or said it is stopping
        self._removed: str | None = None  # the error code that removed us: kicked, banned, revoked
        self._rejoin_failed = False  # our name was taken while we were away
        self._closed = False
        self._pending_join: Join | None = None
        self._resubscribe_at = 0.0
        self._next_join = 0.0
        self._join_wait = L.JOIN_RETRY_INTERVAL  # until the next resend; doubles up to JOIN_RETRY_MAX
        self._last_heartbeat = 0.0
        self._heartbeat_interval = L.BROKER_HEARTBEAT_INTERVAL  # as the broker last announced it
        self._ping_interval = L.CLIENT_PING_INTERVAL  # shorter if the welcome says the timeout is
        self._last_sent = 0.0  # when we last sent anything: any message refreshes our presence
        self._subscribed: dict[str, int] = {}  # topic -> subscriptions made (a SUB counts them)
        # Rooms asked for with /join and not yet confirmed: their live events before our
        # `joined` are also in the history that precedes it, so they are not shown live.
        self._entering: set[str] = set()
        self.bucket = TokenBucket(L.RATE_BURST - 2, L.RATE_PER_SECOND * 0.9)  # until the welcome
        self.tracker = SeqTracker(bucket=self.bucket, resets=False,
                                  first_ref=BACKFILL_REFS + secrets.randbelow(BACKFILL_REFS),
                                  max_recover=BACKFILL_PAGES * L.MAX_HISTORY_PER_REQUEST)
        self._unconfirmed: dict[int, _Outgoing] = {}  # by ref, in the order said
        # Waiting for a token, or for the connection; a private message waits as its draft.
        self._outbox: deque[ClientMessage | DirectDraft] = deque()
        self._rejoin: _Rejoin | None = None
        self._recent_notices: deque[tuple[object, ...]] = deque(maxlen=64)
        self._last_ts = 0.0  # broker time of the latest event: the time of a gap
        self._members_version = 0  # bumped on every change of members or known_rooms
        self._view: Snapshot | None = None
        self._view_key: tuple[object, ...] = ()
        self._out: list[Effect] = []
        self._posts: dict[int, Post] = {}  # by ref: posts not yet answered
        self._key_refused: HandshakeFailed | None = None  # before any welcome: posts are refused too
        self._next_post = 0.0  # when they go again

    # --- inputs --------------------------------------------------------------------

    def start(self) -> list[Effect]:
        """The subscriptions to make before connecting."""
        for topic in [SYSTEM_TOPIC, self.private_topic] + [room_topic(room) for room in self.rooms]:
            self._subscribe(topic)
        return self._take()

    def request(self, request: RequestType, now: Now) -> list[Effect]:
        if isinstance(request, Speak):
            self._speak(request.message, now)
        elif isinstance(request, Ask):
            self._ask(request.message, now)
        elif isinstance(request, PostOnce):
            self._post(request.message, now)
        elif isinstance(request, JoinChat):
            self._start_join(request.name, "", now)
        elif isinstance(request, CancelJoin):
            self._pending_join = None
        elif isinstance(request, EnterRoom):
            self._enter(request.room, now)
        elif isinstance(request, ChangeName):
            self._change_name(request.name, now)
        elif isinstance(request, Reconnect):
            self._reconnect(now)
        elif isinstance(request, HandshakeFailed):
            self._handshake_failed(request, now)
        elif isinstance(request, LinkDown):
            if self._watching():
                self._on_lost(StatusState.LOST, "connection to the broker lost; reconnecting", now.wall)
        elif isinstance(request, Close):
            self._close(request.message, now)
            return self._take()
        elif isinstance(request, Ignore):
            self._ignore(request.name, now)
        elif isinstance(request, Unignore):
            self._unignore(request.name, now)
        self._flush(now)
        return self._take()

    def publication(self, topic: str, event: Event, now: Now) -> list[Effect]:
        self._last_ts = event.ts
        if isinstance(event, Heartbeat):
            self._on_heartbeat(event, now)
        elif isinstance(event, Shutdown):
            self._on_lost(StatusState.SHUTDOWN, event.detail, event.ts)
        elif topic == SYSTEM_TOPIC:
            pass  # other broker notices (stats): not for the chat, and not numbered for us
        elif topic == self.private_topic and self._answers_post(event):
            self._show(event)
        elif topic == self.private_topic and isinstance(event, Welcome):
            self._on_welcome(event, now)
        elif topic == self.private_topic and isinstance(event, Error) and self._on_error(event, now):
            pass
        elif (self.epoch is not None and self._pending_join is None and self._removed is None
              and not self._rejoin_failed):
            # Before our (re)welcome, anything up to its baseline comes as history instead; and
            # out of the chat (removed, or our name taken) the room is not ours to follow.
            self._track(topic, event, now)
        self._flush(now)
        return self._take()

    def tick(self, now: Now) -> list[Effect]:
        t = now.mono
        if self._pending_join is not None and t >= self._next_join:
            self._send_join(now)
        if self._posts and t >= self._next_post:
            self._send_posts(now)
        if self._connected() and t >= self._last_sent + self._ping_interval:
            self._send(Ping(), now)  # only when idle: the broker charges pings to our bucket too
        if self._watching() and t - self._last_heartbeat > self._silence_lost():
            self._on_lost(StatusState.LOST, "connection to the broker lost; reconnecting", now.wall)
        self._apply(self.tracker.tick(t), now)
        for room, fold in list(self._folds.items()):
            if t >= min(fold.until, fold.ends):
                self._end_fold(room, now)
        if self._rejoin is not None and t >= self._rejoin.until:
            self._resend()
        self._flush(now)
        return self._take()

    def deadline(self) -> float | None:
        """When `tick` next has something to do (monotonic; None: only an input can change things)."""
        times = []
        if self._pending_join is not None:
            times.append(self._next_join)
        if self._posts:
            times.append(self._next_post)
        if self._connected():
            times.append(self._last_sent + self._ping_interval)
        if self._watching():
            times.append(self._last_heartbeat + self._silence_lost())
        if self._rejoin is not None:
            times.append(self._rejoin.until)
        elif self._outbox and self._connected() and not self._waiting_for_key():
            times.append(self.bucket.ready_at())
        backfill = self.tracker.deadline()
        if backfill is not None:
            times.append(backfill)
        times += [min(fold.until, fold.ends) for fold in self._folds.values()]
        return min(times, default=None)

    # --- state for the UI ----------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        if self._closed:
            return Connection.CLOSED
        if self._removed is not None:
            return Connection.REMOVED if self._removed == Code.KICKED else Connection.BANNED
        if self.epoch is None:
            return Connection.CONNECTING
        if self._rejoin_failed:
            return Connection.REJOIN_FAILED
        return Connection.RECONNECTING if self._lost else Connection.CONNECTED

    @property
    def pending(self) -> int:
        """Messages said and not yet settled (confirmed or refused)."""
        return len(self._unconfirmed) + len(self._posts)

    def snapshot(self) -> Snapshot:
        key = (self.name, tuple(self.rooms), self._members_version, self.connection, self.lost_since,
               self.online, self.pending)
        if self._view is None or key != self._view_key:
            self._view_key = key
            self._view = Snapshot(self.name, tuple(self.rooms), frozenset(self.members),
                                  frozenset(self.known_rooms), self.connection, self.lost_since,
                                  self.online, self.pending)
        return self._view

    # --- requests ------------------------------------------------------------------------

    def _speak(self, message: SpokenMessage, now: Now) -> None:
        ref = message.ref
        assert ref is not None, "the shell numbers what is said"
        problem = self._invalid(message)
        if problem is not None:
            self._refuse(ref, *problem, now)
            return
        if self._removed is not None:
            self._refuse(ref, Code.NOT_JOINED, self._removed_detail(), now)
            return
        if len(self._unconfirmed) >= self.max_unconfirmed:
            self._refuse(ref, Code.RATE_LIMITED, "too many messages waiting for the broker; is it reachable?",
                         now)
            return
        self._unconfirmed[ref] = _Outgoing(message)
        self._outbox.append(message)  # a draft is sealed as it leaves (_seal)
        if not self._connected():
            self._show(Pending(message, now.wall))

    # --- end-to-end private messages ------------------------------------------------

    def _seal(self, draft: DirectDraft, keyring: Keyring, now: Now) -> Msg | None:
        """The wire form of a draft: sealed to its recipient's key and to ours (None: refused
        here). Only called once that key is known."""
        key = self._keys[name_key(draft.to)]
        try:
            box, self_box = keyring.seal_for(key, draft.text)
        except (ValueError, CryptoError):  # the broker gave a key nobody can encrypt to
            self._refuse(draft.ref, Code.BAD_REQUEST,
                         f"cannot encrypt to {draft.to}'s key ({fingerprint(key)})", now)
            self._confirm(draft.ref)
            return None
        return Msg(to=draft.to, key=key, box=box, self_box=self_box, ref=draft.ref)

    def _ready_head(self, now: Now) -> bool:
        """Make the head of the queue something to send now; False when there is nothing (an
        empty queue, or a draft waiting for its recipient's key: nothing said after it may
        overtake it). A draft becomes its sealed `msg`, or sends its key request first."""
        while self._outbox and isinstance(self._outbox[0], DirectDraft):
            draft = self._outbox[0]
            if self.keyring is None:
                self._outbox.popleft()
                self._refuse(draft.ref, Code.BAD_REQUEST, "this client has no key to seal private "
                             "messages", now)
                self._confirm(draft.ref)
                continue
            name = name_key(draft.to)
            if name not in self._keys:
                if name in self._key_requests.values():
                    return False  # asked already: wait for the answer
                # Asked with the draft's ref: the answer, or the refusal, names it.
                self._key_requests[draft.ref] = name
                self._outbox.appendleft(KeyRequest(name=draft.to, ref=draft.ref))
                return True
            self._outbox.popleft()
            sealed = self._seal(draft, self.keyring, now)
            if sealed is not None:
                self._outbox.appendleft(sealed)
        return bool(self._outbox)

    def _waiting_for_key(self) -> bool:
        head = self._outbox[0] if self._outbox else None
        return isinstance(head, DirectDraft) and name_key(head.to) not in self._keys

    def _on_key(self, reply: KeyReply) -> None:
        name = self._key_requests.pop(reply.ref, None) if reply.ref is not None else None
        if name is not None:
            self._keys[name] = reply.key  # the name as asked (its holder may go by another now)
        # (else another session's: it shares our stream; or a stale answer)

    def _on_key_refused(self, error: Error) -> None:
        """No key for that name (`no_such_user`): the draft that asked is refused with the error."""
        self._key_requests.pop(error.ref)  # type: ignore[arg-type]
        self._outbox = deque(item for item in self._outbox
                             if not (isinstance(item, DirectDraft) and item.ref == error.ref))

    def _on_key_changed(self, error: Error, now: Now) -> None:
        """Our draft was sealed to a key that no longer holds the name. It is not resent to the
        new key by itself: the person is told, and decides (the new key may be someone else
        who took the name while its owner was away)."""
        out = self._unconfirmed.get(error.ref) if error.ref is not None else None
        draft = out.message if out is not None else None
        if not isinstance(draft, DirectDraft) or not error.key:
            self._show(error)
            return
        name = name_key(draft.to)
        old = self._keys.get(name)
        self._keys[name] = error.key  # what the person sends next goes to the new key
        was = f"was {fingerprint(old)}, " if old else ""
        self._confirm(draft.ref)
        self._show(Status(StatusState.KEY_CHANGED, (
            f"{draft.to}'s key changed ({was}now {fingerprint(error.key)}): another key holds that "
            f"name now, and your message to {draft.to} was NOT sent. Send it again if you trust "
            "the new key."), error.ts))

    def _open_direct(self, event: Direct) -> PrivateMessage:
        """A private message as it is shown: opened with Box(our secret, its sender's key), right
        for the recipient's copy and for our own (sealed to ourselves, so `from` is our key)."""
        text: str | None = None
        if self.keyring is not None:
            try:
                text = self.keyring.open_from(event.from_, event.box)
            except OpenError:
                pass
        return PrivateMessage(event.seq, event.ts, event.name, event.to, event.from_, text, event.ref,
                              event.offline)

    # --- /ignore -----------------------------------------------------------------------

    def _ignore(self, name: str | None, now: Now) -> None:
        if name is None:
            listed = ", ".join(f"{clean_text(label)} ({fingerprint(key)})"
                               for key, label in self.ignored.items())
            self._info(f"Ignored: {listed}." if listed else "You ignore nobody.", now)
            return
        key = self._name_keys.get(name_key(name))
        if key is not None:
            self._ignore_key(key, name, now)
            return
        ref = next(self._ignore_refs)
        self._ignore_asks[ref] = name
        self._ask(KeyRequest(name=name, ref=ref), now)

    def _ignore_key(self, key: str, name: str, now: Now) -> None:
        if key == self.identity:
            self._info("You cannot ignore yourself.", now)
            return
        self.ignored.pop(key, None)
        self.ignored[key] = name
        self._name_keys[name_key(name)] = key
        self._out.append(IgnoresChanged(dict(self.ignored)))
        self._info(f"Ignoring {clean_text(name)} (key {fingerprint(key)}): what that key says is hidden, "
                   f"whatever its name. /unignore {clean_text(name)} to undo.", now)

    def _unignore(self, name: str, now: Now) -> None:
        wanted = name_key(name)
        keys = [key for key, label in self.ignored.items() if name_key(label) == wanted]
        holder = self._name_keys.get(wanted)
        if holder in self.ignored and holder not in keys:
            keys.append(holder)
        if not keys:
            self._info(f"You do not ignore {clean_text(name)}.", now)
            return
        for key in keys:
            del self.ignored[key]
        self._out.append(IgnoresChanged(dict(self.ignored)))
        self._info(f"No longer ignoring {clean_text(name)}.", now)

    def _on_ignore_key(self, reply: KeyReply, now: Now) -> bool:
        """A key answer to /ignore, or to our check of an ignored key's name: True if ours."""
        ref = reply.ref
        if ref in self._ignore_asks:
            self._ignore_key(reply.key, self._ignore_asks.pop(ref), now)  # type: ignore[arg-type]
            return True
        if ref in self._ignore_probes:
            if reply.online:
                self._name_keys[name_key(reply.name)] = reply.key
            del self._ignore_probes[ref]  # type: ignore[arg-type]
            return True
        return False

    def _probe_ignored(self) -> None:
        """Joining: ask which key holds each ignored key's name now (people here before us)."""
        self._ignore_probes.clear()
        for label in dict.fromkeys(self.ignored.values()):
            ref = next(self._ignore_refs)
            self._ignore_probes[ref] = label
            self._outbox.append(KeyRequest(name=label, ref=ref))

    def _learn_key(self, event: Event) -> None:
        """Keep which key holds which name (for /ignore)."""
        if isinstance(event, Joined) and event.key:
            self._name_keys[name_key(event.name)] = event.key
        elif isinstance(event, Renamed):
            key = self._name_keys.pop(name_key(event.old), None)
            if key is not None:
                self._name_keys[name_key(event.new)] = key
        elif isinstance(event, Left) and event.reason != LeftReason.PART:
            self._name_keys.pop(name_key(event.name), None)
        if len(self._name_keys) > L.KNOWN_NAMES:  # a long session in a busy chat: start afresh
            self._name_keys.clear()

    def _hidden(self, event: object) -> bool:
        """Said by a key we ignore: not shown."""
        if not self.ignored:
            return False
        if isinstance(event, PrivateMessage):
            return event.key in self.ignored
        if isinstance(event, (Message, Action)):
            return self._name_keys.get(name_key(event.name)) in self.ignored
        return False

    # --- folding mass departures ---------------------------------------------------------

    def _ask_who(self, room: str) -> None:
        """Who is in `room`: asked (once per welcome, and on entering it) to know who a broker
        restart takes away. The answer is not shown."""
        if len(self._who_refs) > 4 * L.MAX_ROOMS_PER_MEMBER:  # answers lost with a connection
            self._who_refs.clear()
        ref = next(self._ignore_refs)
        self._who_refs[ref] = room
        self._outbox.append(Who(room=room, ref=ref))

    def _on_occupants(self, reply: WhoReply) -> None:
        room = self._who_refs.pop(reply.ref)  # type: ignore[arg-type]
        if room in self.rooms:
            self._occupants[room] = set(reply.names)

    def _occupy(self, event: Event) -> None:
        """Keep each room's occupants in step with its events."""
        if isinstance(event, Joined):
            if event.name == self.name and not event.chat and event.room not in self._occupants:
                self._occupants[event.room] = {event.name}
                self._ask_who(event.room)  # entered one more room: who is there
            elif event.room in self._occupants:
                self._occupants[event.room].add(event.name)
        elif isinstance(event, Left):
            if event.name == self.name and event.reason == LeftReason.PART:
                self._occupants.pop(event.room, None)
                self._folds.pop(event.room, None)
            else:
                self._occupants.get(event.room, set()).discard(event.name)
        elif isinstance(event, Renamed) and event.room in self._occupants:
            occupants = self._occupants[event.room]
            if event.old in occupants:
                occupants.discard(event.old)
                occupants.add(event.new)

    def _fold(self, event: Event, now: Now) -> bool:
        """Fold a connection loss or return into its room's line: True when it is held. A lost
        connection with no fold going shows, and starts one."""
        if not isinstance(event, Joined | Left) or event.name == self.name:
            return False
        fold = self._folds.get(event.room)
        if fold is not None:
            return self._absorb(fold, event, now)
        if isinstance(event, Left) and event.reason in _LOST:
            self._folds[event.room] = _Fold({event.name}, set(), [], now.mono + FOLD_QUIET,
                                            now.mono + FOLD_MAX)
        return False

    def _absorb(self, fold: _Fold, event: Event, now: Now) -> bool:
        if isinstance(event, Left) and event.reason in _LOST:
            fold.lost.add(event.name)
            fold.back.discard(event.name)
        elif isinstance(event, Joined) and event.chat and event.name in fold.lost:
            fold.back.add(event.name)
        else:
            return False
        fold.until = now.mono + FOLD_QUIET
        if len(fold.lost) < FOLD_MIN:
            return False  # a few people: shown as they come, never held (a departure stays prompt)
        fold.held.append(event)
        return True

    def _end_fold(self, room: str, now: Now) -> None:
        self._release_few(room)
        fold = self._folds.pop(room)
        if fold.held:
            self._show(Folded(room, len(fold.lost), len(fold.back), now.wall))

    def _release_few(self, room: str | None) -> None:
        """While a fold holds notices of only a few people, anything else in its room shows
        them first, as they came: a lone departure and return keep their order."""
        fold = self._folds.get(room) if room is not None else None
        if fold is None or not fold.held or len(fold.lost) >= FOLD_MIN:
            return
        held, fold.held = fold.held, []
        for event in held:
            if not self._repeated_notice(event) and not self._hidden(event):
                self._show(event)

    def _info(self, text: str, now: Now) -> None:
        self._show(Status(StatusState.INFO, text, now.wall))

    def _ask(self, message: ClientMessage, now: Now) -> None:
        if self._removed is not None:
            self._refuse(None, Code.NOT_JOINED, self._removed_detail(), now)
            return
        problem = _field_problem(message)
        if problem is not None:  # the broker's refusal would quote its validator
            self._refuse(None, *problem, now)
            return
        if isinstance(message, Away):
            self._away = message.message
        self._outbox.append(message)

    def _post(self, message: Post, now: Now) -> None:
        assert message.ref is not None, "the shell numbers what is posted"
        if len(message.text) > L.MAX_TEXT_CHARS:
            self._refuse(message.ref, Code.TOO_LARGE, too_long(message.text, L.MAX_TEXT_CHARS), now)
            return
        if self._key_refused is not None:  # libzmq may not try again after the refusal
            self._refuse(message.ref, self._key_refused.code, self._key_refused.detail, now)
            return
        self._posts[message.ref] = message
        self._resubscribe_at = now.mono + RESUBSCRIBE_WAIT
        self._send(message, now)
        self._next_post = now.mono + L.JOIN_RETRY_INTERVAL

    def _send_posts(self, now: Now) -> None:
        """No answer yet: our private stream may not be approved yet (or was lost), or the
        broker restarted. Send again; the broker answers a repeated ref without repeating."""
        if now.mono >= self._resubscribe_at:
            self._resubscribe_at = now.mono + RESUBSCRIBE_WAIT
            self._resubscribe(self.private_topic)
        for message in self._posts.values():
            self._send(message, now)
        self._next_post = now.mono + L.JOIN_RETRY_INTERVAL

    def _answers_post(self, event: Event) -> bool:
        """`posted`, or an error, naming a post we wait for: it is settled."""
        ref = event.ref if isinstance(event, Posted | Error) else None
        return ref is not None and self._posts.pop(ref, None) is not None

    def _enter(self, room: str, now: Now) -> None:
        topic = room_topic(room)
        if self._removed == Code.KICKED:  # /join ROOM after a kick: come back, into that room too
            if room not in self.rooms:
                self.rooms.append(room)
                self._subscribe(topic)
            self._reconnect(now)
            return
        if self._removed is not None:
            self._refuse(None, Code.NOT_JOINED, self._removed_detail(), now)
            return
        if room not in self.rooms:
            self._entering.add(topic)
        self._subscribe(topic)  # before the request: the broker waits for the subscription
        self._outbox.append(Enter(room=room, history=self.history))

    def _change_name(self, name: str, now: Now) -> None:
        if self._rejoin_failed:  # our old name was taken while we were away: rejoin as `name`
            self._start_join(name, "reconnected", now)
        elif self._removed is not None:
            self._refuse(None, Code.NOT_JOINED, self._removed_detail(), now)
        elif len(name) > L.MAX_NAME_CHARS:
            self._refuse(None, Code.INVALID_NAME, f"names are at most {L.MAX_NAME_CHARS} characters", now)
        else:
            self._outbox.append(Nick(name=name))

    def _reconnect(self, now: Now) -> None:
        if self._removed in (Code.BANNED, Code.REVOKED):
            self._refuse(None, Code.NOT_JOINED, self._removed_detail(), now)
        elif self._removed == Code.KICKED or self._rejoin_failed:
            self._removed = None
            self._start_join(self.name or "", "reconnected", now)
        elif self.epoch is not None:
            state = "reconnecting already" if self._lost or self._pending_join else "connected already"
            self._refuse(None, Code.BAD_REQUEST, state, now)

    def _handshake_failed(self, failure: HandshakeFailed, now: Now) -> None:
        if self.epoch is None:
            if self._pending_join is not None:
                self._pending_join = None
                self._out.append(JoinDone(None, failure.code, failure.detail))
            self._key_refused = failure
            for ref in list(self._posts):  # refused for good: nothing more will go
                del self._posts[ref]
                self._refuse(ref, failure.code, failure.detail, now)
        elif failure.code == "auth" and self._removed is None:
            # Refused at a reconnection (a ban or a revocation whose notice we missed).
            self._removed = Code.REVOKED
            self._pending_join = None
            self._show(Status(StatusState.BANNED, failure.detail, now.wall))

    def _close(self, message: str | None, now: Now) -> None:
        if self._connected():
            while self._ready_head(now):  # what was asked before closing still goes, in order
                self._send(self._outbox.popleft(), now)  # type: ignore[arg-type]
            if message is not None and self.name is not None:
                self._send(Leave(message=message[:L.MAX_REASON_CHARS]), now)  # a parting word: cut, not lost
        self._closed = True
        self._pending_join = None
        self._out.append(Stopped())

    # --- joining ---------------------------------------------------------------------------

    def _start_join(self, name: str, reason: str, now: Now) -> None:
        # Rejoining: `seen` asks for exactly what we missed instead of recent history.
        seen = {}
        for room in self.rooms if reason else []:
            last = self.tracker.last(room_topic(room))
            if last is not None:  # a gap being recovered counts from before it
                seen[room] = last
        # A rejoin replays what we missed (up to DEFAULT_HISTORY per room) even when no history
        # is shown on joining (a pipe): what was said meanwhile is not history.
        self._join_history = self.history if not reason else (self.history or L.DEFAULT_HISTORY)
        self._pending_join = Join(name=name, rooms=list(self.rooms), history=self._join_history, seen=seen)
        self._resubscribe_at = now.mono + RESUBSCRIBE_WAIT
        self._rejoin_failed = False
        self._join_wait = L.JOIN_RETRY_INTERVAL
        self._send_join(now)

    def _send_join(self, now: Now) -> None:
        assert self._pending_join is not None
        if now.mono >= self._resubscribe_at:  # no welcome: the broker may have lost our approvals
            self._resubscribe_at = now.mono + RESUBSCRIBE_WAIT
            for topic in [self.private_topic] + [room_topic(room) for room in self.rooms]:
                self._resubscribe(topic)
        self._send(self._pending_join, now)
        # Backing off: a broker slow to answer (thousands joining) is not sent more of the same.
        self._next_join = now.mono + self._join_wait
        self._join_wait = min(L.JOIN_RETRY_MAX, 2 * self._join_wait)

    def _on_welcome(self, welcome: Welcome, now: Now) -> None:
        if self._pending_join is None and welcome.epoch == self.epoch:
            # A repeat (a resent join crossed the first welcome): nothing is new, but it took a number.
            self.tracker.event(self.private_topic, welcome.seq, welcome, now.mono)
            return
        first = self.epoch is None
        restarted = not first and welcome.epoch != self.epoch
        seen = self._pending_join.seen if self._pending_join is not None else {}
        had = {room: self.tracker.last(room_topic(room)) for room in self.rooms}
        self.epoch = welcome.epoch
        self.name = welcome.name
        # Stay a little under the broker's bucket: network jitter bunches messages up.
        self.bucket.configure(max(1.0, welcome.rate_burst - 2.0), welcome.rate_per_second * 0.9)
        self.members = set(welcome.members)
        self.rooms = list(welcome.rooms)
        self.known_rooms.update(self.rooms)
        self._members_version += 1
        for room in had:
            if room not in welcome.rooms:
                self.tracker.forget(room_topic(room))
        recover: list[Out] = []
        for room, seq in welcome.rooms.items():
            topic = room_topic(room)
            self._entering.discard(topic)  # in it: the welcome's baseline counts
            last = had.get(room)
            if welcome.resumed and self._join_history == 0 and last is not None and last < seq:
                # Still a member, and no replay asked for: what came meanwhile was dropped while
                # we waited for this welcome. Recover it like a gap.
                self.tracker.baseline(topic, last)
                recover += self.tracker.mark(topic, seq, now.mono)
            else:
                self.tracker.baseline(topic, seq)
        self.tracker.baseline(self.private_topic, welcome.seq, recover=False)
        self._pending_join = None
        self._lost = False
        self._rejoin_failed = False
        self.lost_since = None
        self.online = welcome.online
        self._last_heartbeat = now.mono
        self._heartbeat_interval = min(welcome.heartbeat, L.BROKER_HEARTBEAT_MAX)
        # A broker run with a short --client-timeout says so: ping twice within it.
        timeout = welcome.timeout if welcome.timeout and welcome.timeout > 0 else L.CLIENT_TIMEOUT
        self._ping_interval = min(L.CLIENT_PING_INTERVAL, timeout / 2)
        self._last_sent = now.mono
        self._out.append(JoinDone(welcome))
        if restarted:  # everyone lost the connection: fold their returns, room by room
            for room in welcome.rooms:
                lost = self._occupants.get(room, set()) - {welcome.name}
                if len(lost) >= FOLD_MIN:
                    self._folds[room] = _Fold(lost, set(), [], now.mono + FOLD_QUIET, now.mono + FOLD_MAX)
        self._occupants = {}
        for room in welcome.rooms:
            self._ask_who(room)
        if self.ignored:
            self._probe_ignored()
        if not first and not welcome.resumed and self._away:  # the broker forgot it: say it again
            self._outbox.append(Away(message=self._away))
        if first:
            self._show(welcome)
        else:
            detail = "the broker restarted; rejoined" if restarted else "rejoined"
            self._show(Status(StatusState.RECONNECTED, detail, welcome.ts))
            self._key_requests.clear()  # lost with the old connection, perhaps: asked again
            in_flight = {ref for ref, out in self._unconfirmed.items() if out.sent}
            if in_flight:
                # What we said may have been published with its echo lost on the way: the replay
                # of what we missed (it follows the welcome) shows it. Resend the rest after that.
                due = set() if self._join_history == 0 else {
                    room for room, seq in welcome.rooms.items() if seen.get(room, seq) < seq}
                self._rejoin = _Rejoin(in_flight, due, now.mono + RESEND_WAIT)
                if not due:
                    self._resend()
        self._apply(recover, now)

    def _on_error(self, error: Error, now: Now) -> bool:
        """Handle join-related errors and removals; True when consumed here."""
        if self._pending_join is not None and error.code in JOIN_ERRORS:
            name = self._pending_join.name
            self._pending_join = None
            self._out.append(JoinDone(None, error.code, error.detail))
            if self.epoch is not None:  # an automatic rejoin failed: say so, offer a way out
                self._rejoin_failed = True
                self._show(Status(StatusState.REJOIN_FAILED, f"could not rejoin as {name}: {error.detail}; "
                                  "choose another name with /nick NEW", error.ts))
            return True
        if error.code in REMOVED:
            # An admin or the operator removed us: never come back by ourselves.
            self._removed = error.code
            self._pending_join = None
            banned = error.code != Code.KICKED
            if banned:  # nothing said will ever go: settle it all
                self._unconfirmed.clear()
                self._outbox.clear()
            self._show(Status(StatusState.BANNED if banned else StatusState.REMOVED, error.detail, error.ts))
            return True
        if error.code == Code.NOT_JOINED and self.epoch is not None:
            if self._pending_join is None and self._removed is None and not self._rejoin_failed:
                self._start_join(self.name or "", "reconnected", now)
            return True  # a message it names stays unconfirmed: it goes again after the rejoin
        return False  # shown, then its ref settled, by _live

    def _silence_lost(self) -> float:
        """No heartbeat this long: the broker is lost. Counted in its announced intervals (a
        broker with thousands online spaces them out)."""
        return L.BROKER_SILENCE_LOST * max(1.0, self._heartbeat_interval / L.BROKER_HEARTBEAT_INTERVAL)

    def _on_heartbeat(self, beat: Heartbeat, now: Now) -> None:
        self._last_heartbeat = now.mono
        self._heartbeat_interval = min(beat.interval, L.BROKER_HEARTBEAT_MAX)
        self.online = beat.online
        if (self.epoch is None or self._pending_join is not None or self._removed is not None
                or self._rejoin_failed or self._closed):
            return
        if beat.epoch != self.epoch:
            self._start_join(self.name or "", "restarted", now)
        elif self._lost:
            self._start_join(self.name or "", "reconnected", now)

    def _on_lost(self, state: StatusState, detail: str, ts: float) -> None:
        if self._lost or self.epoch is None or self._removed is not None or self._closed:
            return
        self._lost = True
        self._pending_join = None  # joins into the void would all arrive at once: rejoin when heard
        self.lost_since = ts
        self._show(Status(state, detail, ts))

    # --- incoming events --------------------------------------------------------------------

    def _track(self, topic: str, event: Event, now: Now) -> None:
        if topic in self._entering:
            if not (isinstance(event, Joined) and event.name == self.name):
                return  # before our arrival: the room's history (sent first) has it
            self._entering.discard(topic)
            self.tracker.baseline(topic, event.seq - 1)  # live from our arrival on
        if topic not in self.tracker.topics:
            return  # not (or no longer) ours: a room we left, say
        if isinstance(event, Mark):
            self._apply(self.tracker.mark(topic, event.seq, now.mono), now)
        else:
            self._apply(self.tracker.event(topic, event.seq, event, now.mono), now)

    def _apply(self, records: list[Out], now: Now) -> None:
        """Carry out the tracker's records: live events, recovered ones (as one Replay per run),
        losses, and history requests."""
        recovered: list[Event] = []
        lost = 0
        topic = ""
        for record in records:
            if isinstance(record, Write) and record.backfill or isinstance(record, GapRecord):
                if topic and record.topic != topic:
                    self._show_recovered(topic, recovered, lost)
                    recovered, lost = [], 0
                topic = record.topic
                if isinstance(record, Write):
                    recovered.append(record.item)
                    self._confirm_own(record.item, None)
                else:
                    lost += record.missing
                continue
            if topic:
                self._show_recovered(topic, recovered, lost)
                recovered, lost, topic = [], 0, ""
            if isinstance(record, Write):
                self._live(record.item, now)
            elif isinstance(record, Request):
                self._request_range(record, now)
        if topic:
            self._show_recovered(topic, recovered, lost)

    def _show_recovered(self, topic: str, events: list[Event], lost: int) -> None:
        room = room_of_topic(topic)
        if self.ignored:
            events = [event for event in events if not self._hidden(event)]
        if events and room is not None:
            self._show(Replay(ReplayKind.BACKFILL, room, events, lost, self._last_ts))
        elif lost:
            self._show(Gap(topic, lost, self._last_ts))

    def _request_range(self, request: Request, now: Now) -> None:
        # The tracker took a token from our bucket: it goes now, ahead of the queue (the room's
        # live events wait for the answer). Not while away: the rejoin starts the room afresh.
        room = room_of_topic(request.topic)
        if room is not None and self._connected():
            self._send(HistoryRequest(room=room, after=request.after, before=request.before,
                                      limit=request.limit, ref=request.ref), now)

    def _live(self, event: Event, now: Now) -> None:
        if isinstance(event, History):
            self._on_history(event, now)
            return
        if isinstance(event, Direct):
            opened = self._open_direct(event)
            if opened.ref is not None and opened.key == self.identity:
                self._confirm(opened.ref)
            if not self._hidden(opened):
                self._show(opened)
            return
        if isinstance(event, KeyReply):
            if not self._on_ignore_key(event, now):
                self._on_key(event)
            return
        if isinstance(event, Error) and event.ref is not None and (
                self._ignore_probes.pop(event.ref, None) is not None):
            return  # an ignored key's name is not held now: nothing to say
        if isinstance(event, Error) and event.ref is not None:
            self._ignore_asks.pop(event.ref, None)  # /ignore of an unknown name: shown below
        if isinstance(event, Error) and event.code == Code.KEY_CHANGED:
            self._on_key_changed(event, now)
            return
        if isinstance(event, Error) and event.ref in self._key_requests:
            self._on_key_refused(event)  # shown, and its draft settled, below
        if isinstance(event, (Message, Action)) and event.ref is not None and event.name == self.name:
            self._confirm(event.ref)
        if isinstance(event, Error) and event.code == Code.BAD_REQUEST:
            event = _readable(event)
        if isinstance(event, WhoReply) and event.ref is not None and event.ref in self._who_refs:
            self._on_occupants(event)
            return
        self._follow(event)
        self._learn_key(event)
        self._occupy(event)
        if self._fold(event, now):
            return
        self._release_few(getattr(event, "room", None))
        if self._repeated_notice(event):
            return  # the same arrival/departure/rename, seen again through another shared room
        if self._hidden(event):
            return
        self._show(event)
        if isinstance(event, Error) and event.ref is not None:
            self._confirm(event.ref)  # refused: settled too, and never sent again

    def _on_history(self, history: History, now: Now) -> None:
        events = []
        for raw in history.events:
            try:
                events.append(decode_event(raw))
            except ProtocolError:
                continue
        topic = room_topic(history.room)
        if history.ref is not None:  # the answer to one of our gap requests (or a stale one)
            found = [(event.seq, event) for event in events]
            self._apply(self.tracker.history(history.ref, topic, history.after, found, now.mono,
                                            history.more), now)
            return
        if topic in self._entering:
            # The room's past up to our arrival: live from here on (should our `joined` be lost).
            self._entering.discard(topic)
            self.tracker.baseline(topic, history.upto)
        rejoin = self._rejoin
        if rejoin is not None:
            for event in events:  # our own words, published before an echo got lost in a rejoin
                self._confirm_own(event, rejoin.refs)
            rejoin.rooms_due.discard(history.room)
            if not rejoin.rooms_due:
                self._resend()
        shown = []
        fold = self._folds.get(history.room) if history.after > 0 else None
        for event in events:  # in order: who holds a name changes along the way
            self._learn_key(event)
            if fold is not None and self._absorb(fold, event, now):
                continue  # a return after the broker restarted: part of the room's one line
            if not self._hidden(event):
                shown.append(event)
        if fold is not None and not shown and not history.lost and len(shown) < len(events):
            return  # nothing left to show but the fold's line
        events = shown
        kind = ReplayKind.MISSED if history.after > 0 else ReplayKind.HISTORY
        skipped = 0
        if history.after > 0 and events and events[0].seq > history.after + 1 + history.lost:
            skipped = events[0].seq - history.after - 1 - history.lost  # more than we asked to see
        self._show(Replay(kind, history.room, events, history.lost, history.ts, skipped))

    def _confirm_own(self, event: Event, refs: set[int] | None) -> None:
        """Our own message came back: settle it if it was among `refs` (None: any sent one)."""
        if not (isinstance(event, (Message, Action)) and event.name == self.name and event.ref is not None):
            return
        if refs is None:
            out = self._unconfirmed.get(event.ref)
            if out is None or not out.sent:
                return
        elif event.ref not in refs:
            return
        self._confirm(event.ref)

    def _follow(self, event: Event) -> None:
        """Keep our own rooms, name and the list of known names in step with events."""
        if isinstance(event, Joined):
            self.members.add(event.name)
            self.known_rooms.add(event.room)
            if event.name == self.name and event.room not in self.rooms:
                self.rooms.append(event.room)
        elif isinstance(event, Left):
            if event.name == self.name and event.reason == LeftReason.PART and event.room in self.rooms:
                self.rooms.remove(event.room)
                topic = room_topic(event.room)
                self.tracker.forget(topic)
                for _ in range(self._subscribed.pop(topic, 0)):
                    self._out.append(Unsubscribe(topic))
            elif event.reason != LeftReason.PART:
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
        else:
            return
        self._members_version += 1

    def _repeated_notice(self, event: Event) -> bool:
        if isinstance(event, Joined) and event.chat:
            key: tuple[object, ...] = ("joined", event.name, event.ts)
        elif isinstance(event, Left) and event.reason != LeftReason.PART:
            key = ("left", event.name, event.ts)
        elif isinstance(event, Renamed):
            key = ("renamed", event.old, event.ts)
        else:
            return False
        if key in self._recent_notices:
            return True
        self._recent_notices.append(key)
        return False

    # --- sending ----------------------------------------------------------------------------

    def _connected(self) -> bool:
        """Welcomed, hearing the broker, and allowed to talk."""
        return (self.epoch is not None and self._pending_join is None and not self._lost
                and self._removed is None and not self._rejoin_failed and not self._closed)

    def _watching(self) -> bool:
        """Is the broker's heartbeat being watched (joined once, not given up)?"""
        return (self.epoch is not None and not self._lost and self._removed is None
                and not self._closed)

    def _flush(self, now: Now) -> None:
        """Send what is queued, as fast as the bucket allows."""
        if not self._outbox or not self._connected() or self._rejoin is not None:
            return  # after a rejoin, earlier messages go first: wait for the resend
        while self._ready_head(now) and self.bucket.take(now.mono):
            self._send(self._outbox.popleft(), now)  # type: ignore[arg-type]

    def _send(self, message: ClientMessage, now: Now) -> None:
        ref = getattr(message, "ref", None)
        if ref is not None and ref in self._unconfirmed and not isinstance(message, KeyRequest):
            self._unconfirmed[ref].sent = True
        self._out.append(Send(message))
        self._last_sent = now.mono

    def _resend(self) -> None:
        """Put what was sent before the rejoin and never confirmed back in front, in order."""
        rejoin, self._rejoin = self._rejoin, None
        if rejoin is None:
            return
        again = []
        for ref, out in self._unconfirmed.items():
            if ref in rejoin.refs and out.sent:
                out.sent = False
                again.append(out.message)
        self._outbox.extendleft(reversed(again))

    def _confirm(self, ref: int) -> None:
        self._unconfirmed.pop(ref, None)

    def _refuse(self, ref: int | None, code: str, detail: str, now: Now) -> None:
        """Refused here, never sent: shown like the broker's own refusal."""
        self._show(Error(seq=0, ts=now.wall, code=code, detail=detail, ref=ref))

    def _removed_detail(self) -> str:
        if self._removed == Code.KICKED:
            return "you were kicked: type /reconnect to come back"
        return "you were removed from this chat and cannot come back with this key"

    @staticmethod
    def _invalid(message: SpokenMessage) -> tuple[str, str] | None:
        """Why the broker would refuse `message` without naming it (so it would wait forever)."""
        if len(message.text) > L.MAX_TEXT_CHARS:
            return Code.TOO_LARGE, too_long(message.text, L.MAX_TEXT_CHARS)
        if isinstance(message, DirectDraft):
            # Sealed end to end, so the broker cannot check these: checked here instead.
            if len(message.to) > L.MAX_NAME_CHARS:
                return Code.INVALID_NAME, f"no such user: names are at most {L.MAX_NAME_CHARS} characters"
            if not clean_message(message.text):
                return Code.EMPTY_TEXT, "message is empty"
            return None
        if len(message.room) > L.MAX_ROOM_CHARS + 1:
            return Code.INVALID_ROOM, f"no such room: rooms are at most {L.MAX_ROOM_CHARS} characters"
        return None

    # --- plumbing ---------------------------------------------------------------------------

    def _resubscribe(self, topic: str) -> None:
        """Subscribe `topic` again: the SUB forwards the repeat, and the broker reads it as a
        fresh request to approve. No unsubscribe first: until the broker read the subscribe
        after it, what it sent us on `topic` (the welcome of an earlier join, a ban notice)
        would reach nobody. Only a long wait's many repeats are taken down and made once
        afresh, so the unsubscribes a leave owes stay few."""
        if self._subscribed.get(topic, 0) >= RESUBSCRIBE_RESET:
            for _ in range(self._subscribed.pop(topic)):
                self._out.append(Unsubscribe(topic))
        self._subscribe(topic)

    def _subscribe(self, topic: str) -> None:
        # A SUB forwards duplicate subscriptions: a repeat repairs a broker that forgot ours.
        self._subscribed[topic] = self._subscribed.get(topic, 0) + 1
        self._out.append(Subscribe(topic))

    def _show(self, event: ClientEvent) -> None:
        self._out.append(Show(event, self.snapshot()))

    def _take(self) -> list[Effect]:
        out, self._out = self._out, []
        return out


def _field_problem(message: ClientMessage) -> tuple[str, str] | None:
    """A field of a request the broker's decoder would refuse as too long, said plainly."""
    name = getattr(message, "name", None)
    if isinstance(name, str) and len(name) > L.MAX_NAME_CHARS:
        return Code.NO_SUCH_USER, f"no such user: names are at most {L.MAX_NAME_CHARS} characters"
    room = getattr(message, "room", None)
    if isinstance(room, str) and len(room) > L.MAX_ROOM_CHARS + 1:
        return Code.INVALID_ROOM, f"no such room: rooms are at most {L.MAX_ROOM_CHARS} characters"
    for field_name in ("reason", "message"):
        text = getattr(message, field_name, None)
        if isinstance(text, str) and len(text) > L.MAX_REASON_CHARS:
            return Code.TOO_LARGE, (f"{field_name} too long ({len(text)} characters, the limit is "
                                    f"{L.MAX_REASON_CHARS})")
    return None


def _readable(error: Error) -> Error:
    """The broker's `bad_request` quotes its decoder (`Expected str of length <= 32 - at
    $.name`): words for a programmer, not for a person. The client checks what it can first;
    anything left is a bug in this client."""
    detail = "the broker could not read a request from this client (bad_request); please report this"
    return Error(seq=error.seq, ts=error.ts, code=error.code, detail=detail, ref=error.ref, key=error.key)


# --- the API a UI calls -----------------------------------------------------------------


class SendError(Exception):
    pass


class ClientApi:
    """What a UI calls. Each call becomes one request for the core; `_submit` delivers it."""

    def __init__(self, rooms: list[str]) -> None:
        self._refs = itertools.count(new_ref_counter_start())
        self.snapshot = Snapshot(rooms=tuple(rooms), known_rooms=frozenset(rooms))
        self.failure: str | None = None  # why the client stopped working, if it did

    def _submit(self, request: RequestType) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Connect and start handling requests."""
        raise NotImplementedError

    def join(self, name: str, timeout: float = 5.0) -> Welcome:
        """Join as `name`; raise JoinError (zchat.client) with a reason the user can act on."""
        raise NotImplementedError

    def wait_delivered(self, timeout: float) -> bool:
        """Block until the broker has confirmed (or refused) every message said so far."""
        raise NotImplementedError

    def close(self, message: str = "", linger: float = 1.0, leave: bool = True) -> None:
        """Send a leave (if joined and `leave`) and stop."""
        raise NotImplementedError

    def say(self, text: str, room: str | None = None) -> int:
        """Queue `text` for `room` (default: the first room); returns its ref."""
        return self._speak(lambda ref: Say(room=room or self._default_room(), text=text, ref=ref))

    def action(self, text: str, room: str | None = None) -> int:
        return self._speak(lambda ref: Me(room=room or self._default_room(), text=text, ref=ref))

    def direct(self, to: str, text: str) -> int:
        """Queue a private message; it is sealed end to end to `to`'s key as it leaves."""
        return self._speak(lambda ref: DirectDraft(to=to, text=text, ref=ref))

    def nick(self, name: str) -> None:
        self._submit(ChangeName(name))

    def moderate(self, action: Literal["kick", "ban", "mute"], name: str, reason: str = "",
                 seconds: int = L.MUTE_DEFAULT_SECONDS) -> None:
        """Admin commands: kick, ban or mute `name`."""
        message: ClientMessage
        if action == "kick":
            message = Kick(name=name, reason=reason)
        elif action == "ban":
            message = Ban(name=name, reason=reason)
        else:
            message = Mute(name=name, seconds=seconds, reason=reason)
        self._submit(Ask(message))

    def history(self, room: str, count: int = L.DEFAULT_HISTORY, before: int | None = None) -> None:
        """Ask for the last `count` stored events of `room` (older than seq `before`, if given);
        they arrive as a Replay."""
        limit = min(count, L.MAX_HISTORY_PER_REQUEST)
        self._submit(Ask(HistoryRequest(room=room, limit=limit, before=before)))

    def who(self, room: str | None = None) -> None:
        self._submit(Ask(Who(room=room)))

    def list_rooms(self) -> None:
        self._submit(Ask(Rooms()))

    def enter(self, room: str) -> None:
        """Join one more room; a `joined` event with our name confirms it."""
        self._submit(EnterRoom(room))

    def part(self, room: str, message: str = "") -> None:
        self._submit(Ask(Part(room=room, message=message)))

    def post(self, text: str, room: str, name: str, create: bool = False) -> int:
        """Post `text` to `room` as `name` without joining; returns its ref. Settled (see
        wait_delivered) by a `posted` event or an error with that ref."""
        message = Post(room=room, text=text, name=name, ref=next(self._refs), create=create)
        self._submit(PostOnce(message))
        assert message.ref is not None
        return message.ref

    def reconnect(self) -> None:
        """Rejoin after a kick, or after a rejoin found our name taken."""
        self._submit(Reconnect())

    def topic(self, room: str, text: str | None = None) -> None:
        """Ask `room`'s topic (None) or set it ("" clears it)."""
        self._submit(Ask(SetTopic(room=room, text=text)))

    def away(self, message: str = "") -> None:
        """Mark ourselves away with `message`; "" marks us back."""
        self._submit(Ask(Away(message=message)))

    def ignore(self, name: str | None = None) -> None:
        """Hide what NAME's key says, from now on and across restarts; None lists them."""
        self._submit(Ignore(name))

    def unignore(self, name: str) -> None:
        self._submit(Unignore(name))

    def unban(self, target: str) -> None:
        """Admin: lift the ban of a name's last key, or of a key."""
        self._submit(Ask(Unban(target=target)))

    def bans(self) -> None:
        """Admin: list the banned keys."""
        self._submit(Ask(Bans()))

    def _default_room(self) -> str:
        rooms = self.snapshot.rooms
        if not rooms:
            raise SendError("you are in no room: /join one first")
        return rooms[0]

    def _speak(self, make: Callable[[int], SpokenMessage]) -> int:
        message = make(next(self._refs))
        self._submit(Speak(message))
        assert message.ref is not None
        return message.ref
