"""The dispatcher: each loop turn is stored, then published. Pure core, real SQLite, no
sockets: the `send` callback checks what a second connection to the database can see at the
moment each frame goes out."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from corekit import LOBBY, Unsealed, body, dm, subscribe_all, u

from zchat.core import BrokerCore, Out
from zchat.dispatch import Dispatcher
from zchat.history import HistoryStore

A, B = "a1" * 32, "b2" * 32


class Crash(Exception):
    """The broker process dying at this point."""


class Broker:
    """A core, its store on disk and a dispatcher, as the broker shell wires them."""

    def __init__(self, path: Path, send=None) -> None:  # type: ignore[no-untyped-def]
        self.core = BrokerCore("epoch", 0.0)
        self.store = HistoryStore(path)
        self.sent: list[bytes] = []
        self.dispatcher = Dispatcher(self.core, self.store, send or self.sent.append,
                                     Unsealed())  # type: ignore[arg-type]

    def turn(self, out: list[Out], now: float) -> None:
        self.dispatcher.add(out)
        self.dispatcher.flush(now)

    def say(self, identity: str, now: float, **fields: object) -> None:
        self.turn(self.core.on_message(identity, body(**fields), 1, now), now)

    def join(self, identity: str, name: str, now: float) -> None:
        subscribe_all(self.core, identity, now)
        self.say(identity, now, type="join", name=name, history=0)


def reader(path: Path) -> sqlite3.Connection:
    """Another process's view: only what is committed."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def test_every_publication_is_committed_before_it_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    checked: list[str] = []

    def send(frame: bytes) -> None:
        topic, _, data = frame.partition(b" ")
        view = db
        if topic.startswith(b"r/"):  # a room event: stored under its number already
            seq = json.loads(data)["seq"]
            assert view.execute("SELECT 1 FROM events WHERE topic = ? AND seq = ?",
                                (topic.decode(), seq)).fetchone(), (topic, seq)
            checked.append("event")
        elif topic == u(A).encode() and "welcome" not in checked:  # alice's name is remembered first
            assert view.execute("SELECT identity FROM names WHERE name_key = 'alice'").fetchone() == (A,)
            checked.append("welcome")
        broker.sent.append(frame)

    broker = Broker(path, send)
    db = reader(path)
    broker.join(A, "alice", 1.0)
    broker.join(B, "bob", 2.0)
    for i in range(5):
        broker.say(A, 3.0 + i, type="say", room="lobby", text=f"line {i}", ref=i + 1)
    broker.say(B, 9.0, type="nick", name="robert")
    broker.say(B, 10.0, type="leave", message="bye")
    assert checked.count("welcome") == 1 and checked.count("event") == 2 + 5 + 1 + 1
    assert [r for (r,) in db.execute("SELECT seq FROM events WHERE topic = ? ORDER BY seq", (LOBBY,))] == \
        list(range(1, 10))


def test_nothing_is_sent_when_storing_fails(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "history.sqlite3")
    broker.join(A, "alice", 1.0)
    before = len(broker.sent)

    def broken(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    broker.store.write = broken  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        broker.say(A, 2.0, type="say", room="lobby", text="never stored", ref=1)
    assert len(broker.sent) == before  # not published: a client cannot have seen it


def _mail_for_bob(broker: Broker) -> None:
    """alice writes to bob, who was here once and is offline now."""
    broker.join(A, "alice", 1.0)
    broker.join(B, "bob", 2.0)
    broker.say(B, 3.0, type="leave")
    broker.say(A, 4.0, **dm("bob", B, ref=1))  # sealed to bob's key


def _mailbox(path: Path) -> int:
    with reader(path) as db:
        return db.execute("SELECT count(*) FROM mailbox").fetchone()[0]


def test_kept_mail_survives_a_crash_while_it_is_being_published(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    to_bob: list[bytes] = []

    def send(frame: bytes) -> None:
        if frame.startswith(u(B).encode()):
            to_bob.append(frame)
            if len(to_bob) == 2:  # bob's welcome went out; the crash comes with his mail
                raise Crash
        broker.sent.append(frame)

    broker = Broker(path, send)
    _mail_for_bob(broker)
    to_bob.clear()
    assert _mailbox(path) == 1
    with pytest.raises(Crash):
        broker.join(B, "bob", 5.0)
    assert _mailbox(path) == 1  # still there: delivered again after the restart

    restarted = Broker(path)  # the same database, a new broker
    restarted.join(B, "bob", 6.0)
    mail = [frame for frame in restarted.sent if frame.startswith(u(B).encode())]
    assert len(mail) == 2  # welcome, then the kept message


def test_delivered_mail_goes_with_the_next_commit_and_is_not_delivered_twice(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    broker = Broker(path)
    _mail_for_bob(broker)
    broker.sent.clear()
    broker.join(B, "bob", 5.0)
    assert len([f for f in broker.sent if f.startswith(u(B).encode())]) == 2
    assert _mailbox(path) == 1  # published; deleted by the commit that follows
    assert broker.store.take_mail(B) == []  # handed out already: not again meanwhile
    broker.turn(broker.core.tick(6.0), 6.0)  # the next turn (a heartbeat)
    assert _mailbox(path) == 0


def test_mail_delivered_in_the_last_turn_is_deleted_on_close(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    broker = Broker(path)
    _mail_for_bob(broker)
    broker.join(B, "bob", 5.0)
    assert _mailbox(path) == 1
    broker.store.close()
    assert _mailbox(path) == 0
