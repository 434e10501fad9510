"""Per-room state is freed: the core keeps in memory only the rooms in use and reads a room's
number back from storage when it is used again; retention's work follows what changed, not
how many rooms ever existed; the names and rooms tables and the mutes stay bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
from corekit import LOBBY, Unsealed, body, subscribe_all, u

from zchat import limits as L
from zchat.auth import Account
from zchat.core import BrokerCore, Limits, Out, Publish
from zchat.dispatch import Dispatcher
from zchat.history import HistoryStore, Retention
from zchat.protocol import Joined, Message

pytestmark = pytest.mark.timeout(60)

A, B = "a1" * 32, "b2" * 32
NOW = 1_800_000_000.0
DAY = 86400.0
UNLIMITED = Limits(rate_burst=10**9, rate_per_second=1e9)


class Stored:
    """What the dispatcher would have written: each room's last published number."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.asked: list[str] = []

    def keep(self, out: list[Out]) -> list[Out]:
        for item in out:
            if isinstance(item, Publish) and item.topic.startswith("r/"):
                self.last[item.topic] = max(self.last.get(item.topic, 0), item.event.seq)
        return out

    def seq(self, topic: str) -> int:
        self.asked.append(topic)
        return self.last.get(topic, 0)


def cycles(core: BrokerCore, keep, count: int, now: float) -> float:  # type: ignore[no-untyped-def]
    """alice enters and leaves `count` rooms, one after the other; returns the time after."""
    for i in range(count):
        room = f"room{i}"
        core.on_subscribe(A, f"r/{room}/", now)
        keep(core.on_message(A, body(type="enter", room=room, history=0), 1, now))
        keep(core.on_message(A, body(type="part", room=room), 1, now + 0.001))
        core.on_unsubscribe(A, f"r/{room}/")
        now += 0.01
    for _ in range(5):  # a few heartbeats: the marks after each room's last event run out
        now += 1.0
        keep(core.on_message(A, body(type="ping"), 1, now))  # alice stays
        keep(core.tick(now))
    return now


def live_rooms(core: BrokerCore) -> list[str]:
    return sorted(topic for topic in core.seqs if topic.startswith("r/"))


@pytest.mark.parametrize("storage", [True, False], ids=["numbers in storage", "no storage"])
def test_a_thousand_enter_part_cycles_leave_one_live_room_in_memory(storage: bool) -> None:
    stored = Stored()
    core = BrokerCore("e", NOW, UNLIMITED, stored_seq=stored.seq if storage else None)
    keep = stored.keep
    subscribe_all(core, A, NOW)
    keep(core.on_message(A, body(type="join", name="alice"), 1, NOW))
    now = cycles(core, keep, 1000, NOW + 1)
    assert live_rooms(core) == [LOBBY]  # not 1,001 rooms
    assert set(core.seqs) <= {LOBBY, u(A), "sys/"}
    assert len(core.busy_rooms) == 0
    # Used again, a room continues its numbering: joined 1, left 2, now joined 3.
    core.on_subscribe(A, "r/room7/", now)
    again = keep(core.on_message(A, body(type="enter", room="room7", history=0), 1, now))
    assert [(p.topic, type(p.event), p.event.seq) for p in again if isinstance(p, Publish)] == [
        ("r/room7/", Joined, 3)]
    said = core.on_message(A, body(type="say", room="room7", text="back", ref=1), 1, now + 0.3)
    assert [(type(p.event), p.event.seq) for p in said] == [(Message, 4)]
    if storage:
        assert "r/room7/" in stored.asked


def test_the_say_hot_path_never_asks_storage() -> None:
    stored = Stored()
    core = BrokerCore("e", NOW, stored_seq=stored.seq)
    subscribe_all(core, A, NOW)
    core.on_message(A, body(type="join", name="alice"), 1, NOW)
    stored.asked.clear()
    for i in range(50):
        core.on_message(A, body(type="say", room="lobby", text=f"line {i}"), 1, NOW + i)
        core.tick(NOW + i + 0.5)
    assert stored.asked == []  # a room with members keeps its number in memory


class Broker:
    """The core over a real store, with the broker's own wiring: store-then-publish turns and
    the core reading room numbers back from the store."""

    def __init__(self, path: Path) -> None:
        self.store = HistoryStore(path, Retention(per_room=0, days=0))
        self.core = BrokerCore("e", NOW, UNLIMITED, stored_seq=self.store.last_seq)
        self.dispatcher = Dispatcher(self.core, self.store, lambda frame: None,
                                     Unsealed())  # type: ignore[arg-type]

    def keep(self, out: list[Out]) -> list[Out]:
        self.dispatcher.add(out)
        self.dispatcher.flush(NOW)
        return out


def test_numbers_of_freed_rooms_come_back_from_the_store_also_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    broker = Broker(path)
    subscribe_all(broker.core, A, NOW)
    broker.keep(broker.core.on_message(A, body(type="join", name="alice"), 1, NOW))
    now = cycles(broker.core, broker.keep, 300, NOW + 1)
    assert live_rooms(broker.core) == [LOBBY]
    assert broker.store.last_seq("r/room9/") == 2
    broker.store.close()
    again = Broker(path)  # a restart: nothing in memory
    subscribe_all(again.core, B, now, topics=("r/room9/",))
    join = body(type="join", name="bob", rooms=["room9"], history=0)
    out = again.keep(again.core.on_message(B, join, 1, now))
    joined = [(p.topic, p.event.seq) for p in out if isinstance(p, Publish) and isinstance(p.event, Joined)]
    assert joined == [("r/room9/", 3)]
    again.store.close()


# --- retention: the cost follows what changed ------------------------------------------------------


def _row(topic: str, seq: int, ts: float) -> tuple[str, int, float, bytes]:
    return (topic, seq, ts, b'{"type":"message"}')


def statements(store: HistoryStore, work) -> list[str]:  # type: ignore[no-untyped-def]
    ran: list[str] = []
    store.db.set_trace_callback(ran.append)
    try:
        work()
    finally:
        store.db.set_trace_callback(None)
    return ran


def test_a_retention_pass_costs_nothing_per_room_that_nobody_writes(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.sqlite3", Retention(per_room=100, days=30))
    for i in range(1000):  # a thousand rooms, used once
        store.write([_row(f"r/room{i}/", 1, NOW - DAY)], [], [], NOW)
    store.write([_row(LOBBY, seq, NOW - 60 + seq) for seq in range(1, 11)], [], [], NOW)
    assert store.retain(NOW) == 0  # the first pass looks at what was written
    store.write([_row(LOBBY, 11, NOW)], [], [], NOW)
    ran = statements(store, lambda: store.retain(NOW + 60))
    assert len(ran) <= 10, ran  # lobby's few lookups, not two queries per room ever made
    assert not any("room5" in statement for statement in ran)


def test_rooms_whose_events_expire_are_found_without_being_written(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.sqlite3", Retention(per_room=0, days=1))
    for i in range(700):
        store.write([_row(f"r/old{i}/", seq, NOW - 3 * DAY) for seq in (1, 2)], [], [], NOW - 3 * DAY)
    store.write([_row("r/fresh/", 1, NOW - 60)], [], [], NOW)
    store.retain(NOW - 3 * DAY)  # nothing has expired yet
    dropped = store.retain(NOW) + store.retain(NOW + 60)  # at most 500 rooms a pass
    assert dropped == 1400
    assert store.db.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    assert store.last_seq("r/old5/") == 2  # the number stays: the next event there is 3
    assert store.retain(NOW + 120) == 0 and store.stored == 1


def test_only_the_newest_emptied_rooms_keep_their_numbers(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "ROOMS_REMEMBERED", 10)
    store = HistoryStore(tmp_path / "history.sqlite3", Retention(per_room=0, days=1))
    for i in range(30):
        store.write([_row(f"r/gone{i:02}/", 5, NOW - 5 * DAY + i)], [], [], NOW)
    store.retain(NOW)
    kept = [topic for (topic,) in store.db.execute("SELECT topic FROM rooms ORDER BY topic")]
    assert kept == [f"r/gone{i:02}/" for i in range(20, 30)]
    assert store.last_seq("r/gone29/") == 5 and store.last_seq("r/gone00/") == 0  # forgotten: from 1


def test_the_names_table_keeps_only_the_most_recent_names(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "KNOWN_NAMES", 20)
    store = HistoryStore(tmp_path / "history.sqlite3")
    for i in range(100):
        store.write([], [], [(f"name{i:03}", "ab" * 32)], NOW + i)
    store.retain(NOW + 100)
    names = [key for (key,) in store.db.execute("SELECT name_key FROM names ORDER BY name_key")]
    assert names == [f"name{i:03}" for i in range(80, 100)]


def test_a_database_from_before_the_rooms_table_keeps_its_numbers(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "history.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE events (topic TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,"
        " body BLOB NOT NULL, PRIMARY KEY (topic, seq)) WITHOUT ROWID;"
        "CREATE TABLE topic_seq (topic TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;"
        f"INSERT INTO events VALUES ('r/lobby/', 41, {NOW}, '{{}}'), ('r/lobby/', 42, {NOW}, '{{}}');"
        "INSERT INTO topic_seq VALUES ('r/emptied/', 7), ('r/lobby/', 30);")
    old.commit()
    old.close()
    store = HistoryStore(path)
    assert store.last_seq("r/lobby/") == 42 and store.last_seq("r/emptied/") == 7
    assert store.last_seqs() == {"r/lobby/": 42, "r/emptied/": 7}
    store.close()


# --- mutes ------------------------------------------------------------------------------------------


def test_mutes_that_ran_out_are_forgotten() -> None:
    core = BrokerCore("e", NOW, accounts={A: Account("alice", "admin"), B: Account("bob")})
    for identity, name in ((A, "alice"), (B, "bob")):
        subscribe_all(core, identity, NOW)
        core.on_message(identity, body(type="join", name=name), 1, NOW)
    core.on_message(A, body(type="mute", name="bob", seconds=60), 1, NOW)
    assert B in core.muted
    core.on_message(B, body(type="ping"), 1, NOW + 61)  # still here
    core.tick(NOW + 61)
    assert core.muted == {}  # not kept until the next /mute
    out = core.on_message(B, body(type="say", room="lobby", text="free again"), 1, NOW + 61)
    assert [type(p.event) for p in out] == [Message]
