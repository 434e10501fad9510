"""End to end, against a real broker over CURVE: attacks by peers that hold valid keys (issue 13,
items 4, 5, 7, 8) and a key used by two sessions at once (issue 10, 2.3 and 2.5). The attackers
are raw pyzmq peers that speak the protocol as docs/PROTOCOL.md describes it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from conftest import ROOT, Chat
from peers import RawPeer, WirePush, broker_key
from zmq.utils.monitor import recv_monitor_message

from zchat import keys
from zchat import limits as L
from zchat.protocol import (
    Ban,
    ClientMessage,
    Code,
    Error,
    Heartbeat,
    History,
    HistoryRequest,
    Join,
    Left,
    Message,
    Ping,
    Say,
    Welcome,
    Who,
    WhoReply,
    encode_client_message,
)

pytestmark = pytest.mark.timeout(90)


def frame(message: ClientMessage) -> bytes:
    return encode_client_message(message)


def peer(chat: Chat, keypair: keys.KeyPair | None = None, rooms: tuple[str, ...] = ("lobby",),
         private: bool = True) -> RawPeer:
    """A raw peer subscribed to sys/, its private stream (unless not `private`) and `rooms`."""
    keypair = keypair or RawPeer.keypair()
    topics = [b"sys/"] + [f"r/{room}/".encode() for room in rooms]
    if private:
        topics.append(f"u/{keypair.identity}/".encode())
    return RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), topics, keypair=keypair)


def connected(chat: Chat, keypair: keys.KeyPair | None = None) -> RawPeer:
    """A raw peer that is not a member, once the broker publishes to it (a heartbeat came)."""
    p = peer(chat, keypair)
    p.wait_for(lambda t, e: isinstance(e, Heartbeat))
    return p


def joined(chat: Chat, name: str, keypair: keys.KeyPair | None = None) -> RawPeer:
    """A raw peer that joined as `name` (its join resent until welcomed, as a client does)."""
    p = peer(chat, keypair)
    deadline = time.monotonic() + 15
    while True:
        p.send(frame(Join(name=name)))
        try:
            p.wait_for(lambda t, e: isinstance(e, Welcome), timeout=L.JOIN_RETRY_INTERVAL)
            return p
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def confirm_connection(second: RawPeer, reader: RawPeer, ref: int) -> None:
    """`second` (a second session of `reader`'s key) asks who is here; the answer on the key's
    private stream shows the broker has read from that connection."""
    second.send(frame(Who(ref=ref)))
    reader.wait_for(lambda t, e: isinstance(e, WhoReply) and e.ref == ref)


class Monitor:
    """Disconnect events of one of our sockets."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.events = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def disconnected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.events.poll(int(left * 1000) + 1):
                if recv_monitor_message(self.events)["event"] == zmq.EVENT_DISCONNECTED:
                    return True
        return False

    def close(self) -> None:
        self.sock.disable_monitor()
        self.events.close(0)


def told_and_cut(mallory: RawPeer, watched: Monitor, bob: RawPeer, code: str) -> Error:
    """`mallory` is told `code` and its connection is cut, while `bob` is still served."""
    told = mallory.wait_for(error_with(code))[1]
    assert watched.disconnected(timeout=5)
    bob.send(frame(Say(room="lobby", text="unbothered")))
    bob.wait_for(said("unbothered"))
    return told  # type: ignore[return-value]


def error_with(code: str, ref: int | None = None) -> Callable[[str, object], bool]:
    return lambda t, e: isinstance(e, Error) and e.code == code and (ref is None or e.ref == ref)


def left(name: str) -> Callable[[str, object], bool]:
    return lambda t, e: isinstance(e, Left) and e.name == name


def said(text: str) -> Callable[[str, object], bool]:
    return lambda t, e: isinstance(e, Message) and e.text == text


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def close_all(*peers: RawPeer) -> None:
    for p in peers:
        p.close()


# --- one key, two sessions (10.2.3, 13.5) ---------------------------------------------------


def test_a_key_leaves_only_with_its_last_input_connection(chat: Chat) -> None:
    chat.start_broker()
    keypair = RawPeer.keypair()
    bob = joined(chat, "bob")
    alice = joined(chat, "alice", keypair)
    second = peer(chat, keypair, rooms=(), private=False)  # e.g. `zchat send` beside the TUI
    try:
        confirm_connection(second, alice, ref=77)
        alice.close()  # the first session goes; the second still speaks for the key
        closed_at = time.time()
        # A heartbeat stamped well past the broker's grace before a leave (the second session
        # silent meanwhile, as a client is between two pings).
        bob.wait_for(lambda t, e: isinstance(e, Heartbeat) and e.ts > closed_at + 0.3, timeout=5)
        second.send(frame(Say(room="lobby", text="still here")))
        bob.wait_for(said("still here"))
        assert not [e for e in decoded(bob) if isinstance(e, Left) and e.name == "alice"]
        second.close()  # the last one: now alice has left
        bob.wait_for(left("alice"))
    finally:
        close_all(bob, alice, second)


def decoded(p: RawPeer) -> list[object]:
    return [event for _, event in p.decoded()]  # private frames opened with its key


def next_heartbeat(p: RawPeer) -> None:
    seen = max((e.seq for e in decoded(p) if isinstance(e, Heartbeat)), default=0)
    p.wait_for(lambda t, e: isinstance(e, Heartbeat) and e.seq > seen, timeout=5)


def test_a_ban_cuts_every_connection_of_the_key(chat: Chat, tmp_path: Path) -> None:
    admin, victim = RawPeer.keypair(), RawPeer.keypair()
    path = tmp_path / "authorized_keys"
    path.write_text(f"root {admin.identity} admin\nmallory {victim.identity} user\n")
    chat.start_broker("--authorized-keys", str(path))
    root = joined(chat, "root", admin)
    first = joined(chat, "mallory", victim)
    second = peer(chat, victim, rooms=(), private=False)
    watched = [Monitor(first.push), Monitor(second.push)]
    try:
        confirm_connection(second, first, ref=5)
        root.send(frame(Ban(name="mallory", reason="spam")))
        first.wait_for(error_with(Code.BANNED))
        assert [m.disconnected(timeout=5) for m in watched] == [True, True]
    finally:
        for m in watched:
            m.close()
        close_all(root, first, second)


# --- one message of many parts (13.5) ---------------------------------------------------------


@pytest.mark.parametrize(("parts", "size", "code"), [
    (L.MAX_MESSAGE_PARTS + 1, 10, Code.TOO_MANY_FRAMES),
    (5, 60_000, Code.TOO_LARGE),  # 300 KB in all, each part within MAXMSGSIZE
], ids=["parts", "bytes"])
def test_a_multipart_message_past_the_bounds_is_dropped_and_its_sender_cut(
        chat: Chat, parts: int, size: int, code: str) -> None:
    chat.start_broker()
    bob = joined(chat, "bob")
    mallory = joined(chat, "mallory")
    watched = Monitor(mallory.push)
    try:
        mallory.send(*[b"x" * size] * parts)
        assert "disconnected" in told_and_cut(mallory, watched, bob, code).detail
    finally:
        watched.close()
        close_all(bob, mallory)


@pytest.mark.timeout(120)
def test_an_endless_multipart_message_gets_its_sender_cut_before_the_broker_grows(chat: Chat) -> None:
    """libzmq holds every part of an unfinished message, unseen by the broker until the last
    (before: 200 MiB took the broker from 32 to 233 MB, and nothing ended it). libzmq itself
    sends nothing of a message before its last part, so the attacker speaks ZMTP and CURVE
    by hand."""
    broker = chat.start_broker()
    bob = joined(chat, "bob")
    keypair = RawPeer.keypair()
    mallory = joined(chat, "mallory", keypair)
    wire = WirePush(chat.port, broker_key(chat.config_dir), keypair)
    pid = broker.proc.pid
    baseline = rss_mb(pid)
    part = b"x" * 60_000
    sent = 0
    try:
        wire.send_part(frame(Who(ref=3)), more=False)  # one whole message: the broker knows whose
        mallory.wait_for(lambda t, e: isinstance(e, WhoReply) and e.ref == 3)
        with pytest.raises(OSError):  # the broker ends the connection
            while sent < 300 * 2**20:  # never the last part
                wire.send_part(part)
                sent += len(part)
        grown = rss_mb(pid) - baseline
        print(f"cut after {sent / 2**20:.0f} MiB; broker RSS grew {grown:.0f} MB")
        assert grown < 100
        mallory.wait_for(error_with(Code.FLOODING))
        bob.send(frame(HistoryRequest(room="lobby", ref=9)))  # the broker serves the others
        bob.wait_for(lambda t, e: isinstance(e, History) and e.ref == 9)
    finally:
        wire.close()
        close_all(bob, mallory)


def test_a_two_part_message_is_refused_but_not_cut(chat: Chat) -> None:
    chat.start_broker()
    alice = joined(chat, "alice")
    watched = Monitor(alice.push)
    try:
        alice.send(frame(Ping()), b"second part")
        alice.wait_for(error_with(Code.TOO_MANY_FRAMES))
        assert not watched.disconnected(timeout=0.5)
        alice.send(frame(Say(room="lobby", text="fine")))
        alice.wait_for(said("fine"))
    finally:
        watched.close()
        alice.close()


# --- the log (13.7) ----------------------------------------------------------------------------


def test_a_client_cannot_forge_log_lines_or_send_escapes_to_the_operators_terminal(chat: Chat) -> None:
    broker = chat.start_broker()
    mallory = connected(chat)
    try:
        mallory.send(b'{"type":"x\\n<forged line>\\u001b]0;pwned\\u0007"}')
        mallory.wait_for(error_with(Code.BAD_REQUEST))
        broker.wait_for(r"refused input from .*bad_request: .*<forged line>")
        assert broker.count(r"^<forged line>") == 0
        assert broker.count(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]") == 0
    finally:
        mallory.close()


def test_deeply_nested_json_is_answered_bad_request_and_charged(chat: Chat) -> None:
    broker = chat.start_broker()
    mallory = connected(chat)
    try:
        for _ in range(L.RATE_BURST + 2):
            mallory.send(b'{"type":"ping","x":' + b"[" * 8000)
        mallory.wait_for(error_with(Code.BAD_REQUEST))
        mallory.wait_for(error_with(Code.RATE_LIMITED))  # each one was charged
        assert broker.count(r"internal error|RecursionError|Traceback") == 0
    finally:
        mallory.close()


# --- floods (13.8) -----------------------------------------------------------------------------


def test_a_ping_flood_gets_the_key_cut_and_the_others_go_on(chat: Chat) -> None:
    chat.start_broker()
    bob = joined(chat, "bob")
    mallory = joined(chat, "mallory")
    watched = Monitor(mallory.push)
    try:
        ping = frame(Ping())
        for _ in range(20 * L.MAX_FRAMES_PER_SECOND):
            try:
                mallory.push.send(ping, zmq.NOBLOCK)
            except zmq.Again:  # the broker cut it: our queue to it is full
                break
        told_and_cut(mallory, watched, bob, Code.FLOODING)
    finally:
        watched.close()
        close_all(bob, mallory)


def test_pings_at_a_clients_pace_are_free_and_never_cut(chat: Chat) -> None:
    chat.start_broker("--rate-burst", "2", "--rate-per-second", "0.01")
    alice = joined(chat, "alice")
    watched = Monitor(alice.push)
    try:
        for _ in range(3):  # two a second: two sessions of one key
            alice.send(frame(Ping()))
            alice.send(frame(Ping()))
            next_heartbeat(alice)
        alice.send(frame(Say(room="lobby", text="still free", ref=1)))
        alice.wait_for(said("still free"))
        assert not watched.disconnected(timeout=0.2)
    finally:
        watched.close()
        alice.close()


# --- refusals name their ref (10.2.5) ----------------------------------------------------------


def test_zchat_send_refused_for_rate_exits_1(chat: Chat) -> None:
    chat.start_broker()
    keypair = keys.load_or_create(keys.client_keys_dir(chat.config_dir), keys.client_key_file_name("ann"))
    flooder = connected(chat, keypair)  # the same key, busy in another session
    stop = threading.Event()

    def flood() -> None:  # inside the frame ceiling, far past the rate limit
        while not stop.is_set():
            flooder.send(frame(Who()))
            stop.wait(0.02)

    try:
        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        flooder.wait_for(error_with(Code.RATE_LIMITED))
        send = subprocess.run(
            [sys.executable, "-m", "zchat", "send", *chat.endpoint_args(), "--name", "ann",
             "--timeout", "8", "hello"], cwd=ROOT, env=chat.env, capture_output=True, text=True,
            timeout=30)
        assert send.returncode == 1, send.stderr
        assert re.search(r"slow down", send.stderr), send.stderr
    finally:
        stop.set()
        flooder.close()


# --- memory per subscriber, in bytes (13.4) ------------------------------------------------------


def fill_history(db: Path, events: int, text_chars: int) -> None:
    """A room history of `events` messages of `text_chars` characters, stored before the broker
    starts (the attack needs big pages, not the time to say them)."""
    from zchat.history import HistoryStore

    store = HistoryStore(db)
    text = "x" * text_chars
    store.write([("r/lobby/", seq, 1.0, json.dumps({
        "type": "message", "seq": seq, "ts": 1.0, "room": "lobby", "name": "bob", "text": text}).encode())
        for seq in range(1, events + 1)], [], [], 1.0)
    store.close()


def slow_reader(chat: Chat) -> RawPeer:
    """A raw peer on its private stream only, whose SUB takes in little more than it reads."""
    reader = peer(chat, rooms=(), private=False)
    reader.sub.close(0)
    reader.sub = reader.ctx.socket(zmq.SUB)
    reader.sub.rcvhwm, reader.sub.rcvbuf = 1, 4096
    reader.sub.curve_serverkey = broker_key(chat.config_dir)
    reader.sub.curve_publickey, reader.sub.curve_secretkey = reader.keypair.public, reader.keypair.secret
    reader.sub.subscribe(f"u/{reader.identity}/".encode())
    reader.sub.connect(f"tcp://127.0.0.1:{chat.pub_port}")
    return reader


HISTORY_REQUEST = b'{"type":"history","room":"lobby","limit":500}'


@pytest.mark.timeout(120)
def test_slow_readers_of_big_history_pages_cannot_grow_the_broker(chat: Chat, tmp_path: Path) -> None:
    """Ten keys inside the rate limit ask for ~1 MB history pages and read two frames a second
    (before: the broker grew by ~25 MB a second). Their pages shrink to the byte cap, their
    history bytes are rationed, and past the backlog budget their subscriptions are cut. An
    honest key reading every page at the same time is never cut."""
    db = tmp_path / "history.sqlite3"
    fill_history(db, 500, 1900)  # 500 events of ~2 KB: a full page is ~1 MB
    broker = chat.start_broker("--db", str(db), "--stats-interval", "0")
    pid = broker.proc.pid
    attackers = [slow_reader(chat) for _ in range(10)]
    honest = peer(chat, rooms=())
    try:
        honest.wait_for(lambda t, e: isinstance(e, Heartbeat))
        baseline = peak = rss_mb(pid)
        pages = more = 0
        start = time.monotonic()
        next_request = next_read = start
        while time.monotonic() - start < 20:
            now = time.monotonic()
            if now >= next_request:  # 5 a second each: exactly the refill of the rate limit
                for p in [*attackers, honest]:
                    p.push.send(HISTORY_REQUEST, zmq.NOBLOCK)
                next_request += 1 / L.RATE_PER_SECOND
            if now >= next_read:  # two frames a second each
                for a in attackers:
                    for _ in range(2):
                        if a.sub.poll(0):
                            a.received.append(a.sub.recv())
                next_read += 1.0
                peak = max(peak, rss_mb(pid))
            while honest.sub.poll(0):  # the honest key reads everything at once
                data = honest.opened(honest.sub.recv()) or b""  # private frames are sealed
                if b'"type":"history"' in data[:200]:
                    pages += 1
                    more += b'"more":true' in data[-20:]
            time.sleep(0.005)
        peak = max(peak, rss_mb(pid))
        print(f"broker RSS {baseline:.0f} MB -> peak {peak:.0f} MB; honest key got {pages} pages "
              f"({more} with more); {broker.count('slow consumer')} slow consumer(s) cut")
        assert peak - baseline < 10 * L.MAX_BACKLOG_BYTES / 2**20, (baseline, peak)
        assert broker.count(rf"slow consumer {honest.identity[:12]}") == 0
        assert pages >= 20 and more == pages  # rationed, and never a page over the byte cap
    finally:
        close_all(*attackers, honest)


@pytest.mark.timeout(90)
def test_a_key_that_reads_too_slowly_is_cut_and_told_why(chat: Chat, tmp_path: Path) -> None:
    """A reader that takes two frames a second while asking for pages at the rate limit: it
    stays ever further behind. (One that reads much less, or nothing, is dropped by the ZMTP
    heartbeat already: it answers no ping in time.)"""
    db = tmp_path / "history.sqlite3"
    fill_history(db, 500, 1900)
    broker = chat.start_broker("--db", str(db), "--stats-interval", "0")
    mallory = slow_reader(chat)
    try:
        mallory.sub.poll(10_000)  # connected: a first answer waits for it
        deadline = time.monotonic() + 60
        pattern = rf"slow consumer {mallory.identity[:12]}: \d+ bytes unread"
        next_read = time.monotonic()
        while not broker.count(pattern):  # inside the rate limit
            assert time.monotonic() < deadline, "never cut"
            mallory.push.send(HISTORY_REQUEST)
            if time.monotonic() >= next_read and mallory.sub.poll(0):
                mallory.received.append(mallory.sub.recv())
                next_read += 0.5
            time.sleep(1 / L.RATE_PER_SECOND)
        # Its SUB reconnects by itself; on subscribing again it is told why.
        mallory.wait_for(error_with(Code.SLOW_CONSUMER), timeout=15)
    finally:
        mallory.close()
