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

from zchat.client import JoinError, SendError
from zchat.clientcore import ClientApi
from zchat.commands import COMMANDS, UsageError, help_text, parse, split_lines, split_text, too_long
from zchat.events import ClientEvent, Connection, Status, StatusState
from zchat.limits import DEFAULT_HISTORY, MAX_TEXT_CHARS, MAX_TEXT_LINES, MUTE_DEFAULT_SECONDS
from zchat.protocol import Code, Joined, Left, LeftReason, normalize_room
from zchat.render import DEFAULT_CLOCK, Days, View, clock, mentions, render

RETRY_NAME = {Code.NAME_TAKEN, Code.INVALID_NAME}
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
        self.clock_format = clock_format  # the config file's timestamp_format
        self.hyperlinks = hyperlinks  # URLs as OSC 8 links (only with colours)
        self.log = log  # log_dir: each event to its buffer's file (zchat.chatlog), with our name

    def attach(self, client: Client) -> None:
        self.client = client
        rooms = client.snapshot.rooms
        self.room = rooms[0] if rooms else None

    def view(self) -> View:
        return View(me=self.client.snapshot.name if self.client else None, room=self.room, color=self.color,
                    clock_format=self.clock_format, hyperlinks=self.hyperlinks, days=self.days)

    def show(self, text: str) -> None:
        with self._lock:  # else `release` could empty the hold between our test and append
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
            if self.log is not None:
                self.log(event, me)
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
        elif name == "leave":
            self._leave(args[0] if args else None)
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
        room = f"#{self.room}" if self.room else "no room"
        rooms = f" (+{len(view.rooms) - 1} more)" if len(view.rooms) > 1 else ""
        return f" {room}{rooms} | {view.name} | {state} | {view.online} online "


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


def run_interactive(make_client: ClientFactory, name: str | None, look: Look = Look()) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
    from prompt_toolkit.patch_stdout import patch_stdout

    session = Session(color=use_color(sys.stdout))
    look.apply(session)
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
            quit_message = chat_prompt.prompt(session.prompt, pre_run=show_held)
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
