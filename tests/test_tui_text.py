"""The real interactive client in tmux: what it writes to the terminal for a link (OSC 8),
read from the pane's raw output (tmux pipe-pane), as tmux 3.3 does not keep hyperlinks."""

from __future__ import annotations

import time
from pathlib import Path

import test_tui
from conftest import CLOCK, Chat
from test_tui import PROMPT, Tmux, colour_client_command, join_in_tmux

tmux = test_tui.tmux  # the fixture: a private tmux server per test

URL = "https://example.org/a/rather/long/path/that/may/wrap/on/a/narrow/terminal?q=1"


def _raw_output(tmux: Tmux, path: Path) -> None:
    tmux.tmux("pipe-pane", "-o", "-t", tmux.target, f"cat >> {path}")


def _wait_raw(path: Path, needle: bytes, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes() if path.exists() else b""
        if needle in data:
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the terminal's raw output within {timeout} s")
        time.sleep(0.05)  # polling a file: the condition is re-checked, not assumed


def test_a_url_is_an_osc8_link_on_a_colour_terminal(chat: Chat, tmux: Tmux, tmp_path: Path) -> None:
    chat.start_broker()
    tmux.start(colour_client_command(chat, "reader"))
    tmux.wait_for(rf"{CLOCK} \* Welcome, reader!", timeout=15)
    tmux.wait_last_line(PROMPT)
    raw = tmp_path / "raw"
    _raw_output(tmux, raw)
    chat.joined_client("linker").send(f"see {URL} \x1b]8;;https://evil.example\x1b\\here\x1b]8;;\x1b\\")
    tmux.wait_for(r"linker: see https://example\.org/")
    data = _wait_raw(raw, b"here")
    assert f"\x1b]8;;{URL}\x1b\\{URL}\x1b]8;;\x1b\\".encode() in data
    assert b"evil.example" not in data  # the link someone typed was cleaned before ours were made


def test_no_links_with_no_color(chat: Chat, tmux: Tmux, tmp_path: Path) -> None:
    chat.start_broker()
    join_in_tmux(chat, tmux, "reader")  # NO_COLOR=1
    raw = tmp_path / "raw"
    _raw_output(tmux, raw)
    chat.joined_client("linker").send(f"see {URL} end")
    tmux.wait_for(r"linker: see https://example\.org/")
    assert b"\x1b]8" not in _wait_raw(raw, b"end")
