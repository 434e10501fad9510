"""Unit tests of zchat.render: the lines a person reads. Pure: no terminal, no sockets.

Timestamps are fixed and the expected clock comes from render.clock, so the tests
do not depend on the machine's timezone.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from zchat.events import ClientEvent, Gap, PrivateMessage, Status, StatusState
from zchat.protocol import (
    Action,
    Error,
    Heartbeat,
    Joined,
    Left,
    Message,
    Renamed,
    RoomList,
    Shutdown,
    Welcome,
    WhoReply,
)
from zchat.render import View, clock, mentions, name_color, render

TS = 1_700_000_123.25
T = clock(TS)
ID = "a1" * 32
PALETTE = ("31", "32", "33", "35", "36", "91", "92", "93", "95", "96")
PLAIN = View(me="alice", room="lobby", color=False)
COLOR = View(me="alice", room="lobby", color=True)

# Our own escape codes: a reset (full, or of weight and colour only), reverse video,
# and a (bold) palette colour.
RESETS = r"(?:0|22;39|39;22|39)"
COLOURS = "|".join(PALETTE)
OUR_SGR = re.compile(rf"\x1b\[(?:{RESETS}|7|(?:1;)?(?:{COLOURS}))m")
# A coloured name: the colour code, the name, then a reset.
PAINTED = re.compile(rf"\x1b\[((?:1;)?\d+)m([^\x1b]*)\x1b\[{RESETS}m")


def message(name: str = "bob", text: str = "hi", room: str = "lobby") -> Message:
    return Message(seq=1, ts=TS, room=room, name=name, text=text)


def action(name: str = "bob", text: str = "waves", room: str = "lobby") -> Action:
    return Action(seq=1, ts=TS, room=room, name=name, text=text)


def direct(name: str = "alice", to: str = "bob", text: str | None = "psst") -> PrivateMessage:
    """A private message as the client shows it: opened (text None: it did not open)."""
    return PrivateMessage(seq=1, ts=TS, name=name, to=to, key=ID, text=text)


def welcome(name: str = "alice", members: list[str] | None = None, online: int | None = None) -> Welcome:
    members = [name] if members is None else members
    return Welcome(seq=1, ts=TS, id=ID, name=name, epoch="e", rooms={"lobby": 0},
                   online=len(members) if online is None else online, members=members,
                   heartbeat=1.0, rate_burst=20, rate_per_second=5.0)


def line(event: ClientEvent, view: View = PLAIN) -> str:
    rendered = render(event, view)
    assert rendered is not None
    return rendered


def assert_clean(text: str, color: bool) -> None:
    """No control character at all, except our own colour codes when colour is on."""
    if color:
        text = OUR_SGR.sub("", text)
    assert "\x1b" not in text, repr(text)
    assert all(ch.isprintable() for ch in text), repr(text)


def painted(text: str) -> list[tuple[str, str]]:
    """The (SGR code, name) of each coloured name in a line, in order."""
    return PAINTED.findall(text)


def visible(text: str) -> str:
    return OUR_SGR.sub("", text)


def reverse_flags(text: str) -> list[bool]:
    """For each visible character, whether reverse video is on when it is drawn."""
    flags: list[bool] = []
    reverse = False
    pos = 0
    for match in re.finditer(r"\x1b\[([0-9;]*)m", text):
        flags += [reverse] * (match.start() - pos)
        for param in match.group(1).split(";"):
            if param in ("", "0", "27"):
                reverse = False
            elif param == "7":
                reverse = True
        pos = match.end()
    return flags + [reverse] * (len(text) - pos)


# --- every event type, plain -----------------------------------------------------------------


@pytest.mark.parametrize("event, view, expected", [
    (message("alice", "hi"), PLAIN, "alice: hi"),
    (message("bob", "hi"), PLAIN, "bob: hi"),
    (message("alice", "hi", room="rust"), PLAIN, "#rust alice: hi"),
    (message("alice", "hi", room="rust"), View(me="alice", room="rust"), "alice: hi"),
    (message("alice", "hi", room="rust"), View(), "alice: hi"),
    (action("alice", "waves"), PLAIN, "* alice waves"),
    (action("bob", "waves at you", room="rust"), PLAIN, "#rust * bob waves at you"),
    (direct("alice", "bob", "text"), View(me="alice"), "-> bob: text"),
    (direct("alice", "bob", "text"), View(me="bob"), "<- alice: text"),
    (direct("alice", "bob", "text"), View(), "<- alice: text"),
    (direct("alice", "alice", "note"), View(me="alice"), "-> alice: note"),
    (direct("mallory", "bob", None), View(me="bob"),
     "! a private message from mallory could not be opened (it was not sealed to your key, or was damaged)"),
    (Status(StatusState.KEY_CHANGED, "bob's key changed (now 1a2b 3c4d 5e6f 7081): another key holds "
            "that name now; your message was encrypted to the new key", TS), PLAIN,
     "! bob's key changed (now 1a2b 3c4d 5e6f 7081): another key holds that name now; your message was "
     "encrypted to the new key"),
    (Joined(seq=1, ts=TS, room="lobby", name="alice", chat=True), PLAIN, "- alice has joined the chat."),
    (Joined(seq=1, ts=TS, room="rust", name="alice", chat=True), PLAIN, "- alice has joined the chat."),
    (Joined(seq=1, ts=TS, room="rust", name="alice"), PLAIN, "- alice has joined #rust."),
    (Left(seq=1, ts=TS, room="lobby", name="alice", reason="quit", message="bye"), PLAIN,
     "- alice has left the chat. (bye)"),
    (Left(seq=1, ts=TS, room="lobby", name="alice", reason="quit"), PLAIN, "- alice has left the chat."),
    (Left(seq=1, ts=TS, room="rust", name="alice", reason="part"), PLAIN, "- alice has left #rust."),
    (Left(seq=1, ts=TS, room="rust", name="alice", reason="part", message="later"), PLAIN,
     "- alice has left #rust. (later)"),
    (Left(seq=1, ts=TS, room="lobby", name="bob", reason="timeout"), PLAIN, "- bob has left the chat."),
    (Left(seq=1, ts=TS, room="lobby", name="bob", reason="disconnected"), PLAIN, "- bob has left the chat."),
    (Renamed(seq=1, ts=TS, room="lobby", old="alice", new="alicia"), PLAIN,
     "- alice is now known as alicia."),
    (Error(seq=1, ts=TS, code="no_such_user", detail="nobody called 'zed' is online"), PLAIN,
     "! nobody called 'zed' is online"),
    (WhoReply(seq=1, ts=TS, room=None, names=["alice", "bob", "carol"], count=3), PLAIN,
     "* Online (3): alice, bob, carol"),
    (WhoReply(seq=1, ts=TS, room="rust", names=["alice", "bob"], count=2), PLAIN,
     "* Online in #rust (2): alice, bob"),
    (WhoReply(seq=1, ts=TS, room=None, names=["alice", "bob"], count=502), PLAIN,
     "* Online (502): alice, bob, and 500 more"),
    (WhoReply(seq=1, ts=TS, room="nowhere", names=[], count=0), PLAIN, "* Online in #nowhere (0): nobody"),
    (RoomList(seq=1, ts=TS, rooms={"lobby": 3, "rust": 1}, count=2), PLAIN, "* Rooms: #lobby (3), #rust (1)"),
    (RoomList(seq=1, ts=TS, rooms={"lobby": 3}, count=4), PLAIN, "* Rooms: #lobby (3), and 3 more"),
    (RoomList(seq=1, ts=TS, rooms={}, count=0), PLAIN, "* Rooms: none"),
    (welcome("alice", ["alice", "bob", "carol"]), PLAIN,
     "* Welcome, alice! 2 other(s) online: bob, carol. Type /help for commands."),
    (welcome("alice"), PLAIN, "* Welcome, alice! nobody else is online yet. Type /help for commands."),
    (Status("lost", "connection to the broker lost; reconnecting", TS), PLAIN,
     "* Connection to the broker lost; reconnecting..."),
    (Status("reconnected", "rejoined", TS), PLAIN, "* Reconnected (rejoined)."),
    (Status("reconnected", "the broker restarted; rejoined", TS), PLAIN,
     "* Reconnected (the broker restarted; rejoined)."),
    (Status("shutdown", "broker stopping", TS), PLAIN, "* The broker is shutting down."),
    (Gap("r/rust/", 3, TS), PLAIN, "! 3 events missed on #rust"),
    (Gap("r/lobby/", 1, TS), PLAIN, "! 1 event missed on #lobby"),
    (Gap(f"u/{ID}/", 2, TS), PLAIN, f"! 2 events missed on u/{ID}/"),
    (Gap("sys/", 5, TS), PLAIN, "! 5 events missed on sys/"),
])
def test_render_every_event(event: ClientEvent, view: View, expected: str) -> None:
    assert render(event, view) == f"[{T}] {expected}"


def test_the_timestamp_is_the_events_clock() -> None:
    assert re.fullmatch(r"\d\d:\d\d:\d\d", T)
    later = Message(seq=1, ts=TS + 3600, room="lobby", name="bob", text="hi")
    assert line(later) == f"[{clock(TS + 3600)}] bob: hi"
    assert line(message()).startswith(f"[{T}] ")


def test_welcome_lists_at_most_twenty_others() -> None:
    others = [f"user{i:02d}" for i in range(25)]
    text = line(welcome("alice", ["alice", *others]))
    shown = ", ".join(others[:20])
    assert text == f"[{T}] * Welcome, alice! 25 other(s) online: {shown}, .... Type /help for commands."


def test_welcome_uses_the_exact_online_count() -> None:
    text = line(welcome("alice", ["alice", "bob"], online=900))
    assert "899 other(s) online: bob" in text


@pytest.mark.parametrize("event", [
    Heartbeat(seq=1, ts=TS, epoch="e", interval=1.0, online=3),
    Shutdown(seq=1, ts=TS, epoch="e", detail="bye"),
])
def test_events_not_shown(event: ClientEvent) -> None:
    assert render(event, PLAIN) is None
    assert render(event, COLOR) is None


def test_plain_lines_have_no_escape_codes() -> None:
    for event in (message("alice", "hi alice"), message("bob", "hi alice"), direct(), welcome(),
                  Renamed(seq=1, ts=TS, room="lobby", old="alice", new="alicia")):
        text = line(event, PLAIN)
        assert "\x1b" not in text
        assert_clean(text, color=False)


# --- terminal-escape injection ------------------------------------------------------------------

PAYLOADS = [
    "\x1b[2J",
    "\x1b[31m",
    "\x1b[H\x1b[2K",
    "\x1b]0;pwned\x07",
    "\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\",
    "\x1bP+q\x1b\\",
    "\x1bc",
    "\x9b2J",
    "\x9d0;pwned\x9c",
    "\x07",
    "\b\b\b\b",
    "\r",
    "\n",
    "\x00\x7f\x85",
    "\u202e\u2066",
    "\x1b",
    "\x1b[",
]
NASTY = "ev" + "".join(PAYLOADS) + "il"

Builder = Callable[[str], ClientEvent]
BUILDERS: dict[str, Builder] = {
    "message-name": lambda p: message(name=f"x{p}y"),
    "message-text": lambda p: message(text=f"hi {p} there"),
    "message-other-room": lambda p: message(name=f"x{p}", text=p, room="rust"),
    "action": lambda p: action(name=f"x{p}", text=f"waves{p}"),
    "direct-received": lambda p: direct(name=f"x{p}", to="alice", text=p),
    "direct-sent": lambda p: direct(name="alice", to=f"x{p}", text=p),
    "joined": lambda p: Joined(seq=1, ts=TS, room="lobby", name=f"x{p}", chat=True),
    "joined-room": lambda p: Joined(seq=1, ts=TS, room="rust", name=f"x{p}"),
    "left-quit": lambda p: Left(seq=1, ts=TS, room="lobby", name=f"x{p}", reason="quit", message=p),
    "left-part": lambda p: Left(seq=1, ts=TS, room="rust", name=f"x{p}", reason="part", message=f"m{p}"),
    "renamed": lambda p: Renamed(seq=1, ts=TS, room="lobby", old=f"x{p}", new=f"y{p}"),
    "error": lambda p: Error(seq=1, ts=TS, code="bad_request", detail=f"bad {p}"),
    "who": lambda p: WhoReply(seq=1, ts=TS, room=None, names=[f"x{p}", f"y{p}"], count=9),
    "welcome": lambda p: welcome(f"x{p}", [f"x{p}", f"y{p}", "alice"]),
}
# What someone said: its line breaks are kept (each continuation line indented).
SAID = {"message-text", "message-other-room", "action", "direct-received", "direct-sent"}


@pytest.mark.parametrize("color", [False, True], ids=["plain", "color"])
@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("payload", [*PAYLOADS, NASTY], ids=[repr(p) for p in [*PAYLOADS, NASTY]])
def test_nothing_received_can_control_the_terminal(payload: str, kind: str, color: bool) -> None:
    view = View(me="alice", room="lobby", color=color)
    text = line(BUILDERS[kind](payload), view)
    rows = text.split("\n")  # a line break in what someone said is kept, the next line indented
    if kind not in SAID:
        assert len(rows) == 1, repr(text)
    for row in rows[1:]:
        assert row.startswith(" " * len(f"[{T}] ")), repr(text)  # never at the left edge: no fake header
    for row in rows:
        assert_clean(row, color)
    if not color:
        assert "\x1b" not in text
        assert "\x9b" not in text


def test_injected_text_is_stripped_not_mangled() -> None:
    text = line(message("bob", "a\x1b[2Jb\x1b]0;pwned\x07c\x9b2Jd\x07e\bf\rg\x1b[31mh"))
    assert text == f"[{T}] bob: abcdef gh"  # a carriage return becomes a space
    assert line(message("bob", "tab\there")) == f"[{T}] bob: tab here"


@pytest.mark.parametrize("make", [
    lambda p: message(room=f"ru{p}st"),
    lambda p: action(room=f"ru{p}st"),
    lambda p: Joined(seq=1, ts=TS, room=f"ru{p}st", name="bob"),
    lambda p: Left(seq=1, ts=TS, room=f"ru{p}st", name="bob", reason="part"),
    lambda p: WhoReply(seq=1, ts=TS, room=f"ru{p}st", names=["bob"], count=1),
    lambda p: RoomList(seq=1, ts=TS, rooms={f"ru{p}st": 1}, count=1),
    lambda p: Gap(f"r/ru{p}st/", 2, TS),
], ids=["message", "action", "joined", "left", "who", "rooms", "gap"])
def test_room_names_are_cleaned_too(make: Builder) -> None:
    # The broker only accepts room names matching ROOM_RE, but render promises to be
    # the second line of defence for everything that came over the wire.
    for color in (False, True):
        assert_clean(line(make(NASTY), View(me="alice", room="lobby", color=color)), color)


# --- colours -------------------------------------------------------------------------------------


def test_name_color_is_stable_and_from_the_palette() -> None:
    for name in ("alice", "bob", "carol", "x" * 32, "Ünïcode"):
        assert name_color(name) in PALETTE
        assert name_color(name) == name_color(name)
        assert name_color(name.upper()) == name_color(name)  # names are case-insensitive
    # The same for every process and every person (no salted hash()).
    assert (name_color("alice"), name_color("bob"), name_color("carol")) == ("91", "36", "35")


def test_name_colors_vary_between_names() -> None:
    assert len({name_color(f"user{i}") for i in range(50)}) >= 5


def test_names_are_coloured() -> None:
    text = line(message("bob", "hi"), COLOR)
    assert text.startswith(f"[{T}] \x1b[{name_color('bob')}mbob\x1b[")
    assert painted(text) == [(name_color("bob"), "bob")]
    assert visible(text) == f"[{T}] bob: hi"
    assert_clean(text, color=True)


def test_the_same_name_gets_the_same_colour_everywhere() -> None:
    for event in (message("bob"), action("bob"), direct("bob", "alice"),
                  Joined(seq=1, ts=TS, room="lobby", name="bob"),
                  Left(seq=1, ts=TS, room="lobby", name="bob", reason="quit"),
                  WhoReply(seq=1, ts=TS, room=None, names=["alice", "bob"], count=2),
                  welcome("alice", ["alice", "bob"])):
        assert (name_color("bob"), "bob") in painted(line(event, COLOR)), event


def test_own_name_is_bold() -> None:
    own = (f"1;{name_color('alice')}", "alice")
    text = line(message("alice", "hi"), COLOR)
    assert painted(text) == [own]
    assert visible(text) == f"[{T}] alice: hi"
    assert own in painted(line(welcome("alice", ["alice", "bob"]), COLOR))
    assert painted(line(WhoReply(seq=1, ts=TS, room=None, names=["alice", "bob"], count=2), COLOR)) == [
        own, (name_color("bob"), "bob")]
    # Someone else's name is not bold, even in my own direct message to them.
    assert painted(line(message("bob", "hi"), COLOR)) == [(name_color("bob"), "bob")]
    assert painted(line(direct("alice", "bob", "hi"), COLOR)) == [(name_color("bob"), "bob")]


def test_the_text_after_a_coloured_name_is_not_coloured() -> None:
    text = line(message("bob", "plain words"), COLOR)
    tail = text.split("bob", 1)[1]
    reset = re.match(r"\x1b\[([0-9;]*)m", tail)
    assert reset is not None
    params = reset.group(1).split(";")
    assert "0" in params or "39" in params  # the colour ends with the name
    assert tail[reset.end():] == ": plain words"


def test_renamed_colours_both_names() -> None:
    text = line(Renamed(seq=1, ts=TS, room="lobby", old="bob", new="robert"), COLOR)
    assert painted(text) == [(name_color("bob"), "bob"), (name_color("robert"), "robert")]
    assert visible(text) == f"[{T}] - bob is now known as robert."


def test_colour_off_means_no_escape_codes() -> None:
    for event in (message("bob", "hi alice"), message("alice", "hi"), direct("bob", "alice")):
        assert "\x1b" not in line(event, PLAIN)


# --- mentions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "alice", "hi alice", "Hi ALICE!", "@alice, look", "alice: look", "(alice)", "thanks alice.",
    "hey Alice?", "is 'alice' here",
])
def test_mentions_of_my_name(text: str) -> None:
    assert mentions(message("bob", text), "alice") is True
    assert mentions(action("bob", text), "alice") is True
    assert mentions(direct("bob", "alice", text), "alice") is True


@pytest.mark.parametrize("text", [
    "alicea", "xalice", "malice aforethought", "alice_x", "alice-bot", "hi al ice", "", "bob",
])
def test_not_mentions(text: str) -> None:
    assert mentions(message("bob", text), "alice") is False


def test_my_own_message_is_not_a_mention() -> None:
    assert mentions(message("alice", "I am alice"), "alice") is False
    assert mentions(action("alice", "is alice"), "alice") is False
    assert mentions(direct("alice", "bob", "alice here"), "alice") is False
    assert mentions(direct("bob", "alice", None), "alice") is False  # did not open: nothing to match


def test_mentions_need_a_name_and_a_message() -> None:
    assert mentions(message("bob", "hi alice"), None) is False
    assert mentions(message("bob", "hi alice"), "") is False
    assert mentions(Joined(seq=1, ts=TS, room="lobby", name="alice"), "alice") is False
    assert mentions(Renamed(seq=1, ts=TS, room="lobby", old="bob", new="alice"), "alice") is False
    assert mentions(Error(seq=1, ts=TS, code="x", detail="alice"), "alice") is False


def test_names_with_regex_characters_are_matched_literally() -> None:
    assert mentions(message("bob", "hi a.b"), "a.b") is True
    assert mentions(message("bob", "hi axb"), "a.b") is False


def test_a_mention_line_is_reverse_video() -> None:
    text = line(message("bob", "hi alice, look"), COLOR)
    assert text.startswith("\x1b[7m")
    assert text.endswith("\x1b[0m")
    assert_clean(text, color=True)
    assert visible(text) == f"[{T}] bob: hi alice, look"


def test_a_mention_line_is_reverse_video_to_the_end() -> None:
    # The name's own colour reset must not switch the highlight off halfway through.
    for event in (message("bob", "hi alice, look"), action("bob", "pokes alice"),
                  direct("bob", "alice", "alice?")):
        text = line(event, COLOR)
        flags = reverse_flags(text)
        assert len(flags) == len(visible(text))
        assert all(flags), (repr(text), flags)


def test_no_reverse_video_without_a_mention_or_without_colour() -> None:
    assert "\x1b[7m" not in line(message("bob", "hi there"), COLOR)
    assert "\x1b[7m" not in line(message("alice", "I am alice"), COLOR)
    assert line(message("bob", "hi alice"), PLAIN) == f"[{T}] bob: hi alice"
