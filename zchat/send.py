"""`zchat send`: deliver one message and exit 0 once the broker has accepted it."""

from __future__ import annotations

import sys
from collections.abc import Callable

from zchat import limits as L
from zchat.client import ChatClient, ClientEvent, JoinError, SendError
from zchat.commands import split_lines, split_text, too_long
from zchat.events import Status, StatusState
from zchat.protocol import DEFAULT_ROOM, Code, Error, normalize_room, valid_name

EXIT_OK, EXIT_REFUSED, EXIT_INVALID, EXIT_TIMEOUT = 0, 1, 2, 3


def run_send(make_client: Callable[[list[str], Callable[[ClientEvent], None]], ChatClient],
             name: str, text: str, room: str | None, to: str | None, timeout: float = 10.0,
             split: bool = False, create: bool = False) -> int:
    """Send, wait for the broker's confirmation, stop. Returns an exit code.

    To a room it is a `post`: nobody joins or leaves, so the room sees the message alone. A
    room that does not exist is refused unless `create`. A private message (`to`) joins the
    chat in no room, so no room sees that either. A text over the limit is invalid input
    unless `split`: then it goes as several messages, cut at spaces, in order."""
    def fail(code: int, reason: str) -> int:
        print(f"zchat send: {reason}", file=sys.stderr, flush=True)
        return code

    if not text.strip():
        return fail(EXIT_INVALID, "nothing to send")
    if len(text) > L.MAX_TEXT_CHARS and not split:
        return fail(EXIT_INVALID, f"{too_long(text, L.MAX_TEXT_CHARS)}; --split sends it as several messages")
    lines = text.strip("\n").count("\n") + 1  # line breaks are kept (one message of several lines)
    if lines > L.MAX_TEXT_LINES and not split:
        return fail(EXIT_INVALID, f"message too long ({lines} lines, the limit is {L.MAX_TEXT_LINES}); "
                    "--split sends it as several messages")
    pieces = (split_lines(text.strip("\n"), L.MAX_TEXT_CHARS, L.MAX_TEXT_LINES) if lines > 1
              else split_text(text, L.MAX_TEXT_CHARS))
    if not valid_name(name):
        return fail(EXIT_INVALID, f"invalid name {name!r}")
    if to is not None and not valid_name(to):
        return fail(EXIT_INVALID, f"invalid recipient {to!r}")
    target_room = normalize_room(room or DEFAULT_ROOM)
    if target_room is None:
        return fail(EXIT_INVALID, f"invalid room {room!r}")

    refusals: list[Error] = []

    def on_event(event: ClientEvent) -> None:
        if isinstance(event, Error) and event.ref is not None:
            refusals.append(event)
        elif isinstance(event, Status) and event.state == StatusState.KEY_CHANGED:  # not sent
            refusals.append(Error(seq=0, ts=event.ts, code=Code.KEY_CHANGED, detail=event.detail))

    def refused() -> int:
        error = refusals[0]
        if error.code == Code.NO_SUCH_ROOM:
            return fail(EXIT_REFUSED, f"{error.detail}; --create makes it")
        if error.code in ("unreachable", "timeout"):
            return fail(EXIT_TIMEOUT, error.detail)
        # Refused by the broker, or here (a message too long is invalid input).
        return fail(EXIT_INVALID if error.code == Code.TOO_LARGE else EXIT_REFUSED, error.detail)

    def unconfirmed() -> int:
        code, reason = client.diagnose()
        if code != "unreachable":
            reason = f"the broker did not confirm the message within {timeout:g} s"
        return fail(EXIT_TIMEOUT, reason)

    client = make_client([], on_event)  # no room: nothing to subscribe to but our own stream
    client.start()
    resumed = True  # a post never joins: nothing to leave
    try:
        if to is not None:
            try:
                resumed = client.join(name, timeout=timeout).resumed
            except JoinError as exc:
                slow = exc.code in ("unreachable", "timeout")
                return fail(EXIT_TIMEOUT if slow else EXIT_REFUSED, str(exc))
        for piece in pieces:  # one at a time: a refusal stops the rest
            try:
                if to is not None:
                    client.direct(to, piece)
                else:
                    client.post(piece, target_room, name, create=create)
            except SendError as exc:
                return fail(EXIT_REFUSED, str(exc))
            if not client.wait_delivered(timeout):
                return unconfirmed()
            if refusals:
                return refused()
        return EXIT_OK
    finally:
        client.close(leave=not resumed)
