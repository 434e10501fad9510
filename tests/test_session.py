"""tui.Session without a terminal: lines held back while the screen is not ready."""

from __future__ import annotations

import threading

import pytest

from zchat.tui import Session

pytestmark = pytest.mark.timeout(20)


def test_a_line_shown_while_release_runs_is_not_lost() -> None:
    written: list[str] = []
    session = Session(color=False, write=written.append)
    session.hold()
    in_append, released = threading.Event(), threading.Event()

    class Stalling(list):
        """The hold list: its append waits for `release` to have finished (bounded), so a
        `show` that tested `_held` without the lock would add to a list nobody reads."""

        def append(self, text: str) -> None:
            in_append.set()
            released.wait(0.5)  # with the lock held, release cannot finish: the wait runs out
            super().append(text)

    session._held = Stalling()
    shower = threading.Thread(target=session.show, args=("hello",))
    shower.start()
    assert in_append.wait(5)

    def release() -> None:
        session.release()
        released.set()

    releaser = threading.Thread(target=release)
    releaser.start()
    shower.join(5)
    releaser.join(5)
    assert not shower.is_alive() and not releaser.is_alive()
    assert written == ["hello"]
    session.show("after")  # released: straight through
    assert written == ["hello", "after"]


def test_lines_are_held_until_release_then_shown_in_order() -> None:
    written: list[str] = []
    session = Session(color=False, write=written.append)
    session.hold()
    session.show("one")
    session.show("two")
    assert written == []
    other: list[str] = []
    session.release(other.append)
    assert other == ["one", "two"] and written == []
    session.show("three")
    assert written == ["three"]
