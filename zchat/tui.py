"""The terminal front ends: an interactive prompt_toolkit line, or plain pipes.

Both sit on the client library, share `Session` (the current room and what
each command does) and show what `render` makes of each event. The
interactive one keeps the input line intact while messages arrive
(prompt_toolkit's patch_stdout redraws it below whatever is printed).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from zchat.buffers import Buffer, Buffers, Destination, counts, destination
from zchat.client import JoinError, SendError
from zchat.clientcore import ClientApi
from zchat.commands import COMMANDS, UsageError, help_text, parse, split_lines, split_text, too_long
from zchat.events import ClientEvent, Connection, Replay, ReplayKind, Status, StatusState
from zchat.limits import (
    DEFAULT_HISTORY,
    MAX_HISTORY_PER_REQUEST,
    MAX_TEXT_CHARS,
    MAX_TEXT_LINES,
    MUTE_DEFAULT_SECONDS,
)
from zchat.protocol import Action, Code, Joined, Left, LeftReason, Message, Muted, Renamed, normalize_room
from zchat.render import DEFAULT_CLOCK, Days, View, clock, mentions, render

RETRY_NAME = {Code.NAME_TAKEN, Code.INVALID_NAME}
CLEAR_SCREEN = "\x1b[H\x1b[2J"  # a buffer is drawn again from the top of a cleared screen
BUFFER_KEYS = {f"escape {n}": f"alt-{n}" for n in range(1, 10)} | {
    "c-n": "c-n", "c-p": "c-p", "pageup": "pageup", "pagedown": "pagedown"}  # prompt_toolkit -> ours
EXIT_BANNED = 4  # the broker banned this key (or it was revoked): documented in the README


@dataclass(frozen=True)
class Look:
    """The config file's settings for the chat's screen and its logs."""

    clock_format: str = DEFAULT_CLOCK  # timestamp_format
    hyperlinks: bool = True  # OSC 8 links, when colours are on
    log_dir: Path | None = None

    def apply(self, session: Session) -> None:
        session.clock_format = self.clock_format
        session.hyperlinks = self.hyperlinks and session.color
        if self.log_dir is not None:
            from zchat.chatlog import ChatLog

            try:
                session.log = ChatLog(self.log_dir, self.clock_format, warn=session.show)
            except OSError as exc:  # said on the screen; the chat goes on without its log
                session.show(f"! log_dir: cannot use {self.log_dir}: {exc.strerror}; not logging")


Client = ClientApi  # zchat.client.ChatClient, or a test's in-process stand-in
ClientFactory = Callable[[str, Callable[[ClientEvent], None]], Client]


def use_color(stream: TextIO) -> bool:
    """Colours only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


_output_lock = threading.Lock()  # the I/O thread and the input thread both write lines


def write_line(text: str, stream: TextIO | None = None) -> None:
    """One whole line, in one write, flushed: lines from two threads (or stdout and stderr
    into one pipe) never glue together."""
    stream = stream or sys.stdout
    with _output_lock:
        stream.write(text + "\n")
        stream.flush()


class Session:
    """One person's chat: the current room, and what each typed line does."""

    def __init__(self, color: bool, write: Callable[[str], None] | None = None,
                 on_banned: Callable[[], None] | None = None, own_arrival: bool = True,
                 now: Callable[[], float] = time.time, clock_format: str = DEFAULT_CLOCK,
                 hyperlinks: bool = False,
                 log: Callable[[ClientEvent, str | None], None] | None = None) -> None:
        self.client: Client | None = None
        self.room: str | None = None
        self.color = color
        self._write = write or write_line
        # Events arrive on the I/O thread, typed lines on the UI thread. Re-entrant: on_event
        # shows its line while holding it.
        self._lock = threading.RLock()
        self._held: list[str] | None = None  # lines kept back while the screen is not ready
        self.exit_code = 0
        self.on_banned = on_banned  # end the front end: there is no way back with this key
        # Called (on the I/O thread) once the client has stopped working: the front end ends.
        self.on_failure: Callable[[], None] | None = None
        self.own_arrival = own_arrival  # show "- me has joined the chat." (not in a pipe: noise)
        self.days = Days(now())  # day-change lines, from today's date on
        self._now = now
        self.clock_format = clock_format  # the config file's timestamp_format
        self.hyperlinks = hyperlinks  # URLs as OSC 8 links (only with colours)
        self.log = log  # log_dir: each event to its buffer's file (zchat.chatlog), with our name
        # The interactive client's view: one buffer per conversation (None: one flow of lines).
        self.buffers: Buffers | None = None
        self._redraw: Callable[[list[str]], None] = self._clear_and_write
        self.page = 20  # lines in a page (PageUp): the terminal's height, as the TUI sets it
        self._searches: dict[str, str] = {}  # room -> text: its stored history is being searched

    def attach(self, client: Client) -> None:
        self.client = client
        rooms = client.snapshot.rooms
        self.room = rooms[0] if rooms else None
        for room in rooms if self.buffers is not None else ():
            self.buffers.get(Destination(room=room))

    def view(self) -> View:
        return self.view_in(self.room, self.days)

    def view_in(self, room: str | None, days: Days) -> View:
        """How lines look in `room` (None: a private conversation), with those day lines."""
        return View(me=self.client.snapshot.name if self.client else None, room=room, color=self.color,
                    clock_format=self.clock_format, hyperlinks=self.hyperlinks, days=days)

    def show(self, text: str) -> None:
        with self._lock:  # else `release` could empty the hold between our test and append
            if self.buffers is not None and not self.buffers.add(self.buffers.current, text.split("\n")):
                return  # scrolled up: kept for later
            self._output(text)

    def _output(self, text: str) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(text)
            else:
                self._write(text)

    def hold(self) -> None:
        """Keep lines back (from now until `release`)."""
        with self._lock:
            self._held = []

    def release(self, write: Callable[[str], None] | None = None) -> None:
        """Show the lines kept back (with `write`, if given), then show lines as they come."""
        with self._lock:
            held, self._held = self._held or [], None
            for text in held:
                (write or self._write)(text)

    # --- incoming -------------------------------------------------------------

    def on_event(self, event: ClientEvent) -> None:
        if self.buffers is not None:
            self._on_buffered_event(event)
            self._after_event(event)
            return
        with self._lock:
            client = self.client
            me = client.snapshot.name if client else None
            if isinstance(event, Joined) and event.name == me and not event.chat:
                self.room = event.room  # a room we just entered becomes the current one
            elif (isinstance(event, Left) and event.name == me and event.reason == LeftReason.PART
                  and event.room == self.room):
                remaining = [room for room in (client.snapshot.rooms if client else ()) if room != event.room]
                self.room = remaining[0] if remaining else None
            line = render(event, self.view())
            if isinstance(event, Joined) and event.chat and event.name == me and not self.own_arrival:
                line = None
            if line is not None:
                bell = "\a" if self.color and mentions(event, me) else ""
                self.show(line + bell)
        self._after_event(event)

    def _after_event(self, event: ClientEvent) -> None:
        if self.log is not None:
            client = self.client
            self.log(event, client.snapshot.name if client else None)
        if isinstance(event, Status) and event.state == StatusState.BANNED:
            self.exit_code = EXIT_BANNED
            if self.on_banned is not None:
                self.on_banned()
        if isinstance(event, Status) and event.state == StatusState.FAILED and self.on_failure is not None:
            self.on_failure()

    # --- outgoing -------------------------------------------------------------

    def execute(self, text: str) -> str | None:
        """Run what was typed or pasted. Several lines are one message, line breaks and
        indentation kept (a paste of code), also after /me or /msg NAME; lines that start with
        another command run one by one, in order, as if typed one after the other.

        Returns the leave message when the person quits, else None.
        """
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if len(lines) > 1 and self._one_message(lines[0]):
            lines = ["\n".join(lines)]
        for line in lines:
            if not line.strip():
                continue
            try:
                quit_message = self._execute_line(line)
            except (UsageError, SendError) as exc:
                self.show(f"! {exc}")
                continue
            if quit_message is not None:
                return quit_message
        return None

    @staticmethod
    def _one_message(first: str) -> bool:
        """Do the lines starting with `first` make one message (not a list of commands)?"""
        if not first.startswith("/") or first.startswith("//"):
            return True
        return first.split(None, 1)[0].lower() in ("/me", "/msg")

    def _execute_line(self, line: str) -> str | None:
        client = self.client
        assert client is not None
        command = parse(line)
        name, args = command.name, command.args
        if name == "quit":
            return args[0]
        if name == "help":
            self.show(help_text(args[0] if args else None))
        elif name == "say" and self._peer() is not None:
            for piece in self._pieces(args[0]):  # a private buffer: plain lines go to that person
                client.direct(self._peer() or "", piece)
        elif name == "say":
            room = self._current()
            for piece in self._pieces(args[0]):
                client.say(piece, room)
        elif name == "me":
            room = self._current()
            for piece in self._pieces(args[0]):
                client.action(piece, room)
        elif name == "msg":
            for piece in self._pieces(args[1]):
                client.direct(args[0], piece)
        elif name == "nick":
            client.nick(args[0])
        elif name == "who":
            client.who(args[0] if args else None)
        elif name == "rooms":
            client.list_rooms()
        elif name in ("kick", "ban"):
            client.moderate("kick" if name == "kick" else "ban", args[0], reason=args[1])
        elif name == "mute":
            client.moderate("mute", args[0], seconds=int(args[1]) if len(args) > 1 else MUTE_DEFAULT_SECONDS)
        elif name == "topic":
            text = args[0] or None
            client.topic(self._current(), "" if text == "-" else text)
        elif name == "away":
            client.away(args[0] or "away")
        elif name == "back":
            client.away("")
        elif name == "ignore":
            client.ignore(args[0] if args else None)
        elif name == "unignore":
            client.unignore(args[0])
        elif name == "unban":
            client.unban(args[0])
        elif name == "bans":
            client.bans()
        elif name == "history":
            client.history(self._current(), int(args[0]) if args else DEFAULT_HISTORY)
        elif name == "join":
            self._join(args[0])
        elif name == "leave" and not args and self._peer() is not None:
            self._close_private()
        elif name == "leave":
            self._leave(args[0] if args else None)
        elif name in ("buffer", "query", "search"):
            self._buffer_command(name, args)
        elif name == "reconnect":
            client.reconnect()
        return None

    def _pieces(self, text: str) -> list[str]:
        """A line over the broker's limit goes as several messages, cut at spaces (several
        lines: between lines, at most MAX_TEXT_LINES each); the person is told, since the
        others see it arrive in parts."""
        lines = text.count("\n") + 1
        if len(text) <= MAX_TEXT_CHARS and lines <= MAX_TEXT_LINES:
            return [text]
        if lines > 1:
            pieces = split_lines(text, MAX_TEXT_CHARS, MAX_TEXT_LINES)
            why = (too_long(text, MAX_TEXT_CHARS) if len(text) > MAX_TEXT_CHARS
                   else f"message too long ({lines} lines, the limit is {MAX_TEXT_LINES})")
        else:
            pieces, why = split_text(text, MAX_TEXT_CHARS), too_long(text, MAX_TEXT_CHARS)
        self.show(f"* {why}: sent as {len(pieces)} messages.")
        return pieces

    def _current(self) -> str:
        peer = self._peer()
        if peer is not None:
            raise SendError(f"this is your private conversation with {peer}: switch to a room for that")
        if self.room is None:
            raise SendError("you are in no room: /join one first")
        return self.room

    def _join(self, raw: str) -> None:
        assert self.client is not None
        room = normalize_room(raw)
        if room is None:
            raise UsageError(f"invalid room name {raw!r}")
        if room in self.client.snapshot.rooms:
            self.room = room
            if self.buffers is not None:
                self._switch(self.buffers.get(Destination(room=room)))
            self.show(f"* Now talking in #{room}.")
        else:
            self.client.enter(room)

    def _leave(self, raw: str | None) -> None:
        assert self.client is not None
        room = normalize_room(raw) if raw else self.room
        if room is None or room not in self.client.snapshot.rooms:
            raise UsageError(f"you are not in {'#' + room if room else 'any room'}")
        self.client.part(room)

    # --- what the screen shows besides the messages ---------------------------

    def prompt(self) -> str:
        peer = self._peer()
        if peer is not None:
            return f"@{peer}> "
        return f"#{self.room}> " if self.room else "(no room)> "

    def status(self) -> str:
        if self.client is None:
            return ""
        view = self.client.snapshot
        state = {
            Connection.RECONNECTING: f"reconnecting since {clock(view.lost_since)}" if view.lost_since
            else "reconnecting",
            Connection.REJOIN_FAILED: "name taken: /nick NEW",
            Connection.REMOVED: "removed: /reconnect to come back",
        }.get(view.connection, str(view.connection))
        if view.pending and view.connection != Connection.CONNECTED:
            state += f", {view.pending} pending"
        room = f"#{self.room}" if self.room else f"@{self._peer()}" if self._peer() else "no room"
        rooms = f" (+{len(view.rooms) - 1} more)" if len(view.rooms) > 1 else ""
        return f" {room}{rooms} | {view.name} | {state} | {view.online} online "

    def bar(self, width: int | None = None) -> str:
        """The buffers (the hotlist), when there is more than one or the view is scrolled up."""
        buffers = self.buffers
        if buffers is None or (len(buffers.all) < 2 and not buffers.current.scroll):
            return ""
        return buffers.bar(width)

    # --- buffers: one per conversation (the interactive client's view) --------------------

    def use_buffers(self, redraw: Callable[[list[str]], None] | None = None) -> None:
        """Keep each room and private conversation in its own buffer; `redraw` draws a
        buffer's lines on a cleared screen (default: clear the terminal, then write them)."""
        self.buffers = Buffers(self.client.snapshot.rooms if self.client else ())
        if redraw is not None:
            self._redraw = redraw

    def _clear_and_write(self, lines: list[str]) -> None:
        self._output(CLEAR_SCREEN + "\n".join(lines))

    def _peer(self) -> str | None:
        """The person of the private buffer on screen, if that is one."""
        return self.buffers.current.peer if self.buffers is not None else None

    def press(self, key: str) -> None:
        """A buffer key: alt-1..alt-9, c-n, c-p, pageup, pagedown."""
        buffers = self.buffers
        if buffers is None:
            return
        with self._lock:
            if key.startswith("alt-"):
                target = buffers.find(key.removeprefix("alt-"))
                if target is not None:
                    self._switch(target)
            elif key in ("c-n", "c-p"):
                self._switch(buffers.step(1 if key == "c-n" else -1))
            elif key == "pageup":
                self._redraw(buffers.page_up(self.page))
            elif key == "pagedown" and buffers.current.scroll:
                self._redraw(buffers.page_down(self.page))

    def _switch(self, buffer: Buffer) -> None:
        assert self.buffers is not None
        with self._lock:
            lines = self.buffers.switch(buffer, self.page)
            self.room = buffer.room
            self._redraw(lines)

    def _buffer_command(self, name: str, args: tuple[str, ...]) -> None:
        buffers = self.buffers
        if buffers is None:
            raise UsageError(f"/{name} works in the interactive client only (on a terminal)")
        if name == "buffer":
            target = buffers.find(args[0])
            if target is None:
                raise UsageError(f"no buffer {args[0]}: the bar at the bottom lists them")
            self._switch(target)
        elif name == "query":
            self._switch(buffers.get(Destination(peer=args[0])))
        else:
            self._search(args[0])

    def _close_private(self) -> None:
        assert self.buffers is not None
        with self._lock:
            self.buffers.close(self.buffers.current)
            self._switch(self.buffers.current)

    def _search(self, text: str) -> None:
        """Lines of the buffer holding `text`; then, for a room, its stored history from
        before the buffer's first event (the answer comes as a history replay)."""
        assert self.buffers is not None and self.client is not None
        with self._lock:
            buffer = self.buffers.current
            found = self.buffers.search(text)
            head = f"--- {len(found)} line(s) matching {text!r} in {buffer.label} ---"
            if buffer.room is None:
                self._output("\n".join([head, *found, "--- end of search ---"]))
                return
            self._output("\n".join([head, *found]))
            self._searches[buffer.room] = text
        self.client.history(buffer.room, MAX_HISTORY_PER_REQUEST, before=buffer.oldest_seq)

    def _search_history(self, replay: Replay, me: str | None) -> None:
        text = self._searches.pop(replay.room)
        view = self.view_in(replay.room, Days(self._now()))  # older results show their date
        shown = [render(event, view) for event in replay.events]
        found = [line for line in shown if line is not None and text.casefold() in line.casefold()]
        where = "before this buffer" if self.buffers and any(
            b.room == replay.room and b.oldest_seq for b in self.buffers.all) else "of the room"
        head = f"--- {len(found)} stored event(s) matching {text!r} {where} ---"
        self._output("\n".join([head, *found, "--- end of search ---"]))

    def _on_buffered_event(self, event: ClientEvent) -> None:
        """An event into its conversation's buffer: drawn if that one is on screen, else
        counted in the bar."""
        buffers = self.buffers
        assert buffers is not None
        with self._lock:
            me = self.client.snapshot.name if self.client else None
            if (isinstance(event, Replay) and event.kind == ReplayKind.HISTORY
                    and event.room in self._searches):
                self._search_history(event, me)
                return
            where = destination(event, me)
            if isinstance(event, Joined) and event.name == me and not event.chat:
                self._switch(buffers.get(where))  # a room we just entered becomes the current one
            elif isinstance(event, Left) and event.name == me and event.reason == LeftReason.PART:
                self._close_room(event.room)
                where = Destination()  # said in the buffer on screen
            if isinstance(event, Joined) and event.chat and event.name == me and not self.own_arrival:
                return
            buffer = buffers.get(where)
            if buffer.days is None:  # each buffer draws its own day-change lines
                buffer.days = Days(self._now())
            line = render(event, self.view_in(buffer.room, buffer.days))
            if line is None:
                return
            unread, highlight = counts(event, me)
            seq = _first_seq(event) if where.room is not None else 0
            if buffers.add(buffer, line.split("\n"), unread, highlight, seq):
                self._output(line + ("\a" if self.color and mentions(event, me) else ""))
            elif where.peer is not None and not unread and buffer is not buffers.current:
                self.show(line)  # what you sent to someone from another buffer: shown where you are

    def _close_room(self, room: str) -> None:
        assert self.buffers is not None
        buffer = next((b for b in self.buffers.all if b.room == room), None)
        if buffer is None:
            return
        was_current = buffer is self.buffers.current
        self.buffers.close(buffer)
        if was_current:
            self._switch(self.buffers.current)


def _first_seq(event: ClientEvent) -> int:
    """The seq of a room event (the oldest of a replay's); 0 for anything else."""
    if isinstance(event, (Message, Action, Joined, Left, Muted, Renamed)):
        return event.seq
    if isinstance(event, Replay) and event.events:
        return min(e.seq for e in event.events)
    return 0


def _connect(make_client: ClientFactory, session: Session, name: str) -> Client:
    client = make_client(name, session.on_event)
    session.attach(client)
    client.start()
    try:
        client.join(name)
    except JoinError:
        client.close()
        raise
    session.attach(client)  # the welcome may have set the rooms
    return client


def _completer(session: Session):  # type: ignore[no-untyped-def]
    from prompt_toolkit.completion import Completer, Completion

    class ChatCompleter(Completer):
        def get_completions(self, document, complete_event):  # type: ignore[no-untyped-def]
            if session.client is None:
                return
            view = session.client.snapshot  # immutable: the I/O thread replaces it, never changes it
            before = document.text_before_cursor
            word = document.get_word_before_cursor(WORD=True)
            words = before.split()
            if before.startswith("/") and len(words) <= 1 and not before.endswith(" "):
                candidates: list[str] = list(COMMANDS)
            elif words[:1] in (["/join"], ["/leave"], ["/who"]):
                rooms = sorted(view.known_rooms)
                candidates = ["#" + room for room in rooms] if word.startswith("#") else rooms
            else:
                candidates = [name for name in sorted(view.members) if name != view.name]
            for candidate in candidates:
                if candidate.lower().startswith(word.lower()) and candidate != word:
                    yield Completion(candidate, start_position=-len(word))

    return ChatCompleter()


def _prompt_with_bar(session: Session) -> str | list[tuple[str, str]]:
    """The input line's prompt, under the buffers' bar when there is one (as weechat's)."""
    from prompt_toolkit.application import get_app

    size = get_app().output.get_size()
    session.page = max(1, size.rows - 3)  # a page: the terminal less the bar, input and status lines
    bar = session.bar(size.columns - 1)
    return [("reverse", bar), ("", "\n" + session.prompt())] if bar else session.prompt()


def _bind_buffer_keys(bindings, session: Session) -> None:  # type: ignore[no-untyped-def]
    """Alt+1..9, Ctrl+N/P: switch buffers; PageUp/PageDown: scroll the one on screen."""
    from prompt_toolkit.filters import has_completions

    for keys, name in BUFFER_KEYS.items():
        def press(event, name: str = name) -> None:  # type: ignore[no-untyped-def]
            session.press(name)

        # Ctrl+N/P still walk a completion menu while one is open.
        menu_keys = name in ("c-n", "c-p")
        bindings.add(*keys.split(), filter=~has_completions if menu_keys else True)(press)


def run_interactive(make_client: ClientFactory, name: str | None, look: Look = Look()) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
    from prompt_toolkit.patch_stdout import patch_stdout

    session = Session(color=use_color(sys.stdout))
    look.apply(session)
    session.use_buffers()
    # Until the chat prompt is up, what arrives is kept back: a line written straight to the
    # terminal while prompt_toolkit starts drawing could be drawn over.
    session.hold()
    prompt: PromptSession[str] = PromptSession()
    client: Client | None = None
    while client is None:
        try:
            while not name:
                name = prompt.prompt("Enter your name: ").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        try:
            client = _connect(make_client, session, name)
        except JoinError as exc:
            session.release()  # what came before the refusal
            session.hold()
            print(f"! {exc}", file=sys.stderr, flush=True)
            if exc.code not in RETRY_NAME:
                return 1
            name = None
    # One prompt for the whole chat: Enter runs the line and clears it, the prompt stays up.
    # Between prompts the terminal would be back in cooked mode and echo whatever was typed
    # ahead (a fast typist, a paste) as raw text among the messages.
    bindings = KeyBindings()

    @bindings.add("enter")
    def _run_line(event: KeyPressEvent) -> None:
        line = event.current_buffer
        text = line.text
        line.reset(append_to_history=bool(text.strip()))  # the broker's echo shows what was sent
        said = session.execute(text)
        if said is not None:
            event.app.exit(result=said)

    @bindings.add("escape", "enter")  # Alt+Enter (Esc, then Enter): a line break in the message
    def _line_break(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    _bind_buffer_keys(bindings, session)
    chat_prompt: PromptSession[str] = PromptSession(
        completer=_completer(session), complete_while_typing=False, key_bindings=bindings,
        erase_when_done=True, bottom_toolbar=session.status, refresh_interval=1.0)

    def end_prompt() -> None:  # on the prompt's own loop
        app = chat_prompt.app
        if app.future is not None and not app.future.done():
            app.exit(result="")

    def on_failure() -> None:  # on the I/O thread: hand it to the prompt's loop
        loop = chat_prompt.app.loop
        if loop is not None:
            loop.call_soon_threadsafe(end_prompt)

    session.on_failure = on_failure

    session.on_banned = on_failure
    if session.exit_code:  # banned before the prompt was up
        client.close(leave=False)
        return session.exit_code
    with patch_stdout(raw=True):
        def show_held() -> None:
            # Called once the application is registered (later lines go through it) and
            # before its first drawing: straight to the terminal, nothing to draw over yet.
            session.release(lambda text: print(text, file=sys.__stdout__, flush=True))
            if client.failure is not None:  # it stopped before the prompt was up
                end_prompt()

        try:
            quit_message = chat_prompt.prompt(lambda: _prompt_with_bar(session), pre_run=show_held)
        except (EOFError, KeyboardInterrupt):
            quit_message = ""
        finally:
            session.release()  # never left holding, however the prompt ended
    client.wait_delivered(2.0)
    client.close(quit_message)
    if client.failure is not None:
        print(f"zchat: {client.failure}", file=sys.stderr, flush=True)
        return 1
    return session.exit_code


def run_plain(make_client: ClientFactory, name: str | None, stdin: TextIO = sys.stdin,
              look: Look = Look()) -> int:
    """Scripts and pipes: each input line is a message or command; output is plain lines."""
    if not name:
        print("Enter your name: ", end="", flush=True)
        name = stdin.readline().strip()
    # Banned: stop reading at once (the signal interrupts a read of stdin; SIGTERM is ours below).
    session = Session(color=False, on_banned=lambda: signal.pthread_kill(main, signal.SIGTERM),
                      own_arrival=False)
    look.apply(session)
    main = threading.main_thread().ident or 0
    try:
        client = _connect(make_client, session, name)
    except JoinError as exc:
        write_line(f"zchat: {exc}", sys.stderr)
        return 1
    # SIGTERM leaves like EOF does: a clean leave notice, not a timeout.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # The client stopped working: stop reading input too (a blocked read ends on the signal).
    session.on_failure = lambda: os.kill(os.getpid(), signal.SIGTERM)
    quit_message = ""
    try:
        for raw in stdin if client.failure is None else ():
            said = session.execute(raw.rstrip("\r\n"))
            if said is not None:
                quit_message = said
                break
    except KeyboardInterrupt:
        pass
    if session.exit_code:
        client.close(leave=False)
        return session.exit_code
    delivered = client.wait_delivered(10.0)
    client.close(quit_message)
    if client.failure is not None:
        print(f"zchat: {client.failure}", file=sys.stderr, flush=True)
        return 1
    if not delivered:
        write_line("zchat: some messages were not confirmed by the broker", sys.stderr)
        return 1
    return 0
