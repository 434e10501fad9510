"""What a chat client shows besides the broker's events, and the state a UI may read.

Pure types, shared by the client core (which makes them), the client shell (which
hands them to the UI) and `render` (which turns them into lines). None of them
travels on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from zchat.protocol import Event, Me, Say


class StatusState(StrEnum):
    """A change in the connection, as `Status.state`."""

    LOST = "lost"  # the broker went silent: reconnecting by itself
    RECONNECTED = "reconnected"  # rejoined (detail: whether the broker had restarted)
    SHUTDOWN = "shutdown"  # the broker said it is stopping: reconnecting when it is back
    REJOIN_FAILED = "rejoin_failed"  # our name was taken while we were away: /nick NEW
    REMOVED = "removed"  # kicked by an admin: quiet until /reconnect (or /join ROOM)
    BANNED = "banned"  # banned, or the key was revoked or refused: no way back with this key
    FAILED = "failed"  # the client itself failed (its I/O thread died): start it again
    KEY_CHANGED = "key_changed"  # another key holds a name we wrote to: a warning to read
    INFO = "info"  # the client's answer to a local command (/ignore): a line to read


@dataclass(frozen=True)
class Status:
    """A change in the connection, made up by the client (not published)."""

    state: StatusState
    detail: str
    ts: float


@dataclass(frozen=True)
class Gap:
    """Sequence numbers on `topic` jumped: `missing` events never arrived and cannot be recovered."""

    topic: str
    missing: int
    ts: float


class ReplayKind(StrEnum):
    HISTORY = "history"  # on entering a room, or asked for with /history
    MISSED = "missed"  # what was said while we were away (after a rejoin)
    BACKFILL = "backfill"  # events lost on the way, recovered from storage


@dataclass(frozen=True)
class Replay:
    """Stored events shown out of the live flow."""

    kind: ReplayKind
    room: str
    events: list[Event]
    lost: int  # events of the range that storage no longer has
    ts: float
    skipped: int = 0  # older events of the range not fetched (past the request limit)


@dataclass(frozen=True)
class DirectDraft:
    """A private message as typed, until the broker confirms it: sealed to the recipient's key
    (fetched first when we do not have it) only as it is sent. Never sent as it is."""

    to: str
    text: str
    ref: int


@dataclass(frozen=True)
class PrivateMessage:
    """A `direct` as this client opened it. `text` is None when its box did not open (not
    sealed to our key, or damaged): shown as a notice, never as garbage."""

    seq: int
    ts: float
    name: str  # the sender
    to: str
    key: str  # the sender's key (the direct's `from`)
    text: str | None
    ref: int | None = None
    offline: bool = False


@dataclass(frozen=True)
class Pending:
    """A message said while the broker is out of reach: it is sent, in order, once the client
    has rejoined; its echo (or a refusal naming its ref) settles it."""

    message: Say | Me | DirectDraft
    ts: float


@dataclass(frozen=True)
class Folded:
    """Many people in `room` lost their connection at once (a broker restart, a relay's death):
    one line instead of a notice for each departure and each return. `lost` of them went,
    `back` of those came back within the window."""

    room: str
    lost: int
    back: int
    ts: float


ClientEvent = Event | Status | Gap | Replay | Pending | PrivateMessage | Folded


class Connection(StrEnum):
    """The connection as a UI shows it."""

    CONNECTING = "connecting"  # the first join is on its way
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # lost, or rejoining
    REJOIN_FAILED = "rejoin_failed"
    REMOVED = "removed"
    BANNED = "banned"
    CLOSED = "closed"


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the client's state, for a UI thread to read at any time."""

    name: str | None = None
    rooms: tuple[str, ...] = ()  # ours, the first being the default
    members: frozenset[str] = frozenset()  # names known to be online
    known_rooms: frozenset[str] = frozenset()  # every room heard of, for completion
    connection: Connection = Connection.CONNECTING
    lost_since: float | None = None  # wall-clock time the connection was lost
    online: int = 0  # members online, from the latest welcome or heartbeat
    pending: int = 0  # messages said and not yet confirmed (or refused) by the broker
