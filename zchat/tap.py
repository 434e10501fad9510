"""The tap: log every public event and account for every sequence number.

A SUB on r/ (every room), sys/ and the tap's own u/<id>/ (where history
replies arrive), and a PUSH to the broker's input for history requests, both
CURVE clients of the broker. Each event is written through a standard logging
handler (stdout, a file, or a size- or time-rotating file), flushed at once,
as a JSON line or a readable text line.

Completeness, per room topic: the first event seen is the baseline. After
it, a jump in `seq` is backfilled from the broker's stored history while the
room's live events are held (at most BACKFILL_WAIT seconds); what cannot be
recovered becomes a gap record. A `mark` (the broker repeating a busy room's
latest seq) reveals a lost tail of a burst the same way; marks themselves are
not written. So from its baseline on, every sequence
number of a room appears in the log exactly once and in order: as an event,
a backfilled event, or inside a gap record. `SeqTracker` does that
bookkeeping without sockets or clocks; `run_tap` is the shell around it.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler, TimedRotatingFileHandler
from pathlib import Path
from typing import Any

import msgspec
import zmq

from zchat import limits as L
from zchat.endpoints import Endpoints
from zchat.keys import KeyPair
from zchat.protocol import (
    ROOM_PREFIX,
    SYSTEM_TOPIC,
    HistoryRequest,
    clean_text,
    encode_client_message,
    private_topic,
    room_of_topic,
)
from zchat.transport import curve_client

log = logging.getLogger("zchat.tap")

BACKFILL_WAIT = 3.0  # seconds a room's live events are held while its gap is being recovered
# Pace history requests under the broker's default token bucket (the tap never gets a welcome
# announcing the real one), as the client library does.
REQUEST_BURST = L.RATE_BURST - 2
REQUEST_RATE = L.RATE_PER_SECOND * 0.9
DRAIN_BATCH = 1000  # messages read before looking at the timers again

# --- bookkeeping (pure) --------------------------------------------------------


@dataclass(slots=True)
class Write:
    """Write this event (`backfill`: recovered from storage, not received live)."""

    topic: str
    seq: int
    item: Any
    backfill: bool = False


@dataclass(slots=True)
class Gap:
    """Sequence numbers first..last of `topic` are lost for good."""

    topic: str
    first: int
    last: int

    @property
    def missing(self) -> int:
        return self.last - self.first + 1


@dataclass(slots=True)
class Reset:
    """`topic` went back from `last` to `seq`: its numbering restarted (the broker lost its
    history). The new numbering starts a new baseline."""

    topic: str
    last: int
    seq: int


@dataclass(slots=True)
class Request:
    """Ask for the stored events of `topic` with after < seq < before."""

    topic: str
    after: int
    before: int
    ref: int

    @property
    def limit(self) -> int:
        return self.before - self.after - 1


Out = Write | Gap | Reset | Request


@dataclass(slots=True)
class _Topic:
    last: int  # every seq up to this one is accounted for (written, or inside a gap record)
    top: int  # the highest seq known to exist: received live, or announced by a mark
    held: list[tuple[int, Any]] | None = None  # while recovering a gap: the live events behind it
    ref: int | None = None  # the outstanding history request (None while waiting for a token)
    before: int = 0  # ...which asked for last < seq < before
    deadline: float = 0.0


class SeqTracker:
    """Per-topic sequence bookkeeping: what to write, what to ask for, in which order.

    No sockets, no clock: every call gets `now` (monotonic seconds) and returns the
    records to write and the requests to send, in order. A gap is recovered in chunks
    of at most MAX_HISTORY_PER_REQUEST, oldest first, one outstanding request per topic;
    requests are paced by a token bucket like the broker's.
    """

    def __init__(self, wait: float = BACKFILL_WAIT, burst: int = REQUEST_BURST,
                 rate: float = REQUEST_RATE) -> None:
        self.wait = wait
        self.topics: dict[str, _Topic] = {}
        self.refs: dict[int, str] = {}  # outstanding request -> topic
        # Taps sharing a key share a private stream: start refs where another tap's are unlikely.
        self._next_ref = itertools.count(1 + secrets.randbelow(2**48))
        self._burst, self._rate = float(burst), rate
        self._tokens = float(burst)
        self._refilled: float | None = None
        self._waiting: deque[str] = deque()  # topics waiting for a request token, in order

    def event(self, topic: str, seq: int, item: Any, now: float) -> list[Out]:
        """A live event arrived."""
        t = self.topics.get(topic)
        if t is None:  # the baseline: nothing before it is ours to account for
            self.topics[topic] = _Topic(last=seq, top=seq)
            return [Write(topic, seq, item)]
        if seq <= t.top:  # never repeated while the broker keeps its history: numbering restarted
            out = self._release(topic, t)
            out.append(Reset(topic, t.top, seq))
            self.topics[topic] = _Topic(last=seq, top=seq)
            out.append(Write(topic, seq, item))
            return out
        t.top = seq
        if t.held is not None:
            t.held.append((seq, item))
            return []
        return self._advance(topic, t, [(seq, item)], now)

    def mark(self, topic: str, seq: int, now: float) -> list[Out]:
        """The broker says `seq` is the latest on `topic`: anything after ours never came."""
        t = self.topics.get(topic)
        if t is None:  # a baseline too: everything up to `seq` was before our time
            self.topics[topic] = _Topic(last=seq, top=seq)
            return []
        if seq <= t.top:  # nothing new (a mark never takes a number of its own)
            return []
        t.top = seq
        if t.held is not None:
            return []  # recovering already: it goes on up to the new top
        return self._advance(topic, t, [], now)

    def history(self, ref: int, topic: str, after: int, events: Iterable[tuple[int, Any]],
                now: float, more: bool = False) -> list[Out]:
        """The broker answered request `ref` (for `topic`, seqs after `after`) with these stored
        (seq, item) pairs; `more`: its byte cap left out older ones of the range."""
        t = self.topics.get(topic)
        if self.refs.get(ref) != topic or t is None or t.last != after:
            return []  # given up already, or not ours (another tap with our key asked)
        del self.refs[ref]
        t.ref = None
        found = {seq: item for seq, item in events if t.last < seq < t.before}
        if more and found:  # the newest part of the chunk: hold it, ask for what comes before
            t.held = sorted(found.items()) + (t.held or [])
            return self._ask(topic, t, now)
        out: list[Out] = []
        for seq in sorted(found):
            if seq > t.last + 1:
                out.append(Gap(topic, t.last + 1, seq - 1))
            out.append(Write(topic, seq, found[seq], backfill=True))
            t.last = seq
        if t.last < t.before - 1:
            out.append(Gap(topic, t.last + 1, t.before - 1))
            t.last = t.before - 1
        held, t.held = t.held or [], None
        return out + self._advance(topic, t, held, now)

    def tick(self, now: float) -> list[Out]:
        """Give up on unanswered requests; send the requests that waited for a token."""
        out: list[Out] = []
        for ref, topic in list(self.refs.items()):
            t = self.topics[topic]
            if now >= t.deadline:
                del self.refs[ref]
                t.ref = None
                held, t.held = t.held or [], None
                end = held[0][0] - 1 if held else t.top
                out.append(Gap(topic, t.last + 1, end))
                t.last = end
                out += self._advance(topic, t, held, now)
        while self._waiting and self._take_token(now):
            topic = self._waiting.popleft()
            out.append(self._request(topic, self.topics[topic], now))
        return out

    def restarted(self, now: float) -> list[Out]:
        """The broker restarted: requests sent to the old one may be lost, ask again."""
        out: list[Out] = []
        for ref, topic in list(self.refs.items()):
            del self.refs[ref]
            self.topics[topic].ref = None
            out += self._ask(topic, self.topics[topic], now)
        return out

    def close(self) -> list[Out]:
        """Stopping: whatever is held is written now, after a gap for what was not recovered."""
        out: list[Out] = []
        for topic, t in self.topics.items():
            out += self._release(topic, t)
        return out

    def deadline(self) -> float | None:
        """When `tick` next has something to do (None: nothing pending)."""
        times = [self.topics[topic].deadline for topic in self.refs.values()]
        if self._waiting and self._refilled is not None:
            times.append(self._refilled + (1.0 - self._tokens) / self._rate)
        return min(times, default=None)

    # --- helpers ---------------------------------------------------------------

    def _advance(self, topic: str, t: _Topic, items: list[tuple[int, Any]], now: float) -> list[Out]:
        """Write events in order until one reveals a jump; hold it and the rest, ask for the gap."""
        out: list[Out] = []
        for i, (seq, item) in enumerate(items):
            if seq > t.last + 1:
                t.held = items[i:]
                return out + self._ask(topic, t, now)
            out.append(Write(topic, seq, item))
            t.last = seq
        if t.last < t.top:  # a mark announced events that never came
            t.held = []
            return out + self._ask(topic, t, now)
        t.held = None
        return out

    def _ask(self, topic: str, t: _Topic, now: float) -> list[Out]:
        if self._take_token(now):
            return [self._request(topic, t, now)]
        self._waiting.append(topic)
        return []

    def _request(self, topic: str, t: _Topic, now: float) -> Request:
        assert t.held is not None
        ref = next(self._next_ref)
        self.refs[ref] = topic
        t.ref, t.deadline = ref, now + self.wait
        end = t.held[0][0] if t.held else t.top + 1
        t.before = min(end, t.last + 1 + L.MAX_HISTORY_PER_REQUEST)  # oldest chunk first
        return Request(topic, t.last, t.before, ref)

    def _release(self, topic: str, t: _Topic) -> list[Out]:
        """Stop recovering `topic`: gaps for whatever is missing, then the held events."""
        if t.ref is not None:
            self.refs.pop(t.ref, None)
            t.ref = None
        if topic in self._waiting:
            self._waiting.remove(topic)
        out: list[Out] = []
        for seq, item in t.held or []:
            if seq > t.last + 1:
                out.append(Gap(topic, t.last + 1, seq - 1))
            out.append(Write(topic, seq, item))
            t.last = seq
        if t.last < t.top:
            out.append(Gap(topic, t.last + 1, t.top))
            t.last = t.top
        t.held = None
        return out

    def _take_token(self, now: float) -> bool:
        if self._refilled is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


# --- output ----------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def make_handler(output: Path | None = None, rotate_bytes: int | None = None,
                 rotate_when: str | None = None, backups: int = 5) -> logging.Handler:
    """stdout, a file, or a file rotated by size or time; each record is flushed."""
    if output is None:
        if rotate_bytes is not None or rotate_when is not None:
            raise ValueError("rotation needs --output FILE")
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    elif rotate_bytes is not None:
        if rotate_bytes <= 0 or backups < 1:
            raise ValueError("--rotate-bytes needs N > 0 and --backups K >= 1")
        handler = RotatingFileHandler(output, maxBytes=rotate_bytes, backupCount=backups, encoding="utf-8")
    elif rotate_when is not None:  # ValueError for an unknown interval
        handler = TimedRotatingFileHandler(output, when=rotate_when, backupCount=max(0, backups),
                                           encoding="utf-8")
    else:
        handler = logging.FileHandler(output, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def _clock(ts: object) -> str:
    when = ts if isinstance(ts, (int, float)) and not isinstance(ts, bool) else time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _c(value: object) -> str:
    return clean_text(str(value))


def _where(topic: str) -> str:
    room = room_of_topic(topic)
    return f"#{room}" if room else _c(topic)


def text_line(topic: str, ev: dict, backfill: bool = False) -> str:
    """`[YYYY-MM-DD HH:MM:SS] #room alice: text` and the like; everything cleaned."""
    kind, g = ev.get("type"), ev.get
    where = _where(topic)
    if kind == "message":
        body = f"{where} {_c(g('name'))}: {_c(g('text'))}"
    elif kind == "action":
        body = f"{where} * {_c(g('name'))} {_c(g('text'))}"
    elif kind == "joined":
        body = f"{where} -> {_c(g('name'))} " + ("joined the chat" if g("chat") else "entered")
    elif kind == "left":
        why = _c(g("reason", "?")) + (f": {_c(g('message'))}" if g("message") else "")
        body = f"{where} <- {_c(g('name'))} left ({why})"
    elif kind == "renamed":
        body = f"{where} -- {_c(g('old'))} is now {_c(g('new'))}"
    elif kind == "heartbeat":
        body = f"-- heartbeat: epoch {_c(g('epoch'))}, {_c(g('online'))} online"
    elif kind == "shutdown":
        body = f"!! broker shutting down: {_c(g('detail'))}"
    else:  # an event type this tap does not know: still on record
        body = f"{where} {_c(kind)}: {_c(_encode(ev).decode())}"
    return f"[{_clock(g('ts'))}] " + ("(backfill) " if backfill else "") + body


class TapLog:
    """Formats records (JSON lines or text) and hands them to a logging handler."""

    def __init__(self, handler: logging.Handler, fmt: str = "jsonl") -> None:
        if fmt not in ("jsonl", "text"):
            raise ValueError(f"unknown format {fmt!r}: jsonl or text")
        self.handler = handler
        self.text = fmt == "text"

    def _emit(self, line: str) -> None:
        self.handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO,
                                                   "levelname": "INFO", "name": log.name}))

    def event(self, topic: str, ev: dict, backfill: bool = False) -> None:
        if self.text:
            self._emit(text_line(topic, ev, backfill))
            return
        record = {"topic": topic}
        record.update(ev)
        record["topic"] = topic
        if backfill:
            record["backfill"] = True
        self._emit(_encode(record).decode())

    def gap(self, gap: Gap, ts: float) -> None:
        if self.text:
            self._emit(f"[{_clock(ts)}] !! gap in {_where(gap.topic)}: {gap.missing} events missing "
                       f"(seq {gap.first}-{gap.last})")
        else:
            self._emit(_encode({"type": "gap", "topic": gap.topic, "from": gap.first, "to": gap.last,
                                "missing": gap.missing, "ts": ts}).decode())

    def reset(self, reset: Reset, ts: float) -> None:
        if self.text:
            self._emit(f"[{_clock(ts)}] !! {_where(reset.topic)}: seq went back from {reset.last} to "
                       f"{reset.seq}; the broker lost its history, counting again from here")
        else:
            self._emit(_encode({"type": "reset", "topic": reset.topic, "last": reset.last,
                                "seq": reset.seq, "ts": ts}).decode())

    def epoch(self, epoch: str, previous: str | None, ts: float) -> None:
        if self.text:
            what = f"broker epoch {_c(epoch)}" if previous is None else \
                f"broker restarted: epoch {_c(previous)} -> {_c(epoch)}"
            self._emit(f"[{_clock(ts)}] !! {what}")
        else:
            self._emit(_encode({"type": "epoch", "epoch": epoch, "previous": previous, "ts": ts}).decode())

    def close(self) -> None:
        self.handler.flush()
        self.handler.close()


# --- the shell ---------------------------------------------------------------------


class Tap:
    """Moves frames from the SUB through the tracker into the log; requests go out on the PUSH."""

    def __init__(self, out: TapLog, push: zmq.Socket, identity: str, heartbeats: bool = False) -> None:
        self.out = out
        self.push = push
        self.private = private_topic(identity)
        self.heartbeats = heartbeats
        self.tracker = SeqTracker()
        self.epoch: str | None = None

    def frame(self, data: bytes, now: float) -> None:
        raw_topic, _, body = data.partition(b" ")
        topic = raw_topic.decode("utf-8", "replace")
        try:
            ev = _decode(body)
        except msgspec.DecodeError:
            log.warning("undecodable event on %r skipped", topic[:80])
            return
        if not isinstance(ev, dict):
            return
        kind, seq = ev.get("type"), ev.get("seq")
        if topic == SYSTEM_TOPIC:
            epoch = ev.get("epoch")
            if isinstance(epoch, str) and epoch != self.epoch:
                previous, self.epoch = self.epoch, epoch
                self.out.epoch(epoch, previous, ev.get("ts") or time.time())
                if previous is not None:
                    self.apply(self.tracker.restarted(now))
            if kind not in ("heartbeat", "stats") or self.heartbeats:  # the broker's pulse: opt-in
                self.out.event(topic, ev)
        elif topic == self.private:
            if kind == "history" and type(ev.get("ref")) is int and type(ev.get("after")) is int:
                events = [(e["seq"], e) for e in ev.get("events") or []
                          if isinstance(e, dict) and type(e.get("seq")) is int]
                room = f"{ROOM_PREFIX}{ev.get('room')}/"
                self.apply(self.tracker.history(ev["ref"], room, ev["after"], events, now,
                                                ev.get("more") is True))
            elif kind == "error":
                log.warning("broker: %s: %s", _c(ev.get("code")), _c(ev.get("detail")))
        elif topic.startswith(ROOM_PREFIX) and room_of_topic(topic) and type(seq) is int:
            if kind == "mark":
                self.apply(self.tracker.mark(topic, seq, now))
            else:
                self.apply(self.tracker.event(topic, seq, ev, now))
        else:
            self.out.event(topic, ev)

    def apply(self, outs: list[Out]) -> None:
        for item in outs:
            if isinstance(item, Write):
                self.out.event(item.topic, item.item, item.backfill)
            elif isinstance(item, Gap):
                self.out.gap(item, time.time())
            elif isinstance(item, Reset):
                self.out.reset(item, time.time())
            else:
                room = room_of_topic(item.topic) or ""
                request = HistoryRequest(room=room, after=item.after, before=item.before,
                                         limit=item.limit, ref=item.ref)
                try:
                    self.push.send(encode_client_message(request), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the broker is unreachable: the deadline turns this into a gap record


def run_tap(endpoints: Endpoints, server_key: bytes, keypair: KeyPair, out: TapLog,
            heartbeats: bool = False) -> int:
    """Log until SIGINT or SIGTERM; then write what is held, flush, close and return 0."""
    ctx = zmq.Context()
    sub = curve_client(ctx, zmq.SUB, endpoints, server_key, keypair)
    push = curve_client(ctx, zmq.PUSH, endpoints, server_key, keypair)
    push.sndhwm = L.CLIENT_SNDHWM
    # libzmq sends a SUB's subscriptions in byte order (r/, sys/, u/...), so a first heartbeat
    # proves r/ is installed; u/<id>/ follows within the same batch.
    for topic in (private_topic(keypair.identity), ROOM_PREFIX, SYSTEM_TOPIC):
        sub.subscribe(topic.encode())
    sub.connect(endpoints.publish)
    push.connect(endpoints.input)
    tap = Tap(out, push, keypair.identity, heartbeats)

    stopping: list[int] = []
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    old_handlers = {sig: signal.signal(sig, lambda signum, _: stopping.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(wake_r.fileno(), zmq.POLLIN)
    try:
        while not stopping:
            deadline = tap.tracker.deadline()
            timeout = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            ready = dict(poller.poll(timeout))
            if sub in ready:
                for _ in range(DRAIN_BATCH):
                    try:
                        data = sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    tap.frame(data, time.monotonic())
            if wake_r.fileno() in ready:
                try:
                    wake_r.recv(512)
                except BlockingIOError:
                    pass
            tap.apply(tap.tracker.tick(time.monotonic()))
        tap.apply(tap.tracker.close())
        return 0
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        wake_r.close()
        wake_w.close()
        sub.close(0)
        push.close(0)
        ctx.term()
        out.close()
