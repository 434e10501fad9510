"""The terminal front ends: an interactive prompt_toolkit line, or plain pipes.

Both sit on the client library and show what `render` makes of each event.
The interactive one keeps the input line intact while messages arrive
(prompt_toolkit's patch_stdout redraws it below whatever is printed).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import TextIO

from zchat.client import ChatClient, ClientEvent, JoinError
from zchat.protocol import Code
from zchat.render import render

HELP = """Commands:
  /help             show this help
  /quit [message]   leave the chat (Ctrl-D or Ctrl-C also leave cleanly)
Anything else you type is sent to the room."""

ClientFactory = Callable[[str, Callable[[ClientEvent], None]], ChatClient]
RETRY_NAME = {Code.NAME_TAKEN, Code.INVALID_NAME}


def _print_event(event: ClientEvent) -> None:
    line = render(event)
    if line is not None:
        print(line, flush=True)


def _connect(make_client: ClientFactory, name: str) -> ChatClient:
    client = make_client(name, _print_event)
    client.start()
    try:
        client.join(name)
    except JoinError:
        client.close()
        raise
    return client


def _handle_command(client: ChatClient, line: str) -> str | None:
    """Run a slash command; return a leave message when the user quits."""
    command, _, rest = line.partition(" ")
    if command == "/quit":
        return rest.strip()
    if command == "/help":
        print(HELP, flush=True)
    else:
        print(f"! unknown command {command}; type /help", flush=True)
    return None


def run_interactive(make_client: ClientFactory, name: str | None) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    session: PromptSession[str] = PromptSession()
    client: ChatClient | None = None
    while client is None:
        try:
            while not name:
                name = session.prompt("Enter your name: ").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        try:
            client = _connect(make_client, name)
        except JoinError as exc:
            print(f"! {exc}", file=sys.stderr, flush=True)
            if exc.code not in RETRY_NAME:
                return 1
            name = None
    quit_message = ""
    with patch_stdout(raw=True):
        while True:
            try:
                line = session.prompt(lambda: f"#{client.rooms[0]}> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                continue
            if line.startswith("/"):
                said = _handle_command(client, line)
                if said is not None:
                    quit_message = said
                    break
                continue
            client.say(line)
    client.wait_delivered(2.0)
    client.close(quit_message)
    return 0


def run_plain(make_client: ClientFactory, name: str | None, stdin: TextIO = sys.stdin) -> int:
    """Scripts and pipes: each input line is a message; output is plain lines."""
    if not name:
        print("Enter your name: ", end="", flush=True)
        name = stdin.readline().strip()
    try:
        client = _connect(make_client, name)
    except JoinError as exc:
        print(f"zchat: {exc}", file=sys.stderr, flush=True)
        return 1
    # SIGTERM leaves like EOF does: a clean leave notice, not a timeout.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    quit_message = ""
    try:
        for raw in stdin:
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                said = _handle_command(client, line)
                if said is not None:
                    quit_message = said
                    break
                continue
            client.say(line)
    except KeyboardInterrupt:
        pass
    delivered = client.wait_delivered(10.0)
    client.close(quit_message)
    if not delivered:
        print("zchat: some messages were not confirmed by the broker", file=sys.stderr)
        return 1
    return 0
