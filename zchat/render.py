"""Turning events into the lines a person reads. Pure: no terminal, no sockets."""

from __future__ import annotations

import time

from zchat.client import ClientEvent, Gap, Status
from zchat.protocol import (
    ROOM_PREFIX,
    Error,
    Joined,
    Left,
    Message,
    Renamed,
    Welcome,
    clean_text,
)


def clock(ts: float) -> str:
    """HH:MM:SS in local time of a broker timestamp."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


def render(event: ClientEvent) -> str | None:
    """The display line for an event, or None for events not shown."""
    if isinstance(event, Message):
        return f"[{clock(event.ts)}] {clean_text(event.name)}: {clean_text(event.text)}"
    if isinstance(event, Joined):
        return f"[{clock(event.ts)}] - {clean_text(event.name)} has joined the chat."
    if isinstance(event, Left):
        said = f" ({clean_text(event.message)})" if event.message else ""
        return f"[{clock(event.ts)}] - {clean_text(event.name)} has left the chat.{said}"
    if isinstance(event, Renamed):
        return f"[{clock(event.ts)}] - {clean_text(event.old)} is now known as {clean_text(event.new)}."
    if isinstance(event, Error):
        return f"[{clock(event.ts)}] ! {clean_text(event.detail)}"
    if isinstance(event, Welcome):
        others = [clean_text(n) for n in event.members if n != event.name]
        shown = ", ".join(others[:20]) + (", ..." if len(others) > 20 else "")
        who = f"{event.online - 1} other(s) online: {shown}" if others else "nobody else is online yet"
        return (f"[{clock(event.ts)}] * Welcome, {clean_text(event.name)}! {who}. "
                "Type /help for commands.")
    if isinstance(event, Status):
        text = {
            "lost": "Connection to the broker lost; reconnecting...",
            "reconnected": f"Reconnected ({event.detail}).",
            "shutdown": "The broker is shutting down.",
        }.get(event.state, event.detail)
        return f"[{clock(event.ts)}] * {text}"
    if isinstance(event, Gap):
        where = event.topic
        if where.startswith(ROOM_PREFIX):
            where = "#" + where[len(ROOM_PREFIX):].rstrip("/")
        plural = "s" if event.missing != 1 else ""
        return f"[{clock(event.ts)}] ! {event.missing} event{plural} missed on {where}"
    return None
