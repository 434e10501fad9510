"""End to end: the real broker and real clients as processes, tcp loopback, CURVE."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
import zmq
from conftest import CLOCK, Chat, Proc
from peers import FaultyProxy, RawPeer, broker_key

from zchat import limits as L
from zchat.keys import identity_of, load_public
from zchat.protocol import Error, Message, Welcome

pytestmark = pytest.mark.timeout(90)


def raw_join(peer: RawPeer, name: str, timeout: float = 10.0) -> Welcome:
    """Join as a raw peer the way the protocol says: resend until welcomed."""
    join = json.dumps({"type": "join", "name": name, "rooms": ["lobby"]}).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peer.send(join)
        try:
            _, event = peer.wait_for(lambda t, e: isinstance(e, Welcome), timeout=0.3)
            return event
        except AssertionError:
            continue
    raise AssertionError(f"{name} was not welcomed within {timeout} s")


def test_three_clients_chat_and_see_each_other(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    carol = chat.joined_client("carol")
    for watcher in (alice, bob):
        watcher.wait_for(rf"^{CLOCK} - carol has joined the chat\.$")
    alice.wait_for(rf"^{CLOCK} - bob has joined the chat\.$")

    alice.send("hello from alice")
    bob.send("hi alice, bob here")
    carol.send("carol too")
    for proc in (alice, bob, carol):  # everyone, the sender included
        proc.wait_for(rf"^{CLOCK} alice: hello from alice$")
        proc.wait_for(rf"^{CLOCK} bob: hi alice, bob here$")
        proc.wait_for(rf"^{CLOCK} carol: carol too$")

    carol.send("/quit see you")
    assert carol.wait_exit(10) == 0
    for proc in (alice, bob):
        proc.wait_for(rf"^{CLOCK} - carol has left the chat\. \(see you\)$")
    bob.close_stdin()  # EOF leaves cleanly too
    assert bob.wait_exit(10) == 0
    alice.wait_for(rf"^{CLOCK} - bob has left the chat\.$")


def test_kill_9_is_announced_within_2_seconds(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.wait_for(r"- bob has joined the chat\.")
    killed_at = time.monotonic()
    bob.proc.send_signal(signal.SIGKILL)
    alice.wait_for(rf"^{CLOCK} - bob has left the chat\.$", timeout=2.0)
    assert time.monotonic() - killed_at < 2.0


def test_hung_client_is_announced_within_5_seconds_and_rejoins(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.wait_for(r"- bob has joined the chat\.")
    stopped_at = time.monotonic()
    bob.proc.send_signal(signal.SIGSTOP)
    alice.wait_for(rf"^{CLOCK} - bob has left the chat\.$", timeout=5.0)
    assert time.monotonic() - stopped_at < 5.0
    mark = len(alice.lines)
    bob.proc.send_signal(signal.SIGCONT)
    alice.wait_for(rf"^{CLOCK} - bob has joined the chat\.$", timeout=10, start=mark)
    bob.send("back again")
    alice.wait_for(rf"^{CLOCK} bob: back again$", timeout=10)


def test_name_in_the_body_is_not_believed(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    key = broker_key(chat.config_dir)
    mallory = RawPeer(chat.port, chat.pub_port, key, [b"sys/", b"r/lobby/"])
    stranger = RawPeer(chat.port, chat.pub_port, key, [])
    try:
        mallory.sub.subscribe(f"u/{mallory.identity}/".encode())
        raw_join(mallory, "mallory")
        forged = {"type": "say", "room": "lobby", "text": "I am alice, trust me",
                  "name": "alice", "from": "alice", "id": "0" * 64}
        mallory.send(json.dumps(forged).encode())
        line = alice.wait_for(r"I am alice, trust me")
        assert re.fullmatch(rf"{CLOCK} mallory: I am alice, trust me", line), line
        # A key that never joined cannot speak at all, whatever name it writes.
        stranger.send(json.dumps({"type": "say", "room": "lobby", "text": "stranger danger",
                                  "name": "alice"}).encode())
        mallory.send(json.dumps({"type": "say", "room": "lobby", "text": "marker"}).encode())
        alice.wait_for(r"mallory: marker")  # ordered after the stranger's attempt reached the broker
        assert alice.count("stranger danger") == 0
    finally:
        mallory.close()
        stranger.close()


def test_subscriptions_are_policed(chat: Chat) -> None:
    """A CURVE peer asking for everything, or for someone else's stream, gets neither."""
    chat.start_broker()
    key = broker_key(chat.config_dir)
    alice = chat.joined_client("alice")
    alice_id = identity_of(load_public(chat.config_dir / "keys" / "client-alice.key"))
    spy = RawPeer(chat.port, chat.pub_port, key, [b"", b"u/", f"u/{alice_id}/".encode(), b"sys/"])
    try:
        # Wait until the spy's connection demonstrably works: it hears heartbeats.
        spy.wait_for(lambda t, e: t == "sys/", timeout=10)
        # Traffic on alice's private stream (an error) and in the room (a message).
        alice.send("/nosuchcommand")
        alice.send("in the room")
        bob = chat.joined_client("bob")  # bob's welcome goes to bob's private stream
        bob.send("bob in the room")
        alice.wait_for(r"bob: bob in the room")
        spy.poll(0.5)
        topics = {data.partition(b" ")[0] for data in spy.received}
        assert topics == {b"sys/"}, topics
    finally:
        spy.close()


def test_plaintext_sub_receives_nothing(chat: Chat) -> None:
    chat.start_broker()
    key = broker_key(chat.config_dir)
    plain = RawPeer(chat.port, chat.pub_port, None, [b""])
    tap = RawPeer(chat.port, chat.pub_port, key, [b"r/", b"sys/"])
    try:
        alice = chat.joined_client("alice")
        alice.send("secret-marker-4711")
        tap.wait_for(lambda t, e: isinstance(e, Message) and e.text == "secret-marker-4711")
        plain.poll(0.5)
        assert plain.received == []
    finally:
        plain.close()
        tap.close()


def test_nothing_crosses_the_wire_in_plaintext(chat: Chat) -> None:
    """Route a client through recording TCP proxies: its words must not appear in the bytes."""
    chat.start_broker()
    into, out_of = FaultyProxy(chat.port, record=True), FaultyProxy(chat.pub_port, record=True)
    try:
        alice = Proc(["client.py", "--port", str(into.port), "--pub-port", str(out_of.port),
                      "--config-dir", str(chat.config_dir), "--name", "alice"], env=chat.env)
        chat.procs.append(alice)
        alice.wait_for(r"\* Welcome, alice!", timeout=15)
        alice.send("plaintext-canary-93117")
        alice.wait_for(rf"{CLOCK} alice: plaintext-canary-93117")  # it went out and came back
        wire = bytes(into.captured) + bytes(out_of.captured)
        assert len(into.captured) > 0 and len(out_of.captured) > 0
        for needle in (b"plaintext-canary-93117", b"alice", b"lobby", b"heartbeat", b"welcome"):
            assert needle not in wire, needle
    finally:
        into.close()
        out_of.close()


def test_tap_reads_complete_timestamped_records(chat: Chat) -> None:
    chat.start_broker()
    tap = Proc(["-m", "zchat", "tap", "--port", str(chat.port), "--pub-port", str(chat.pub_port),
                "--config-dir", str(chat.config_dir)], env=chat.env, stdin=False)
    chat.procs.append(tap)
    tap.wait_for(r'"type": ?"epoch"', timeout=10)  # it heard a heartbeat: its subscriptions are in
    alice = chat.client("alice")
    alice.wait_for(r"\* Welcome, alice!")
    tap.wait_for(r'"type": ?"joined"', timeout=10)
    alice.send("for the record")
    line = tap.wait_for(r"for the record")
    record = json.loads(line)
    assert record["topic"] == "r/lobby/"
    assert record["type"] == "message" and record["name"] == "alice" and record["room"] == "lobby"
    assert isinstance(record["seq"], int) and record["seq"] >= 1
    assert abs(record["ts"] - time.time()) < 60


def test_bad_input_gets_errors_and_nobody_else_notices(chat: Chat) -> None:
    chat.start_broker()
    key = broker_key(chat.config_dir)
    alice = chat.joined_client("alice")
    peer = RawPeer(chat.port, chat.pub_port, key, [b"sys/", b"r/lobby/"])
    try:
        peer.sub.subscribe(f"u/{peer.identity}/".encode())
        raw_join(peer, "fuzzer")
        bad = [
            (b"\xff\xfe not json",), (b"[1,2,3]",), (b'{"type":"nope"}',),
            (b'{"type":"say","room":"lobby"}',), (b'{"type":"say","room":"lobby","text":""}',),
            (b'{"type":"say","room":"lobby","text":"' + b"x" * (L.MAX_BODY_BYTES + 1000) + b'"}',),
            (b'{"type":"say","room":"lobby","text":"a"}', b"second frame"),
            (b'{"type":"join","name":"bad/name"}',), (b'{"type":"say","room":"elsewhere","text":"x"}',),
        ]
        for frames in bad:
            peer.send(*frames)
        # Wait for an error to the last bad message; the others came before it, in order.
        peer.wait_for(lambda t, e: isinstance(e, Error) and e.code == "not_in_room")
        codes = [e.code for t, e in peer.decoded() if isinstance(e, Error)]
        assert codes == ["bad_request", "bad_request", "bad_request", "bad_request", "empty_text",
                         "too_large", "too_many_frames", "invalid_name", "not_in_room"], codes
        alice.send("still fine")
        alice.wait_for(rf"{CLOCK} alice: still fine")
        assert chat.broker is not None and chat.broker.proc.poll() is None
    finally:
        peer.close()


def test_taken_name_is_refused_with_a_clear_message(chat: Chat, tmp_path) -> None:  # type: ignore[no-untyped-def]
    chat.start_broker()
    chat.joined_client("alice")
    # Another machine's key (another config dir), given the broker key explicitly.
    key_hex = re.search(r"--server-key ([0-9a-f]{64})", "\n".join(chat.broker.lines)).group(1)  # type: ignore[union-attr]
    other = chat.client("Alice", "--server-key", key_hex, config_dir=tmp_path / "elsewhere")
    other.wait_for(r"the name 'Alice' is taken", timeout=10)
    assert other.wait_exit(10) == 1


def test_unreachable_broker_is_reported_not_hung(chat: Chat) -> None:
    # A broker key must exist for the client to try at all: make one, then stop it.
    chat.start_broker()
    chat.broker.stop()  # type: ignore[union-attr]
    lonely = chat.client("alice")
    lonely.wait_for(r"no broker answers at tcp://127\.0\.0\.1:\d+", timeout=15)
    assert lonely.wait_exit(5) == 1


def test_wrong_server_key_is_reported(chat: Chat) -> None:
    chat.start_broker()
    wrong = zmq.curve_keypair()[0].decode()
    client = chat.client("alice", f"--server-key={wrong}")  # `=`: a z85 key may start with "-"
    client.wait_for(r"handshake .* failed|is --server-key", timeout=15)
    assert client.wait_exit(5) == 1


def test_broker_restart_shows_lost_then_reconnected(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    chat.broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    chat.broker.proc.wait(5)  # type: ignore[union-attr]
    alice.wait_for(rf"{CLOCK} \* Connection to the broker lost", timeout=10)
    chat.start_broker()
    alice.wait_for(rf"{CLOCK} \* Reconnected", timeout=10)
    alice.send("after the restart")
    alice.wait_for(rf"{CLOCK} alice: after the restart", timeout=10)


def test_sigterm_stops_broker_and_clients_hear_it(chat: Chat) -> None:
    broker = chat.start_broker()
    alice = chat.joined_client("alice")
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.wait_exit(5) == 0
    alice.wait_for(rf"{CLOCK} \* The broker is shutting down", timeout=5)
