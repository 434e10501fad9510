"""Faults, end to end: a slow, stalled or cut link (an in-test TCP proxy), broker kill -9 and
restart, broker SIGTERM. Real broker and client processes, CURVE over loopback.

(Client SIGSTOP/SIGCONT is covered by tests/test_e2e.py.)
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLOCK, Chat, Proc
from peers import FaultyProxy
from test_e2e_closed import _write_keys

from zchat import keys
from zchat.protocol import decode_event

pytestmark = pytest.mark.timeout(120)

LOST = rf"^{CLOCK} \* Connection to the broker lost"
RECONNECTED = rf"^{CLOCK} \* Reconnected"


@pytest.fixture
def proxies(chat: Chat) -> Iterator[list[FaultyProxy]]:
    made: list[FaultyProxy] = []
    yield made
    for proxy in made:
        proxy.close()


def proxied_client(chat: Chat, proxies: list[FaultyProxy], name: str, delay: float = 0.0) -> Proc:
    """A client whose two connections (input and publish) both go through faulty proxies."""
    into, out_of = FaultyProxy(chat.port, delay), FaultyProxy(chat.pub_port, delay)
    proxies += [into, out_of]
    proc = Proc(["client.py", "--port", str(into.port), "--pub-port", str(out_of.port),
                 "--config-dir", str(chat.config_dir), "--name", name], env=chat.env)
    chat.procs.append(proc)
    proc.wait_for(rf"{CLOCK} \* Welcome, {name}!", timeout=15)
    return proc


def broker_alive(chat: Chat) -> bool:
    return chat.broker is not None and chat.broker.proc.poll() is None


# --- (a) a slow, stalled or cut link -----------------------------------------------------------


def assert_nobody_noticed(alice: Proc, bob: Proc) -> None:
    """Both still online, as each sees it: alice never lost the broker, bob never saw her leave."""
    alice.send("/who")
    alice.wait_for(rf"^{CLOCK} \* Online \(2\): alice, bob$", timeout=10)
    assert alice.count("Connection to the broker lost") == 0
    assert bob.count("alice has left") == 0

def test_slow_link_works_just_slower(chat: Chat, proxies: list[FaultyProxy]) -> None:
    chat.start_broker()
    bob = chat.joined_client("bob")
    alice = proxied_client(chat, proxies, "alice", delay=0.3)  # 0.6 s round trip
    bob.wait_for(rf"^{CLOCK} - alice has joined the chat\.$")
    for i in range(5):
        alice.send(f"slow line {i}")
    bob.send("fast line")
    for i in range(5):
        bob.wait_for(rf"^{CLOCK} alice: slow line {i}$", timeout=10)
    alice.wait_for(rf"^{CLOCK} bob: fast line$", timeout=10)
    # Heartbeats arrive late but regularly: never "lost" at this delay, and nobody left.
    assert_nobody_noticed(alice, bob)
    # The order is the order typed.
    lines = [line for line in bob.lines if "slow line" in line]
    assert lines == [f"{line.split(']')[0]}] alice: slow line {i}" for i, line in enumerate(lines)]


@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_lost_link_is_reported_and_recovered(chat: Chat, proxies: list[FaultyProxy], fault: str) -> None:
    chat.start_broker()
    bob = chat.joined_client("bob")
    alice = proxied_client(chat, proxies, "alice")
    bob.wait_for(rf"^{CLOCK} - alice has joined the chat\.$")
    alice.send("before the fault")
    bob.wait_for(rf"^{CLOCK} alice: before the fault$")
    alice.wait_for(rf"^{CLOCK} alice: before the fault$")  # confirmed: not to be resent

    for proxy in proxies:
        proxy.cut() if fault == "cut" else proxy.stall()
    faulted_at = time.monotonic()
    alice.wait_for(LOST, timeout=8)  # no broker heartbeat for BROKER_SILENCE_LOST
    # The broker notices too (connection reset, or libzmq's heartbeat timeout on a stall) and
    # tells the others alice is gone.
    bob.wait_for(rf"^{CLOCK} - alice has left the chat\.$", timeout=8)
    alice.send("typed while the link was down")
    bob.send("said while alice was away")
    assert time.monotonic() - faulted_at < 10
    assert broker_alive(chat)

    mark_alice, mark_bob = len(alice.lines), len(bob.lines)
    for proxy in proxies:
        proxy.restore() if fault == "cut" else proxy.resume()
    alice.wait_for(RECONNECTED, timeout=15, start=mark_alice)
    bob.wait_for(rf"^{CLOCK} - alice has joined the chat\.$", timeout=10, start=mark_bob)
    # What alice typed while away was kept and goes out once after the rejoin.
    bob.wait_for(rf"^{CLOCK} alice: typed while the link was down$", timeout=10)
    # Messages flow both ways afterwards.
    alice.send("after the fault")
    bob.wait_for(rf"^{CLOCK} alice: after the fault$", timeout=10)
    bob.send("welcome back")
    alice.wait_for(rf"^{CLOCK} bob: welcome back$", timeout=10)
    assert bob.count(r"alice: typed while the link was down$") == 1
    assert bob.count(r"alice: before the fault$") == 1, "\n".join(bob.lines)  # nothing sent twice
    assert bob.count("Connection to the broker lost") == 0
    assert broker_alive(chat)


def test_message_whose_echo_was_lost_is_not_published_twice(chat: Chat, proxies: list[FaultyProxy]) -> None:
    """The broker published alice's message, but the link died before its echo reached her.
    After the rejoin she is shown it among the missed events (with her ref): resending it
    as unconfirmed makes everyone see it twice."""
    chat.start_broker()
    bob = chat.joined_client("bob")
    alice = proxied_client(chat, proxies, "alice")
    bob.wait_for(rf"^{CLOCK} - alice has joined the chat\.$")
    into, out_of = proxies
    out_of.stall()  # broker -> alice: held, so the echo cannot arrive
    alice.send("echo lost in transit")
    bob.wait_for(rf"^{CLOCK} alice: echo lost in transit$")  # the broker published it
    into.cut()
    out_of.cut()  # drops the held echo with the connection
    alice.wait_for(LOST, timeout=8)
    mark = len(bob.lines)
    out_of.resume()
    into.restore()
    out_of.restore()
    alice.wait_for(RECONNECTED, timeout=15)
    bob.wait_for(rf"^{CLOCK} - alice has joined the chat\.$", timeout=10, start=mark)
    alice.send("marker after the rejoin")
    bob.wait_for(rf"^{CLOCK} alice: marker after the rejoin$", timeout=10)
    assert bob.count(r"alice: echo lost in transit$") == 1, "\n".join(bob.lines)


def test_short_stall_below_the_timeouts_goes_unnoticed(chat: Chat, proxies: list[FaultyProxy]) -> None:
    """A 1.5 s hiccup (below BROKER_SILENCE_LOST, CLIENT_TIMEOUT and libzmq's heartbeat
    timeout) loses nothing and announces nothing."""
    chat.start_broker()
    bob = chat.joined_client("bob")
    alice = proxied_client(chat, proxies, "alice")
    bob.wait_for(rf"^{CLOCK} - alice has joined the chat\.$")
    for proxy in proxies:
        proxy.stall()
    alice.send("during the hiccup")
    bob.send("bob during the hiccup")
    time.sleep(1.5)  # not a synchronisation: the fault's duration is what is under test
    for proxy in proxies:
        proxy.resume()
    bob.wait_for(rf"^{CLOCK} alice: during the hiccup$", timeout=10)
    alice.wait_for(rf"^{CLOCK} bob: bob during the hiccup$", timeout=10)
    assert_nobody_noticed(alice, bob)


def test_flapping_link_never_crashes_the_broker(chat: Chat, proxies: list[FaultyProxy]) -> None:
    chat.start_broker()
    bob = chat.joined_client("bob")
    alice = proxied_client(chat, proxies, "alice")
    for _ in range(10):
        for proxy in proxies:
            proxy.cut()
        for proxy in proxies:
            proxy.restore()
        mark = len(bob.lines)
        bob.send("/who")  # a round trip through the broker between flaps
        bob.wait_for(r"\* Online", timeout=10, start=mark)
    assert broker_alive(chat)
    mark = len(bob.lines)
    alice.send("still here after flapping")
    bob.wait_for(rf"^{CLOCK} alice: still here after flapping$", timeout=20, start=mark)
    bob.send("me too")
    alice.wait_for(rf"^{CLOCK} bob: me too$", timeout=20)


# --- (b) broker kill -9 and restart -----------------------------------------------------------


def _rooms_setup(chat: Chat) -> tuple[Proc, Proc, Proc]:
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    carol = chat.joined_client("carol")
    for proc in (alice, carol):
        proc.send("/join ops")
        proc.wait_for(rf"^{CLOCK} - {'alice' if proc is alice else 'carol'} has joined #ops\.$")
    alice.wait_for(rf"^{CLOCK} - carol has joined #ops\.$")
    return alice, bob, carol


def _check_rooms_after_restart(alice: Proc, bob: Proc, carol: Proc, tag: str) -> None:
    alice.send(f"ops talk {tag}")  # alice's current room is #ops
    carol.wait_for(rf"^{CLOCK} alice: ops talk {tag}$", timeout=10)
    bob.send(f"lobby talk {tag}")
    alice.wait_for(rf"^{CLOCK} #lobby bob: lobby talk {tag}$", timeout=10)
    carol.wait_for(rf"^{CLOCK} #lobby bob: lobby talk {tag}$", timeout=10)
    assert bob.count(f"ops talk {tag}") == 0


def test_broker_kill_9_and_restart_everyone_back_in_their_rooms(chat: Chat) -> None:
    chat.start_broker()
    alice, bob, carol = _rooms_setup(chat)
    _check_rooms_after_restart(alice, bob, carol, "before")
    marks = [len(proc.lines) for proc in (alice, bob, carol)]
    chat.broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    chat.broker.proc.wait(5)  # type: ignore[union-attr]
    for proc, mark in zip((alice, bob, carol), marks, strict=True):
        proc.wait_for(LOST, timeout=10, start=mark)
    chat.start_broker()
    back_at = time.monotonic()
    for proc, mark in zip((alice, bob, carol), marks, strict=True):
        line = proc.wait_for(RECONNECTED, timeout=max(0.1, back_at + 5 - time.monotonic()), start=mark)
        assert "restarted" in line, line
    assert time.monotonic() - back_at < 5
    _check_rooms_after_restart(alice, bob, carol, "after")
    for proc in (alice, bob, carol):
        assert proc.count("Reconnected") == 1


def test_broker_quick_restart_reconnects_within_5_seconds(chat: Chat) -> None:
    """Restarted at once (before the clients' watchdog fires): they may not say "lost" at all,
    but they must say "Reconnected" and be back in their rooms."""
    chat.start_broker()
    alice, bob, carol = _rooms_setup(chat)
    marks = [len(proc.lines) for proc in (alice, bob, carol)]
    chat.broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    chat.broker.proc.wait(5)  # type: ignore[union-attr]
    chat.start_broker()
    back_at = time.monotonic()
    for proc, mark in zip((alice, bob, carol), marks, strict=True):
        proc.wait_for(RECONNECTED, timeout=max(0.1, back_at + 5 - time.monotonic()), start=mark)
    _check_rooms_after_restart(alice, bob, carol, "quick")


def test_messages_typed_while_the_broker_is_down_arrive_once(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    chat.broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    chat.broker.proc.wait(5)  # type: ignore[union-attr]
    alice.wait_for(LOST, timeout=10)
    alice.send("said into the void")
    alice.wait_for(rf"^{CLOCK} \(pending\) alice: said into the void$", timeout=10)  # not sent yet
    chat.start_broker()
    bob.wait_for(rf"^{CLOCK} alice: said into the void$", timeout=10)
    alice.wait_for(rf"^{CLOCK} alice: said into the void$", timeout=10)
    bob.send("heard you")
    alice.wait_for(rf"^{CLOCK} bob: heard you$", timeout=10)
    assert bob.count("said into the void") == 1
    assert alice.count(rf"^{CLOCK} alice: said into the void$") == 1


def test_broker_survives_a_client_crash_after_a_name_swap_reload(chat: Chat, tmp_path: Path) -> None:
    """The operator swaps two names in the authorized-keys file and sends SIGHUP; then one of
    the two clients crashes. The broker must announce it, not crash itself."""
    path = tmp_path / "authorized_keys"
    alice_key, bob_key = chat.client_key("alice"), chat.client_key("bob")
    _write_keys(path, [("alice", alice_key, "admin"), ("bob", bob_key, "user")])
    broker = chat.start_broker("--authorized-keys", str(path))
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.wait_for(rf"^{CLOCK} - bob has joined the chat\.$")
    _write_keys(path, [("bob", alice_key, "admin"), ("alice", bob_key, "user")])
    broker.proc.send_signal(signal.SIGHUP)
    bob.wait_for(r"is now known as", timeout=10)
    mark = len(bob.lines)
    alice.proc.kill()  # alice's key, now called bob
    alice.wait_exit(5)
    try:
        bob.wait_for(rf"^{CLOCK} - bob has left the chat\.$", timeout=5, start=mark)
    finally:
        assert broker.proc.poll() is None, "broker died:\n" + "\n".join(broker.lines[-12:])


# --- (d) SIGTERM -----------------------------------------------------------------------------


def _stored_texts(chat: Chat) -> list[tuple[str, str, str | None, str | None]]:
    """(type, room, name, text) of every stored event, decoded from the JSON body exactly as
    it was published, in (topic, seq) order."""
    path = keys.broker_dir(chat.config_dir) / "history.sqlite3"
    assert Path(path).exists()
    db = sqlite3.connect(str(path), timeout=5)
    try:
        rows = db.execute("SELECT topic, seq, body FROM events ORDER BY topic, seq").fetchall()
    finally:
        db.close()
    out = []
    for topic, seq, body in rows:
        event = decode_event(bytes(body))
        assert event.seq == seq and topic == f"r/{event.room}/", (topic, seq, event)  # type: ignore[union-attr]
        out.append((type(event).__name__.lower(), getattr(event, "room", ""), getattr(event, "name", None),
                    getattr(event, "text", None)))
    return out


def test_sigterm_notifies_everyone_flushes_history_and_exits_0(chat: Chat) -> None:
    broker = chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.send("/join ops")
    alice.wait_for(rf"^{CLOCK} - alice has joined #ops\.$")
    alice.send("in ops before the end")
    alice.send("/me waves in ops")
    bob.send("lobby words")
    alice.wait_for(rf"^{CLOCK} #lobby bob: lobby words$")
    # A burst, cut short by the signal: whatever anyone saw must be on disk.
    for i in range(40):
        bob.send(f"burst {i}")
    alice.wait_for(rf"^{CLOCK} #lobby bob: burst 5$", timeout=10)
    stopped_at = time.monotonic()
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.wait_exit(2) == 0
    assert time.monotonic() - stopped_at < 2.0
    for proc in (alice, bob):
        proc.wait_for(rf"^{CLOCK} \* The broker is shutting down\.$", timeout=5)

    rows = _stored_texts(chat)
    stored = {(kind, room, name, text) for kind, room, name, text in rows}
    assert ("message", "ops", "alice", "in ops before the end") in stored
    assert ("action", "ops", "alice", "waves in ops") in stored
    assert ("message", "lobby", "bob", "lobby words") in stored
    assert ("joined", "ops", "alice", None) in stored
    shown = set()
    for proc in (alice, bob):
        for line in proc.lines:
            # Published lines only: one said after the broker stopped shows as "(pending)".
            if " bob: burst " in line and "(pending)" not in line:
                shown.add(line.rsplit(": ", 1)[1])
    assert shown, "no burst line was shown"
    for text in shown:
        assert ("message", "lobby", "bob", text) in stored, text
    # Every burst message the broker stored is numbered without gaps (one transaction a turn).
    lobby = [text for kind, room, _, text in rows if room == "lobby" and kind == "message"
             and text and text.startswith("burst ")]
    assert lobby == [f"burst {i}" for i in range(len(lobby))]


def test_a_leave_read_after_its_connection_closed_still_counts(chat: Chat) -> None:
    """A client says /quit and closes at once; the broker is busy (here: stopped) and only
    gets to it once both the leave message and the connection's close are waiting. The
    leave must win: everyone sees "has left (bye)", not "disconnected"."""
    from peers import RawPeer, broker_key

    from zchat.protocol import Heartbeat, Joined, Left, Welcome

    broker = chat.start_broker()
    key = broker_key(chat.config_dir)
    spy = RawPeer(chat.port, chat.pub_port, key, [b"r/lobby/", b"sys/"])
    # Live before the join (a heartbeat came through), or the joined event may beat the subscription.
    spy.wait_for(lambda topic, event: isinstance(event, Heartbeat), timeout=10)
    pair = RawPeer.keypair()
    quitter = RawPeer(chat.port, chat.pub_port, key, [f"u/{pair.identity}/".encode(), b"r/lobby/"], pair)
    try:
        deadline = time.monotonic() + 10
        welcomed = False
        while not welcomed and time.monotonic() < deadline:  # joins are resent until welcomed
            quitter.send(b'{"type":"join","name":"quitter"}')
            try:
                quitter.wait_for(lambda topic, event: isinstance(event, Welcome), timeout=0.3)
                welcomed = True
            except AssertionError:
                pass
        assert welcomed
        spy.wait_for(lambda topic, event: isinstance(event, Joined) and event.name == "quitter")
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            quitter.push.linger = 2000  # what was sent reaches the (stopped) broker's kernel
            quitter.send(b'{"type":"leave","message":"bye"}')
            quitter.close()  # the leave goes out, then the connection closes
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        _, left = spy.wait_for(lambda topic, event: isinstance(event, Left) and event.name == "quitter")
        assert (left.reason, left.message) == ("quit", "bye")
    finally:
        spy.close()
        quitter.close()  # if it failed before closing it: never leave a context to the GC
