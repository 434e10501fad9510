"""Turning events into the lines a person reads. Pure: no terminal, no sockets.

Everything another user typed goes through `clean_text` here (the broker
strips it too: this is the second line of defence), so nothing received can
move the cursor, clear the screen or change colours. Colours are our own
escape codes, added after cleaning.
"""

from __future__ import annotations

import re
import time
import unicodedata
import zlib
from dataclasses import dataclass

from zchat.e2e import fingerprint
from zchat.events import (
    ClientEvent,
    DirectDraft,
    Folded,
    Gap,
    Pending,
    PrivateMessage,
    Replay,
    ReplayKind,
    Status,
    StatusState,
)
from zchat.protocol import (
    ROOM_PREFIX,
    Action,
    AwayNotice,
    BanList,
    Error,
    Joined,
    Left,
    LeftReason,
    Me,
    Message,
    Muted,
    Posted,
    Renamed,
    RoomList,
    RoomTopic,
    Unbanned,
    Welcome,
    WhoReply,
    clean_message,
    clean_text,
)

# Readable on dark and light backgrounds: no black, white or blue-on-black.
_PALETTE = ("31", "32", "33", "35", "36", "91", "92", "93", "95", "96")
_RESET = "\x1b[0m"
DEFAULT_CLOCK = "%H:%M:%S"  # the config file's timestamp_format changes it


class Days:
    """The local date of the last event shown, to draw a day-change line between two events of
    different dates. It starts at the date of `today` (a timestamp the shell gives: this module
    reads no clock), so history older than today shows its date, and today's does not."""

    def __init__(self, today: float) -> None:
        self.last = time.localtime(today)[:3]

    def change(self, ts: float) -> str | None:
        """The day-change line to draw before an event at `ts`, or None (the same date)."""
        day = time.localtime(ts)[:3]
        if day == self.last:
            return None
        self.last = day
        return day_line(ts)


def day_line(ts: float) -> str:
    """`-- Wednesday 2 December 2026 --` for the local date of `ts`."""
    t = time.localtime(ts)
    return f"-- {time.strftime('%A', t)} {t.tm_mday} {time.strftime('%B %Y', t)} --"


@dataclass(frozen=True)
class View:
    """What a line's look depends on besides the event."""

    me: str | None = None
    room: str | None = None  # the current room: messages elsewhere are tagged #room
    color: bool = False
    clock_format: str = DEFAULT_CLOCK  # strftime format of each line's clock
    hyperlinks: bool = False  # URLs as OSC 8 links (a terminal, colours on, not switched off)
    days: Days | None = None  # day-change lines (None: none)


def clock(ts: float, layout: str = DEFAULT_CLOCK) -> str:
    """The clock of a line (HH:MM:SS by default) in local time of a broker timestamp; cleaned,
    as a format from the config file could hold anything."""
    return clean_text(time.strftime(layout, time.localtime(ts)))


def cells(text: str) -> int:
    """Terminal columns `text` takes (wide East Asian characters two, combining marks none)."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


# A URL made of printable ASCII (an OSC 8 target must be), without a closing punctuation mark.
_URL = re.compile(r"\bhttps?://[!-~]+")
_URL_TAIL = ".,;:!?'\")]}>"


def hyperlink(text: str) -> str:
    """`text` (already cleaned: no escape can be in it) with each URL wrapped in an OSC 8
    hyperlink, so a terminal keeps a long link clickable where it wraps."""
    def link(match: re.Match[str]) -> str:
        url = match.group(0)
        stripped = url.rstrip(_URL_TAIL)
        tail = url[len(stripped):]
        if len(stripped) <= len("https://"):
            return url
        return f"\x1b]8;;{stripped}\x1b\\{stripped}\x1b]8;;\x1b\\{tail}"
    return _URL.sub(link, text)


def _said(text: str, view: View) -> str:
    """What someone said, cleaned (line breaks kept), then its links (never the other way)."""
    said = clean_message(text)
    return hyperlink(said) if view.hyperlinks and view.color else said


def name_color(name: str) -> str:
    """A stable colour per name: the same name looks the same for everyone."""
    return _PALETTE[zlib.crc32(name.casefold().encode()) % len(_PALETTE)]


def mentions(event: ClientEvent, me: str | None) -> bool:
    """Does someone else's message or action name `me` as a word?"""
    if not me or not isinstance(event, (Message, Action, PrivateMessage)) or event.name == me:
        return False
    if event.text is None:  # a private message that did not open
        return False
    pattern = rf"(?<![\w.-]){re.escape(me)}(?![\w-]|\.\w)"
    return re.search(pattern, event.text, re.IGNORECASE) is not None


def render(event: ClientEvent, view: View = View()) -> str | None:
    """The display line(s) for an event, or None for events not shown."""
    if isinstance(event, Replay):
        return _replay(event, view)
    body = _body(event, view)
    if body is None:
        return None
    head = f"[{clock(event.ts, view.clock_format)}] "
    if "\n" in body:  # only a message's own line breaks: each continuation under the first
        body = body.replace("\n", "\n" + " " * max(2, cells(head)))
    line = head + body
    if view.color and mentions(event, view.me):
        line = f"\x1b[7m{line}{_RESET}"  # reverse video: hard to miss
    change = view.days.change(event.ts) if view.days is not None else None
    return line if change is None else f"{change}\n{line}"


def _replay(replay: Replay, view: View) -> str | None:
    """Stored events between two marker lines, so nobody takes them for live ones."""
    room = "#" + clean_text(replay.room)
    lines = [render(event, view) for event in replay.events]
    shown = [line for line in lines if line is not None]
    lost = f"; {replay.lost} could not be recovered" if replay.lost else ""
    if replay.skipped:
        lost += f"; {replay.skipped} older not shown (/history N shows more)"
    if replay.kind == ReplayKind.BACKFILL:
        head = f"--- {len(shown)} missed event(s) recovered in {room}{lost} ---"
    elif replay.kind == ReplayKind.MISSED:
        head = f"--- {len(shown)} event(s) in {room} while you were away{lost} ---"
    else:
        if not shown and not lost:
            return None
        head = f"--- history of {room}: {len(shown)} event(s){lost} ---"
    tail = f"--- end of {'history' if replay.kind == ReplayKind.HISTORY else 'missed events'} ---"
    if view.color:
        head, tail = f"\x1b[2m{head}\x1b[22m", f"\x1b[2m{tail}\x1b[22m"
    return "\n".join([head, *shown, tail] if shown else [head])


def _name(name: str, view: View) -> str:
    name = clean_text(name)
    if not view.color:
        return name
    weight = "1;" if name == view.me else ""
    # Reset only what we set (weight, colour), so a reverse-video mention line stays reversed.
    return f"\x1b[{weight}{name_color(name)}m{name}\x1b[22;39m"


def _body(event: ClientEvent, view: View) -> str | None:
    n = lambda name: _name(name, view)  # noqa: E731
    r = lambda room: "#" + clean_text(room)  # noqa: E731  (a broker should have cleaned it; trust nothing)
    if isinstance(event, Message):
        tag = f"{r(event.room)} " if view.room and event.room != view.room else ""
        return f"{tag}{n(event.name)}: {_said(event.text, view)}"
    if isinstance(event, Action):
        tag = f"{r(event.room)} " if view.room and event.room != view.room else ""
        return f"{tag}* {n(event.name)} {_said(event.text, view)}"
    if isinstance(event, PrivateMessage):
        if event.text is None:
            return (f"! a private message from {n(event.name)} could not be opened "
                    "(it was not sealed to your key, or was damaged)")
        if view.me is not None and event.name == view.me:
            note = " (offline: delivered when they next join)" if event.offline else ""
            return f"-> {n(event.to)}{note}: {_said(event.text, view)}"
        note = " (while you were away)" if event.offline else ""
        return f"<- {n(event.name)}{note}: {_said(event.text, view)}"
    if isinstance(event, Joined):
        where = "the chat" if event.chat else r(event.room)
        return f"- {n(event.name)} has joined {where}."
    if isinstance(event, Left):
        said = f" ({clean_text(event.message)})" if event.message else ""
        if event.reason in (LeftReason.KICKED, LeftReason.BANNED):
            return f"- {n(event.name)} was {event.reason} by {n(event.by)}.{said}"
        where = r(event.room) if event.reason == LeftReason.PART else "the chat"
        return f"- {n(event.name)} has left {where}.{said}"
    if isinstance(event, Muted):
        if not event.seconds:
            return f"- {n(event.name)} may speak again ({n(event.by)})."
        said = f" ({clean_text(event.reason)})" if event.reason else ""
        until = f" until {clock(event.until, view.clock_format)}" if event.until else ""
        if view.me is not None and event.name == view.me:
            return (f"- You were muted for {event.seconds} s by {n(event.by)}.{said} You may speak again "
                    f"at {clock(event.until, view.clock_format)}." if event.until else
                    f"- You were muted for {event.seconds} s by {n(event.by)}.{said}")
        return f"- {n(event.name)} was muted for {event.seconds} s{until} by {n(event.by)}.{said}"
    if isinstance(event, RoomTopic):
        return _topic(event, n, r)
    if isinstance(event, AwayNotice):
        if view.me is not None and event.name == view.me:
            return (f"* You are marked as away: {clean_text(event.message)}" if event.message
                    else "* You are no longer marked as away.")
        return f"* {n(event.name)} is away: {clean_text(event.message)}"
    if isinstance(event, BanList):
        bans = ", ".join(f"{n(name) + ' ' if name else ''}({fingerprint(clean_text(key))})"
                         for key, name in event.bans.items()) or "none"
        more = f", and {event.count - len(event.bans)} more" if event.count > len(event.bans) else ""
        return f"* Banned keys ({event.count}): {bans}{more}"
    if isinstance(event, Unbanned):
        who = f"{n(event.name)} ({fingerprint(clean_text(event.key))})" if event.name else (
            f"key {fingerprint(clean_text(event.key))}")
        return f"* {who} is no longer banned ({n(event.by)}): that key may come back."
    if isinstance(event, Renamed):
        return f"- {n(event.old)} is now known as {n(event.new)}."
    if isinstance(event, Error):
        return f"! {clean_text(event.detail)}"
    if isinstance(event, WhoReply):
        where = f" in {r(event.room)}" if event.room else ""
        names = ", ".join(n(name) + (f" (away: {clean_text(event.away[name])})" if name in event.away else "")
                          for name in event.names) or "nobody"
        more = f", and {event.count - len(event.names)} more" if event.count > len(event.names) else ""
        return f"* Online{where} ({event.count}): {names}{more}"
    if isinstance(event, RoomList):
        topics = {room: f", topic: {clean_text(text)}" for room, text in event.topics.items()}
        rooms = ", ".join(f"{r(room)} ({size}{topics.get(room, '')})"
                          for room, size in event.rooms.items()) or "none"
        more = f", and {event.count - len(event.rooms)} more" if event.count > len(event.rooms) else ""
        return f"* Rooms: {rooms}{more}"
    if isinstance(event, Posted):
        return f"* Posted to {r(event.room)} (event {event.at})."
    if isinstance(event, Welcome):
        others = [name for name in event.members if name != event.name]
        shown = ", ".join(n(name) for name in others[:20]) + (", ..." if len(others) > 20 else "")
        who = f"{event.online - 1} other(s) online: {shown}" if others else "nobody else is online yet"
        return f"* Welcome, {n(event.name)}! {who}. Type /help for commands."
    if isinstance(event, Status):
        if event.state == StatusState.KEY_CHANGED:  # a warning: the person should look
            return f"! {clean_text(event.detail)}"
        return "* " + _status(event)
    if isinstance(event, Pending):
        said = event.message
        if isinstance(said, DirectDraft):
            line = f"-> {n(said.to)}: {_said(said.text, view)}"
        elif isinstance(said, Me):
            line = f"* {n(view.me or '')} {_said(said.text, view)}"
        else:
            line = f"{n(view.me or '')}: {_said(said.text, view)}"
        return f"(pending) {line}"
    if isinstance(event, Folded):
        tag = f"{r(event.room)} " if view.room and event.room != view.room else ""
        people = "1 person" if event.lost == 1 else f"{event.lost} people"
        return f"{tag}- {people} lost their connection; {event.back} back."
    if isinstance(event, Gap):
        where = clean_text(event.topic)
        if where.startswith(ROOM_PREFIX):
            where = r(where[len(ROOM_PREFIX):].rstrip("/"))
        plural = "s" if event.missing != 1 else ""
        return f"! {event.missing} event{plural} missed on {where}"
    return None


def _topic(event: RoomTopic, n, r) -> str:  # type: ignore[no-untyped-def]
    text = clean_text(event.text)
    if event.changed:
        if not text:
            return f"- {n(event.by)} cleared the topic of {r(event.room)}."
        return f"- {n(event.by)} changed the topic of {r(event.room)} to: {text}"
    if not text:
        return f"* {r(event.room)} has no topic."
    by = f" (set by {n(event.by)})" if event.by else ""
    return f"* Topic of {r(event.room)}: {text}{by}"


def _status(status: Status) -> str:
    detail = clean_text(status.detail)
    if status.state == StatusState.LOST:
        return "Connection to the broker lost; reconnecting..."
    if status.state == StatusState.RECONNECTED:
        return f"Reconnected ({detail})."
    if status.state == StatusState.SHUTDOWN:
        return "The broker is shutting down."
    if status.state == StatusState.REJOIN_FAILED:
        return f"Could not rejoin: {detail}"
    if status.state == StatusState.REMOVED:
        return f"{detail.capitalize()}. Type /reconnect to come back, or /quit to leave."
    if status.state == StatusState.FAILED:
        return f"{_sentence(detail)}; start zchat again."
    if status.state == StatusState.BANNED:
        return f"{detail.capitalize()}. You cannot come back with this key."
    return detail


def _sentence(text: str) -> str:
    """`text` with a capital first letter, the rest as it is (names and codes keep their case)."""
    return text[:1].upper() + text[1:]
