"""`zchat history --host/--port`: a room's stored history, asked of the broker over the protocol.

What the user's own key may read, as any client reads it: `history` requests on a PUSH,
the answers on the key's private stream `u/<id>/` (sealed to it), page after page
(`before` = the oldest seq received) until the room's start, `--limit` or `--since`.

`HistoryPager` decides the requests and collects the events without sockets or a clock;
`fetch_history` is the shell around it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import zmq

from zchat import limits as L
from zchat.endpoints import Endpoints
from zchat.keys import KeyPair
from zchat.protocol import (
    SYSTEM_TOPIC,
    Code,
    Error,
    History,
    HistoryRequest,
    ProtocolError,
    decode_publication,
    encode_client_message,
    private_topic,
)
from zchat.sealing import SealError, box_for, open_publication
from zchat.transport import BUSY_STATUS, HandshakeWatch, curve_client

RESEND_AFTER = 1.0  # seconds without an answer before asking again (u/<id>/ may not be installed yet)
EXIT_NO_ANSWER = 1
EXIT_REFUSED = 3


class NoAnswer(Exception):
    """The broker did not give the history; `code` is the exit code, the message the reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class HistoryPager:
    """Pages through one room's history, newest first, until `limit` events that `keep`
    accepts, an event older than `since`, or the room's start."""

    room: str
    limit: int | None = None
    since: float | None = None
    grep: str | None = None
    events: list[bytes] = field(default_factory=list)  # kept, newest first
    before: int | None = None
    done: bool = False
    found_any: bool = False  # the room has stored events at all

    def request(self, ref: int) -> HistoryRequest:
        left = L.MAX_HISTORY_PER_REQUEST if self.limit is None else self.limit - len(self.events)
        return HistoryRequest(room=self.room, before=self.before, ref=ref,
                              limit=max(1, min(L.MAX_HISTORY_PER_REQUEST, left)))

    def take(self, answer: History, asked: int) -> None:
        """One answer (oldest first) to a request for `asked` events."""
        for raw in reversed(answer.events):
            event = json.loads(bytes(raw))
            self.found_any = True
            if self.since is not None and float(event.get("ts", 0)) < self.since:
                self.done = True
                return
            if self._matches(event):
                self.events.append(bytes(raw))
                if self.limit is not None and len(self.events) >= self.limit:
                    self.done = True
                    return
        if not answer.events or (len(answer.events) < asked and not answer.more):
            self.done = True  # the room's start (or what retention left of it)
            return
        self.before = json.loads(bytes(answer.events[0]))["seq"]
        if self.before <= 1:
            self.done = True

    def _matches(self, event: dict) -> bool:
        if not self.grep:
            return True
        return self.grep.lower() in f"{event.get('name', '')} {event.get('text', '')}".lower()

    def oldest_first(self) -> list[bytes]:
        return list(reversed(self.events))


def fetch_history(endpoints: Endpoints, server_key: bytes, keypair: KeyPair, pager: HistoryPager,
                  timeout: float) -> list[bytes]:
    """The pager's events (stored JSON, oldest first), asked of the broker with `keypair`.
    Raises NoAnswer when the broker is unreachable, refuses the key, or stops answering."""
    ctx = zmq.Context()
    sub = curve_client(ctx, zmq.SUB, endpoints, server_key, keypair)
    push = curve_client(ctx, zmq.PUSH, endpoints, server_key, keypair)
    watch = HandshakeWatch(push, keypair.identity)
    box = box_for(keypair.secret, server_key)
    mine = private_topic(keypair.identity)
    for topic in (mine, SYSTEM_TOPIC):
        sub.subscribe(topic.encode())
    sub.connect(endpoints.publish)
    push.connect(endpoints.input)
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(watch.monitor, zmq.POLLIN)
    try:
        ref, sent_at, heard = 0, None, False
        deadline = time.monotonic() + timeout
        while not pager.done:
            now = time.monotonic()
            if now >= deadline:
                code, reason = watch.explain(endpoints.input, endpoints.flags())
                raise NoAnswer(EXIT_REFUSED if code in ("auth", "handshake") else EXIT_NO_ANSWER, reason)
            if (heard and sent_at is None) or (sent_at is not None and now - sent_at >= RESEND_AFTER):
                ref += 1
                request = pager.request(ref)
                push.send(encode_client_message(request), zmq.NOBLOCK)
                sent_at = now
            ready = dict(poller.poll(min(deadline - now, RESEND_AFTER) * 1000))
            if watch.monitor in ready and "auth" in watch.drain() and watch.status != BUSY_STATUS:
                raise NoAnswer(EXIT_REFUSED, watch.explain(endpoints.input, endpoints.flags())[1])
            if sub not in ready:
                continue
            while True:
                try:
                    frame = sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                heard = True
                answer = _answer(frame, box, mine, ref)
                if isinstance(answer, Error):
                    if answer.code != Code.RATE_LIMITED:
                        raise NoAnswer(EXIT_NO_ANSWER, f"the broker refused: {answer.detail}")
                    sent_at = time.monotonic()  # ask again in a second, when the allowance refilled
                elif answer is not None:
                    pager.take(answer, request.limit)
                    sent_at = None
                    deadline = time.monotonic() + timeout
                    break
        return pager.oldest_first()
    except zmq.Again:
        raise NoAnswer(EXIT_NO_ANSWER, f"cannot send to the broker at {endpoints.input}") from None
    finally:
        watch.close(push)
        sub.close(0)
        push.close(0)
        ctx.term()


def _answer(frame: bytes, box, mine: str, ref: int) -> History | Error | None:  # type: ignore[no-untyped-def]
    """The answer (or error) to request `ref` in `frame`; None for anything else."""
    if not frame.startswith(mine.encode()):
        return None  # sys/: only proof that we are connected
    try:
        _, event = decode_publication(open_publication(box, frame))
    except (SealError, ProtocolError):
        return None
    if isinstance(event, (History, Error)) and event.ref == ref:
        return event
    return None
