"""A piped client writes whole lines: its I/O thread (events) and its input thread (local
errors), into one pipe with stderr, never glue two lines together."""

from __future__ import annotations

import re

import pytest
from conftest import CLOCK, Chat

pytestmark = pytest.mark.timeout(90)

LINE = re.compile(rf"^({CLOCK} |! )")


def test_lines_from_two_threads_never_glue(chat: Chat) -> None:
    chat.start_broker("--rate-per-second", "0")  # no pacing: events arrive as fast as possible
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.wait_for(r"bob has joined")
    for number in range(300):
        bob.send(f"flood {number}")
        alice.send("/history x")  # a local usage error, written by alice's input thread
    bob.wait_for(r"bob: flood 299$", timeout=60)
    alice.wait_for(r"bob: flood 299$", timeout=60)
    alice.send("/history x")
    alice.wait_for(r"^! usage: /history", start=len(alice.lines))
    assert alice.count(r"^! usage: /history") >= 300
    glued = [line for line in alice.lines if not LINE.match(line) or len(re.findall(CLOCK, line)) > 1
             or line.count("! usage") > 1]
    assert glued == []
