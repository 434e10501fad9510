"""Stored history: SQLite (stdlib sqlite3, WAL) under the broker's data directory.

What is kept:
- every public event (topic r/<room>/), exactly as published, with its
  per-topic sequence number: late joiners and gap backfills read it;
- each topic's last sequence number, so numbering continues after a restart
  even when retention has pruned every event of a room;
- private messages for offline users, sealed end to end (the broker cannot
  read them), bound to the key the sender encrypted to and deleted once that
  key has them: at most MAILBOX_PER_USER per key, of which at most
  MAILBOX_PER_SENDER from one sender; never in the public events table;
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

log = logging.getLogger("zchat.broker")

CHECKPOINT_INTERVAL = 1.0  # seconds between WAL checkpoints (off the broker's thread)
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
CREATE TABLE IF NOT EXISTS topic_seq (topic TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
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
"""


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


class Checkpointer(threading.Thread):
    """Moves the WAL into the database from a thread of its own, so the broker's commits
    never stop to do it inline (SQLite's auto-checkpoint would, now and then, for ms)."""

    def __init__(self, path: Path | str, interval: float = CHECKPOINT_INTERVAL) -> None:
        super().__init__(name="zchat-checkpoint", daemon=True)
        self.path, self.interval = path, interval
        self.stopping = threading.Event()

    def run(self) -> None:
        db = sqlite3.connect(str(self.path), timeout=5.0, isolation_level=None)
        try:
            while not self.stopping.wait(self.interval):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # never blocks the writer
        except sqlite3.Error:
            pass  # the broker's own writes still work; the WAL just grows until restart
        finally:
            db.close()


class HistoryStore:
    def __init__(self, path: Path | str, retention: Retention | None = None) -> None:
        self.path = path
        self.retention = retention or Retention()
        # Files whose mode was brought to 0600 on opening (the broker logs them).
        self.tightened = make_private(path) if str(path) != ":memory:" else []
        self.db = connect(path)
        # Events stored, for stats: counted once here, then kept up to date by write and prune.
        self.stored: int = self.db.execute("SELECT count(*) FROM events").fetchone()[0]
        self.collisions = 0  # events refused because their (topic, seq) was already stored
        self.checkpointer: Checkpointer | None = None
        if str(path) != ":memory:":
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.checkpointer = Checkpointer(path)
            self.checkpointer.start()

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stopping.set()
            self.checkpointer.join(5)
        self.db.close()

    # --- start-up --------------------------------------------------------------

    def last_seqs(self) -> dict[str, int]:
        """Each room's last sequence number: from its newest event, or from topic_seq, which
        prune() updates before it deletes (so numbers survive even an emptied room)."""
        seqs = dict(self.db.execute("SELECT topic, last_seq FROM topic_seq"))
        for topic, last in self.db.execute("SELECT topic, max(seq) FROM events GROUP BY topic"):
            seqs[topic] = max(last, seqs.get(topic, 0))
        return seqs

    def known_names(self, limit: int = L.KNOWN_NAMES) -> dict[str, str]:
        rows = self.db.execute("SELECT name_key, identity FROM names ORDER BY seen DESC LIMIT ?", (limit,))
        return {key: identity for key, identity in reversed(rows.fetchall())}

    # --- one transaction per broker loop turn ------------------------------------

    def write(self, events: list[EventRow], mail: list[MailRow],
              names: list[tuple[str, str]], now: float) -> list[MailOutcome]:
        """Store one loop turn; returns what the mailbox did with each of `mail`, in order."""
        if not (events or mail or names):
            return []
        db = self.db
        inserted = 0
        db.execute("BEGIN")
        try:
            if events:
                # Never over a stored event: a (topic, seq) already there means two writers
                # numbered from the same seqs. The stored one stays; the clash is reported.
                inserted = db.executemany("INSERT OR IGNORE INTO events (topic, seq, ts, body) "
                                          "VALUES (?, ?, ?, ?)", events).rowcount
                if inserted != len(events):
                    self._report_collisions(events, inserted)
            outcomes = [self._keep_mail(*row) for row in mail]
            if names:
                db.executemany(
                    "INSERT INTO names (name_key, identity, seen) VALUES (?, ?, ?) ON CONFLICT(name_key) "
                    "DO UPDATE SET identity = excluded.identity, seen = excluded.seen",
                    [(key, identity, now) for key, identity in names])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.stored += inserted
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

    def take_mail(self, recipient: str) -> list[bytes]:
        db = self.db
        rows = db.execute("SELECT id, body FROM mailbox WHERE recipient = ? ORDER BY id",
                          (recipient,)).fetchall()
        if rows:
            db.execute("DELETE FROM mailbox WHERE recipient = ? AND id <= ?", (recipient, rows[-1][0]))
        return [bytes(body) for _, body in rows]

    # --- retention -------------------------------------------------------------------

    def prune(self, now: float | None = None, topics: Iterable[str] | None = None) -> int:
        """Apply retention to `topics` (the broker passes the rooms it knows; None: every room
        stored, found by a scan); returns how many events were dropped. Per room it costs index
        lookups and the rows dropped, so it stays short however much history is kept."""
        now = time.time() if now is None else now
        db = self.db
        if topics is None:
            topics = [topic for (topic,) in db.execute("SELECT DISTINCT topic FROM events")]
        cutoff = now - self.retention.days * 86400 if self.retention.days > 0 else None
        dropped = 0
        db.execute("BEGIN")
        try:
            for topic in topics:
                last = db.execute("SELECT max(seq) FROM events WHERE topic = ?", (topic,)).fetchone()[0]
                if last is None:
                    continue
                # Keep the room's last number before its events may go (see last_seqs).
                db.execute("INSERT INTO topic_seq (topic, last_seq) VALUES (?, ?) ON CONFLICT(topic) "
                           "DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)", (topic, last))
                first_kept = 1
                if self.retention.per_room > 0:
                    first_kept = last - self.retention.per_room + 1
                if cutoff is not None:
                    # The oldest event young enough to keep: a walk over the expired ones only.
                    young = db.execute("SELECT seq FROM events WHERE topic = ? AND ts >= ? ORDER BY seq "
                                       "LIMIT 1", (topic, cutoff)).fetchone()
                    first_kept = max(first_kept, young[0] if young is not None else last + 1)
                if first_kept > 1:
                    dropped += db.execute("DELETE FROM events WHERE topic = ? AND seq < ?",
                                          (topic, first_kept)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.stored = max(0, self.stored - dropped)
        return dropped


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
    """The rooms the database has ever numbered an event in, sorted."""
    db = connect(path, readonly=True)
    try:
        topics = {topic for (topic,) in db.execute("SELECT topic FROM topic_seq")}
        topics.update(topic for (topic,) in db.execute("SELECT DISTINCT topic FROM events"))
    finally:
        db.close()
    return sorted(topic[2:-1] for topic in topics if topic.startswith("r/") and topic.endswith("/"))
