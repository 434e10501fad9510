"""Text as people write it, from typed line to the exact lines on each screen (tests/chatkit.py):
messages of several lines, day-change lines, the clock's format, links, client-side logs.

Lines are compared without their `[HH:MM:SS] ` clock; a continuation line has none, so it
shows with its indent (as wide as the clock) in front.
"""

from __future__ import annotations

import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chatkit import CLOCK, START_WALL, World

from zchat import config
from zchat import limits as L
from zchat.chatlog import ChatLog
from zchat.protocol import Action, Message, Muted, Say
from zchat.render import View, day_line, render
from zchat.tui import Look, Session

IND = " " * len("[00:00:00] ")  # continuation lines start under the text after the clock


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


def marks(*users) -> list[int]:  # type: ignore[no-untyped-def]
    return [len(user.screen) for user in users]


def said(world: World) -> list[str]:
    return [event.text for _, event in world.published if isinstance(event, (Message, Action))]


# --- several lines --------------------------------------------------------------------------


def test_a_paste_of_several_lines_is_one_message_indented_under_the_first(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    a, b = marks(alice, bob)
    world.type("alice", "Traceback:\n  File \"x.py\", line 1\n[12:00:00] bob: I am not bob\n")
    expected = ["alice: Traceback:", f"{IND}  File \"x.py\", line 1", f"{IND}[12:00:00] bob: I am not bob"]
    assert alice.screen[a:] == expected
    assert bob.screen[b:] == expected
    assert len(alice.client.sent_of(Say)) == 1
    assert said(world)[-1] == "Traceback:\n  File \"x.py\", line 1\n[12:00:00] bob: I am not bob"


def test_me_and_msg_take_several_lines_too(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    a, b = marks(alice, bob)
    world.type("alice", "/me sings\n  la la")
    world.type("alice", "/msg bob first\n  second")
    assert bob.screen[b:] == ["* alice sings", f"{IND}  la la", "<- alice: first", f"{IND}  second"]
    assert alice.screen[a:] == ["* alice sings", f"{IND}  la la", "-> bob: first", f"{IND}  second"]


def test_a_paste_of_commands_runs_them_one_by_one(world: World) -> None:
    alice = world.join("alice")
    (a,) = marks(alice)
    world.type("alice", "/join games\nhello games")
    assert alice.screen[a:] == ["- alice has joined #games.", "alice: hello games"]


def test_the_broker_strips_every_control_but_line_breaks(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    (b,) = marks(bob)
    link = "\x1b]8;;http://evil\x1b\\two\x1b]8;;\x1b\\"
    alice.client.say(f"\n\n  one\x1b[2J\x07  \r\n{link}\x00\rthree\n \n", "lobby")
    world.settle()
    assert said(world)[-1] == "  one\ntwo three"  # CR LF a break, a lone CR a space
    assert bob.screen[b:] == ["alice:   one", f"{IND}two three"]  # the first line's indent kept


def test_more_lines_than_the_limit_go_as_several_messages_and_the_broker_folds_extra_breaks(
        world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    a, b = marks(alice, bob)
    lines = [f"line {i}" for i in range(L.MAX_TEXT_LINES + 10)]
    world.type("alice", "\n".join(lines))
    assert alice.screen[a] == f"* message too long ({len(lines)} lines, the limit is {L.MAX_TEXT_LINES}): " \
                              "sent as 2 messages."
    assert said(world)[-2:] == ["\n".join(lines[:L.MAX_TEXT_LINES]), "\n".join(lines[L.MAX_TEXT_LINES:])]
    assert len(bob.screen[b:]) == len(lines)
    # A client that sends more lines anyway: the broker keeps the limit, the rest joined by spaces.
    alice.client.say("\n".join(lines), "lobby")
    world.settle()
    kept = said(world)[-1].split("\n")
    assert len(kept) == L.MAX_TEXT_LINES and kept[-1] == " ".join(lines[L.MAX_TEXT_LINES - 1:])


def test_a_message_of_blank_lines_is_empty(world: World) -> None:
    alice = world.join("alice")
    alice.client.say(" \n\t\n\x1b[2J\n", "lobby")
    world.settle()
    assert alice.screen[-1] == "! message is empty"


# --- dates ----------------------------------------------------------------------------------


def next_midnight(ts: float) -> float:
    t = time.localtime(ts)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 1, 0, 0, -1))


def test_a_day_change_line_between_two_events_of_different_dates(world: World) -> None:
    world.join("alice")
    bob = world.join("bob")
    (b,) = marks(bob)
    world.type("alice", "before midnight")
    world.wall = next_midnight(world.wall)
    world.type("alice", "after midnight")
    world.type("alice", "same day")
    assert bob.screen[b:] == ["alice: before midnight", day_line(world.wall), "alice: after midnight",
                              "alice: same day"]
    assert re.fullmatch(r"-- [A-Z][a-z]+day \d{1,2} [A-Z][a-z]+ \d{4} --", day_line(world.wall))


def test_history_older_than_today_shows_its_date(world: World) -> None:
    world.join("alice")
    world.type("alice", "old news")
    then = world.wall
    world.wall = next_midnight(next_midnight(world.wall))  # two days later
    carol = world.join("carol")
    world.type("alice", "fresh")
    start = carol.screen.index("--- history of #lobby: 2 event(s) ---")
    assert carol.screen[start:start + 5] == [
        "--- history of #lobby: 2 event(s) ---",
        day_line(then),
        "- alice has joined the chat.",
        "alice: old news",
        "--- end of history ---",
    ]
    assert carol.screen[start + 5:].count(day_line(world.wall)) == 1  # back to today, once
    assert carol.screen[-1] == "alice: fresh"


def test_timestamp_format_changes_the_clock_of_each_line(world: World) -> None:
    alice = world.join("alice")
    alice.session.clock_format = "%H:%M"
    world.type("alice", "two\nlines")
    assert re.fullmatch(r"\[\d\d:\d\d\] alice: two", alice.raw[-2])
    assert alice.raw[-1] == " " * len("[00:00] ") + "lines"  # the indent follows the clock's width


def test_timestamp_format_is_the_clock_of_a_mute_end_too() -> None:
    """The end of a mute was drawn HH:MM:SS whatever the configured clock."""
    muted = Muted(seq=1, ts=START_WALL, room="lobby", name="bob", by="alice", seconds=60,
                  until=START_WALL + 60)
    short = View(me="alice", clock_format="%H:%M")
    line = render(muted, short)
    assert re.fullmatch(r"\[\d\d:\d\d\] - bob was muted for 60 s until \d\d:\d\d by alice\.", line)
    mine = View(me="bob", clock_format="%H:%M")
    assert re.search(r"You may speak again at \d\d:\d\d\.$", render(muted, mine))


# --- links ----------------------------------------------------------------------------------


def test_urls_become_osc8_links_only_with_colours_and_the_switch_on() -> None:
    url = "https://example.org/a/very/long/path?q=1&r=2"
    event = Message(seq=1, ts=START_WALL, room="lobby", name="bob", text=f"see {url}.")
    linked = render(event, View(me="alice", room="lobby", color=True, hyperlinks=True))
    assert linked is not None and f"\x1b]8;;{url}\x1b\\{url}\x1b]8;;\x1b\\." in linked  # the dot stays out
    assert "\x1b]8" not in (render(event, View(color=True)) or "")  # hyperlinks = false
    assert "\x1b]8" not in (render(event, View(hyperlinks=True)) or "")  # no colours: NO_COLOR, a pipe


@pytest.mark.parametrize("text", [
    "https://evil.example/\x1b]8;;https://other\x1b\\x",  # a link of its own inside
    "https://evil.example/\x1b[2J\x07",
    "https://evil.example/\x9b2J\x9d0;t\x9c",
    "http://a.b/\u202e\u2066x",
])
def test_a_url_cannot_carry_an_escape_sequence(text: str) -> None:
    event = Message(seq=1, ts=START_WALL, room="lobby", name="bob", text=text)
    linked = render(event, View(color=True, hyperlinks=True)) or ""
    rest = re.sub(r"\x1b\]8;;[!-~]*\x1b\\", "", re.sub(r"\x1b\[[0-9;]*m", "", linked))  # ours only
    assert "\x1b" not in rest and all(c.isprintable() for c in rest), repr(linked)
    assert linked.count("\x1b]8;;") == 2  # one link: opened and closed


# --- client-side logs -----------------------------------------------------------------------


def test_log_dir_writes_each_buffer_per_day_sanitised_and_private(world: World, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    alice = world.join("alice")
    world.join("bob")
    alice.session.log = ChatLog(logs)
    world.type("alice", "/join games")
    world.type("bob", "hello \x1b[2Jlobby\x1b]0;pwned\x07")
    world.type("alice", "in games\n  second line")
    world.type("bob", "/msg alice psst")
    world.type("alice", "/msg Bob back")
    day = time.strftime("%Y-%m-%d", time.localtime(world.wall))
    files = {path.name: path for path in logs.iterdir()}
    assert sorted(files) == [f"#games.{day}.log", f"#lobby.{day}.log", f"bob.{day}.log"]

    def read(name: str) -> list[str]:
        return [CLOCK.sub("", line) for line in files[name].read_text().splitlines()]

    assert read(f"#lobby.{day}.log") == ["bob: hello lobby"]
    assert read(f"#games.{day}.log") == ["- alice has joined #games.", "alice: in games",
                                         f"{IND}  second line"]
    assert read(f"bob.{day}.log") == ["<- bob: psst", "-> bob: back"]
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files.values())
    assert all("\x1b" not in path.read_text() for path in files.values())
    world.wall = next_midnight(world.wall)
    world.type("bob", "tomorrow")
    tomorrow = time.strftime("%Y-%m-%d", time.localtime(world.wall))
    assert [CLOCK.sub("", line) for line in (logs / f"#lobby.{tomorrow}.log").read_text().splitlines()] == \
        ["bob: tomorrow"]


def test_a_log_file_is_never_written_through_a_symlink(world: World, tmp_path: Path) -> None:
    logs, target = tmp_path / "logs", tmp_path / "elsewhere"
    alice = world.join("alice")
    shown: list[str] = []
    alice.session.log = ChatLog(logs, warn=shown.append)
    day = time.strftime("%Y-%m-%d", time.localtime(world.wall))
    (logs / f"#lobby.{day}.log").symlink_to(target)
    world.type("alice", "hi")
    world.type("alice", "again")
    assert not target.exists()
    assert len(shown) == 1 and shown[0].startswith("! log_dir: cannot write")


# --- the config file ------------------------------------------------------------------------


def _chat_settings(file: dict) -> config.Settings:
    return config.resolve({}, {}, file, config.defaults_for(config.CHAT_KEYS, {"HOME": "/home/u"}),
                          side="client", origin="z.toml")


def test_the_config_file_sets_the_clock_links_and_logs() -> None:
    s = _chat_settings({"client": {"timestamp_format": "%d %b %H:%M", "hyperlinks": False,
                                   "log_dir": "~/chatlogs"}})
    assert s["timestamp_format"] == "%d %b %H:%M" and s["hyperlinks"] is False
    assert s["log_dir"] == Path("~/chatlogs").expanduser()


@pytest.mark.parametrize("layout, problem", [
    ("%H:%Q", "unknown strftime directive %Q"),
    ("%H:%", "unknown strftime directive %"),
    ("%H\x1b[2J", "printable"),
])
def test_an_invalid_timestamp_format_is_one_line_naming_it(layout: str, problem: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        _chat_settings({"client": {"timestamp_format": layout}})
    message = str(info.value)
    assert "\n" not in message and "client.timestamp_format" in message and problem in message, message


def test_an_unusable_log_dir_is_said_on_the_screen_and_the_chat_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    shown: list[str] = []
    session = Session(color=True, write=shown.append)
    Look(clock_format="%H:%M", hyperlinks=True, log_dir=blocker / "logs").apply(session)
    assert session.log is None
    assert shown == [f"! log_dir: cannot use {blocker / 'logs'}: Not a directory; not logging"]
    assert session.clock_format == "%H:%M" and session.hyperlinks
    plain = Session(color=False, write=shown.append)
    Look(hyperlinks=True).apply(plain)
    assert not plain.hyperlinks  # no colours (a pipe, NO_COLOR): no links either


def test_zchat_send_refuses_more_lines_than_the_limit_unless_split(
        capsys: pytest.CaptureFixture[str]) -> None:
    from zchat.send import EXIT_INVALID, run_send

    def no_client(*_: object) -> None:
        raise AssertionError("nothing is sent")

    text = "\n".join(f"line {i}" for i in range(L.MAX_TEXT_LINES + 1))
    assert run_send(no_client, "deploy", text, "lobby", None) == EXIT_INVALID  # type: ignore[arg-type]
    lines = L.MAX_TEXT_LINES
    assert capsys.readouterr().err == (f"zchat send: message too long ({lines + 1} lines, the limit is "
                                       f"{lines}); --split sends it as several messages\n")
