"""Stored history: SQLite (stdlib sqlite3, WAL) under the broker's data directory.

What is kept:
- every public event (topic r/<room>/), exactly as published, with its
  per-topic sequence number: late joiners and gap backfills read it;
- each topic's last sequence number, so numbering continues after a restart
  even when retention has pruned every event of a room;
- private messages for offline users (bounded per user), deleted once
  delivered (in the first commit after they were published: a crash in
  between delivers them twice rather than never): they are never written to
  the public events table, and `zchat history` cannot show them;
- which key last held each name, so a message to an offline name reaches
  that key.

The broker writes one transaction per loop turn, before it publishes what
the turn produced: an event a client has seen is on disk (kill -9 safe; WAL
with synchronous=NORMAL gives up only the last commits on power loss).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zchat import limits as L

CHECKPOINT_INTERVAL = 1.0  # seconds between WAL checkpoints (off the broker's thread)

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
    recipient TEXT NOT NULL,
    ts REAL NOT NULL,
    body BLOB NOT NULL
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


@dataclass(frozen=True)
class StoredEvent:
    """One row of the public record, as `zchat history` reads it."""

    topic: str
    seq: int
    ts: float
    body: bytes


EventRow = tuple[str, int, float, bytes]  # topic, seq, ts, body: what the broker writes


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
        db.executescript(SCHEMA)
    return db


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
        self.db = connect(path)
        # Events stored, for stats: counted once here, then kept up to date by write and prune.
        self.stored: int = self.db.execute("SELECT count(*) FROM events").fetchone()[0]
        # Mail handed out by take_mail, recipient -> highest id: deleted by the next write,
        # whose commit follows the publishing.
        self._mail_sent: dict[str, int] = {}
        self.checkpointer: Checkpointer | None = None
        if str(path) != ":memory:":
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.checkpointer = Checkpointer(path)
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

    def write(self, events: list[EventRow], mail: list[tuple[str, float, bytes]],
              names: list[tuple[str, str]], now: float) -> None:
        if not (events or mail or names or self._mail_sent):
            return
        db = self.db
        delivered, self._mail_sent = self._mail_sent, {}
        db.execute("BEGIN")
        try:
            for recipient, last_id in delivered.items():  # published since the last commit
                db.execute("DELETE FROM mailbox WHERE recipient = ? AND id <= ?", (recipient, last_id))
            if events:
                db.executemany("INSERT OR REPLACE INTO events (topic, seq, ts, body) VALUES (?, ?, ?, ?)",
                               events)
            for recipient, ts, body in mail:
                db.execute("INSERT INTO mailbox (recipient, ts, body) VALUES (?, ?, ?)",
                           (recipient, ts, body))
                # Bounded per user: the oldest go first.
                db.execute("DELETE FROM mailbox WHERE recipient = ? AND id NOT IN (SELECT id FROM mailbox "
                           "WHERE recipient = ? ORDER BY id DESC LIMIT ?)",
                           (recipient, recipient, self.retention.mailbox))
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
        self.stored += len(events)

    # --- reads -------------------------------------------------------------------

    def range(self, topic: str, after: int, upto: int, limit: int) -> list[bytes]:
        """Bodies of the newest `limit` events with after < seq <= upto, oldest first."""
        rows = self.db.execute(
            "SELECT body FROM events WHERE topic = ? AND seq > ? AND seq <= ? ORDER BY seq DESC LIMIT ?",
            (topic, after, upto, limit)).fetchall()
        return [bytes(body) for (body,) in reversed(rows)]

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
