"""Buffers in the real interactive client, driven in tmux (helpers of tests/test_tui.py): the
bar's unread counts, switching with Alt+N and Ctrl+N, the "new since you looked" marker,
PageUp/PageDown."""

from __future__ import annotations

import re

import pytest
from conftest import CLOCK, Chat
from test_tui import Tmux, join_in_tmux
from test_tui import tmux as tmux  # noqa: F401  (the fixture)

from zchat.buffers import MARKER

pytestmark = pytest.mark.timeout(60)


def full_screen(tmux: Tmux) -> list[str]:
    """Every line of the pane, reverse video included (the bar is drawn in it)."""
    return [line.rstrip() for line in tmux.tmux("capture-pane", "-p", "-J", "-t", tmux.target).split("\n")]


def wait_bar(tmux: Tmux, bar: str, timeout: float = 10.0) -> list[str]:
    """Wait until the line above the input line is exactly `bar`; the whole screen then."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        lines = full_screen(tmux)
        if bar in [line.strip() for line in lines]:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no bar {bar!r} within {timeout} s; screen:\n" + "\n".join(lines))
        time.sleep(0.05)


def conversation(lines: list[str]) -> list[str]:
    """The chat lines on screen: timestamped lines and marker lines, clock stripped."""
    clock = re.compile(rf"^{CLOCK} ")
    return [clock.sub("", line) for line in lines if clock.match(line) or line.startswith("---")]


def test_bar_counts_unread_alt_n_switches_and_draws_the_marker(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")
    tmux.type("/join dev")
    tmux.key("Enter")
    tmux.wait_last_line("#dev>")
    wait_bar(tmux, "1:#lobby [2:#dev]")
    talker = chat.joined_client("talker")  # in #lobby
    talker.send("first in lobby")
    talker.send("typist, look here")
    talker.wait_for(rf"^{CLOCK} talker: typist, look here$")
    lines = wait_bar(tmux, "1:#lobby(2!) [2:#dev]")
    assert not any("in lobby" in line or "look here" in line for line in lines), lines  # not on screen

    talker.send("/msg typist a secret")
    wait_bar(tmux, "1:#lobby(2!) [2:#dev] 3:talker(1!)")

    tmux.key("M-1")  # Alt+1
    tmux.wait_last_line("#lobby>")
    wait_bar(tmux, "[1:#lobby] 2:#dev 3:talker(1!)")
    lines = tmux.wait_until(lambda ls: MARKER in ls, "the marker line")
    shown = conversation(lines)
    assert shown[-4:] == [MARKER, "- talker has joined the chat.", "talker: first in lobby",
                          "talker: typist, look here"], lines
    assert "- typist has joined #dev." not in shown, lines  # #dev's lines stay in #dev

    tmux.key("C-p")  # Ctrl+P: round the bar to the private conversation
    tmux.wait_last_line("@talker>")
    wait_bar(tmux, "1:#lobby 2:#dev [3:talker]")
    lines = tmux.wait_until(lambda ls: conversation(ls) == ["<- talker: a secret"], "only the conversation")
    tmux.type("and back to you")
    tmux.key("Enter")
    talker.wait_for(rf"^{CLOCK} <- typist: and back to you$")  # a private message, as /msg
    tmux.wait_for(rf"^{CLOCK} -> talker: and back to you$")

    tmux.key("C-n")  # Ctrl+N: round again to #lobby
    tmux.wait_last_line("#lobby>")
    wait_bar(tmux, "[1:#lobby] 2:#dev 3:talker")


def test_pageup_and_pagedown_scroll_the_buffer(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker("--rate-per-second", "0")
    join_in_tmux(chat, tmux, "typist")
    talker = chat.joined_client("talker")
    for i in range(80):
        talker.send(f"line {i:02d}")
    talker.wait_for(rf"^{CLOCK} talker: line 79$", timeout=20)
    tmux.wait_for(rf"^{CLOCK} talker: line 79$", timeout=20)
    tmux.key("PageUp")
    wait_bar(tmux, "[1:#lobby (scrolled up)]")
    # A page is the pane's height less the bar, the input and the status lines: 27 lines.
    page = [f"talker: line {i:02d}" for i in range(80 - 54, 80 - 27)]
    tmux.wait_until(lambda ls: [line for line in conversation(ls) if line.startswith("talker: line")] == page,
                    "the page before the last")
    tmux.key("PageUp")
    lines = tmux.wait_until(lambda ls: any(line.endswith("talker: line 00") for line in ls), "the top")
    talker.send("said while scrolled")
    lines = wait_bar(tmux, "[1:#lobby (scrolled up; 1 new below)]")
    assert not any("said while scrolled" in line for line in lines), lines
    tmux.key("PageDown")  # the page read stays put as lines arrive: 55 lines up, then 28, 1, 0
    tmux.key("PageDown")
    tmux.wait_until(lambda ls: conversation(ls)[-2:] == ["talker: line 78", "talker: line 79"],
                    "the page one line above the end")
    wait_bar(tmux, "[1:#lobby (scrolled up; 1 new below)]")
    tmux.key("PageDown")
    tmux.wait_for(rf"^{CLOCK} talker: said while scrolled$")
    tmux.wait_last_line("#lobby>")
    lines = full_screen(tmux)
    assert not any("scrolled" in line and "said" not in line for line in lines), lines  # the bar is gone
    assert conversation(lines)[-2:] == ["talker: line 79", "talker: said while scrolled"], lines
