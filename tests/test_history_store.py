"""The SQLite history store on a real file: retention by count and by age, numbering that
survives pruning, and the operator's search."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from zchat import history
from zchat.history import HistoryStore, Retention, search

NOW = 1_800_000_000.0
DAY = 86400.0


def body(room: str, seq: int, ts: float) -> bytes:
    return json.dumps({"type": "message", "seq": seq, "ts": ts, "room": room, "name": "alice",
                       "text": f"{room} {seq}"}).encode()


def fill(store: HistoryStore, room: str, stamps: list[float]) -> None:
    topic = f"r/{room}/"
    store.write([(topic, seq, ts, body(room, seq, ts)) for seq, ts in enumerate(stamps, 1)], [], [], NOW)


def kept(store: HistoryStore, room: str) -> list[int]:
    return [row[0] for row in store.db.execute("SELECT seq FROM events WHERE topic = ? ORDER BY seq",
                                               (f"r/{room}/",))]


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = HistoryStore(tmp_path / "history.sqlite3", Retention(per_room=0, days=0))
    yield s
    s.close()


@pytest.mark.parametrize("told", [True, False], ids=["rooms given", "rooms found"])
def test_count_retention_keeps_the_newest_of_each_room(store: HistoryStore, told: bool) -> None:
    store.retention = Retention(per_room=10, days=0)
    fill(store, "big", [NOW - 60 + i for i in range(30)])
    fill(store, "small", [NOW - 60 + i for i in range(5)])
    dropped = store.prune(NOW, ["r/big/", "r/small/"] if told else None)
    assert dropped == 20
    assert kept(store, "big") == list(range(21, 31))
    assert kept(store, "small") == [1, 2, 3, 4, 5]
    assert store.stored == 15
    assert store.prune(NOW, ["r/big/", "r/small/"] if told else None) == 0


def test_age_retention_drops_only_what_is_older_than_the_limit(store: HistoryStore) -> None:
    store.retention = Retention(per_room=0, days=1)
    fill(store, "mixed", [NOW - 3 * DAY, NOW - 2 * DAY, NOW - DAY - 1, NOW - DAY + 1, NOW - 60])
    fill(store, "fresh", [NOW - 10, NOW - 5])
    assert store.prune(NOW, ["r/mixed/", "r/fresh/"]) == 3
    assert kept(store, "mixed") == [4, 5]
    assert kept(store, "fresh") == [1, 2]


def test_count_and_age_together_take_the_stricter(store: HistoryStore) -> None:
    store.retention = Retention(per_room=3, days=1)
    fill(store, "lobby", [NOW - 2 * DAY] * 2 + [NOW - 60] * 6)
    assert store.prune(NOW, ["r/lobby/"]) == 5
    assert kept(store, "lobby") == [6, 7, 8]


def test_numbering_survives_a_room_emptied_by_age_and_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = HistoryStore(path, Retention(per_room=0, days=1))
    fill(store, "quiet", [NOW - 5 * DAY] * 7)
    assert store.prune(NOW, ["r/quiet/"]) == 7
    assert kept(store, "quiet") == []
    store.close()
    reopened = HistoryStore(path)
    try:
        assert reopened.last_seqs()["r/quiet/"] == 7  # the next event is 8, never 1 again
        assert reopened.stored == 0
    finally:
        reopened.close()


def test_a_room_not_named_is_left_alone(store: HistoryStore) -> None:
    store.retention = Retention(per_room=1, days=0)
    fill(store, "a", [NOW] * 4)
    fill(store, "b", [NOW] * 4)
    assert store.prune(NOW, ["r/a/"]) == 3
    assert kept(store, "a") == [4]
    assert kept(store, "b") == [1, 2, 3, 4]


def test_search_since_and_limit_without_a_time_index(store: HistoryStore) -> None:
    fill(store, "a", [NOW - 30, NOW - 20, NOW - 10])
    fill(store, "b", [NOW - 25, NOW - 15])
    since = [(e.topic, e.seq) for e in search(store.path, since=NOW - 20)]
    assert since == [("r/a/", 2), ("r/b/", 2), ("r/a/", 3)]  # oldest first, across rooms
    newest = [(e.topic, e.seq) for e in search(store.path, limit=2)]
    assert newest == [("r/b/", 2), ("r/a/", 3)]
    assert [e.seq for e in search(store.path, room="b")] == [1, 2]


def test_a_stored_event_is_never_replaced(store: HistoryStore, caplog: pytest.LogCaptureFixture) -> None:
    # Two writers numbering from the same seqs (issue: two brokers on one config dir) must not
    # overwrite what was stored and shown first.
    fill(store, "lobby", [NOW, NOW + 1])
    clash = ("r/lobby/", 2, NOW + 5, b'{"type":"message","seq":2,"text":"second writer"}')
    fresh = ("r/lobby/", 3, NOW + 6, body("lobby", 3, NOW + 6))
    with caplog.at_level("ERROR", logger="zchat.broker"):
        store.write([clash, fresh], [], [], NOW)
    rows = dict(store.db.execute("SELECT seq, body FROM events WHERE topic = 'r/lobby/'"))
    assert rows[2] == body("lobby", 2, NOW + 1)
    assert rows[3] == fresh[3]
    assert store.collisions == 1
    assert store.stored == 3
    assert "already stored" in caplog.text and "r/lobby/ seq 2" in caplog.text


@pytest.mark.parametrize("count", [1, 3, 255, 256, 257, 700])
def test_a_turn_of_any_size_is_stored_whole_and_in_order(store: HistoryStore, count: int) -> None:
    # A turn's events go in as multi-row statements of a few sizes (zchat.history.INSERT_ROWS and
    # the powers of two below it): every count must land exactly, none twice, none missing.
    fill(store, "lobby", [NOW + i for i in range(count)])
    assert kept(store, "lobby") == list(range(1, count + 1))
    stored = store.db.execute("SELECT seq, ts, body FROM events WHERE topic = 'r/lobby/' ORDER BY seq")
    assert all(row == (seq, NOW + seq - 1, body("lobby", seq, NOW + seq - 1))
               for seq, row in enumerate(stored, 1))
    assert store.stored == count and store.collisions == 0


def test_collisions_are_counted_inside_a_large_turn(store: HistoryStore) -> None:
    fill(store, "lobby", [NOW] * 300)
    # 600 events: seqs 1..300 again (clashes, spread over several statements), then 301..600.
    rows = [("r/lobby/", seq, NOW + 1, b'{"second":"writer"}') for seq in range(1, 601)]
    store.write(rows, [], [], NOW)
    assert store.collisions == 300 and store.stored == 600
    assert store.db.execute("SELECT count(*) FROM events WHERE body = ?", (b'{"second":"writer"}',)
                            ).fetchone()[0] == 300


def test_the_wal_starts_over_under_a_steady_stream_of_commits(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite reuses the WAL from its start only after a checkpoint copied all of it. The broker
    # commits every loop turn; a checkpoint pass during which it commits never gets there, and
    # the WAL (on disk) grew by every commit for as long as they kept coming.
    monkeypatch.setattr(history, "CATCH_UP_FRAMES", 1)  # hold the writer whenever behind
    path = tmp_path / "history.sqlite3"
    store = HistoryStore(path, Retention(per_room=0, days=0))
    checkpointer = store.checkpointer
    assert checkpointer is not None
    checkpointer.stopping.set()  # its own thread stops; this test says when a round runs
    checkpointer.join(5)
    due, done = threading.Event(), threading.Event()

    def rounds() -> None:  # a round each time the writer asks, while it keeps committing
        db = sqlite3.connect(str(path), timeout=5.0, isolation_level=None)
        try:
            while due.wait(30) and not done.is_set():
                due.clear()
                checkpointer.checkpoint(db)
        finally:
            db.close()

    worker = threading.Thread(target=rounds)
    worker.start()
    try:
        for seq in range(1, 4001):  # one event per turn, as at a low rate: a commit each
            store.write([("r/lobby/", seq, NOW, body("lobby", seq, NOW))], [], [], NOW)
            if seq % 200 == 0:
                due.set()
        wal = Path(f"{path}-wal").stat().st_size
    finally:
        done.set()
        due.set()
        worker.join(30)
        store.close()
    assert checkpointer.held > 0
    # Without a restart these 4,000 commits leave a WAL of 24 MB; with one every few hundred
    # commits, a few MB.
    assert wal < 12 * 2**20, wal
