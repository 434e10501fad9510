"""A live-broker fuzzer: hostile input at a real broker process while two real clients chat.

An authenticated raw peer sends a few thousand random, truncated, oversized and multi-frame
messages; plain TCP sockets throw junk and plaintext ZMTP greetings at both ports. The
broker must stay up and answering, the two clients must keep hearing each other, and the
broker's memory must stay bounded.

Memory bound: the fuzzer pushes well over 100 MB through the broker (mostly frames between
MAX_BODY_BYTES and MAXMSGSIZE, refused as too large before any parsing). Everything the
broker may legitimately keep from it is small and bounded: one peer record (at most
MAX_TOPICS_PER_PEER topics), a few rate-limited error events, a handful of stored room
messages. So RSS after the run may exceed the baseline by interpreter and allocator
slack only; 50 MB is well above that slack (a few MB measured) and well below what
keeping even half of the junk would cost.
"""

from __future__ import annotations

import json
import random
import re
import socket
import struct
from pathlib import Path

import pytest
import zmq
from conftest import CLOCK, Chat
from peers import RawPeer, broker_key
from test_e2e import raw_join

from zchat import limits as L
from zchat.protocol import Error, Heartbeat, Message, Welcome

pytestmark = pytest.mark.timeout(180)

RSS_GROWTH_LIMIT_KB = 50 * 1024
FUZZ_MESSAGES = 5000
SEED = 20240605


def rss_kb(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    return _status_kb(pid, "VmRSS")


def _status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, text
    return int(match.group(1))


# --- what the fuzzer sends ---------------------------------------------------------------

VALID = [
    {"type": "say", "room": "lobby", "text": "fuzz"},
    {"type": "me", "room": "lobby", "text": "fuzzes"},
    {"type": "msg", "to": "alice", "key": "a1" * 32, "box": "QUJD" * 14, "self_box": "QUJD" * 14},
    {"type": "key", "name": "alice"},
    {"type": "who"}, {"type": "rooms"}, {"type": "ping"},
    {"type": "history", "room": "lobby", "after": 0, "limit": 10},
    {"type": "enter", "room": "fuzzroom"}, {"type": "part", "room": "fuzzroom"},
    {"type": "nick", "name": "fuzzer2"}, {"type": "join", "name": "fuzzer", "rooms": ["lobby"]},
    {"type": "kick", "name": "alice"}, {"type": "ban", "name": "bob"}, {"type": "mute", "name": "alice"},
]
KEYS = ["type", "room", "rooms", "text", "name", "to", "ref", "history", "seen", "after", "before", "limit",
        "seconds", "reason", "message", "key", "box", "self_box"]


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**53, 2**53 + 1, 2**64, -(2**63), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 1e-308])
    if kind in (4, 5):
        alphabet = "abc#/.\\-_ \x00\x1b[]\u202e\u00e9\U0001f600\"'{}"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 7:
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}
    return rng.choice(VALID)["type"]


def mutated(rng: random.Random) -> bytes:
    message = dict(rng.choice(VALID))
    for _ in range(rng.randrange(1, 4)):
        action = rng.randrange(3)
        if action == 0 and message:
            message.pop(rng.choice(list(message)))
        else:
            message[rng.choice(KEYS)] = random_value(rng)
    return json.dumps(message).encode()


def truncated(rng: random.Random) -> bytes:
    data = json.dumps(rng.choice(VALID)).encode()
    return data[: rng.randrange(0, len(data))]


def junk(rng: random.Random, low: int, high: int) -> bytes:
    return rng.randbytes(rng.randrange(low, high))


def fuzz_frames(rng: random.Random) -> list[bytes]:
    """One message (its frames) of a random kind; oversized ones (beyond MAXMSGSIZE) apart."""
    roll = rng.random()
    if roll < 0.20:
        return [mutated(rng)]
    if roll < 0.28:
        return [truncated(rng)]
    if roll < 0.38:
        return [junk(rng, 0, 400)]
    if roll < 0.45:
        return [json.dumps(random_value(rng)).encode()]
    if roll < 0.55:  # several frames, of any sizes up to the frame limit
        return [rng.choice([mutated(rng), junk(rng, 0, 200), junk(rng, 0, L.MAX_FRAME_BYTES)])
                for _ in range(rng.randrange(2, 6))]
    # Too large for the protocol, not for the socket: refused before any parsing.
    big = junk(rng, L.MAX_FRAME_BYTES // 2, L.MAX_FRAME_BYTES)
    if rng.random() < 0.5:  # a JSON-looking prefix
        big = b'{"type":"say","room":"lobby","text":"' + big
    return [big[: L.MAX_FRAME_BYTES]]


# --- raw TCP ---------------------------------------------------------------------------------


def zmtp_greeting(mechanism: bytes, as_server: bool = False, major: int = 3) -> bytes:
    return (b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([major, 0]) + mechanism.ljust(20, b"\x00")
            + bytes([1 if as_server else 0]) + b"\x00" * 31)


def zmtp_ready(socket_type: bytes) -> bytes:
    name = b"Socket-Type"
    body = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(socket_type)) + socket_type
    return bytes([0x04, len(body)]) + body


def tcp_abuse(port: int, rng: random.Random) -> int:
    """Junk, plaintext greetings and half handshakes at one port; returns connections made."""
    payloads = [
        zmtp_greeting(b"NULL") + zmtp_ready(b"PUSH") + b"\x00\x05hello",
        zmtp_greeting(b"NULL") + zmtp_ready(b"SUB") + b"\x00\x01\x01",
        zmtp_greeting(b"PLAIN") + zmtp_ready(b"PUSH"),
        zmtp_greeting(b"CURVE") + b"\x04\xc8\x05HELLO" + rng.randbytes(194),  # a bogus HELLO
        zmtp_greeting(b"CURVE", major=1),
        zmtp_greeting(b"NULL", major=2),
        b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f",  # a ZMTP 2 style signature, then silence
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(200),  # a TLS hello
        b"",  # connect and close
    ]
    payloads += [rng.randbytes(rng.randrange(1, 5000)) for _ in range(30)]
    payloads += [zmtp_greeting(b"CURVE")[: rng.randrange(1, 64)] for _ in range(5)]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            try:
                conn.sendall(payload)
                conn.settimeout(0.05)
                try:
                    conn.recv(4096)  # the broker's greeting, or nothing
                except (TimeoutError, OSError):
                    pass
            except OSError:
                pass  # the broker may drop us mid-send: fine
    return len(payloads)


def drain(peer: RawPeer) -> None:
    """Forget what a raw peer has received so far (keeps its memory flat)."""
    while peer.sub.poll(0):
        peer.sub.recv()
    peer.received.clear()


def test_broker_survives_a_fuzzing_peer_and_raw_junk(chat: Chat) -> None:
    rng = random.Random(SEED)
    broker = chat.start_broker()
    pid = broker.proc.pid
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.wait_for(rf"{CLOCK} - bob has joined the chat\.")
    alice.send("before the storm")
    bob.wait_for(rf"^{CLOCK} alice: before the storm$")
    bob.send("ready when you are")
    alice.wait_for(rf"^{CLOCK} bob: ready when you are$")

    key = broker_key(chat.config_dir)
    fuzzer = RawPeer(chat.port, chat.pub_port, key, [b"sys/"])
    fuzzer.sub.subscribe(f"u/{fuzzer.identity}/".encode())
    fuzzer.sub.subscribe(b"r/lobby/")
    fuzzer.push.sndtimeo = 10_000  # a send that cannot go out within 10 s fails the test, not hangs it
    try:
        raw_join(fuzzer, "fuzzer")
        # Warm up (allocator pools, SQLite pages, libzmq buffers) before the baseline.
        for _ in range(200):
            fuzzer.send(*fuzz_frames(rng))
        alice.send("warm")
        bob.wait_for(rf"^{CLOCK} alice: warm$")
        drain(fuzzer)
        baseline = rss_kb(pid)
        peak = baseline

        sent_bytes = 0
        said = []
        for i in range(FUZZ_MESSAGES):
            frames = fuzz_frames(rng)
            fuzzer.send(*frames)
            sent_bytes += sum(len(frame) for frame in frames)
            if i % 500 == 250:  # the humans keep talking all along
                said.append((alice, bob, f"alice during fuzz {i}"))
                said.append((bob, alice, f"bob during fuzz {i}"))
                alice.send(said[-2][2])
                bob.send(said[-1][2])
                peak = max(peak, rss_kb(pid))
                drain(fuzzer)
        for _, hearer, text in said:
            hearer.wait_for(rf"^{CLOCK} [a-z]+: {text}$", timeout=20)
        peak = max(peak, rss_kb(pid))

        # A few frames beyond MAXMSGSIZE: the broker drops that connection (libzmq), the peer
        # reconnects by itself; no other connection is affected.
        for size in (L.MAX_FRAME_BYTES + 1, 80_000, 100_000):
            fuzzer.send(rng.randbytes(size))
            sent_bytes += size
        connections = tcp_abuse(chat.port, rng) + tcp_abuse(chat.pub_port, rng)

        # The fuzzer's own connection still works (after a reconnect): it can join again.
        # Frames still queued behind the oversized ones may cut it once more after the welcome,
        # so the peer does what a client does: join again until its words get through.
        for attempt in range(3):
            drain(fuzzer)
            welcome = raw_join(fuzzer, "fuzzer", timeout=15)
            assert isinstance(welcome, Welcome)
            fuzzer.send(json.dumps({"type": "say", "room": "lobby", "text": "fuzzer says bye"}).encode())
            try:
                fuzzer.wait_for(lambda t, e: isinstance(e, Message) and e.text == "fuzzer says bye",
                                timeout=5)
                break
            except AssertionError:
                if attempt == 2:
                    raise

        # The humans still chat both ways, and a newcomer gets in.
        alice.send("after the storm")
        bob.wait_for(rf"^{CLOCK} alice: after the storm$", timeout=10)
        bob.send("all quiet")
        alice.wait_for(rf"^{CLOCK} bob: all quiet$", timeout=10)
        carol = chat.joined_client("carol")
        carol.send("carol arrives late")
        alice.wait_for(rf"^{CLOCK} carol: carol arrives late$", timeout=10)
        assert alice.count(r"Connection to the broker lost") == 0
        assert bob.count(r"Connection to the broker lost") == 0

        # Heartbeats still flow to the fuzzer, the broker process is alive.
        drain(fuzzer)
        fuzzer.wait_for(lambda t, e: isinstance(e, Heartbeat), timeout=5)
        assert broker.proc.poll() is None
        after = rss_kb(pid)
        peak = max(peak, after)
        print(f"fuzz: {FUZZ_MESSAGES} messages, {sent_bytes / 1e6:.1f} MB, {connections} raw connections; "
              f"broker RSS {baseline / 1024:.1f} MB -> {after / 1024:.1f} MB (peak sampled "
              f"{peak / 1024:.1f} MB, VmHWM {_status_kb(pid, 'VmHWM') / 1024:.1f} MB)")
        assert sent_bytes > 2 * RSS_GROWTH_LIMIT_KB * 1024, "the memory bound would prove nothing"
        assert after - baseline < RSS_GROWTH_LIMIT_KB, (baseline, after)
        assert not [line for line in broker.lines if "Traceback" in line or "internal error" in line]
    finally:
        fuzzer.close()


def test_junk_before_any_handshake_does_not_disturb_a_joining_client(chat: Chat) -> None:
    """Raw junk first, then a client joins and chats: the broker's listening sockets are fine."""
    rng = random.Random(SEED + 1)
    broker = chat.start_broker()
    tcp_abuse(chat.port, rng)
    tcp_abuse(chat.pub_port, rng)
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.send("hello after junk")
    bob.wait_for(rf"^{CLOCK} alice: hello after junk$")
    assert broker.proc.poll() is None


def test_fuzz_peer_errors_are_its_own(chat: Chat) -> None:
    """While a peer floods bad frames, only its private stream carries errors: another raw
    peer in the same room sees no error and no fuzz text."""
    rng = random.Random(SEED + 2)
    chat.start_broker()
    key = broker_key(chat.config_dir)
    fuzzer = RawPeer(chat.port, chat.pub_port, key, [b"sys/", b"r/lobby/"])
    witness = RawPeer(chat.port, chat.pub_port, key, [b"sys/", b"r/lobby/"])
    try:
        for peer, name in ((fuzzer, "fuzzer"), (witness, "witness")):
            peer.sub.subscribe(f"u/{peer.identity}/".encode())
            raw_join(peer, name)
        fuzzer.push.sndtimeo = 10_000
        for _ in range(500):
            frames = fuzz_frames(rng)
            if len(frames) == 1 and b'"say"' in frames[0]:
                continue  # a valid say could be published: keep only what must be refused
            fuzzer.send(*frames)
        witness.send(json.dumps({"type": "say", "room": "lobby", "text": "witness marker"}).encode())
        witness.wait_for(lambda t, e: isinstance(e, Message) and e.text == "witness marker", timeout=15)
        fuzzer.wait_for(lambda t, e: isinstance(e, Error), timeout=5)  # it did get errors
        seen = [data.partition(b" ")[0] for data in witness.received]
        assert f"u/{fuzzer.identity}/".encode() not in seen
        assert not [e for t, e in witness.decoded() if isinstance(e, Error)]
    finally:
        fuzzer.close()
        witness.close()


def test_oversized_frame_drops_only_that_connection(chat: Chat) -> None:
    """Beyond MAXMSGSIZE libzmq drops the sender's connection; the sender's socket reconnects
    on its own and others never notice."""
    chat.start_broker()
    alice = chat.joined_client("alice")
    key = broker_key(chat.config_dir)
    peer = RawPeer(chat.port, chat.pub_port, key, [b"sys/", b"r/lobby/"])
    peer.push.sndtimeo = 10_000
    try:
        peer.sub.subscribe(f"u/{peer.identity}/".encode())
        raw_join(peer, "bigmouth")
        alice.wait_for(rf"{CLOCK} - bigmouth has joined the chat\.")
        peer.send(b"x" * (L.MAX_FRAME_BYTES + 10))
        # Its input connection was dropped: it is announced as gone, then it can come back.
        alice.wait_for(rf"{CLOCK} - bigmouth has left the chat\.", timeout=10)
        mark = len(alice.lines)
        raw_join(peer, "bigmouth", timeout=15)
        alice.wait_for(rf"{CLOCK} - bigmouth has joined the chat\.", timeout=10, start=mark)
        alice.send("unbothered")
        alice.wait_for(rf"^{CLOCK} alice: unbothered$")
        assert alice.count("Connection to the broker lost") == 0
    finally:
        peer.close()


def test_zmq_plaintext_peers_get_nothing_and_break_nothing(chat: Chat) -> None:
    """Real libzmq peers without CURVE (NULL mechanism) on both ports: refused handshakes."""
    chat.start_broker()
    alice = chat.joined_client("alice")
    ctx = zmq.Context()
    socks = []
    try:
        for _ in range(20):
            push = ctx.socket(zmq.PUSH)
            sub = ctx.socket(zmq.SUB)
            for sock in (push, sub):
                sock.linger = 0
            sub.subscribe(b"")
            push.connect(f"tcp://127.0.0.1:{chat.port}")
            sub.connect(f"tcp://127.0.0.1:{chat.pub_port}")
            try:  # never handshaken, so never a peer to send to: this normally fails at once
                push.send(json.dumps({"type": "join", "name": "plain"}).encode(), zmq.NOBLOCK)
            except zmq.Again:
                pass
            socks += [push, sub]
        alice.send("plain peers about")
        alice.wait_for(rf"^{CLOCK} alice: plain peers about$")
        assert alice.count("plain has joined") == 0
        assert all(not sock.poll(0) for sock in socks[1::2])
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
