"""One-line text records of events, with dates: for logs and `zchat history`. Pure."""

from __future__ import annotations

import time

from zchat.protocol import (
    Action,
    Event,
    Joined,
    Left,
    Message,
    Renamed,
    clean_text,
)


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def text_record(event: Event) -> str:
    """`[YYYY-MM-DD HH:MM:SS] #room alice: text` and the like, in local time."""
    room = "#" + clean_text(getattr(event, "room", "") or "")
    if isinstance(event, Message):
        body = f"{room} {clean_text(event.name)}: {clean_text(event.text)}"
    elif isinstance(event, Action):
        body = f"{room} * {clean_text(event.name)} {clean_text(event.text)}"
    elif isinstance(event, Joined):
        body = f"{room} - {clean_text(event.name)} joined"
    elif isinstance(event, Left):
        said = f" ({clean_text(event.message)})" if event.message else ""
        body = f"{room} - {clean_text(event.name)} left ({event.reason}){said}"
    elif isinstance(event, Renamed):
        body = f"{room} - {clean_text(event.old)} is now {clean_text(event.new)}"
    else:
        body = f"{room} {type(event).__name__.lower()}"
    return f"[{stamp(event.ts)}] {body}"
