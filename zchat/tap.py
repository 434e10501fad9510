"""The tap: log every public event and account for every sequence number.

A SUB on r/ (every room), sys/ and the tap's own u/<id>/ (where history
replies arrive, sealed to the tap's key), and a PUSH to the broker's input for
history requests, both CURVE clients of the broker. Each event is written
through a standard logging handler (stdout, a file, or a size- or time-rotating
file), flushed at once, as a JSON line or a readable text line.

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

import datetime
import logging
import os
import re
import signal
import socket
import stat
import string
import sys
import time
import typing
from logging.handlers import RotatingFileHandler, TimedRotatingFileHandler
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect
import zmq
from nacl.public import Box

from zchat import limits as L
from zchat.endpoints import Endpoints
from zchat.flow import BACKFILL_WAIT, Gap, Out, Probe, Request, Reset, SeqTracker, Write
from zchat.keys import KeyPair
from zchat.protocol import (
    ROOM_PREFIX,
    SYSTEM_TOPIC,
    EventType,
    HistoryRequest,
    Since,
    clean_message,
    clean_text,
    encode_client_message,
    normalize_room,
    private_topic,
    room_of_topic,
    room_topic,
)
from zchat.sealing import SealError, box_for, open_publication
from zchat.transport import BUSY_STATUS, HandshakeWatch, curve_client

log = logging.getLogger("zchat.tap")

# The bookkeeping lives in zchat.flow; these names stay importable from here.
__all__ = ["BACKFILL_WAIT", "Gap", "Out", "Probe", "Request", "Reset", "SeqTracker", "Tap", "TapLog", "Write",
           "make_handler", "resume_points", "run_tap", "text_line"]

DRAIN_BATCH = 1000  # messages read before looking at the timers again
HOLD_MAX = 10_000  # room frames kept back while the broker's epoch is not yet known
SINCE_WAIT = 10.0  # seconds to wait for the answer to --since before going on live only
SINCE_REF = 1  # the ref of the --since request (the tracker's refs start far above it)


# --- output ----------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class ReaderGone(Exception):
    """Standard output's reader went away (`zchat tap | head -3`): time to stop, quietly."""


class _StdoutHandler(logging.StreamHandler):
    """Logging reports a failed write and carries on; for a pipe whose reader is gone that would
    print an error block for every later event, forever. This stops the tap instead."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if isinstance(sys.exc_info()[1], BrokenPipeError | ReaderGone):
            raise ReaderGone from None
        super().handleError(record)

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            raise ReaderGone from None


# The log holds every public event and who said it: owner only unless --mode says otherwise.
DEFAULT_FILE_MODE = 0o600


class _ExactMode:
    """Opens the log file, and each new one after a rotation, with exactly `file_mode`,
    whatever the umask; an existing file is brought to it too. Rotated files are renamed,
    so they keep it."""

    file_mode: int
    baseFilename: str
    mode: str
    encoding: str | None
    errors: str | None

    def __init__(self, *args: Any, file_mode: int, **kwargs: Any) -> None:
        self.file_mode = file_mode  # before the base class opens the file
        super().__init__(*args, **kwargs)

    def _open(self) -> Any:
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=self._opener)

    def _opener(self, path: str, flags: int) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC, self.file_mode)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != self.file_mode:
                os.fchmod(fd, self.file_mode)
        except OSError:
            os.close(fd)
            raise
        return fd


class _FileHandler(_ExactMode, logging.FileHandler):
    pass


class _SizeRotatingHandler(_ExactMode, RotatingFileHandler):
    pass


class _TimeRotatingHandler(_ExactMode, TimedRotatingFileHandler):
    pass


def parse_file_mode(text: str) -> int:
    """--mode: octal permission bits (600, 0640, 0o640); the owner must be able to write."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise ValueError(f"--mode {text!r}: give octal permission bits, like 600 or 640") from None
    if not 0 <= mode <= 0o777 or not mode & 0o200:
        raise ValueError(f"--mode {text!r}: permission bits 000-777 that let the owner write, like 600")
    return mode


def make_handler(output: Path | None = None, rotate_bytes: int | None = None,
                 rotate_when: str | None = None, backups: int = 5,
                 file_mode: int | None = None) -> logging.Handler:
    """stdout, a file, or a file rotated by size or time; each record is flushed. Files are
    created (and kept) with `file_mode`, DEFAULT_FILE_MODE unless given."""
    if output is None:
        if rotate_bytes is not None or rotate_when is not None:
            raise ValueError("rotation needs --output FILE")
        if file_mode is not None:
            raise ValueError("--mode needs --output FILE")
    mode = DEFAULT_FILE_MODE if file_mode is None else file_mode
    if output is None:
        handler: logging.Handler = _StdoutHandler(sys.stdout)
    elif rotate_bytes is not None:
        if rotate_bytes <= 0 or backups < 1:
            raise ValueError("--rotate-bytes needs N > 0 and --backups K >= 1")
        handler = _SizeRotatingHandler(output, maxBytes=rotate_bytes, backupCount=backups, encoding="utf-8",
                                       file_mode=mode)
    elif rotate_when is not None:  # ValueError for an unknown interval
        handler = _TimeRotatingHandler(output, when=rotate_when, backupCount=max(0, backups),
                                       encoding="utf-8", file_mode=mode)
    else:
        handler = _FileHandler(output, encoding="utf-8", file_mode=mode)
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
        body = f"{where} {_c(g('name'))}: {clean_message(str(g('text')))}"
    elif kind == "action":
        body = f"{where} * {_c(g('name'))} {clean_message(str(g('text')))}"
    elif kind == "joined":
        body = f"{where} -> {_c(g('name'))} " + ("joined the chat" if g("chat") else "entered")
    elif kind == "left":
        why = _c(g("reason", "?")) + (f": {_c(g('message'))}" if g("message") else "")
        body = f"{where} <- {_c(g('name'))} left ({why})"
    elif kind == "renamed":
        body = f"{where} -- {_c(g('old'))} is now {_c(g('new'))}"
    elif kind == "key":
        state = "online" if g("online") else "offline"
        body = f"-- key of {_c(g('name'))} ({state}): {_c(g('key'))}"
    elif kind == "direct":  # kept mail, from `zchat history`: its text only if opened (--key)
        said = clean_message(str(g("text"))) if "text" in ev else "(private, sealed)"
        body = f"mail {_c(g('name'))} -> {_c(g('to'))}: {said}"
    elif kind == "posted":  # `zchat send`'s confirmation, on its private stream
        body = f"-- posted to #{_c(g('room'))} as event {_c(g('at'))}"
    elif kind == "heartbeat":
        body = f"-- heartbeat: epoch {_c(g('epoch'))}, {_c(g('online'))} online"
    elif kind == "shutdown":
        body = f"!! broker shutting down: {_c(g('detail'))}"
    elif kind == "muted":
        said = f": {_c(g('reason'))}" if g("reason") else ""
        body = (f"{where} -- {_c(g('name'))} was muted by {_c(g('by'))} for {_c(g('seconds'))} s{said}"
                if g("seconds") else f"{where} -- {_c(g('name'))} may speak again (by {_c(g('by'))})")
    elif kind == "topic":
        set_by = f" (set by {_c(g('by'))})" if g("by") else ""
        body = (f"{where} -- {_c(g('by'))} changed the topic to: {_c(g('text'))}" if g("changed") else
                f"{where} -- topic: {_c(g('text'))}{set_by}")
    elif kind == "away":
        body = (f"-- {_c(g('name'))} is away: {_c(g('message'))}" if g("message") else
                f"-- {_c(g('name'))} is back")
    elif kind == "bans":
        body = f"-- {_c(g('count'))} banned: " + ", ".join(
            f"{_c(key)} ({_c(name)})" for key, name in (g("bans") or {}).items())
    elif kind == "unbanned":
        body = f"-- {_c(g('key'))} ({_c(g('name'))}) unbanned by {_c(g('by'))}"
    elif kind == "mark":
        body = f"{where} -- latest seq {_c(g('seq'))}"
    elif kind == "stats":
        body = (f"-- stats: {_c(g('online'))} online, {_c(g('rooms'))} rooms, "
                f"{_c(g('messages_in_rate'))} messages/s in, {_c(g('published_rate'))} frames/s out")
    elif kind == "welcome":
        body = f"-- welcome {_c(g('name'))}: {_c(g('online'))} online, epoch {_c(g('epoch'))}"
    elif kind == "error":
        body = f"!! {_c(g('code'))}: {_c(g('detail'))}"
    elif kind == "who":
        names = ", ".join(_c(name) for name in g("names") or [])
        body = f"{where} -- {_c(g('count'))} here: {names}"
    elif kind == "rooms":
        rooms = ", ".join(f"#{_c(room)} ({_c(count)})" for room, count in (g("rooms") or {}).items())
        body = f"-- {_c(g('count'))} rooms: {rooms}"
    elif kind == "history":
        body = f"#{_c(g('room'))} -- {len(g('events') or [])} stored events up to seq {_c(g('upto'))}"
    elif kind == "since":  # the answer to `tap --since`, seen by a tap of the same key
        rooms = ", ".join(f"#{_c(room)} after {_c(seq)}" for room, seq in (g("seqs") or {}).items())
        body = f"-- replay from {_clock(g('since'))}: {_c(g('count'))} rooms: {rooms}"
    else:  # an event type this tap does not know: still on record
        body = f"{where} {_c(kind)}: {_c(_encode(ev).decode())}"
    head = f"[{_clock(g('ts'))}] "
    if "\n" in body:  # a message's own line breaks: continuation lines indented under the first
        body = body.replace("\n", "\n" + " " * len(head))
    return head + ("(backfill) " if backfill else "") + body


# --- which records, in which shape ----------------------------------------------------

# The tap's own records, beside the broker's events.
TAP_RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "gap": ("topic", "from", "to", "missing", "ts"),
    "reset": ("topic", "last", "seq", "ts"),
    "epoch": ("epoch", "previous", "ts"),
}
TYPE_ALIASES = {"join": "joined", "leave": "left", "rename": "renamed", "mute": "muted"}


def _event_fields() -> dict[str, tuple[str, ...]]:
    """Each event type's JSON `type` value and the JSON names of its fields."""
    kinds: dict[str, tuple[str, ...]] = {}
    for cls in typing.get_args(EventType):
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType) and isinstance(info.tag, str)
        kinds[info.tag] = tuple(field.encode_name for field in info.fields)
    return kinds


RECORD_FIELDS = _event_fields() | TAP_RECORD_FIELDS
RECORD_TYPES = frozenset(RECORD_FIELDS)
# What a template may name: every field of any record, `topic`, `backfill`, and `time` (from `ts`).
TEMPLATE_FIELDS = frozenset(f for fields in RECORD_FIELDS.values() for f in fields) | {
    "type", "topic", "backfill", "time"}


def parse_types(text: str) -> frozenset[str]:
    """--type message,action,join: the JSON `type` values to keep (join/leave name joined/left)."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    kinds = frozenset(TYPE_ALIASES.get(name, name) for name in names)
    unknown = sorted(kinds - RECORD_TYPES)
    if not names or unknown:
        raise ValueError(f"--type: unknown type {', '.join(unknown) or '(none)'}; known: "
                         + ", ".join(sorted(RECORD_TYPES)) + " (join and leave for joined and left)")
    return kinds


class _Template(string.Formatter):
    """str.format over a record: a field the record lacks renders empty (its format spec
    ignored); every value is cleaned like the text format's."""

    def __init__(self, template: str) -> None:
        self.template = template
        try:
            names = [field for _, field, _, _ in self.parse(template) if field is not None]
        except ValueError as exc:
            raise ValueError(f"--format {template!r}: {exc}") from None
        for field in names:
            root = re.split(r"[.\[]", field, maxsplit=1)[0]
            if root == "" or root.isdigit():
                raise ValueError(f"--format {template!r}: name each field, like {{name}} or {{text}}")
            if root not in TEMPLATE_FIELDS:
                raise ValueError(f"--format {template!r}: unknown field {{{root}}}; known: "
                                 + ", ".join(sorted(TEMPLATE_FIELDS)))

    def render(self, record: dict) -> str:
        ts = record.get("ts")
        if isinstance(ts, int | float) and not isinstance(ts, bool):
            record = record | {"time": datetime.datetime.fromtimestamp(ts)}  # local time
        return self.vformat(self.template, (), record)

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        try:
            return super().get_field(field_name, args, kwargs)
        except (KeyError, IndexError, AttributeError, TypeError):
            return _MISSING, field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is _MISSING or value is None:
            return ""
        try:
            return clean_text(format(value, format_spec))
        except (ValueError, TypeError):  # a spec that does not fit this record's value
            return clean_text(str(value))

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        return value if value is _MISSING else super().convert_field(value, conversion)


_MISSING = object()


class TapLog:
    """Formats records (JSON lines, text, or a template) and hands them to a logging handler.

    `types`: keep only records of these types (None: all). `count`: stop after this many
    events (the tap's own gap, reset and epoch records are not counted); `done` says so."""

    def __init__(self, handler: logging.Handler | None, fmt: str = "jsonl", *,
                 types: frozenset[str] | None = None, count: int | None = None) -> None:
        self.template: _Template | None = None
        if fmt not in ("jsonl", "text"):
            if "{" not in fmt:
                raise ValueError(f"unknown format {fmt!r}: jsonl, text, or a template like "
                                 "'{time:%H:%M:%S} {room} <{name}> {text}'")
            self.template = _Template(fmt)
        self.handler = handler or logging.NullHandler()
        self.text = fmt == "text"
        self.types = types
        self.left = count
        self.done = count is not None and count <= 0

    def _emit(self, line: str) -> None:
        self.handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO,
                                                   "levelname": "INFO", "name": log.name}))

    def _skip(self, kind: object) -> bool:
        return self.done or (self.types is not None and kind not in self.types)

    def _record(self, record: dict) -> None:
        if self.template is not None:
            self._emit(self.template.render(record))
        else:
            self._emit(_encode(record).decode())

    def event(self, topic: str, ev: dict, backfill: bool = False) -> None:
        if self._skip(ev.get("type")):
            return
        if self.text:
            self._emit(text_line(topic, ev, backfill))
        else:
            record = {"topic": topic}
            record.update(ev)
            record["topic"] = topic
            if backfill:
                record["backfill"] = True
            self._record(record)
        if self.left is not None:
            self.left -= 1
            self.done = self.left <= 0

    def gap(self, gap: Gap, ts: float) -> None:
        if self._skip("gap"):
            return
        if self.text:
            self._emit(f"[{_clock(ts)}] !! gap in {_where(gap.topic)}: {gap.missing} events missing "
                       f"(seq {gap.first}-{gap.last})")
        else:
            self._record({"type": "gap", "topic": gap.topic, "from": gap.first, "to": gap.last,
                          "missing": gap.missing, "ts": ts})

    def reset(self, reset: Reset, ts: float) -> None:
        if self._skip("reset"):
            return
        if self.text:
            self._emit(f"[{_clock(ts)}] !! {_where(reset.topic)}: seq went back from {reset.last} to "
                       f"{reset.seq}; the broker lost its history, counting again from here")
        else:
            self._record({"type": "reset", "topic": reset.topic, "last": reset.last,
                          "seq": reset.seq, "ts": ts})

    def epoch(self, epoch: str, previous: str | None, ts: float) -> None:
        if self._skip("epoch"):
            return
        if self.text:
            what = f"broker epoch {_c(epoch)}" if previous is None else \
                f"broker restarted: epoch {_c(previous)} -> {_c(epoch)}"
            self._emit(f"[{_clock(ts)}] !! {what}")
        else:
            self._record({"type": "epoch", "epoch": epoch, "previous": previous, "ts": ts})

    def close(self) -> None:
        self.handler.flush()
        self.handler.close()


# --- the shell ---------------------------------------------------------------------


class Tap:
    """Moves frames from the SUB through the tracker into the log; requests go out on the PUSH."""

    def __init__(self, out: TapLog, push: zmq.Socket, identity: str, box: Box,
                 heartbeats: bool = False, resume: dict[str, int] | None = None,
                 since: float | None = None, rooms: list[str] | None = None) -> None:
        self.out = out
        self.box = box  # opens our sealed private stream
        self.push = push
        self.private = private_topic(identity)
        self.heartbeats = heartbeats
        self.tracker = SeqTracker()
        self.epoch: str | None = None
        # Until a sys/ event says which broker is speaking (at start, and after the connection
        # dropped), room frames are kept back: a restarted broker's first events must follow
        # its epoch record, not precede it.
        self.epoch_known = False
        self.held: list[bytes] = []
        # --resume: each room topic's last seq in the file, counted from once the broker is heard
        self.resume = dict(resume or {})
        # --since: asked once the broker is heard; until its answer (or SINCE_WAIT), room frames
        # are kept back, so each room's replay starts before its first live event.
        self.since = since
        self.since_rooms = rooms
        self.since_ref: int | None = None
        self.since_deadline = 0.0

    def connection_lost(self) -> None:
        self.epoch_known = False

    def frame(self, data: bytes, now: float) -> None:
        try:
            data = open_publication(self.box, data)  # u/ only; the rest as it is
        except SealError:
            log.debug("a u/ publication that does not open with our key: dropped")
            return
        raw_topic, _, body = data.partition(b" ")
        topic = raw_topic.decode("utf-8", "replace")
        if ((not self.epoch_known or self.since_ref is not None) and topic.startswith(ROOM_PREFIX)
                and len(self.held) < HOLD_MAX):
            self.held.append(data)
            return
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
            if isinstance(epoch, str) and not self.epoch_known:
                self.epoch_known = True
                # Subscribed now (u/ included): baselines from the file before any held frame.
                resume, self.resume = self.resume, {}
                for topic_, seq in resume.items():
                    self.apply(self.tracker.resume(topic_, seq, now))
                if self.since is not None:  # held on until the answer
                    self._ask_since(now)
                else:
                    self._release_held(now)
            if kind not in ("heartbeat", "stats") or self.heartbeats:  # the broker's pulse: opt-in
                self.out.event(topic, ev)
        elif topic == self.private:
            if kind == "since" and self.since_ref is not None and ev.get("ref") == self.since_ref:
                self._replay_from(ev.get("seqs"), ev.get("count"), now)
            elif kind == "error" and self.since_ref is not None and ev.get("ref") == self.since_ref:
                log.warning("broker: %s: %s; going on live only", _c(ev.get("code")), _c(ev.get("detail")))
                self.since_ref = None
                self._release_held(now)
            elif kind == "history" and ev.get("ref") in self.tracker.probes and type(ev.get("upto")) is int:
                self.apply(self.tracker.probed(ev["ref"], ev["upto"], now))
            elif kind == "history" and type(ev.get("ref")) is int and type(ev.get("after")) is int:
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

    def _release_held(self, now: float) -> None:
        held, self.held = self.held, []
        for frame in held:
            self.frame(frame, now)

    def _ask_since(self, now: float) -> None:
        """--since: ask where each room's events from that time begin (once: later
        reconnections resume from what was written, as always)."""
        since, self.since = self.since, None
        self.since_ref = SINCE_REF
        self.since_deadline = now + SINCE_WAIT
        rooms = [room_of_topic(topic) or "" for topic in self.since_rooms] if self.since_rooms else None
        self._send(Since(ts=since or 0.0, rooms=rooms, ref=SINCE_REF))

    def _replay_from(self, seqs: object, count: object, now: float) -> None:
        """The broker said where to start: each room is counted from there, and what follows is
        fetched from its history by the usual backfill (as --resume does), before its live
        events, which were held until now."""
        self.since_ref = None
        found = {room: seq for room, seq in seqs.items()
                 if isinstance(room, str) and type(seq) is int} if isinstance(seqs, dict) else {}
        if type(count) is int and count > len(found):
            log.warning("--since: %d rooms have events since then; replaying the %d most recent",
                        count, len(found))
        for room, seq in sorted(found.items()):
            topic = room_topic(room) if normalize_room(room) == room else None
            if topic is not None:
                self.apply(self.tracker.resume(topic, seq, now))
        self._release_held(now)

    def tick(self, now: float) -> None:
        """Timers: the --since answer that never came (live only, said), then the tracker's."""
        if self.since_ref is not None and now >= self.since_deadline:
            log.warning("--since: no answer from the broker; going on live only")
            self.since_ref = None
            self._release_held(now)
        self.apply(self.tracker.tick(now))

    def deadline(self) -> float | None:
        times = [t for t in (self.tracker.deadline(), self.since_deadline if self.since_ref else None)
                 if t is not None]
        return min(times, default=None)

    def apply(self, outs: list[Out]) -> None:
        for item in outs:
            if isinstance(item, Write):
                self.out.event(item.topic, item.item, item.backfill)
            elif isinstance(item, Gap):
                self.out.gap(item, time.time())
            elif isinstance(item, Reset):
                self.out.reset(item, time.time())
            elif isinstance(item, Probe):  # no events: the answer's upto is what counts
                self._send(HistoryRequest(room=room_of_topic(item.topic) or "", after=item.after, limit=0,
                                          ref=item.ref))
            else:
                room = room_of_topic(item.topic) or ""
                self._send(HistoryRequest(room=room, after=item.after, before=item.before,
                                          limit=item.limit, ref=item.ref))

    def _send(self, request: HistoryRequest | Since) -> None:
        try:
            self.push.send(encode_client_message(request), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the broker is unreachable: the deadline turns this into a gap record


def resume_points(path: Path, topics: list[str]) -> dict[str, int]:
    """--resume: the last seq of each room topic a jsonl log accounts for (an event's seq, a
    gap's `to`), in file order, so a reset's new numbering wins. Only `topics` (r/ for all)
    count; an unreadable line (cut short by a crash) is skipped."""
    last: dict[str, int] = {}
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return last
    with file:
        for line in file:
            try:
                record = _decode(line)
            except msgspec.DecodeError:
                continue
            if not isinstance(record, dict):
                continue
            topic = record.get("topic")
            if not isinstance(topic, str) or not room_of_topic(topic) or \
                    not any(topic.startswith(prefix) for prefix in topics):
                continue
            kind = record.get("type")
            seq = record.get("to") if kind == "gap" else record.get("seq")
            if type(seq) is int:
                last[topic] = seq - 1 if kind == "reset" else seq  # the reset's event follows it
    return last


def _pipe_reader_watch(out: TapLog) -> int | None:
    """stdout's descriptor when the tap writes to a pipe, to notice its reader leaving."""
    if not isinstance(out.handler, _StdoutHandler):
        return None
    try:
        fd = sys.stdout.fileno()
        return fd if stat.S_ISFIFO(os.fstat(fd).st_mode) else None
    except (OSError, ValueError):
        return None


def _refused(watch: HandshakeWatch, endpoints: Endpoints) -> bool:
    """True (and said, in one line) when the broker refused our key for good; a refusal for
    now (too many connections) passes, as libzmq retries."""
    if "auth" not in watch.drain() or watch.status == BUSY_STATUS:
        return False
    print(f"zchat tap: {watch.explain(endpoints.input, endpoints.flags())[1]}", file=sys.stderr, flush=True)
    return True


def room_topics(rooms: list[str] | None) -> list[str]:
    """The room topics to subscribe to: r/ (every room), or r/<room>/ for each of `rooms`
    (ValueError for an invalid name)."""
    if not rooms:
        return [ROOM_PREFIX]
    topics = []
    for name in rooms:
        room = normalize_room(name)
        if room is None:
            raise ValueError(f"--room {name!r}: not a valid room name")
        topics.append(room_topic(room))
    return sorted(set(topics))


def run_tap(endpoints: Endpoints, server_key: bytes, keypair: KeyPair, out: TapLog,
            heartbeats: bool = False, rooms: list[str] | None = None,
            seconds: float | None = None, resume: dict[str, int] | None = None,
            since: float | None = None, broker_key: bytes | None = None) -> int:
    """Log until SIGINT or SIGTERM, `out` has its count of events, or `seconds` have passed;
    then write what is held, flush, close and return 0."""
    topics = room_topics(rooms)
    ctx = zmq.Context()
    sub = curve_client(ctx, zmq.SUB, endpoints, server_key, keypair)
    push = curve_client(ctx, zmq.PUSH, endpoints, server_key, keypair)
    push.sndhwm = L.CLIENT_SNDHWM
    # libzmq sends a SUB's subscriptions in byte order (r/..., sys/, u/...), so a first heartbeat
    # proves the room topics are installed; u/<id>/ follows within the same batch.
    # With --room, the broker sends only those rooms: the filtering is ZeroMQ's.
    for topic in (private_topic(keypair.identity), *topics, SYSTEM_TOPIC):
        sub.subscribe(topic.encode())
    sub.connect(endpoints.publish)
    watch = HandshakeWatch(push, keypair.identity)  # a refused key: say so and exit
    push.connect(endpoints.input)
    box = box_for(keypair.secret, broker_key or server_key)  # through a relay: the broker's key
    tap = Tap(out, push, keypair.identity, box, heartbeats, resume,
              since=since, rooms=topics if rooms else None)

    stopping: list[int] = []
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    old_handlers = {sig: signal.signal(sig, lambda signum, _: stopping.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    poller = zmq.Poller()
    sub_monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    poller.register(sub, zmq.POLLIN)
    poller.register(sub_monitor, zmq.POLLIN)
    poller.register(wake_r.fileno(), zmq.POLLIN)
    poller.register(watch.monitor, zmq.POLLIN)
    reader_watch = _pipe_reader_watch(out)
    if reader_watch is not None:  # a pipe reports POLLERR once its reader has gone: stop then
        poller.register(reader_watch, zmq.POLLERR)
    stop_at = None if seconds is None else time.monotonic() + seconds
    try:
        while not stopping and not out.done:
            deadline = min((t for t in (tap.deadline(), stop_at) if t is not None), default=None)
            timeout = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            ready = dict(poller.poll(timeout))
            if sub_monitor in ready:
                while True:
                    try:
                        sub_monitor.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    tap.connection_lost()  # the next events may come from a restarted broker
            if sub in ready:
                for _ in range(DRAIN_BATCH):
                    try:
                        data = sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    tap.frame(data, time.monotonic())
                    if out.done:
                        break
            if reader_watch is not None and reader_watch in ready:
                raise ReaderGone
            if watch.monitor in ready and _refused(watch, endpoints):
                return 1
            if wake_r.fileno() in ready:
                try:
                    wake_r.recv(512)
                except BlockingIOError:
                    pass
            tap.tick(time.monotonic())
            if stop_at is not None and time.monotonic() >= stop_at:
                break
        tap.apply(tap.tracker.close())
        return 0
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        wake_r.close()
        wake_w.close()
        sub.disable_monitor()
        sub_monitor.close(0)
        watch.close(push)
        sub.close(0)
        push.close(0)
        ctx.term()
        out.close()
