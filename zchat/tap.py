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
a backfilled event, or inside a gap record. `zchat.flow.SeqTracker` does that
bookkeeping without sockets or clocks (the chat client uses the same one); `run_tap`
is the shell around it.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from logging.handlers import RotatingFileHandler, TimedRotatingFileHandler
from pathlib import Path

import msgspec
import zmq

from zchat import limits as L
from zchat.endpoints import Endpoints
from zchat.flow import BACKFILL_WAIT, Gap, Out, Request, Reset, SeqTracker, Write
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

# The bookkeeping lives in zchat.flow; these names stay importable from here.
__all__ = ["BACKFILL_WAIT", "Gap", "Out", "Request", "Reset", "SeqTracker", "Tap", "TapLog", "Write",
           "make_handler", "run_tap", "text_line"]

DRAIN_BATCH = 1000  # messages read before looking at the timers again


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
                self.apply(self.tracker.history(ev["ref"], room, ev["after"], events, now))
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
