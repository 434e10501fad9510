"""Client-side logs, as irssi's autolog: `log_dir` in the config file writes each buffer (a
room, or a private conversation) as plain text, one file per room or person and per day:
`<log_dir>/#lobby.2026-12-02.log`, `<log_dir>/bob.2026-12-02.log`.

Each line is what the screen shows (zchat.render, without colours or links: the same
sanitising, no escape code ever reaches a file). The directory is made 0700 and each file
0600, opened without following a symlink. `log_target` and `log_lines` are pure; `ChatLog`
is the shell that appends to the files.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from zchat.events import ClientEvent, PrivateMessage, Replay, ReplayKind
from zchat.protocol import Action, Joined, Left, Message, Muted, Renamed, valid_name
from zchat.render import DEFAULT_CLOCK, View, render

DIR_MODE = 0o700
FILE_MODE = 0o600
_ROOM_EVENTS = (Message, Action, Joined, Left, Renamed, Muted)


def log_target(event: ClientEvent, me: str | None) -> str | None:
    """The buffer an event belongs to: `#room`, or the other person's name (case-folded: names
    are unique regardless of case) for a private message; None for what is not logged."""
    if isinstance(event, _ROOM_EVENTS):
        return "#" + event.room if event.room else None
    if isinstance(event, PrivateMessage):
        other = event.to if me is not None and event.name == me else event.name
        return other.casefold() if valid_name(other) else None  # never a path from the wire
    return None


def log_lines(event: ClientEvent, me: str | None,
              clock_format: str = DEFAULT_CLOCK) -> list[tuple[str, float, str]]:
    """(buffer, ts, text) for each line `event` writes: events recovered after a loss or
    missed while away are logged (they were never shown live); a history replay is not
    (what it holds was logged when it happened, or before this log began)."""
    if isinstance(event, Replay):
        if event.kind == ReplayKind.HISTORY:
            return []
        return [line for inner in event.events for line in log_lines(inner, me, clock_format)]
    target = log_target(event, me)
    if target is None:
        return []
    text = render(event, View(me=me, room=target[1:] if target.startswith("#") else None,
                              clock_format=clock_format))
    return [] if text is None else [(target, event.ts, text)]


class ChatLog:
    """Appends each event's lines to its buffer's file of the day (`Session.log`)."""

    def __init__(self, directory: Path, clock_format: str = DEFAULT_CLOCK,
                 warn: Callable[[str], None] | None = None) -> None:
        self.directory = directory
        self.clock_format = clock_format
        self.warn = warn  # told once when a file cannot be written (the chat goes on)
        self.failed = False
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if stat.S_IMODE(directory.stat().st_mode) != DIR_MODE:
            directory.chmod(DIR_MODE)  # made earlier, or by mkdir under a umask: ours only

    def __call__(self, event: ClientEvent, me: str | None) -> None:
        for target, ts, text in log_lines(event, me, self.clock_format):
            day = time.strftime("%Y-%m-%d", time.localtime(ts))
            self._append(self.directory / f"{target}.{day}.log", text)

    def _append(self, path: Path, text: str) -> None:
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, FILE_MODE)
            if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)  # a file made by something else: ours only
            with os.fdopen(fd, "a", encoding="utf-8") as file:
                file.write(text + "\n")
        except OSError as exc:
            if not self.failed and self.warn is not None:
                self.warn(f"! log_dir: cannot write {path}: {exc.strerror}; not logging this line")
            self.failed = True
