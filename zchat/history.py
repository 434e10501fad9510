"""Stored history: SQLite (stdlib sqlite3, WAL) under the broker's data directory.

What is kept:
- every public event (topic r/<room>/), exactly as published, with its
  per-topic sequence number: late joiners and gap backfills read it;
- each room's last sequence number (table `rooms`, written with its events),
  so numbering continues after a restart and after retention dropped every
  event of a room (the newest ROOMS_REMEMBERED such emptied rooms are kept);
  with the time of its oldest stored event, so that retention finds the rooms
  whose events expire without looking at every room;
- private messages for offline users, sealed end to end (the broker cannot
  read them), bound to the key the sender encrypted to: at most
  MAILBOX_PER_USER per key, of which at most MAILBOX_PER_SENDER from one
  sender; never in the public events table; deleted once delivered (in the
  first commit after they were published: a crash in between delivers them
  twice rather than never);
- which key last held each name, so a message to an offline name can be
  encrypted to that key.

The broker writes one transaction per loop turn, before it publishes what
the turn produced: an event a client has seen is on disk (kill -9 safe; WAL
with synchronous=NORMAL gives up only the last commits on power loss).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zchat import limits as L
from zchat.protocol import ROOM_PREFIX

log = logging.getLogger("zchat.broker")

CHECKPOINT_INTERVAL = 1.0  # seconds between WAL checkpoints (off the broker's thread)
# WAL frames (pages) past which a checkpoint makes the broker's commits wait for it to catch up:
# that pass syncs the disk twice, a stall of a few ms (tens under I/O load), which at 64 MB
# came every few seconds at 10k msg/s and showed in the p99 (bench.py). 1 GB of 4 KB pages:
# every couple of minutes at 1k messages a second.
CATCH_UP_FRAMES = 262_144
# The database holds offline DMs and who held which name: owner only, whatever the umask.
PRIVATE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite creates these with the database's own mode

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    body BLOB NOT NULL,  -- the event's JSON exactly as published; searched with json_extract
    PRIMARY KEY (topic, seq)
) WITHOUT ROWID;
-- No index on ts: it cost a quarter of each insert. Retention by age walks each room in
-- seq order (ts rises with seq) and `zchat history --since` scans.
DROP INDEX IF EXISTS events_ts;
-- One row per room: written with its events, so a room's number is one lookup away (the
-- broker keeps no room in memory that nobody uses), and retention's work follows what changes.
CREATE TABLE IF NOT EXISTS rooms (
    topic TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,  -- kept after retention dropped the room's events
    oldest REAL,                -- ts of its oldest stored event; NULL: none stored
    newest REAL NOT NULL        -- ts of its newest event
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rooms_oldest ON rooms (oldest) WHERE oldest IS NOT NULL;
CREATE INDEX IF NOT EXISTS rooms_emptied ON rooms (newest) WHERE oldest IS NULL;
CREATE TABLE IF NOT EXISTS mailbox (
    id INTEGER PRIMARY KEY,
    recipient TEXT NOT NULL,  -- the key the sender encrypted to: only it gets the message
    sender TEXT NOT NULL,  -- the sender's key: the mailbox's share per sender, drop notices
    ts REAL NOT NULL,
    ref INTEGER,  -- the sender's ref, named in a drop notice
    body BLOB NOT NULL  -- the recipient's `direct` event; its text is sealed (`box`)
);
CREATE INDEX IF NOT EXISTS mailbox_recipient ON mailbox (recipient, id);
CREATE TABLE IF NOT EXISTS names (name_key TEXT PRIMARY KEY, identity TEXT NOT NULL, seen REAL NOT NULL)
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS names_seen ON names (seen);
-- Each room's topic (`topic` here is the room's r/<room>/, as in `rooms`): a row per room
-- with one, the ROOM_TOPICS_KEPT most recently set. Its changes are room events as well.
CREATE TABLE IF NOT EXISTS room_topics (topic TEXT PRIMARY KEY, text TEXT NOT NULL, set_by TEXT NOT NULL,
    ts REAL NOT NULL) WITHOUT ROWID;
"""
# A database from before the rooms table: its numbers were in topic_seq, and in the events.
MIGRATE_ROOMS = """
INSERT INTO rooms (topic, last_seq, oldest, newest)
    SELECT topic, max(seq), min(ts), max(ts) FROM events GROUP BY topic;
INSERT INTO rooms (topic, last_seq, oldest, newest) SELECT topic, last_seq, NULL, 0 FROM topic_seq WHERE true
    ON CONFLICT (topic) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq);
DROP TABLE topic_seq;
"""
RETAIN_BATCH = 500  # rooms a retention pass takes from each of its sources at most
# A loop turn's events go in as multi-row INSERTs of these many rows: one statement step for
# many rows costs about half what executemany's step per row does (bench.py, flat out). A
# power of two, so that any count is a few statements of at most log2 + 1 distinct shapes.
INSERT_ROWS = 256
_INSERT_EVENTS = "INSERT OR IGNORE INTO events (topic, seq, ts, body) VALUES "


@dataclass(frozen=True)
class Retention:
    per_room: int = L.HISTORY_KEEP_PER_ROOM  # newest events kept per room (0: no count limit)
    days: float = L.HISTORY_KEEP_DAYS  # events older than this are dropped (0: no age limit)
    mailbox: int = L.MAILBOX_PER_USER
    mailbox_per_sender: int = L.MAILBOX_PER_SENDER


@dataclass(frozen=True)
class StoredEvent:
    """One row of the public record, as `zchat history` reads it."""

    topic: str
    seq: int
    ts: float
    body: bytes


EventRow = tuple[str, int, float, bytes]  # topic, seq, ts, body: what the broker writes
MailRow = tuple[str, str, float, bytes, int | None]  # recipient, sender, ts, body, the sender's ref

log = logging.getLogger("zchat.broker")


@dataclass(frozen=True)
class DroppedMail:
    """A kept message pushed out of a full mailbox before it was delivered."""

    sender: str
    to: str  # the name its sender wrote to
    ts: float
    ref: int | None


@dataclass(frozen=True)
class MailOutcome:
    """What the mailbox did with one message: kept it (possibly pushing others out), or
    refused it because its sender's share of that mailbox is used up."""

    kept: bool
    dropped: tuple[DroppedMail, ...] = ()


def make_private(path: Path | str) -> list[str]:
    """Create the database file 0600 if it is missing, and bring it and its side files to
    0600 if they exist (older versions left them 0644). SQLite gives a new -wal or -shm file
    the database file's mode, so those follow. Returns the files whose mode was changed."""
    tightened: list[str] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_MODE:  # an old file, or a umask like 0277
            os.fchmod(fd, PRIVATE_MODE)
            tightened.append(str(path))
    finally:
        os.close(fd)
    for suffix in SIDE_FILES:
        side = f"{path}{suffix}"
        try:
            if stat.S_IMODE(os.stat(side).st_mode) != PRIVATE_MODE:
                os.chmod(side, PRIVATE_MODE)
                tightened.append(side)
        except FileNotFoundError:
            pass
    return tightened


def open_to_others(directory: Path | str) -> int:
    """The permission bits `directory` grants its group and others (0: none)."""
    return stat.S_IMODE(os.stat(directory).st_mode) & 0o077


def connect(path: Path | str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    else:
        db = sqlite3.connect(str(path), timeout=5.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        columns = [row[1] for row in db.execute("PRAGMA table_info(events)")]
        if columns and columns != ["topic", "seq", "ts", "body"]:
            db.close()
            raise sqlite3.DatabaseError(f"{path} was written by an older zchat; move it aside to "
                                        "start afresh")
        _drop_clear_mail(db)
        db.executescript(SCHEMA)
    return db


def _drop_clear_mail(db: sqlite3.Connection) -> None:
    """A mailbox from before end-to-end encryption holds private text in clear, which no
    client of this version could show: delete it rather than keep it readable on disk."""
    columns = [row[1] for row in db.execute("PRAGMA table_info(mailbox)")]
    if columns and "sender" not in columns:
        waiting = db.execute("SELECT count(*) FROM mailbox").fetchone()[0]
        db.execute("DROP TABLE mailbox")
        if waiting:
            log.warning("deleted %d undelivered private message(s) kept in clear by an older zchat; "
                        "private messages are now end-to-end encrypted", waiting)


def _insert_sql(rows: int) -> str:
    return _INSERT_EVENTS + ",".join(("(?, ?, ?, ?)",) * rows)


_INSERT_SQL = {1 << bit: _insert_sql(1 << bit) for bit in range(INSERT_ROWS.bit_length())}


def insert_events(db: sqlite3.Connection, events: list[EventRow]) -> int:
    """Insert `events`, skipping any whose (topic, seq) is stored already; returns how many
    were inserted. Statements of INSERT_ROWS rows, then of the powers of two left over."""
    inserted, start, count = 0, 0, len(events)
    while start < count:
        size = min(INSERT_ROWS, 1 << ((count - start).bit_length() - 1))
        chunk = events[start:start + size]
        # The body as a bytearray: sqlite3 binds one as it is, but looks for an adapter for
        # every bytes object first (two failing attribute lookups; a fifth of an insert).
        params = [value for topic, seq, ts, body in chunk for value in (topic, seq, ts, bytearray(body))]
        inserted += db.execute(_INSERT_SQL[size], params).rowcount
        start += size
    return inserted


class Checkpointer(threading.Thread):
    """Moves the WAL into the database from a thread of its own, so the broker's commits
    never stop to do it inline (SQLite's auto-checkpoint would, now and then, for ms).

    SQLite writes the WAL from its start again only after a checkpoint copied all of it. Under
    a steady stream of commits a pass never gets there (the broker commits while it copies,
    and each pass syncs the disk), so the WAL grew by every commit for as long as the stream
    lasted: 6 MB a second at 1k messages a second. So once the WAL is past CATCH_UP_FRAMES, a
    second, short pass (what was committed during the first) holds the broker's writes."""

    def __init__(self, path: Path | str, writing: threading.Lock,
                 interval: float = CHECKPOINT_INTERVAL) -> None:
        super().__init__(name="zchat-checkpoint", daemon=True)
        self.path, self.interval, self.writing = path, interval, writing
        self.stopping = threading.Event()
        self.held = 0  # passes made holding the writer (the tests look)

    def run(self) -> None:
        db = sqlite3.connect(str(self.path), timeout=5.0, isolation_level=None)
        try:
            while not self.stopping.wait(self.interval):
                self.checkpoint(db)
        except sqlite3.Error:
            pass  # the broker's own writes still work; the WAL just grows until restart
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        # Never blocks. Its figures are the WAL's when it began: all copied does not mean that
        # nothing was committed meanwhile.
        busy, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if busy or frames < CATCH_UP_FRAMES:
            return  # the WAL is not worth making the broker wait yet
        with self.writing:  # the frames committed during that pass, with no commit in between
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.held += 1


class HistoryStore:
    def __init__(self, path: Path | str, retention: Retention | None = None) -> None:
        self.path = path
        # Files whose mode was brought to 0600 on opening (the broker logs them).
        self.tightened = make_private(path) if str(path) != ":memory:" else []
        self.db = connect(path)
        migrating = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = "
                                    "'topic_seq'").fetchone() is not None
        if migrating:
            self.db.executescript("BEGIN;" + MIGRATE_ROOMS + "COMMIT;")
        self._retention = retention or Retention()
        # Retention's work list: rooms written since the last pass (their count limit), and a
        # walk over every room when the limits changed or the database was migrated.
        self._written: set[str] = set()
        self._sweep_from: str | None = "" if migrating else None
        # Rooms emptied by retention (numbers kept) and names written, since they were last
        # counted: a pass counts (and trims) only when these could have passed their bound.
        self._emptied = self.db.execute("SELECT count(*) FROM rooms WHERE oldest IS NULL").fetchone()[0]
        self._names_written = L.KNOWN_NAMES  # unknown at start: count at the first pass
        # Events stored, for stats: counted once here, then kept up to date by write and prune.
        self.stored: int = self.db.execute("SELECT count(*) FROM events").fetchone()[0]
        self.collisions = 0  # events refused because their (topic, seq) was already stored
        # Mail handed out by take_mail, recipient -> highest id: deleted by the next write,
        # whose commit follows the publishing.
        self._mail_sent: dict[str, int] = {}
        self.checkpointer: Checkpointer | None = None
        self.writing = threading.Lock()  # held by each turn's transaction; see Checkpointer
        if str(path) != ":memory:":
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.checkpointer = Checkpointer(path, self.writing)
            self.checkpointer.start()

    def close(self) -> None:
        if self._mail_sent:  # what the last turn delivered
            try:
                self.write([], [], [], time.time())
            except sqlite3.Error:
                pass  # delivered again after the restart, never lost
        if self.checkpointer is not None:
            self.checkpointer.stopping.set()
            self.checkpointer.join(5)
        self.db.close()

    # --- start-up --------------------------------------------------------------

    @property
    def retention(self) -> Retention:
        return self._retention

    @retention.setter
    def retention(self, retention: Retention) -> None:
        if (retention.per_room, retention.days) != (self._retention.per_room, self._retention.days):
            self._sweep_from = ""  # new limits: every room gets a look, a batch per pass
        self._retention = retention

    def last_seqs(self) -> dict[str, int]:
        """Every room's last sequence number (rooms emptied by retention included)."""
        seqs = dict(self.db.execute("SELECT topic, last_seq FROM rooms"))
        for topic, last in self.db.execute("SELECT topic, max(seq) FROM events GROUP BY topic"):
            seqs[topic] = max(last, seqs.get(topic, 0))
        return seqs

    def last_seq(self, topic: str) -> int:
        """One room's last sequence number, 0 for a room never used (or long forgotten): what
        the core asks when a room nobody was in is used again. Two index lookups: its newest
        event, and its row (which keeps the number once retention dropped the events)."""
        db = self.db
        event = db.execute("SELECT max(seq) FROM events WHERE topic = ?", (topic,)).fetchone()[0]
        row = db.execute("SELECT last_seq FROM rooms WHERE topic = ?", (topic,)).fetchone()
        return max(event or 0, row[0] if row is not None else 0)

    def known_names(self, limit: int = L.KNOWN_NAMES) -> dict[str, str]:
        rows = self.db.execute("SELECT name_key, identity FROM names ORDER BY seen DESC LIMIT ?", (limit,))
        return {key: identity for key, identity in reversed(rows.fetchall())}

    def topics(self, limit: int = L.ROOM_TOPICS_KEPT) -> dict[str, tuple[str, str]]:
        """room -> (topic, who set it), the most recently set last (the core's order)."""
        rows = self.db.execute("SELECT topic, text, set_by FROM room_topics ORDER BY ts DESC LIMIT ?",
                               (limit,))
        return {topic[len(ROOM_PREFIX):-1]: (text, by) for topic, text, by in reversed(rows.fetchall())}

    def set_topic(self, topic: str, text: str, by: str, ts: float) -> None:
        """Store (or, with "", drop) a room's topic, keeping the ROOM_TOPICS_KEPT newest."""
        db = self.db  # autocommit: a trim lost to a crash is done by the next change
        if text:
            db.execute("INSERT INTO room_topics (topic, text, set_by, ts) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (topic) DO UPDATE SET text = excluded.text, set_by = excluded.set_by, "
                       "ts = excluded.ts", (topic, text, by, ts))
        else:
            db.execute("DELETE FROM room_topics WHERE topic = ?", (topic,))
        db.execute("DELETE FROM room_topics WHERE topic IN (SELECT topic FROM room_topics "
                   "ORDER BY ts DESC LIMIT -1 OFFSET ?)", (L.ROOM_TOPICS_KEPT,))

    # --- one transaction per broker loop turn ------------------------------------

    def write(self, events: list[EventRow], mail: list[MailRow],
              names: list[tuple[str, str]], now: float) -> list[MailOutcome]:
        """Store one loop turn; returns what the mailbox did with each of `mail`, in order."""
        if not (events or mail or names or self._mail_sent):
            return []
        with self.writing:
            return self._write(events, mail, names, now)

    def _write(self, events: list[EventRow], mail: list[MailRow],
               names: list[tuple[str, str]], now: float) -> list[MailOutcome]:
        db = self.db
        inserted = 0
        newest: dict[str, EventRow] = {}
        delivered, self._mail_sent = self._mail_sent, {}
        db.execute("BEGIN")
        try:
            for recipient, last_id in delivered.items():  # published since the last commit
                db.execute("DELETE FROM mailbox WHERE recipient = ? AND id <= ?", (recipient, last_id))
            if events:
                # Never over a stored event: a (topic, seq) already there means two writers
                # numbered from the same seqs. The stored one stays; the clash is reported.
                inserted = insert_events(db, events)
                if inserted != len(events):
                    self._report_collisions(events, inserted)
                newest = {row[0]: row for row in events}  # each room's last event in this turn
                # A room's row once per retention pass, not per turn: the pass keeps it up to
                # date; this makes sure a room is known (with its oldest event) after a crash.
                written = self._written
                first = [(topic, seq, ts, ts) for topic, seq, ts, _ in newest.values()
                         if topic not in written]
                if first:
                    db.executemany(
                        "INSERT INTO rooms (topic, last_seq, oldest, newest) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (topic) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq), "
                        "newest = excluded.newest, oldest = coalesce(oldest, excluded.oldest)", first)
            outcomes = [self._keep_mail(*row) for row in mail]
            if names:
                db.executemany(
                    "INSERT INTO names (name_key, identity, seen) VALUES (?, ?, ?) ON CONFLICT(name_key) "
                    "DO UPDATE SET identity = excluded.identity, seen = excluded.seen",
                    [(key, identity, now) for key, identity in names])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            for recipient, last_id in delivered.items():  # still to delete
                self._mail_sent[recipient] = max(last_id, self._mail_sent.get(recipient, 0))
            raise
        self.stored += inserted
        if events:
            self._written.update(newest)
        self._names_written += len(names)
        return outcomes

    def _report_collisions(self, events: list[EventRow], inserted: int) -> None:
        clashes = len(events) - inserted
        first = events[0]
        log.error("history: %d event(s) not stored because their (topic, seq) is already stored "
                  "(first of this batch: %s seq %d); is another broker writing %s?",
                  clashes, first[0], first[1], self.path)
        self.collisions += clashes

    def _keep_mail(self, recipient: str, sender: str, ts: float, body: bytes,
                   ref: int | None) -> MailOutcome:
        """Keep one message for `recipient`, fairly: each sender may hold a few of its slots
        (more is refused), and a full mailbox pushes out the oldest message of whichever
        sender holds the most. So junk from many keys cannot push out anyone's real
        message before it has pushed out its own, and every sender hears of a drop."""
        db, limit = self.db, self.retention
        held = db.execute("SELECT count(*) FROM mailbox WHERE recipient = ? AND sender = ?",
                          (recipient, sender)).fetchone()[0]
        if held >= limit.mailbox_per_sender or limit.mailbox <= 0:
            return MailOutcome(kept=False)
        total = db.execute("SELECT count(*) FROM mailbox WHERE recipient = ?", (recipient,)).fetchone()[0]
        dropped = []
        for _ in range(total - limit.mailbox + 1):  # normally once at most
            row = db.execute(
                "SELECT id, sender, coalesce(json_extract(CAST(body AS TEXT), '$.to'), ''), ts, ref "
                "FROM mailbox WHERE recipient = ?1 AND sender = (SELECT sender FROM mailbox "
                "WHERE recipient = ?1 GROUP BY sender ORDER BY count(*) DESC, min(id) LIMIT 1) "
                "ORDER BY id LIMIT 1",
                (recipient,)).fetchone()
            db.execute("DELETE FROM mailbox WHERE id = ?", (row[0],))
            dropped.append(DroppedMail(*row[1:]))
        db.execute("INSERT INTO mailbox (recipient, sender, ts, ref, body) VALUES (?, ?, ?, ?, ?)",
                   (recipient, sender, ts, ref, body))
        return MailOutcome(kept=True, dropped=tuple(dropped))

    # --- reads -------------------------------------------------------------------

    def range(self, topic: str, after: int, upto: int, limit: int) -> list[bytes]:
        """Bodies of the newest `limit` events with after < seq <= upto, oldest first."""
        rows = self.db.execute(
            "SELECT body FROM events WHERE topic = ? AND seq > ? AND seq <= ? ORDER BY seq DESC LIMIT ?",
            (topic, after, upto, limit)).fetchall()
        return [bytes(body) for (body,) in reversed(rows)]

    def since(self, since: float, topics: list[str] | None, limit: int) -> tuple[dict[str, int], int]:
        """For `tap --since`: each public room with stored events at or after `since` (only
        `topics`, if given) -> the seq just before its first such event; at most `limit` rooms
        (the most recently active), and how many there are. No index on ts: ts rises with seq,
        so a binary search over seq finds the first one (some twenty lookups a room)."""
        rooms = {topic: (last, newest) for topic, last, newest in self.db.execute(
            "SELECT topic, last_seq, newest FROM rooms WHERE topic LIKE 'r/%'")}
        for topic in self._written:  # rooms written to since the last pass: their rows lag behind
            row = self.db.execute("SELECT seq, ts FROM events WHERE topic = ? ORDER BY seq DESC LIMIT 1",
                                  (topic,)).fetchone()
            if row is not None and topic.startswith("r/"):
                last, newest = rooms.get(topic, (0, row[1]))
                rooms[topic] = (max(last, row[0]), max(newest, row[1]))
        wanted = set(topics) if topics is not None else None
        rows = sorted(((newest, topic, last) for topic, (last, newest) in rooms.items()
                       if newest >= since and (wanted is None or topic in wanted)), reverse=True)
        rows = [(topic, last) for _, topic, last in rows]
        seqs: dict[str, int] = {}
        for topic, last in rows[:limit]:
            first = self._first_since(topic, since, last)
            if first is not None:
                seqs[topic] = first - 1
        return seqs, len(rows)

    def _first_since(self, topic: str, since: float, last: int) -> int | None:
        """The seq of `topic`'s first stored event with ts >= `since` (None: there is none)."""
        query = "SELECT seq, ts FROM events WHERE topic = ? AND seq >= ? ORDER BY seq LIMIT 1"
        lo, hi, found = 0, last, None
        while lo <= hi:
            mid = (lo + hi) // 2
            row = self.db.execute(query, (topic, mid)).fetchone()
            if row is None:
                hi = mid - 1
            elif row[1] >= since:
                found, hi = row[0], mid - 1
            else:
                lo = row[0] + 1
        return found

    def take_mail(self, recipient: str) -> list[bytes]:
        """The mail kept for `recipient`, oldest first, for the caller to publish now. It is
        deleted by the next `write`, in the commit that follows the publishing, and is not
        handed out again meanwhile."""
        after = self._mail_sent.get(recipient, 0)
        rows = self.db.execute("SELECT id, body FROM mailbox WHERE recipient = ? AND id > ? ORDER BY id",
                               (recipient, after)).fetchall()
        if rows:
            self._mail_sent[recipient] = rows[-1][0]
        return [bytes(body) for _, body in rows]

    # --- retention -------------------------------------------------------------------

    def retain(self, now: float) -> int:
        """The broker's periodic retention pass; returns how many events it dropped. Its cost
        follows what changed, not how many rooms there are: the rooms written since the last
        pass (their count limit), the rooms whose oldest event has expired (a range of an
        index), a batch of the walk over every room after the limits changed; then the bounds
        on emptied rooms and on names. A room nobody writes costs nothing until its events
        expire."""
        topics, self._written = self._written, set()
        if self.retention.days > 0:
            cutoff = now - self.retention.days * 86400
            topics.update(topic for (topic,) in self.db.execute(
                "SELECT topic FROM rooms WHERE oldest < ? ORDER BY oldest LIMIT ?", (cutoff, RETAIN_BATCH)))
        if self._sweep_from is not None:
            batch = [topic for (topic,) in self.db.execute(
                "SELECT topic FROM rooms WHERE topic > ? AND oldest IS NOT NULL ORDER BY topic LIMIT ?",
                (self._sweep_from, RETAIN_BATCH))]
            topics.update(batch)
            self._sweep_from = batch[-1] if len(batch) == RETAIN_BATCH else None
        dropped = self.prune(now, sorted(topics)) if topics else 0
        self._bound_rooms()
        self._bound_names()
        return dropped

    def prune(self, now: float | None = None, topics: Iterable[str] | None = None) -> int:
        """Apply retention to `topics` (None: every room stored, found by a scan); returns how
        many events were dropped. Per room it costs index lookups and the rows dropped, so it
        stays short however much history is kept."""
        now = time.time() if now is None else now
        db = self.db
        if topics is None:
            topics = [topic for (topic,) in db.execute("SELECT DISTINCT topic FROM events")]
        cutoff = now - self.retention.days * 86400 if self.retention.days > 0 else None
        dropped = 0
        db.execute("BEGIN")
        try:
            for topic in topics:
                dropped += self._prune_room(topic, cutoff)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.stored = max(0, self.stored - dropped)
        return dropped

    def _prune_room(self, topic: str, cutoff: float | None) -> int:
        db = self.db
        newest = db.execute("SELECT seq, ts FROM events WHERE topic = ? ORDER BY seq DESC LIMIT 1",
                            (topic,)).fetchone()
        if newest is None:  # nothing stored (any more): nothing to expire
            self._emptied += db.execute(
                "UPDATE rooms SET oldest = NULL WHERE topic = ? AND oldest IS NOT NULL", (topic,)).rowcount
            return 0
        last, last_ts = newest
        first_kept = 1
        if self.retention.per_room > 0:
            first_kept = last - self.retention.per_room + 1
        if cutoff is not None:
            # The oldest event young enough to keep: a walk over the expired ones only.
            young = db.execute("SELECT seq FROM events WHERE topic = ? AND ts >= ? ORDER BY seq LIMIT 1",
                               (topic, cutoff)).fetchone()
            first_kept = max(first_kept, young[0] if young is not None else last + 1)
        dropped = 0
        if first_kept > 1:
            dropped = db.execute("DELETE FROM events WHERE topic = ? AND seq < ?",
                                 (topic, first_kept)).rowcount
        oldest = db.execute("SELECT ts FROM events WHERE topic = ? ORDER BY seq LIMIT 1",
                            (topic,)).fetchone()
        if oldest is None:
            self._emptied += 1
        # ts rises with seq, so the first event left is the oldest; the room's number stays.
        db.execute("INSERT INTO rooms (topic, last_seq, oldest, newest) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (topic) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq), "
                   "oldest = excluded.oldest, newest = max(newest, excluded.newest)",
                   (topic, last, oldest[0] if oldest is not None else None, last_ts))
        return dropped

    def _bound_rooms(self) -> None:
        """Keep the numbers of at most ROOMS_REMEMBERED emptied rooms, the most recently used:
        a room forgotten here numbers from 1 again when it is next used."""
        if self._emptied <= L.ROOMS_REMEMBERED:
            return
        db = self.db
        self._emptied = db.execute("SELECT count(*) FROM rooms WHERE oldest IS NULL").fetchone()[0]
        excess = self._emptied - L.ROOMS_REMEMBERED
        if excess > 0:
            db.execute("DELETE FROM rooms WHERE topic IN (SELECT topic FROM rooms WHERE oldest IS NULL "
                       "ORDER BY newest LIMIT ?)", (excess,))
            self._emptied -= excess

    def _bound_names(self) -> None:
        """Keep the KNOWN_NAMES most recently used names (the core remembers no more); counted
        only after a tenth of that many were written since the last count."""
        if self._names_written < L.KNOWN_NAMES // 10:
            return
        self._names_written = 0
        db = self.db
        if db.execute("SELECT count(*) FROM names").fetchone()[0] > L.KNOWN_NAMES:
            db.execute("DELETE FROM names WHERE seen < (SELECT seen FROM names ORDER BY seen DESC "
                       "LIMIT 1 OFFSET ?)", (L.KNOWN_NAMES - 1,))


def kept_mail(path: Path | str, since: float | None = None,
              limit: int | None = None) -> list[StoredEvent]:
    """The private messages waiting for offline keys, oldest first, each as the `direct` its
    recipient will get (topic: the recipient's u/<id>/). Their text is sealed to that key."""
    db = connect(path, readonly=True)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'mailbox'").fetchone():
            return []
        where, args = ("WHERE ts >= ?", [since]) if since is not None else ("", [])
        rows = db.execute(f"SELECT recipient, ts, body FROM mailbox {where} ORDER BY id DESC"
                          + (" LIMIT ?" if limit is not None else ""),
                          [*args, limit] if limit is not None else args).fetchall()
        return [StoredEvent(f"u/{recipient}/", 0, ts, bytes(body)) for recipient, ts, body in reversed(rows)]
    finally:
        db.close()


def search(path: Path | str, room: str | None = None, since: float | None = None,
           grep: str | None = None, limit: int | None = None) -> Iterable[StoredEvent]:
    """Read the public record directly (works while the broker runs: WAL readers)."""
    db = connect(path, readonly=True)
    try:
        clauses, args = [], []
        if room is not None:
            clauses.append("topic = ?")
            args.append(f"r/{room}/")
        if since is not None:
            clauses.append("ts >= ?")
            args.append(since)
        if grep:
            clauses.append("instr(lower(coalesce(json_extract(body, '$.text'), '') || ' ' || "
                           "coalesce(json_extract(body, '$.name'), '')), lower(?)) > 0")
            args.append(grep)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = f"SELECT topic, seq, ts, body FROM events {where}"
        if limit is None:
            rows = db.execute(query + " ORDER BY ts, topic, seq", args).fetchall()
        else:  # the newest `limit`, shown oldest first
            rows = db.execute(query + " ORDER BY ts DESC, seq DESC LIMIT ?", [*args, limit]).fetchall()
            rows.reverse()
        for row in rows:
            yield StoredEvent(row[0], row[1], row[2], bytes(row[3]))
    finally:
        db.close()


def stored_rooms(path: Path | str) -> list[str]:
    """The rooms the database has ever numbered an event in, sorted. The `rooms` table has a row
    for each (written with a room's first event after every start), so the events need no scan."""
    db = connect(path, readonly=True)
    try:
        topics = [topic for (topic,) in db.execute("SELECT topic FROM rooms")]
    finally:
        db.close()
    return sorted(topic[2:-1] for topic in topics if topic.startswith("r/") and topic.endswith("/"))
