"""Slash commands: parsing what a person typed, and the help text. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from zchat.limits import DEFAULT_HISTORY, MAX_HISTORY_PER_REQUEST, MUTE_DEFAULT_SECONDS, MUTE_MAX_SECONDS


@dataclass(frozen=True)
class Spec:
    usage: str  # arguments, e.g. "NAME TEXT"
    summary: str
    min_args: int  # words required (before the free text, if any)
    free_text: bool = False  # the rest of the line is one argument
    text_required: bool = False


COMMANDS: dict[str, Spec] = {
    "/msg": Spec("NAME TEXT", "send a private message only NAME can read", 1, True, True),
    "/me": Spec("ACTION", "describe what you do: * alice waves", 0, True, True),
    "/nick": Spec("NEW", "change your name, if NEW is free", 1),
    "/who": Spec("[ROOM]", "who is online, everywhere or in ROOM", 0),
    "/join": Spec("ROOM", "join a room (or switch to it) and talk there", 1),
    "/leave": Spec("[ROOM]", "leave ROOM (default: the current room)", 0),
    "/rooms": Spec("", "list the rooms and how many are in each", 0),
    "/history": Spec("[N]", "show the last N stored events of the current room (default "
                     f"{DEFAULT_HISTORY})", 0),
    "/topic": Spec("[TEXT]", "show the current room's topic, or set it to TEXT ('-' clears it)", 0, True),
    "/away": Spec("[MESSAGE]", "mark yourself away: shown in /who, and told once to whoever writes "
                  "to you privately", 0, True),
    "/back": Spec("", "you are back: no longer marked away", 0),
    "/ignore": Spec("[NAME]", "hide what NAME says, bound to their key (a new name does not escape "
                    "it), kept across restarts; alone: list whom you ignore", 0),
    "/unignore": Spec("NAME", "stop ignoring NAME", 1),
    "/kick": Spec("NAME [REASON]", "admin: remove NAME from the chat", 1, True),
    "/ban": Spec("NAME [REASON]", "admin: remove NAME and refuse their key from now on", 1, True),
    "/mute": Spec("NAME [SECONDS]", "admin: NAME may not speak for SECONDS (default "
                  f"{MUTE_DEFAULT_SECONDS}; 0 lifts it)", 1),
    "/unban": Spec("NAME|KEY", "admin: let a banned key (or the last key to hold NAME) come back", 1),
    "/bans": Spec("", "admin: list the banned keys", 0),
    "/buffer": Spec("N|NAME", "show buffer N of the bar, or the room or person NAME", 1),
    "/query": Spec("NAME", "open a private conversation with NAME: what you type there goes to NAME", 1),
    "/search": Spec("TEXT", "find TEXT in this buffer, then in the room's stored history", 0, True, True),
    "/reconnect": Spec("", "come back after being kicked (or after a rejoin found your name taken)", 0),
    "/quit": Spec("[MESSAGE]", "leave the chat; others see MESSAGE", 0, True),
    "/help": Spec("[COMMAND]", "list the commands, or explain one", 0),
}

# Text that starts with "//" is sent as a message starting with "/".
ESCAPE = "//"


@dataclass(frozen=True)
class Command:
    name: str  # "say" for plain text, else the command without "/": "msg", "join", ...
    args: tuple[str, ...]


class UsageError(Exception):
    """The line names a command but misuses it; the message says how to use it."""


def usage(command: str) -> str:
    spec = COMMANDS[command]
    return f"usage: {command} {spec.usage}".rstrip()


def parse(line: str) -> Command:
    """Turn one input line into a Command, or raise UsageError."""
    if not line.startswith("/"):
        return Command("say", (line,))
    if line.startswith(ESCAPE):
        return Command("say", (line[1:],))
    word, _, rest = line.partition(" ")
    command = word.lower()
    spec = COMMANDS.get(command)
    if spec is None:
        raise UsageError(f"unknown command {word}; type /help for the list")
    rest = rest.strip()
    if spec.free_text:
        parts = rest.split(None, spec.min_args)
        words, text = parts[: spec.min_args], " ".join(parts[spec.min_args:])
        if len(words) < spec.min_args or (spec.text_required and not text):
            raise UsageError(usage(command))
        args = (*words, text)
    else:
        args = tuple(rest.split())
        required = spec.min_args
        optional = spec.usage.count("[")
        if not required <= len(args) <= required + optional:
            raise UsageError(usage(command))
        if command == "/mute" and len(args) > 1 and not (
                args[1].isdigit() and int(args[1]) <= MUTE_MAX_SECONDS):
            raise UsageError(f"usage: /mute NAME [SECONDS], SECONDS from 0 to {MUTE_MAX_SECONDS}")
        if command == "/history" and args and not (
                args[0].isdigit() and 0 < int(args[0]) <= MAX_HISTORY_PER_REQUEST):
            raise UsageError(f"usage: /history [N], N from 1 to {MAX_HISTORY_PER_REQUEST}")
    return Command(command[1:], args)


def help_text(command: str | None = None) -> str:
    if command:
        key = command if command.startswith("/") else "/" + command
        spec = COMMANDS.get(key.lower())
        if spec is None:
            return f"no command {command}; type /help for the list"
        return f"{usage(key.lower())}\n  {spec.summary}"
    width = max(len(f"{name} {spec.usage}") for name, spec in COMMANDS.items())
    lines = ["Commands:"]
    for name, spec in COMMANDS.items():
        lines.append(f"  {f'{name} {spec.usage}'.ljust(width)}  {spec.summary}")
    lines.append("Anything else is sent to the current room (start with // to send a leading /).")
    lines.append("Up/Down: input history; Tab: complete commands, names and rooms; Ctrl-D/Ctrl-C: leave.")
    lines.append("Alt+Enter (or Esc then Enter): a line break; a paste of several lines is one message.")
    lines.append("Alt+1..9, Ctrl-N/Ctrl-P: switch buffers; PageUp/PageDown: scroll the buffer.")
    return "\n".join(lines)


def split_text(text: str, limit: int) -> list[str]:
    """Cut an over-long line into pieces of at most `limit` characters, at spaces where
    there are any (as IRC clients do); a word longer than `limit` is cut inside."""
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = rest.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def split_lines(text: str, limit: int, max_lines: int) -> list[str]:
    """Cut a message of several lines into messages of at most `max_lines` lines and `limit`
    characters, between lines (a line longer than `limit` is cut as split_text cuts it)."""
    pieces: list[str] = []
    chunk: list[str] = []
    size = 0  # of "\n".join(chunk)
    for line in text.split("\n"):
        for part in split_text(line, limit) if len(line) > limit else [line]:
            if chunk and (len(chunk) >= max_lines or size + 1 + len(part) > limit):
                pieces.append("\n".join(chunk))
                chunk = []
            size = size + 1 + len(part) if chunk else len(part)
            chunk.append(part)
    if chunk:
        pieces.append("\n".join(chunk))
    return [piece for piece in pieces if piece.strip()]


def too_long(text: str, limit: int) -> str:
    """What the person is told about a line over the limit (the same words everywhere)."""
    return f"message too long ({len(text)} characters, the limit is {limit})"
