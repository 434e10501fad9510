"""End to end, against a real broker over CURVE: attacks by peers that hold valid keys (issue 13,
items 4, 5, 7, 8) and a key used by two sessions at once (issue 10, 2.3 and 2.5). The attackers
are raw pyzmq peers that speak the protocol as docs/PROTOCOL.md describes it."""

from __future__ import annotations

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
from peers import RawPeer, broker_key
from zmq.utils.monitor import recv_monitor_message

from zchat import keys
from zchat import limits as L
from zchat.protocol import (
    Ban,
    ClientMessage,
    Code,
    Error,
    Heartbeat,
    Join,
    Left,
    Message,
    Ping,
    Say,
    Welcome,
    Who,
    WhoReply,
    decode_publication,
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
    return [decode_publication(data)[1] for data in p.received]


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
        told = mallory.wait_for(error_with(code))[1]
        assert "disconnected" in told.detail
        assert watched.disconnected(timeout=5)
        bob.send(frame(Say(room="lobby", text="unbothered")))
        bob.wait_for(said("unbothered"))
    finally:
        watched.close()
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
    mallory = peer(chat)
    try:
        mallory.wait_for(lambda t, e: isinstance(e, Heartbeat))
        mallory.send(b'{"type":"x\\n<forged line>\\u001b]0;pwned\\u0007"}')
        mallory.wait_for(error_with(Code.BAD_REQUEST))
        broker.wait_for(r"refused input from .*bad_request: .*<forged line>")
        assert broker.count(r"^<forged line>") == 0
        assert broker.count(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]") == 0
    finally:
        mallory.close()


def test_deeply_nested_json_is_answered_bad_request_and_charged(chat: Chat) -> None:
    broker = chat.start_broker()
    mallory = peer(chat)
    try:
        mallory.wait_for(lambda t, e: isinstance(e, Heartbeat))
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
            mallory.send(ping)
        mallory.wait_for(error_with(Code.FLOODING))
        assert watched.disconnected(timeout=5)
        bob.send(frame(Say(room="lobby", text="quiet again")))
        bob.wait_for(said("quiet again"))
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
    flooder = peer(chat, keypair)  # the same key, busy in another session
    stop = threading.Event()

    def flood() -> None:  # inside the frame ceiling, far past the rate limit
        while not stop.is_set():
            flooder.send(frame(Who()))
            stop.wait(0.02)

    try:
        flooder.wait_for(lambda t, e: isinstance(e, Heartbeat))
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
