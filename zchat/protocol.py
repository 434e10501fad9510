"""The zchat wire protocol: message types, topics, encoding and validation.

No sockets here. Clients send one-frame JSON objects tagged by "type" to the
broker's PULL socket; the broker publishes one frame per event on its XPUB
socket: the topic, one space, then the JSON event. docs/PROTOCOL.md is the
normative description; this module is its executable form.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from zchat import limits
from zchat.confusables import ASCII_PROTOTYPES

# --- topics ---------------------------------------------------------------

SYSTEM_TOPIC = "sys/"
ROOM_PREFIX = "r/"
PRIVATE_PREFIX = "u/"
DEFAULT_ROOM = "lobby"

# An ASCII letter or digit, then letters, digits, '.', '-' or '_' (\Z: no trailing
# newline). ASCII only: look-alike letters from other scripts cannot impersonate.
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{limits.MAX_NAME_CHARS - 1}}}\Z")
ROOM_RE = re.compile(rf"[a-z0-9][a-z0-9_.-]{{0,{limits.MAX_ROOM_CHARS - 1}}}\Z")  # stored lowercase


def room_topic(room: str) -> str:
    return f"{ROOM_PREFIX}{room}/"


def private_topic(identity: str) -> str:
    return f"{PRIVATE_PREFIX}{identity}/"


def room_of_topic(topic: str) -> str | None:
    """The room a topic carries, or None when it is not a single room's topic."""
    if topic.startswith(ROOM_PREFIX) and topic.endswith("/"):
        room = topic[len(ROOM_PREFIX) : -1]
        if ROOM_RE.match(room):
            return room
    return None


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name))


def normalize_room(room: str) -> str | None:
    """Rooms are case-insensitive; a leading '#' is accepted. None if invalid."""
    room = room.removeprefix("#").lower()
    return room if ROOM_RE.match(room) else None


def name_key(name: str) -> str:
    """Names are unique case-insensitively: 'Alice' and 'alice' collide."""
    return name.casefold()


def _lookalike_table() -> dict[int, str]:
    """UTS #39's skeleton, restricted to ASCII (names are ASCII, which NFD leaves as it is) and
    closed under case: a character and its capital share a prototype (i -> l, as I -> l in
    Unicode's data), and every prototype is folded to lower case (0 -> O -> o)."""
    table: dict[int, str] = {}
    for c in map(chr, range(128)):
        if c.casefold() != c:
            continue  # names are case-folded first
        target = ASCII_PROTOTYPES.get(c) or ASCII_PROTOTYPES.get(c.upper()) or c
        table[ord(c)] = target.casefold()
    return table


_LOOKALIKE = _lookalike_table()


def lookalike_key(name: str) -> str:
    """Equal for names that look alike in some capitalisation: 'aIice' and 'alice' (I looks
    like l), 'b0b' and 'Bob', 'rnallory' and 'mallory'. Case-insensitively equal names are
    look-alikes too. From Unicode's confusables data (zchat/confusables.py); a case-folded
    skeleton, so 'ali' and 'all' also collide ('ALI' would look like 'ALl')."""
    return name.casefold().translate(_LOOKALIKE)


# Names that would speak with the broker's or the operator's voice. Only admin keys of
# closed mode may take one (or a name that looks like one); in open mode nobody may.
RESERVED_NAMES = ("admin", "server", "root", "system", "zchat")
RESERVED_ROLE = "admin"
_RESERVED_KEYS = {lookalike_key(name): name for name in RESERVED_NAMES}


def reserved_name(name: str) -> str | None:
    """The reserved name that `name` is or looks like, if any."""
    return _RESERVED_KEYS.get(lookalike_key(name))


# --- sanitising what other people typed -------------------------------------

# ESC-introduced sequences: CSI (ESC [ ... final), OSC/DCS/PM/APC/SOS strings
# (ended by BEL or ST), and two-byte ESC X; then the 8-bit C1 forms of CSI/OSC.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
    r"|[\x9d\x90\x98\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
)
# Unicode's format characters (general category Cf, as of Unicode 18.0): invisible, yet
# they hide text (zero-width spaces, tag characters), reorder a line (bidi marks, overrides
# and isolates) or make two equal-looking strings differ (U+FEFF, soft hyphen). The joiners
# U+200C/U+200D are handled apart (_STRAY_JOINER). tests/test_clean_text.py checks this list
# against the unicodedata of the Python running the tests.
FORMAT_CHARS = ("\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b\u200e\u200f"
                "\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
                "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
                "\U000e0020-\U000e007f")
# Letters that draw nothing (Hangul fillers, category Lo): a "blank" name or message.
FILLERS = "\u115f\u1160\u3164\uffa0"
# U+2800 BRAILLE PATTERN BLANK is a space in braille text: it becomes one (so a message of
# blanks alone is empty), rather than vanishing from between braille words.
BRAILLE_BLANK = "\u2800"
# Remaining C0/C1 controls and DEL, format characters, fillers.
_CONTROL = re.compile(f"[\\x00-\\x08\\x0a-\\x1f\\x7f-\\x9f{FORMAT_CHARS}{FILLERS}]")
# A zero-width (non-)joiner is kept only between two visible non-ASCII characters, where
# it shapes emoji sequences (family, rainbow flag) and Persian or Indic words; elsewhere,
# as between ASCII letters, it only hides something.
_VISIBLE_NON_ASCII = r"[^\x00-\x7f\s\u200c\u200d]"
# (A joiner first, then its neighbours: a pattern that starts with a character class is
# scanned for quickly; one that starts with a lookbehind is tried at every position.)
_STRAY_JOINER = re.compile(
    rf"[\u200c\u200d](?:(?<!{_VISIBLE_NON_ASCII}[\u200c\u200d])|(?!{_VISIBLE_NON_ASCII}))")


def clean_text(text: str) -> str:
    """Strip terminal control and escape sequences, format characters (Cf) and filler
    letters; tabs and line breaks become spaces, and so does a braille blank."""
    if text.isprintable() and (text.isascii() or not (  # fast path: nothing to strip
            "\u3164" in text or "\u2800" in text or "\u115f" in text or "\u1160" in text
            or "\uffa0" in text)):
        return text
    text = _ESCAPE_SEQUENCE.sub("", text)
    text = text.replace("\t", " ").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    text = _CONTROL.sub("", text)
    if BRAILLE_BLANK in text:
        text = text.replace(BRAILLE_BLANK, " ")
    if "\u200c" in text or "\u200d" in text:
        text = _STRAY_JOINER.sub("", text)
    return text


def clean_message(text: str) -> str:
    """`clean_text` for what someone said (a message, an action, a private message): its line
    breaks (LF or CR LF) are kept as LF (a lone CR becomes a space, as in clean_text), at
    most limits.MAX_TEXT_LINES lines (further breaks become spaces). Each line is cleaned as
    `clean_text` cleans and loses its trailing spaces; blank lines before and after the text
    are dropped. One line is stripped on both sides, as before; the first of several keeps
    its indentation (code stays readable). A receiver indents continuation lines (render),
    so none can pass for a header line of another speaker."""
    if "\n" not in text:
        return clean_text(text).strip()
    lines = [clean_text(line).rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    first = 0
    while first < len(lines) and not lines[first].strip():
        first += 1
    lines = lines[first:]
    if len(lines) <= 1:
        return lines[0].strip() if lines else ""
    keep = limits.MAX_TEXT_LINES
    if len(lines) > keep:
        lines[keep - 1:] = [" ".join(line.strip() for line in lines[keep - 1:] if line.strip())]
    return "\n".join(lines)


# --- client -> broker ---------------------------------------------------------

RoomField = Annotated[str, Meta(max_length=limits.MAX_ROOM_CHARS + 1)]
NameField = Annotated[str, Meta(max_length=limits.MAX_NAME_CHARS)]
TextField = Annotated[str, Meta(max_length=limits.MAX_TEXT_CHARS)]
ReasonField = Annotated[str, Meta(max_length=limits.MAX_REASON_CHARS)]
TopicField = Annotated[str, Meta(max_length=limits.MAX_TOPIC_CHARS)]
Ref = Annotated[int, Meta(ge=0, le=2**53)]
# An identity: the 64 lowercase hex digits of a CURVE (= NaCl Curve25519) public key.
IdentityField = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]  # \Z: no trailing newline
# A NaCl box (nonce + ciphertext + MAC) in standard, padded base64 (zchat.e2e). Only its
# length is checked: a base64 pattern costs 40-150 us per 10 KB box (Python's re), and a
# box that is not what it should be simply does not open at the reader's end.
BoxField = Annotated[str, Meta(min_length=limits.MIN_BOX_CHARS, max_length=limits.MAX_BOX_CHARS)]


class ClientMessage(Struct, tag_field="type", gc=False, omit_defaults=True):
    """Base of everything a client sends. Unknown fields are ignored."""


HistoryCount = Annotated[int, Meta(ge=0, le=limits.MAX_HISTORY_PER_REQUEST)]
Seq = Annotated[int, Meta(ge=0, le=2**53)]


class Join(ClientMessage, tag="join"):
    name: NameField
    # None: the default room (lobby); [] joins the chat in no room.
    rooms: Annotated[list[RoomField], Meta(max_length=limits.MAX_ROOMS_PER_JOIN)] | None = None
    # Recent history wanted per room on joining it; `seen` (room -> last seq the
    # client already has, when rejoining) asks for what came after instead.
    history: HistoryCount = limits.DEFAULT_HISTORY
    seen: Annotated[dict[RoomField, Seq], Meta(max_length=limits.MAX_ROOMS_PER_JOIN)] = {}


class Say(ClientMessage, tag="say"):
    room: RoomField
    text: TextField
    ref: Ref | None = None


class Me(ClientMessage, tag="me"):
    """An action: shown as `* alice waves`."""

    room: RoomField
    text: TextField
    ref: Ref | None = None


class Msg(ClientMessage, tag="msg"):
    """A private message to one name, end-to-end encrypted: the broker never sees its text.
    `key` is the recipient key the sender encrypted `box` to (from a `key` request); the
    broker refuses it with `key_changed` unless that key is still the one bound to `to`."""

    to: NameField
    key: IdentityField
    box: BoxField  # for the recipient: Box(sender secret, recipient public)
    self_box: BoxField  # the sender's own readable copy: Box(sender secret, sender public)
    ref: Ref | None = None


class KeyRequest(ClientMessage, tag="key"):
    """Which key holds `name` now (online), or held it last: what to encrypt a `msg` to."""

    name: NameField
    ref: Ref | None = None


class Nick(ClientMessage, tag="nick"):
    name: NameField


class Who(ClientMessage, tag="who"):
    room: RoomField | None = None  # None: everyone online
    ref: Ref | None = None


class Rooms(ClientMessage, tag="rooms"):
    ref: Ref | None = None


class Enter(ClientMessage, tag="enter"):
    """Join one more room (subscribe to r/<room>/ first)."""

    room: RoomField
    history: HistoryCount = limits.DEFAULT_HISTORY


class HistoryRequest(ClientMessage, tag="history"):
    """Stored events of a public room with after < seq < before (either end open)."""

    room: RoomField
    after: Seq = 0
    before: Seq | None = None
    limit: HistoryCount = limits.DEFAULT_HISTORY
    ref: Ref | None = None


class Part(ClientMessage, tag="part"):
    """Leave one room (and unsubscribe from it once the `left` event arrives)."""

    room: RoomField
    message: ReasonField = ""


class Kick(ClientMessage, tag="kick"):
    """Admin: remove NAME from the chat (they may come back)."""

    name: NameField
    reason: ReasonField = ""


class Ban(ClientMessage, tag="ban"):
    """Admin: remove NAME and refuse their key from now on."""

    name: NameField
    reason: ReasonField = ""


class Mute(ClientMessage, tag="mute"):
    """Admin: NAME may not speak for `seconds` (0 lifts a mute)."""

    name: NameField
    seconds: Annotated[int, Meta(ge=0, le=limits.MUTE_MAX_SECONDS)] = limits.MUTE_DEFAULT_SECONDS
    reason: ReasonField = ""


class Leave(ClientMessage, tag="leave"):
    message: ReasonField = ""


class Ping(ClientMessage, tag="ping"):
    pass


class Post(ClientMessage, tag="post"):
    """A one-shot message to a room from a key that need not be a member (`zchat send`): no
    presence is announced. `name` must be one this key may use (closed mode: ignored). A
    resend with the same `ref` is confirmed again, never published twice. A room that does
    not exist (no members, nothing ever published) is refused unless `create`."""

    room: RoomField
    text: TextField
    name: NameField
    ref: Ref | None = None
    create: bool = False


class Since(ClientMessage, tag="since"):
    """Taps only (closed mode: roles tap and admin): where the stored events of each public room
    from broker time `ts` on begin, to replay them (`tap --since`) with `history` requests.
    `rooms`: only these (default: every room). Answered with a `since` event."""

    ts: Annotated[float, Meta(ge=0, le=2**40)]
    rooms: Annotated[list[RoomField], Meta(max_length=limits.MAX_TOPICS_PER_PEER)] | None = None
    ref: Ref | None = None


class SetTopic(ClientMessage, tag="topic"):
    """A room's topic: `text` sets it (open mode: any member of the room; closed mode: admins),
    "" clears it, None (absent) asks what it is."""

    room: RoomField
    text: TopicField | None = None
    ref: Ref | None = None


class Away(ClientMessage, tag="away"):
    """Mark yourself away with `message` (shown in `who`, told once to each private sender);
    an empty message marks you back."""

    message: ReasonField = ""


class Unban(ClientMessage, tag="unban"):
    """Admin: lift the ban of `target`, a name (its last key) or a key (64 hex digits)."""

    target: Annotated[str, Meta(max_length=64)]
    ref: Ref | None = None


class Bans(ClientMessage, tag="bans"):
    """Admin: list the banned keys."""

    ref: Ref | None = None


ClientMessageType = (Join | Say | Me | Msg | KeyRequest | Nick | Who | Rooms | Enter | Part | HistoryRequest
                     | Kick | Ban | Mute | Leave | Ping | Post | Since | SetTopic | Away | Unban | Bans)

# --- broker -> client ---------------------------------------------------------


class Event(Struct, tag_field="type", gc=False, omit_defaults=True):
    """Base of everything the broker publishes: per-topic seq, broker time."""

    seq: int
    ts: float


class Welcome(Event, tag="welcome"):
    id: str
    name: str
    epoch: str
    rooms: dict[str, int]  # room -> last seq published on it before this welcome
    online: int
    members: list[str]
    heartbeat: float  # seconds between broker heartbeats on sys/
    rate_burst: int  # the sender's token bucket: this many at once...
    rate_per_second: float  # ...then this many per second
    resumed: bool = False  # this key was already online (another session, or a rejoin)
    timeout: float | None = None  # the broker's client timeout: ping well within it


class Message(Event, tag="message"):
    room: str
    name: str
    text: str
    ref: int | None = None


class Action(Event, tag="action"):
    room: str
    name: str
    text: str
    ref: int | None = None


class Direct(Event, tag="direct"):
    """A private message, published on the recipient's and the sender's u/<id>/. Its text
    is in `box`, which only the reader opens: Box(own secret, public key `from`)."""

    name: str  # sender
    to: str
    from_: str = msgspec.field(name="from")  # the sender's key (hex identity)
    box: str  # the recipient's copy gets the msg's box, the sender's its self_box
    ref: int | None = None  # only on the sender's copy
    offline: bool = False  # the recipient was offline: kept and delivered when they join


class KeyReply(Event, tag="key"):
    """The answer to a `key` request."""

    name: str  # as the online holder has it, else as asked
    key: str  # hex identity
    online: bool
    ref: int | None = None


class Joined(Event, tag="joined"):
    room: str
    name: str
    chat: bool = False  # True: arrived in the chat; False: entered one more room
    key: str = ""  # the joiner's key (hex identity): what a client's /ignore is bound to


class LeftReason(StrEnum):
    """Why someone left a room (`left.reason`)."""

    QUIT = "quit"  # sent `leave`
    PART = "part"  # left this one room; still in the chat
    TIMEOUT = "timeout"  # silent for longer than the client timeout
    DISCONNECTED = "disconnected"  # its connection closed
    KICKED = "kicked"
    BANNED = "banned"
    REVOKED = "revoked"  # its key was removed from the authorized-keys file


class Left(Event, tag="left"):
    room: str
    name: str
    reason: str  # a LeftReason; a str on the wire, so a reason added later still decodes
    message: str = ""
    by: str = ""  # the admin, for kicked and banned


class Renamed(Event, tag="renamed"):
    room: str
    old: str
    new: str


class Muted(Event, tag="muted"):
    room: str
    name: str
    by: str
    seconds: int  # 0: the mute was lifted
    reason: str = ""
    until: float = 0.0  # broker time when the mute ends (absent when lifted)


class RoomTopic(Event, tag="topic"):
    """A room's topic. `changed`: someone changed it (published on r/<room>/, stored with the
    room's history); else the answer to a `topic` question, or the topic told on entering the
    room (on the member's u/<id>/). `text` "" means no topic."""

    room: str
    text: str
    by: str = ""  # who set it
    changed: bool = False
    ref: int | None = None


class AwayNotice(Event, tag="away"):
    """On a u/<id>/: `name` is away with `message` ("" : back). To the one who set it, as its
    confirmation; to a private message's sender, once per away period of its recipient."""

    name: str
    message: str


class BanList(Event, tag="bans"):
    """The answer to `bans`: banned key -> the name it last held ("" unknown)."""

    bans: dict[str, str]  # at most limits.MAX_NAMES_IN_REPLY
    count: int
    ref: int | None = None


class Unbanned(Event, tag="unbanned"):
    """The answer to `unban`, on the admin's u/<id>/: `key` may come back."""

    key: str
    name: str  # the name it last held, "" unknown
    by: str
    ref: int | None = None


class Error(Event, tag="error"):
    code: str
    detail: str
    ref: int | None = None
    key: str = ""  # key_changed: the key now bound to the name (re-encrypt to this one)


class WhoReply(Event, tag="who"):
    room: str | None
    names: list[str]  # at most limits.MAX_NAMES_IN_REPLY, sorted
    count: int  # exact
    ref: int | None = None
    away: dict[str, str] = {}  # listed names that are away -> their away message


class RoomList(Event, tag="rooms"):
    rooms: dict[str, int]  # room -> members, at most limits.MAX_ROOMS_IN_REPLY
    count: int
    ref: int | None = None
    topics: dict[str, str] = {}  # listed rooms that have a topic -> the topic


class History(Event, tag="history"):
    """Stored room events, oldest first, each exactly as it was published."""

    room: str
    events: list[msgspec.Raw]
    after: int  # the range asked for: after < seq <= upto
    upto: int
    lost: int = 0  # seqs in a bounded range (after > 0) no longer in storage
    ref: int | None = None
    more: bool = False  # the page's byte cap left out older events of the range: ask again


class Mark(Event, tag="mark"):
    """Re-announces a room's latest seq (this event takes no number of its own), about once
    a second while the room is busy: a receiver that lost the tail of a burst notices."""

    room: str


class Posted(Event, tag="posted"):
    """The broker published a `post`: its `message` is number `at` on r/<room>/."""

    room: str
    at: int
    ref: int | None = None


class SinceReply(Event, tag="since"):
    """The answer to `since`: for each room with stored events at or after `since`, the seq just
    before the first of them (replay with `history` requests after it). At most
    limits.MAX_ROOMS_IN_REPLY rooms, those whose newest event is newest first; `count` is exact."""

    since: float
    seqs: dict[str, int]
    count: int
    ref: int | None = None


class Heartbeat(Event, tag="heartbeat"):
    epoch: str
    interval: float
    online: int


class Shutdown(Event, tag="shutdown"):
    epoch: str
    detail: str


class Stats(Event, tag="stats"):
    """The broker's live statistics on sys/, every few seconds (`zchat stats`). Chat clients
    ignore it. Rates are per second over the last `interval` seconds; the rest are totals
    since start-up unless said otherwise."""

    epoch: str
    uptime: float  # seconds since the broker started
    interval: float  # seconds the rates cover
    online: int  # members online
    rooms: int  # rooms with someone in them
    messages_in: int  # chat messages accepted (room messages, actions, private messages)
    messages_in_rate: float
    frames_in: int  # everything received on the input socket (joins, pings, commands, bad input)
    frames_in_rate: float
    published: int  # frames sent on the publish socket
    published_rate: float
    drops: int  # frames refused as invalid: bad input, too large, too many frames
    drops_by_kind: dict[str, int]  # by error code
    rate_limited: int  # senders refused for rate during the interval
    rate_limited_total: int  # messages refused for rate
    errors: dict[str, int]  # error events sent, by code
    history: int  # events in the history store
    connections: int = 0  # connections open now, both sockets, handshakes in progress included
    refused: dict[str, int] = {}  # connections refused at the handshake or cut, by reason
    evicted: int = 0  # keys that had not joined, dropped to make room for new ones
    # Keys cut for sending data frames on their subscriber connection (an attack: PROTOCOL.md
    # "Sealed private streams"). Absent when 0, and from older brokers.
    data_cuts: int = 0


EventType = (Welcome | Message | Action | Direct | KeyReply | Joined | Left | Renamed | Muted | Error
             | WhoReply | RoomList | History | Mark | Heartbeat | Shutdown | Stats | Posted | SinceReply
             | RoomTopic | AwayNotice | BanList | Unbanned)


def decode_event(data: bytes | msgspec.Raw) -> EventType:
    """Decode one event body (e.g. an entry of History.events)."""
    try:
        return _event_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(Code.BAD_REQUEST, str(exc)) from None

# --- error codes --------------------------------------------------------------


class Code(StrEnum):
    """`error.code`. Clients should treat a code they do not know like `bad_request`: the
    `error` field stays a plain string on the wire, so a newer broker's code still decodes."""

    BAD_REQUEST = "bad_request"  # undecodable, unknown type, wrong field types
    TOO_LARGE = "too_large"
    TOO_MANY_FRAMES = "too_many_frames"
    INVALID_NAME = "invalid_name"
    INVALID_ROOM = "invalid_room"
    NAME_TAKEN = "name_taken"
    NOT_JOINED = "not_joined"
    NOT_IN_ROOM = "not_in_room"
    ALREADY_IN_ROOM = "already_in_room"
    NO_SUCH_ROOM = "no_such_room"  # post: nobody is in it and nothing was ever said there
    TOO_MANY_ROOMS = "too_many_rooms"
    NO_SUCH_USER = "no_such_user"
    NOT_BANNED = "not_banned"  # unban: that key (or name's last key) is not banned
    KEY_CHANGED = "key_changed"  # msg: `key` is not the key bound to the name any more
    MAILBOX_FULL = "mailbox_full"  # msg to an offline key: your share of its mailbox is used up
    MAIL_DROPPED = "mail_dropped"  # a message you left for an offline key was pushed out
    FORBIDDEN = "forbidden"  # an admin command from a non-admin
    NAMES_FIXED = "names_fixed"  # closed mode: the operator's file fixes each key's name
    MUTED = "muted"
    KICKED = "kicked"  # sent to the one removed, who should not rejoin by itself
    BANNED = "banned"
    REVOKED = "revoked"  # the key was removed from the authorized-keys file
    EMPTY_TEXT = "empty_text"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"  # a key that had not joined, evicted to make room for a new one
    FLOODING = "flooding"  # past the frames-per-second ceiling: the key is cut off
    SLOW_CONSUMER = "slow_consumer"  # too much waited for you unread: your subscriptions were cut


class ProtocolError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


# --- encoding -----------------------------------------------------------------

_client_decoder = msgspec.json.Decoder(ClientMessageType)
_client_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(EventType)
_event_encoder = msgspec.json.Encoder()


def decode_client_message(body: bytes | memoryview, frames: int = 1) -> ClientMessageType:
    """Decode one client message or raise ProtocolError with a clear reason."""
    if frames != 1:
        raise ProtocolError(Code.TOO_MANY_FRAMES, f"messages are one frame, got {frames}")
    if len(body) > limits.MAX_BODY_BYTES:
        raise ProtocolError(
            Code.TOO_LARGE, f"message is {len(body)} bytes, limit {limits.MAX_BODY_BYTES}"
        )
    try:
        return _client_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ProtocolError(Code.BAD_REQUEST, str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(Code.BAD_REQUEST, f"not valid UTF-8 JSON: {exc}") from None
    except RecursionError:  # msgspec skipping an unknown field nested thousands deep
        raise ProtocolError(Code.BAD_REQUEST, "JSON nested too deeply") from None


def encode_client_message(message: ClientMessage) -> bytes:
    return _client_encoder.encode(message)


def encode_publication(topic: bytes, event: Event) -> bytes:
    """One frame: topic, a space, the JSON event (SUBs filter on the prefix)."""
    return topic + b" " + _event_encoder.encode(event)


def decode_publication(data: bytes) -> tuple[str, EventType]:
    """Split a published frame into (topic, event); raise ProtocolError if malformed."""
    topic, sep, body = data.partition(b" ")
    if not sep:
        raise ProtocolError(Code.BAD_REQUEST, "publication without a topic separator")
    try:
        return topic.decode(), _event_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(Code.BAD_REQUEST, str(exc)) from None
