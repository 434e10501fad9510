"""One buffer per conversation: the interactive client's view of the chat (as weechat's). Pure.

Each joined room and each private conversation keeps its own lines. Only the current buffer's
lines reach the screen; the others count what arrived unseen (the bar shows it, and marks a
buffer holding a mention of your name or a private message). Switching draws the buffer again
with a marker line where you left it. Piped output never uses this: it is one flow of lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zchat.events import ClientEvent, DirectDraft, Gap, Pending, PrivateMessage, Replay
from zchat.protocol import ROOM_PREFIX, Action, Joined, Left, Message, Muted, Renamed, name_key
from zchat.render import Days, mentions

MARKER = "--- new since you looked ---"
MAX_LINES = 5000  # lines kept per buffer (the oldest go first)


@dataclass(eq=False)  # a buffer is itself: two are never equal for having the same lines
class Buffer:
    room: str | None = None  # a room's buffer...
    peer: str | None = None  # ...or a private conversation's
    lines: list[str] = field(default_factory=list)
    unread: int = 0  # messages arrived since you last looked
    highlight: bool = False  # one of them names you, or is a private message
    seen: int = 0  # lines there when you last left it: the marker goes here
    scroll: int = 0  # lines scrolled up from the bottom (0: following what arrives)
    below: int = 0  # lines arrived while scrolled up
    oldest_seq: int | None = None  # of the room events kept here: /search asks history before it
    days: Days | None = None  # the date of its last line, for its own day-change lines

    @property
    def label(self) -> str:
        if self.room is not None:
            return f"#{self.room}"
        return self.peer if self.peer is not None else "(no room)"



def _key(room: str | None, peer: str | None) -> str:
    """A buffer's key in the index: a room by its name, a person case-insensitively."""
    return f"#{room}" if room is not None else f"@{name_key(peer)}" if peer is not None else ""


@dataclass(frozen=True)
class Destination:
    """Where an event's line goes: a room's buffer, a private one, or (both None) the current one."""

    room: str | None = None
    peer: str | None = None


def destination(event: ClientEvent, me: str | None) -> Destination:
    """The buffer an event belongs to. Answers to commands, errors and connection news go to
    the current buffer."""
    if isinstance(event, (Message, Action, Joined, Left, Muted, Renamed, Replay)):
        return Destination(room=event.room)
    if isinstance(event, PrivateMessage):
        return Destination(peer=event.to if me is not None and event.name == me else event.name)
    if isinstance(event, Pending):
        said = event.message
        return Destination(peer=said.to) if isinstance(said, DirectDraft) else Destination(room=said.room)
    if isinstance(event, Gap) and event.topic.startswith(ROOM_PREFIX):
        return Destination(room=event.topic[len(ROOM_PREFIX):].rstrip("/"))
    return Destination()


def counts(event: ClientEvent, me: str | None) -> tuple[bool, bool]:
    """(unread, highlight): is it a message someone else wrote, and does it name you or is it
    private?"""
    if isinstance(event, PrivateMessage):
        theirs = event.name != me
        return theirs, theirs
    if isinstance(event, (Message, Action)) and event.name != me:
        return True, mentions(event, me)
    return False, False


class Buffers:
    """The buffers in the bar's order, and which one is on screen."""

    def __init__(self, rooms: tuple[str, ...] | list[str] = ()) -> None:
        self.all: list[Buffer] = [Buffer(room=room) for room in rooms] or [Buffer()]
        self.current = self.all[0]
        # Each event finds its buffer by key: 20 busy rooms are 20 lookups, not 20 scans.
        self._index: dict[str, Buffer] = {_key(b.room, b.peer): b for b in self.all}

    # --- finding ---------------------------------------------------------------------------

    def get(self, where: Destination) -> Buffer:
        """The buffer for `where`, opened (at the end of the bar) if there is none yet."""
        if where.room is None and where.peer is None:
            return self.current
        key = _key(where.room, where.peer)
        found = self._index.get(key)
        if found is not None:
            return found
        placeholder = self.all[0]
        if where.room is not None and placeholder.room is None and placeholder.peer is None:
            placeholder.room = where.room  # the buffer of a client in no room yet: the first room's
            self._index[key] = placeholder
            return placeholder
        buffer = Buffer(room=where.room, peer=where.peer)
        self.all.append(buffer)
        self._index[key] = buffer
        return buffer

    def find(self, target: str) -> Buffer | None:
        """`/buffer N|NAME`: a number from 1, `#room`, a room or a person's name."""
        if target.isdigit():
            index = int(target) - 1
            return self.all[index] if 0 <= index < len(self.all) else None
        for buffer in self.all:  # the exact label first: "bob" is the conversation, "#bob" the room
            if buffer.label.casefold() == target.casefold():
                return buffer
        room = target.removeprefix("#").lower()
        return next((buffer for buffer in self.all if buffer.room == room), None)

    def step(self, by: int) -> Buffer:
        """The next (`by` = 1) or previous (-1) buffer, round the bar."""
        index = self.all.index(self.current)
        return self.all[(index + by) % len(self.all)]

    # --- lines -----------------------------------------------------------------------------

    def add(self, buffer: Buffer, lines: list[str], unread: bool = False, highlight: bool = False,
            seq: int = 0) -> bool:
        """Keep `lines` in `buffer`; True if they are to be drawn now (the current buffer,
        following the bottom)."""
        buffer.lines.extend(lines)
        if seq > 0 and (buffer.oldest_seq is None or seq < buffer.oldest_seq):
            buffer.oldest_seq = seq
        if len(buffer.lines) > MAX_LINES:
            cut = len(buffer.lines) - MAX_LINES
            del buffer.lines[:cut]
            buffer.seen = max(0, buffer.seen - cut)
        if buffer is not self.current:
            buffer.unread += unread
            buffer.highlight = buffer.highlight or highlight
            return False
        if buffer.scroll > 0:
            buffer.scroll += len(lines)  # the page in view stays where it is
            buffer.below += len(lines)
            return False
        return True

    def close(self, buffer: Buffer) -> None:
        """Drop `buffer`; if it was on screen, the first buffer left becomes current (a
        placeholder if none is left)."""
        self.all.remove(buffer)
        self._index.pop(_key(buffer.room, buffer.peer), None)
        if not self.all:
            self.all = [Buffer()]
        if buffer is self.current:
            self.current = self.all[0]

    # --- what is drawn ---------------------------------------------------------------------

    def switch(self, buffer: Buffer, page: int) -> list[str]:
        """Make `buffer` current; the lines to draw: its last page, with the marker line where
        you left it if anything arrived since."""
        if buffer is not self.current:
            self.current.seen = len(self.current.lines)
            self.current.scroll = self.current.below = 0
        self.current = buffer
        buffer.unread, buffer.highlight = 0, False
        buffer.scroll = buffer.below = 0
        lines = list(buffer.lines)
        if 0 < buffer.seen < len(lines):  # a buffer never looked at has no "since"
            lines.insert(buffer.seen, MARKER)
        buffer.seen = len(buffer.lines)
        return lines[-page:] if page > 0 else lines

    def page_up(self, page: int) -> list[str]:
        buffer = self.current
        buffer.scroll = min(buffer.scroll + page, max(0, len(buffer.lines) - page))
        return self._window(page)

    def page_down(self, page: int) -> list[str]:
        buffer = self.current
        buffer.scroll = max(0, buffer.scroll - page)
        if buffer.scroll == 0:
            buffer.below = 0
        return self._window(page)

    def _window(self, page: int) -> list[str]:
        lines = self.current.lines
        end = len(lines) - self.current.scroll
        return lines[max(0, end - page):end]

    def search(self, text: str) -> list[str]:
        """The current buffer's lines holding `text` (case-insensitive), oldest first."""
        folded = text.casefold()
        return [line for line in self.current.lines if folded in line.casefold()]

    def bar(self, width: int | None = None) -> str:
        """Every buffer with its number and unread count, `!` marking a mention or a private
        message; the current one in brackets (as weechat's hotlist). Wider than `width`: only
        the current buffer and those with something unread (cut at `width` if still too wide)."""
        full = self._bar(self.all)
        if width is None or len(full) <= width:
            return full
        busy = self._bar([buffer for buffer in self.all if buffer is self.current or buffer.unread])
        return busy if len(busy) <= width else busy[:max(0, width - 3)] + "..."

    def _bar(self, shown: list[Buffer]) -> str:
        items = []
        for number, buffer in enumerate(self.all, 1):
            if buffer not in shown:
                continue
            item = f"{number}:{buffer.label}"
            if buffer is self.current:
                if buffer.scroll:
                    new = f"; {buffer.below} new below" if buffer.below else ""
                    item += f" (scrolled up{new})"
                item = f"[{item}]"
            elif buffer.unread:
                item += f"({buffer.unread}{'!' if buffer.highlight else ''})"
            items.append(item)
        return " ".join(items)
