"""Mail for offline keys: the store's fair share per sender and what the dispatcher tells the
senders, on a real SQLite file and the real core, without sockets.

Issue 13 item 6: 108 junk DMs from 6 throwaway keys pushed bob's real message out of a
100-message mailbox, silently, and mail for a name went to whoever held it next.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from corekit import BOX, SELF_BOX, Unsealed, body, dm, subscribe_all, u

from zchat import limits as L
from zchat.core import BrokerCore, Limits
from zchat.dispatch import Dispatcher
from zchat.history import HistoryStore, MailOutcome, kept_mail
from zchat.protocol import Code, Direct, Error, decode_publication

NOW = 1_800_000_000.0
ALICE = "a1" * 32  # the offline recipient
BOB = "b2" * 32  # a real correspondent
MALLORY = "e5" * 32
JUNK = [f"{i:02x}" * 32 for i in range(0x10, 0x10 + 12)]  # throwaway keys


def letter(sender: str, n: int, to: str = "alice") -> bytes:
    return json.dumps({"type": "direct", "seq": 0, "ts": NOW + n, "name": sender[:6], "to": to,
                       "from": sender, "box": BOX, "offline": True}).encode()


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = HistoryStore(tmp_path / "history.sqlite3")
    yield s
    s.close()


def keep(store: HistoryStore, sender: str, n: int, recipient: str = ALICE) -> MailOutcome:
    [outcome] = store.write([], [(recipient, sender, NOW + n, letter(sender, n), n)], [], NOW)
    return outcome


def senders(store: HistoryStore, recipient: str = ALICE) -> list[str]:
    return [json.loads(b)["from"] for b in store.take_mail(recipient)]


def test_the_numbers_are_the_documented_ones() -> None:
    assert (L.MAILBOX_PER_USER, L.MAILBOX_PER_SENDER) == (100, 10)


def test_one_sender_gets_a_share_of_a_mailbox_and_is_refused_beyond_it(store: HistoryStore) -> None:
    for n in range(L.MAILBOX_PER_SENDER):
        assert keep(store, MALLORY, n) == MailOutcome(kept=True)
    assert keep(store, MALLORY, 99) == MailOutcome(kept=False)
    assert keep(store, BOB, 100) == MailOutcome(kept=True)  # others still have theirs
    assert keep(store, MALLORY, 101, recipient=BOB) == MailOutcome(kept=True)  # per mailbox


def test_108_junk_messages_from_6_keys_cannot_push_a_real_one_out(store: HistoryStore) -> None:
    assert keep(store, BOB, 0).kept
    outcomes = [keep(store, JUNK[i % 6], 1 + i) for i in range(108)]
    assert sum(o.kept for o in outcomes) == 6 * L.MAILBOX_PER_SENDER
    assert not any(o.dropped for o in outcomes)
    assert senders(store).count(BOB) == 1


def test_a_full_mailbox_pushes_out_the_biggest_senders_oldest_and_says_whose(store: HistoryStore) -> None:
    assert keep(store, BOB, 0).kept
    dropped = []
    for i in range(12 * L.MAILBOX_PER_SENDER):  # 12 junk keys, 10 each: 121 for 100 places
        outcome = keep(store, JUNK[i // L.MAILBOX_PER_SENDER], 1 + i)
        assert outcome.kept
        dropped += outcome.dropped
    assert len(dropped) == 1 + 12 * L.MAILBOX_PER_SENDER - L.MAILBOX_PER_USER
    assert {d.sender for d in dropped} <= set(JUNK) and all(d.to == "alice" for d in dropped)
    assert dropped[0].sender == JUNK[0] and dropped[0].ref == 1  # the oldest of a biggest sender
    left = senders(store)
    assert len(left) == L.MAILBOX_PER_USER and left[0] == BOB


def test_mail_is_for_the_key_it_was_sealed_to(store: HistoryStore) -> None:
    keep(store, BOB, 0)
    assert store.take_mail(MALLORY) == []
    assert senders(store) == [BOB]
    assert store.take_mail(ALICE) == []  # taken once


def test_a_clear_text_mailbox_of_an_older_zchat_is_deleted(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "history.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE mailbox (id INTEGER PRIMARY KEY, recipient TEXT NOT NULL, ts REAL NOT NULL, "
                "body BLOB NOT NULL)")
    old.execute("INSERT INTO mailbox (recipient, ts, body) VALUES (?, ?, ?)",
                (ALICE, NOW, b'{"type":"direct","text":"the secret is 1234"}'))
    old.commit()
    old.close()
    with caplog.at_level(logging.WARNING, logger="zchat.broker"):
        store = HistoryStore(path)
    try:
        assert store.take_mail(ALICE) == []
        assert "deleted 1 undelivered private message(s) kept in clear" in caplog.text
        assert keep(store, BOB, 1).kept
    finally:
        store.close()
    assert b"the secret" not in b"".join(row.body for row in kept_mail(path))


def test_kept_mail_lists_the_sealed_directs_by_recipient(store: HistoryStore) -> None:
    keep(store, BOB, 0)
    keep(store, MALLORY, 1, recipient=BOB)
    rows = kept_mail(store.path)
    assert [row.topic for row in rows] == [u(ALICE), u(BOB)]
    assert [row.topic for row in kept_mail(store.path, limit=1)] == [u(BOB)]
    assert kept_mail(store.path, since=NOW + 0.5)[0].topic == u(BOB)


# --- the dispatcher: what the senders hear ---------------------------------------------------



class Broker:
    """The real core, store and dispatcher; the frames it would publish, decoded."""

    def __init__(self, path: Path) -> None:
        self.core = BrokerCore("epoch", NOW, Limits(rate_burst=100_000))
        self.store = HistoryStore(path)
        self.frames: list[tuple[str, object]] = []
        self.dispatch = Dispatcher(self.core, self.store, lambda frame: self.frames.append(
            decode_publication(frame)), Unsealed())  # type: ignore[arg-type]

    def join(self, identity: str, name: str) -> None:
        subscribe_all(self.core, identity, NOW)
        self.run(identity, type="join", name=name)

    def run(self, identity: str, **fields: object) -> list[tuple[str, object]]:
        start = len(self.frames)
        self.dispatch.add(self.core.on_message(identity, body(**fields), 1, NOW))
        self.dispatch.flush(NOW)
        return self.frames[start:]

    def errors(self, identity: str, code: str) -> list[Error]:
        return [e for t, e in self.frames if t == u(identity) and isinstance(e, Error) and e.code == code]


@pytest.fixture
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    b = Broker(tmp_path / "history.sqlite3")
    yield b
    b.store.close()


def test_a_kept_message_is_confirmed_to_its_sender_after_it_is_stored(broker: Broker) -> None:
    broker.join(ALICE, "alice")
    broker.run(ALICE, type="leave")
    broker.join(BOB, "bob")
    [(topic, copy)] = broker.run(BOB, **dm("alice", ALICE, ref=5))
    assert topic == u(BOB) and isinstance(copy, Direct)
    assert (copy.ref, copy.offline, copy.box, copy.from_) == (5, True, SELF_BOX, BOB)
    [row] = kept_mail(broker.store.path)
    assert row.topic == u(ALICE) and json.loads(row.body)["box"] == BOX  # sealed, for alice's key
    assert broker.dispatch.messages == 1


def test_the_sender_is_told_when_its_share_is_used_up(broker: Broker) -> None:
    broker.join(ALICE, "alice")
    broker.run(ALICE, type="leave")
    broker.join(MALLORY, "mallory")
    for n in range(L.MAILBOX_PER_SENDER):
        broker.run(MALLORY, **dm("alice", ALICE, ref=n))
    [(topic, refusal)] = broker.run(MALLORY, **dm("alice", ALICE, ref=77))
    assert topic == u(MALLORY) and isinstance(refusal, Error)
    assert (refusal.code, refusal.ref) == (Code.MAILBOX_FULL, 77)
    assert "already has 10 unread message(s) from you" in refusal.detail
    assert broker.dispatch.errors[Code.MAILBOX_FULL] == 1


def test_senders_whose_kept_mail_is_pushed_out_are_told_if_they_are_here(broker: Broker) -> None:
    broker.join(ALICE, "alice")
    broker.run(ALICE, type="leave")
    for i, key in enumerate(JUNK[:10]):  # 10 keys x their share: the mailbox is full
        broker.join(key, f"junk{i}")
        for n in range(L.MAILBOX_PER_SENDER):
            broker.run(key, **dm("alice", ALICE, ref=1000 * i + n))
    broker.dispatch.add(broker.core.on_disconnect(JUNK[0], NOW))  # gone: nobody to tell,
    broker.core.on_unsubscribed_all(JUNK[0])  # and no number spent on it
    broker.dispatch.flush(NOW)
    seq_before = broker.core.seqs.get(u(JUNK[0]))
    broker.join(BOB, "bob")
    out = broker.run(BOB, **dm("alice", ALICE, ref=1))
    # The oldest message of a biggest sender goes: junk0's, who is not here to hear it.
    assert [(t, type(e).__name__) for t, e in out] == [(u(BOB), "Direct")]
    assert broker.core.seqs.get(u(JUNK[0])) == seq_before
    broker.join(JUNK[10], "junk10")
    out = broker.run(JUNK[10], **dm("alice", ALICE, ref=5))
    assert [(t, e.code, e.ref) for t, e in out if isinstance(e, Error)] == [
        (u(JUNK[1]), Code.MAIL_DROPPED, 1000)]
    assert broker.errors(JUNK[1], Code.MAIL_DROPPED)[0].detail.startswith(
        "a message you left for alice was dropped unread")
    # bob's message is in, and alice's key gets the whole mailbox when it comes back.
    out = broker.run(ALICE, type="join", name="alice")
    delivered = [e for t, e in out if t == u(ALICE) and isinstance(e, Direct)]
    assert len(delivered) == L.MAILBOX_PER_USER and [e.from_ for e in delivered[-2:]] == [BOB, JUNK[10]]
    assert all(e.offline and e.ref is None and e.box == BOX for e in delivered)


def test_mail_sealed_to_a_key_never_reaches_the_next_holder_of_the_name(broker: Broker) -> None:
    broker.join(ALICE, "alice")
    broker.run(ALICE, type="leave")
    broker.join(BOB, "bob")
    broker.run(BOB, **dm("alice", ALICE, ref=1))
    subscribe_all(broker.core, MALLORY, NOW)
    out = broker.run(MALLORY, type="join", name="alice")  # mallory takes the free name
    assert not any(isinstance(e, Direct) for _, e in out)
    # bob still has alice's key: refused, told the new one, nothing for mallory.
    [(topic, refusal)] = broker.run(BOB, **dm("alice", ALICE, ref=2))
    assert (topic, refusal.code, refusal.key) == (u(BOB), Code.KEY_CHANGED, MALLORY)  # type: ignore[attr-defined]
    assert kept_mail(broker.store.path)[0].topic == u(ALICE)
    broker.run(MALLORY, type="leave")
    out = broker.run(ALICE, type="join", name="alice")
    assert [e.from_ for _, e in out if isinstance(e, Direct)] == [BOB]
