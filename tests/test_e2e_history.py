"""End to end: stored history, restarts, offline mail, gap recovery and `zchat history`."""

from __future__ import annotations

import json
import re
import signal
import sqlite3

import pytest
from conftest import CLOCK, Chat, Proc
from peers import RawPeer, broker_key

from zchat.protocol import Heartbeat, Message

pytestmark = pytest.mark.timeout(120)


def _lines_between(proc: Proc, start: str, end: str) -> list[str]:
    first = next(i for i, line in enumerate(proc.lines) if re.search(start, line))
    last = next(i for i, line in enumerate(proc.lines) if i > first and re.search(end, line))
    return proc.lines[first + 1:last]


def test_late_joiner_sees_history_before_live_traffic(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    for i in range(3):
        alice.send(f"early {i}")
    alice.wait_for(r"alice: early 2$")
    bob = chat.joined_client("bob", "--history", "50")  # piped: no history unless asked
    header = bob.wait_for(r"^--- history of #lobby: \d+ event\(s\) ---$")
    shown = _lines_between(bob, re.escape(header), r"^--- end of history ---$")
    assert [line.split("] ", 1)[1] for line in shown] == [
        "- alice has joined the chat.", "alice: early 0", "alice: early 1", "alice: early 2"]
    alice.send("live now")
    live = bob.wait_for(rf"^{CLOCK} alice: live now$")
    # Order on screen: welcome, history, then live, nothing twice.
    order = [bob.lines.index(line) for line in (
        next(line for line in bob.lines if "Welcome, bob" in line), header, live)]
    assert order == sorted(order)
    assert bob.count(r"alice: early 1$") == 1


def test_kill_9_under_traffic_loses_nothing_and_numbering_continues(chat: Chat) -> None:
    chat.start_broker()
    key = broker_key(chat.config_dir)
    watcher = RawPeer(chat.port, chat.pub_port, key, [b"r/lobby/", b"sys/"])
    try:
        alice = chat.joined_client("alice")
        bob = chat.joined_client("bob")
        for i in range(10):
            alice.send(f"before crash {i}")
        bob.wait_for(r"alice: before crash 9$")
        _, last_before = watcher.wait_for(lambda t, e: isinstance(e, Message) and e.text == "before crash 9")
        _, old_beat = watcher.wait_for(lambda t, e: isinstance(e, Heartbeat))
        chat.broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        chat.broker.proc.wait(5)  # type: ignore[union-attr]
        chat.broker = None
        chat.start_broker()
        # A SUB resends its subscriptions only when touched: keep the watcher reading until
        # it hears the new broker (its room subscription went in with the sys/ one).
        watcher.wait_for(lambda t, e: isinstance(e, Heartbeat) and e.epoch != old_beat.epoch, timeout=15)
        for proc in (alice, bob):
            proc.wait_for(rf"^{CLOCK} \* Reconnected", timeout=15)
        alice.send("after restart")
        bob.wait_for(rf"^{CLOCK} alice: after restart$")
        _, after = watcher.wait_for(lambda t, e: isinstance(e, Message) and e.text == "after restart")
        assert after.seq > last_before.seq  # never reused
        # A late joiner sees the messages from before the crash.
        carol = chat.joined_client("carol", "--history", "50")
        carol.wait_for(r"^--- history of #lobby")
        for i in range(10):
            carol.wait_for(rf"alice: before crash {i}$", timeout=5)
        # Every public event's seq is unique and the stored numbering has no holes.
        db = sqlite3.connect(chat.config_dir / "broker" / "history.sqlite3")
        seqs = [seq for (seq,) in db.execute("SELECT seq FROM events WHERE topic='r/lobby/' ORDER BY seq")]
        db.close()
        assert seqs == list(range(1, len(seqs) + 1))
    finally:
        watcher.close()


def test_private_message_to_an_offline_user_waits_for_them(chat: Chat) -> None:
    chat.start_broker()
    carol = chat.joined_client("carol")  # the broker learns which key is carol's
    carol.send("/quit")
    assert carol.wait_exit(10) == 0
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.send("/msg carol the secret is 1234")
    alice.wait_for(rf"^{CLOCK} -> carol \(offline: delivered when they next join\): the secret is 1234$")
    carol = chat.joined_client("carol")
    carol.wait_for(rf"^{CLOCK} <- alice \(while you were away\): the secret is 1234$")
    alice.send("marker after")
    bob.wait_for(r"alice: marker after")
    assert bob.count("secret") == 0
    # Never in the public record, so `zchat history` cannot show it.
    db = sqlite3.connect(chat.config_dir / "broker" / "history.sqlite3")
    hits = db.execute("SELECT count(*) FROM events WHERE body LIKE '%secret%'").fetchone()[0]
    left = db.execute("SELECT count(*) FROM mailbox").fetchone()[0]
    db.close()
    assert hits == 0 and left == 0  # delivered mail is deleted


def test_gap_is_recovered_from_history(chat: Chat) -> None:
    """A stopped client overflows its subscriber queue; on waking it backfills the gap."""
    chat.start_broker("--rate-per-second", "0")
    key = broker_key(chat.config_dir)
    sleeper = chat.joined_client("sleeper")
    # The client asks, hidden, who is in its rooms after joining: a visible /who after it comes
    # back after its answer, so nothing private is on its way while it sleeps through the flood
    # (a private event past the high-water mark is dropped, and rightly reported as missed).
    sleeper.send("/who")
    sleeper.wait_for(r"\* Online \(1\): sleeper")
    sleeper.proc.send_signal(signal.SIGSTOP)
    flood = RawPeer(chat.port, chat.pub_port, key, [b"sys/", b"r/lobby/"])
    try:
        flood.sub.subscribe(f"u/{flood.identity}/".encode())
        from test_e2e import raw_join

        raw_join(flood, "flood")
        total = 16_000  # beyond the broker's per-subscriber queue (XPUB_SNDHWM) and the client's
        pad = "x" * 200
        for i in range(total):
            flood.send(json.dumps({"type": "say", "room": "lobby", "text": f"f{i:05d} {pad}"}).encode())
        flood.wait_for(lambda t, e: isinstance(e, Message) and e.text.startswith(f"f{total - 1:05d}"),
                       timeout=60)
    finally:
        flood.close()
        sleeper.proc.send_signal(signal.SIGCONT)
    sleeper.wait_for(rf"f{total - 1:05d} ", timeout=60)
    sleeper.wait_for(r"^--- \d+ missed event\(s\) recovered in #lobby", timeout=10)
    # Every message shown exactly once and in order: the recovered ones before what followed.
    shown = [int(m.group(1)) for line in sleeper.lines if (m := re.search(r"flood: f(\d{5}) ", line))]
    assert shown == list(range(total))
    assert sleeper.count(r"could not be recovered|events? missed") == 0


def test_zchat_history_searches_and_exports(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    alice.send("the deploy went fine")
    alice.send("/join ops")
    alice.wait_for(r"alice has joined #ops")
    alice.send("ops only: rotate keys")
    alice.wait_for(r"alice: ops only: rotate keys")

    def history(*args: str) -> list[str]:
        proc = Proc(["-m", "zchat", "history", "--config-dir", str(chat.config_dir), *args],
                    env=chat.env, stdin=False)
        chat.procs.append(proc)
        assert proc.wait_exit(15) == 0
        proc._reader.join(5)
        return proc.lines

    lines = history("--grep", "DEPLOY")
    assert len(lines) == 1
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] #lobby alice: the deploy went fine", lines[0])
    ops = history("--room", "ops")
    assert [line.split("] ", 1)[1] for line in ops] == [
        "#ops -> alice entered", "#ops alice: ops only: rotate keys"]
    exported = [json.loads(line) for line in history("--json", "--since", "1h")]
    assert {record["topic"] for record in exported} == {"r/lobby/", "r/ops/"}
    assert any(record["text"] == "the deploy went fine" for record in exported
               if record["type"] == "message")
    assert all(isinstance(record["seq"], int) for record in exported)
    assert len(history("--limit", "2")) == 2
