"""Carrying out what the core decided, once per broker loop turn.

The core returns publications and storage requests (`Out` records). This
collects them during a turn, then: writes every public event, kept mail and
remembered name in one SQLite transaction, and only then sends, in order,
answering history fetches and mail deliveries from storage on the way. So
nothing is ever published that a crash right after could lose, and history
handed to a joiner reaches exactly up to the live events that follow it.
Mail delivered in a turn is deleted in the next turn's transaction, once it
has been published: a crash in between delivers it again, it never loses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from zchat.core import Banned, BrokerCore, DeliverMail, Disconnect, Fetch, Mail, Out, Publish, Remember
from zchat.history import EventRow, HistoryStore
from zchat.protocol import (
    PRIVATE_PREFIX,
    ROOM_PREFIX,
    Action,
    Code,
    Direct,
    Error,
    History,
    Joined,
    Left,
    Mark,
    Message,
    decode_event,
    name_key,
    private_topic,
    room_topic,
)

log = logging.getLogger("zchat.broker")

_encode = msgspec.json.Encoder().encode
# Errors about a frame's form: their details name the problem, never the content.
_INPUT_ERRORS = {Code.BAD_REQUEST, Code.TOO_LARGE, Code.TOO_MANY_FRAMES}


class Dispatcher:
    def __init__(self, core: BrokerCore, store: HistoryStore, send: Callable[[bytes], object],
                 cut: Callable[[str], None] = lambda identity: None,
                 ban: Callable[[str], None] = lambda identity: None) -> None:
        self.core = core
        self.store = store
        self.send = send
        self.cut = cut  # shut an identity's connections down
        self.ban = ban  # remember a banned identity across restarts
        self.pending: list[Out] = []
        # For the broker's stats (totals since start-up).
        self.published = 0  # frames sent
        self.messages = 0  # chat messages accepted: room messages and actions, private ones once
        self.errors: dict[str, int] = {}  # error events sent, by code

    def add(self, out: list[Out]) -> None:
        if out:
            self.pending.extend(out)

    def flush(self, now: float) -> None:
        """Persist this turn's output, then publish it in order."""
        if not self.pending:
            return
        items, self.pending = self.pending, []
        frames: list[bytes | None] = []
        rows: list[EventRow] = []
        mail: list[tuple[str, float, bytes]] = []
        names: list[tuple[str, str]] = []
        add_frame, add_row = frames.append, rows.append
        said = 0  # room messages among them, for the stats
        for item in items:
            if type(item) is Publish:
                event, topic = item.event, item.topic
                body = _encode(event)
                add_frame(topic.encode() + b" " + body)
                if type(event) is Message:  # the hot path: stored, counted, nothing else
                    add_row((topic, event.seq, event.ts, body))
                    said += 1
                    continue
                if topic.startswith(ROOM_PREFIX) and not isinstance(event, Mark):
                    rows.append((topic, event.seq, event.ts, body))
                    if isinstance(event, (Joined, Left)):
                        log.info("%s %s #%s", event.name, "joined" if isinstance(event, Joined) else
                                 f"left ({event.reason})", event.room)
                self._count(topic, event)
            else:
                frames.append(None)
                if isinstance(item, Mail):
                    mail.append((item.recipient, item.event.ts, _encode(item.event)))
                elif isinstance(item, Remember):
                    names.append((item.name_key, item.identity))
        self.store.write(rows, mail, names, now)
        self.messages += said
        send = self.send
        for item, frame in zip(items, frames, strict=True):
            if frame is not None:
                send(frame)
                self.published += 1
            elif isinstance(item, Fetch):
                self._answer_fetch(item, now)
            elif isinstance(item, DeliverMail):
                self._deliver_mail(item, now)
            elif isinstance(item, Banned):
                self.ban(item.identity)
            elif isinstance(item, Disconnect):
                self.cut(item.identity)  # after the notices above have been sent

    def _answer_fetch(self, fetch: Fetch, now: float) -> None:
        bodies = self.store.range(room_topic(fetch.room), fetch.after, fetch.upto, fetch.limit)
        lost = 0
        if fetch.after > 0:  # a bounded range: say how much of it is gone
            lost = max(0, min(fetch.upto - fetch.after, fetch.limit) - len(bodies))
        events = [msgspec.Raw(body) for body in bodies]
        self._send_reply(fetch.identity, lambda seq: History(
            seq=seq, ts=now, room=fetch.room, events=events, after=fetch.after, upto=fetch.upto,
            lost=lost, ref=fetch.ref))

    def _deliver_mail(self, request: DeliverMail, now: float) -> None:
        for body in self.store.take_mail(request.identity):  # bounded by the store
            kept = decode_event(body)
            if isinstance(kept, Direct):
                self._send_reply(request.identity, lambda seq, kept=kept: Direct(
                    seq=seq, ts=kept.ts, name=kept.name, to=kept.to, text=kept.text, offline=True))

    def _send_reply(self, identity: str, make) -> None:  # type: ignore[no-untyped-def]
        reply = self.core.reply(identity, make)
        self.send(reply.topic.encode() + b" " + _encode(reply.event))
        self.published += 1

    def _count(self, topic: str, event: object) -> None:
        """Stats, and a log line for each error sent (its code, never anyone's text)."""
        if isinstance(event, (Message, Action)):
            self.messages += 1
        elif isinstance(event, Direct):
            sender = self.core.names.get(name_key(event.name))
            if sender is not None and topic == private_topic(sender):  # the sender's copy: once
                self.messages += 1
        elif isinstance(event, Error):
            self.errors[event.code] = self.errors.get(event.code, 0) + 1
            who = topic.removeprefix(PRIVATE_PREFIX)[:12]
            if event.code in _INPUT_ERRORS:  # the detail says what was wrong with the frame
                log.info("refused input from %s: %s: %.200s", who, event.code, event.detail)
            else:
                log.info("error to %s: %s", who, event.code)
