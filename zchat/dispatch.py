"""Carrying out what the core decided, once per broker loop turn.

The core returns publications and storage requests (`Out` records). This
collects them during a turn, then: writes every public event, kept mail and
remembered name in one SQLite transaction, and only then sends, in order,
answering history fetches and mail deliveries from storage on the way. So
nothing is ever published that a crash right after could lose, and history
handed to a joiner reaches exactly up to the live events that follow it.

Every frame on a private topic (`u/<id>/`) is sealed to its recipient here, and
only here (zchat.sealing): room and system traffic pays nothing for it.

Mail delivered in a turn is deleted in the next turn's transaction, once it
has been published: a crash in between delivers it again, it never loses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from zchat.admission import LogFold
from zchat.core import (
    Banned,
    BrokerCore,
    DeliverMail,
    Disconnect,
    Fetch,
    FindSince,
    KeepTopic,
    Mail,
    Out,
    Pardoned,
    Publish,
    Remember,
)
from zchat.history import DroppedMail, EventRow, HistoryStore, MailOutcome, MailRow
from zchat.limits import MAX_ROOMS_IN_REPLY
from zchat.logsetup import escape
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
    ProtocolError,
    SinceReply,
    clean_text,
    decode_event,
    private_topic,
    room_topic,
)
from zchat.sealing import BoxCache

log = logging.getLogger("zchat.broker")

_encode = msgspec.json.Encoder().encode
# Errors about a frame's form: their details name the problem, never the content.
ERROR_FOLD_SECONDS = 1.0  # identical errors to one key are logged once per this
_INPUT_ERRORS = {Code.BAD_REQUEST, Code.TOO_LARGE, Code.TOO_MANY_FRAMES}


class Dispatcher:
    def __init__(self, core: BrokerCore, store: HistoryStore, send: Callable[[bytes], object],
                 boxes: BoxCache, cut: Callable[[str], None] = lambda identity: None,
                 ban: Callable[[str], None] = lambda identity: None,
                 unban: Callable[[str], None] = lambda identity: None) -> None:
        self.core = core
        self.boxes = boxes  # seals private publications to their recipient
        self.store = store
        self.send = send
        self.cut = cut  # shut an identity's connections down
        self.ban = ban  # remember a banned identity across restarts
        self.unban = unban  # and forget it when an admin lifts the ban
        self.pending: list[Out] = []
        # For the broker's stats (totals since start-up).
        self.published = 0  # frames sent
        self.messages = 0  # chat messages accepted: room messages and actions, private ones once
        self.errors: dict[str, int] = {}  # error events sent, by code
        # Bytes sent on each private topic since the shell last saw that key's publish
        # connections drained (the shell resets it): what may be waiting for a slow reader.
        self.unread: dict[str, int] = {}
        # The same error to the same key, again and again (a client retrying after a restart):
        # logged once a second, with how many more there were.
        self._error_fold = LogFold(ERROR_FOLD_SECONDS)

    def add(self, out: list[Out]) -> None:
        if out:
            self.pending.extend(out)

    def flush(self, now: float) -> None:
        """Persist this turn's output, then publish it in order."""
        self._log_folded(now)
        if not self.pending:
            return
        items, self.pending = self.pending, []
        frames: list[bytes | None] = []
        rows: list[EventRow] = []
        mail: list[MailRow] = []
        names: list[tuple[str, str]] = []
        add_frame, add_row = frames.append, rows.append
        said = 0  # room messages among them, for the stats
        for item in items:
            if type(item) is Publish:
                event, topic = item.event, item.topic
                body = _encode(event)
                if type(event) is Message:  # the hot path: stored, counted, nothing else
                    add_frame(topic.encode() + b" " + body)
                    add_row((topic, event.seq, event.ts, body))
                    said += 1
                    continue
                if topic.startswith(PRIVATE_PREFIX):
                    frame = self.boxes.seal_publication(topic, body)
                    add_frame(frame)
                    self.unread[topic] = self.unread.get(topic, 0) + len(frame)
                else:
                    add_frame(topic.encode() + b" " + body)
                if topic.startswith(ROOM_PREFIX) and not isinstance(event, Mark):
                    rows.append((topic, event.seq, event.ts, body))
                    if isinstance(event, (Joined, Left)):
                        log.info("%s %s #%s", event.name, "joined" if isinstance(event, Joined) else
                                 f"left ({event.reason})", event.room)
                self._count(topic, event)
            else:
                frames.append(None)
                if isinstance(item, Mail):
                    mail.append((item.recipient, item.sender, item.event.ts, _encode(item.event),
                                 item.copy.ref))
                elif isinstance(item, Remember):
                    names.append((item.name_key, item.identity))
        outcomes = iter(self.store.write(rows, mail, names, now))  # one per Mail, in order
        self.messages += said
        send = self.send
        for item, frame in zip(items, frames, strict=True):
            if frame is not None:
                send(frame)
                self.published += 1
            elif isinstance(item, Mail):
                self._answer_mail(item, next(outcomes), now)
            elif isinstance(item, Fetch):
                self._answer_fetch(item, now)
            elif isinstance(item, FindSince):
                self._answer_since(item, now)
            elif isinstance(item, DeliverMail):
                self._deliver_mail(item, now)
            elif isinstance(item, Banned):
                self.ban(item.identity)
            elif isinstance(item, Pardoned):
                self.unban(item.identity)
            elif isinstance(item, KeepTopic):
                self.store.set_topic(room_topic(item.room), item.text, item.by, now)
            elif isinstance(item, Disconnect):
                self.cut(item.identity)  # after the notices above have been sent

    def _answer_fetch(self, fetch: Fetch, now: float) -> None:
        bodies = self.store.range(room_topic(fetch.room), fetch.after, fetch.upto, fetch.limit)
        lost = 0
        if fetch.after > 0:  # a bounded range: say how much of it is gone
            lost = max(0, min(fetch.upto - fetch.after, fetch.limit) - len(bodies))
        # The newest events that fit the key's allowance (a page at most); at least one when
        # it has any, so paging always progresses. `more`: older ones were left out.
        clock = now - self.core.wall_offset  # the core's buckets run on its monotonic clock
        allowance = self.core.history_allowance(fetch.identity, clock)
        first, size = len(bodies), 0
        while first > 0 and (size + len(bodies[first - 1]) <= allowance or (size == 0 and allowance > 0)):
            first -= 1
            size += len(bodies[first])
        self.core.spend_history(fetch.identity, size)
        events = [msgspec.Raw(body) for body in bodies[first:]]
        self._send_reply(fetch.identity, lambda seq: History(
            seq=seq, ts=now, room=fetch.room, events=events, after=fetch.after, upto=fetch.upto,
            lost=lost, ref=fetch.ref, more=first > 0))

    def _answer_since(self, find: FindSince, now: float) -> None:
        topics = None if find.rooms is None else [room_topic(room) for room in find.rooms]
        found, count = self.store.since(find.since, topics, MAX_ROOMS_IN_REPLY)
        seqs = {topic[len(ROOM_PREFIX):-1]: seq for topic, seq in found.items()}
        self._send_reply(find.identity, lambda seq: SinceReply(
            seq=seq, ts=now, since=find.since, seqs=seqs, count=count, ref=find.ref))

    def _deliver_mail(self, request: DeliverMail, now: float) -> None:
        for body in self.store.take_mail(request.identity):  # bounded by the store
            try:
                kept = decode_event(body)
            except ProtocolError:
                continue
            if isinstance(kept, Direct):  # sealed to this key: we pass it on as it was kept
                self._send_reply(request.identity, lambda seq, kept=kept: msgspec.structs.replace(
                    kept, seq=seq, ref=None, offline=True))

    def _answer_mail(self, mail: Mail, outcome: MailOutcome, now: float) -> None:
        """The sender's copy of a kept message, or why it was not kept; and a word to each
        sender whose kept message the new one pushed out."""
        copy = mail.copy
        if outcome.kept:
            self._send_reply(mail.sender, lambda seq: msgspec.structs.replace(copy, seq=seq))
            self.messages += 1
        else:
            share = self.store.retention.mailbox_per_sender
            self._send_reply(mail.sender, lambda seq: Error(
                seq=seq, ts=now, code=Code.MAILBOX_FULL, ref=copy.ref,
                detail=f"not kept: {clean_text(copy.to)} is offline and already has {share} unread "
                "message(s) from you; send more once they have read those"))
        for dropped in outcome.dropped:
            self._tell_dropped(dropped, now)

    def _tell_dropped(self, dropped: DroppedMail, now: float) -> None:
        notice = self.core.notify(dropped.sender, lambda seq: Error(
            seq=seq, ts=now, code=Code.MAIL_DROPPED, ref=dropped.ref,
            detail=f"a message you left for {clean_text(dropped.to)} was dropped unread: their "
            f"mailbox is full, and your messages were among the most numerous in it"))
        if notice is not None:  # an offline sender is not told
            self._send_private(notice)

    def _send_reply(self, identity: str, make) -> None:  # type: ignore[no-untyped-def]
        self._send_private(self.core.reply(identity, make))

    def _send_private(self, reply: Publish) -> None:
        """A publication on a private stream made outside the turn's batch: sealed like every other,
        and counted against its reader's backlog budget."""
        frame = self.boxes.seal_publication(reply.topic, _encode(reply.event))
        self.send(frame)
        self.published += 1
        self.unread[reply.topic] = self.unread.get(reply.topic, 0) + len(frame)
        if isinstance(reply.event, Error):
            self._count(reply.topic, reply.event)

    def _count(self, topic: str, event: object) -> None:
        """Stats, and a log line for each error sent (its code, never anyone's text)."""
        if isinstance(event, (Message, Action)):
            self.messages += 1
        elif isinstance(event, Direct):
            if topic == private_topic(event.from_):  # the sender's copy: once
                self.messages += 1
        elif isinstance(event, Error):
            self.errors[event.code] = self.errors.get(event.code, 0) + 1
            who = topic.removeprefix(PRIVATE_PREFIX)[:12]
            self._log_folded(event.ts)
            if not self._error_fold.first(f"{who} {event.code}", event.ts):
                return
            if event.code in _INPUT_ERRORS:  # the detail says what was wrong with the frame
                log.info("refused input from %s: %s: %.200s", who, event.code, escape(event.detail))
            else:
                log.info("error to %s: %s", who, event.code)

    def _log_folded(self, now: float) -> None:
        for kind, repeats in self._error_fold.due(now):
            who, code = kind.split(" ", 1)
            log.info("error to %s: %s ... %d more in %g s", who, code, repeats, self._error_fold.interval)
