"""End to end: relays (issue 11 §3). A real broker, relays and clients as processes over tcp
loopback with CURVE; clients connect to a relay exactly as to a broker."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import zmq
from conftest import CLOCK, Chat, Proc
from peers import FaultyProxy, RawPeer, broker_key
from relaykit import RelayProc, joined_relay_client, relay_client, relay_key, start_relay, trust_relays
from test_tap import Output

from zchat import keys
from zchat.protocol import Joined, Welcome
from zchat.relaying import MESSAGE, mark
from zchat.sealing import box_for
from zchat.tui import EXIT_BANNED

pytestmark = pytest.mark.timeout(120)


def _two_relays(chat: Chat, tmp_path: Path, *broker_args: str):  # type: ignore[no-untyped-def]
    dirs = [tmp_path / "relay-a", tmp_path / "relay-b"]
    chat.start_broker("--relay-keys", str(trust_relays(chat, *dirs)), *broker_args)
    return [start_relay(chat, d) for d in dirs]


def test_users_on_two_relays_chat_dm_rename_and_join_rooms(chat: Chat, tmp_path: Path) -> None:
    a, b = _two_relays(chat, tmp_path)
    alice = joined_relay_client(chat, a, "alice")
    bob = joined_relay_client(chat, b, "bob")
    carol = chat.joined_client("carol")  # directly on the broker
    alice.wait_for(rf"^{CLOCK} - bob has joined the chat\.$")
    bob.wait_for(rf"^{CLOCK} - carol has joined the chat\.$")
    alice.send("hello from relay a")
    bob.send("hello from relay b")
    for proc in (alice, bob, carol):
        proc.wait_for(rf"^{CLOCK} alice: hello from relay a$")
        proc.wait_for(rf"^{CLOCK} bob: hello from relay b$")
    alice.send("/msg bob secret-lemon-5521")
    bob.wait_for(rf"^{CLOCK} <- alice: secret-lemon-5521$")
    alice.wait_for(rf"^{CLOCK} -> bob: secret-lemon-5521$")
    assert carol.count("secret-lemon") == 0
    bob.send("/nick robert")
    alice.wait_for(r"bob is now known as robert")
    alice.send("/join #garden")
    alice.wait_for(r"#garden")
    bob.send("/join #garden")
    alice.wait_for(r"robert has joined #garden")
    bob.send("/msg alice back-at-you-77")
    alice.wait_for(rf"^{CLOCK} <- robert: back-at-you-77$")


def test_kill_9_of_a_relay_client_is_announced_within_2_seconds(chat: Chat, tmp_path: Path) -> None:
    a, b = _two_relays(chat, tmp_path)
    alice = joined_relay_client(chat, a, "alice")
    bob = joined_relay_client(chat, b, "bob")
    alice.wait_for(rf"^{CLOCK} - bob has joined the chat\.$")
    killed_at = time.monotonic()
    bob.proc.send_signal(signal.SIGKILL)
    alice.wait_for(rf"^{CLOCK} - bob has left the chat\.$", timeout=2.0)
    assert time.monotonic() - killed_at < 2.0


def test_closed_mode_moderation_across_relays(chat: Chat, tmp_path: Path) -> None:
    """An admin on relay A kicks, mutes and bans a user on relay B; relay A is closed with the
    same file, relay B is open (the broker's file decides)."""
    dirs = [tmp_path / "relay-a", tmp_path / "relay-b"]
    path = tmp_path / "authorized_keys"
    path.write_text("".join(f"{name} {pair.identity} {role}\n" for name, pair, role in (
        ("alice", chat.client_key("alice"), "admin"), ("bob", chat.client_key("bob"), "user"),
        ("carol", chat.client_key("carol"), "user"), ("relay-a", relay_key(dirs[0]), "relay"),
        ("relay-b", relay_key(dirs[1]), "relay"))))
    chat.start_broker("--authorized-keys", str(path))
    a = start_relay(chat, dirs[0], None, None, None, "--authorized-keys", str(path))
    b = start_relay(chat, dirs[1])
    alice = joined_relay_client(chat, a, "alice")
    bob = joined_relay_client(chat, b, "bob")
    carol = joined_relay_client(chat, a, "carol")
    mallory = relay_client(chat, a, "mallory")  # in nobody's file: relay A refuses it
    mallory.wait_for(r"refused this key", timeout=15)
    alice.send("/mute bob 60")
    for proc in (alice, carol):
        proc.wait_for(rf"{CLOCK} - bob was muted for 60 s until \d\d:\d\d:\d\d by alice\.")
    bob.wait_for(rf"{CLOCK} - You were muted for 60 s by alice\. You may speak again at \d\d:\d\d:\d\d\.")
    bob.send("can I talk?")
    bob.wait_for(rf"{CLOCK} ! you are muted for \d+ more seconds")
    alice.send("/mute bob 0")
    bob.wait_for(rf"{CLOCK} - bob may speak again \(alice\)\.")
    alice.send("/kick bob be nice")
    bob.wait_for(rf"{CLOCK} \* You were kicked by alice: be nice\.")
    carol.wait_for(rf"{CLOCK} - bob was kicked by alice\. \(be nice\)$")
    b.proc.wait_for(r"cut 2 connection\(s\) of " + chat.client_key("bob").identity[:12], timeout=5)
    bob.send("/quit")
    assert bob.wait_exit(10) == 0
    bob = joined_relay_client(chat, b, "bob")  # a kick is not a ban
    alice.send("/ban bob for good")
    bob.wait_for(rf"{CLOCK} \* You were banned by alice: for good\.")
    carol.wait_for(rf"{CLOCK} - bob was banned by alice\. \(for good\)$")
    assert bob.wait_exit(10) == EXIT_BANNED
    for relay in (b, a):  # refused at either relay now
        again = relay_client(chat, relay, "bob")
        again.wait_for(r"refused this key", timeout=15)


def test_an_eavesdropper_on_relay_a_cannot_read_a_dm_between_users_on_relay_b(
        chat: Chat, tmp_path: Path) -> None:
    a, b = _two_relays(chat, tmp_path)
    alice = joined_relay_client(chat, b, "alice")
    bob = joined_relay_client(chat, b, "bob")
    targets = [f"u/{chat.client_key(name).identity}/".encode() for name in ("alice", "bob")]
    spy = RawPeer(a.port, a.pub_port, a.key.public, [*targets, b"u/", b"", b"sys/"])
    # The attack of DESIGN.md "Privacy": data frames raced against subscriptions on an XSUB.
    racer = spy.ctx.socket(zmq.XSUB)
    racer.linger = 0
    racer.curve_serverkey, racer.curve_publickey, racer.curve_secretkey = (
        a.key.public, spy.keypair.public, spy.keypair.secret)
    racer.connect(f"tcp://127.0.0.1:{a.pub_port}")
    try:
        spy.wait_for(lambda topic, event: topic == "sys/", timeout=10)  # its connection is live
        for _ in range(50):
            for target in targets:
                racer.send(b"\x01" + target)
                racer.send(b"junk data frame")
        for n in range(5):
            alice.send(f"/msg bob eaves-{n}-drop")
            bob.wait_for(rf"<- alice: eaves-{n}-drop$")
        bob.send("/msg alice reply-secret-99")
        alice.wait_for(r"<- bob: reply-secret-99$")
        spy.poll(0.5)
        private = [data for data in spy.received if data.startswith(b"u/")]
        assert private == [], private[:3]
        assert not any(b"eaves-" in data or b"reply-secret" in data for data in spy.received)
    finally:
        racer.close(0)
        spy.close()


def test_a_marked_frame_from_a_key_that_is_no_relay_is_refused(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker("--relay-keys", str(trust_relays(chat, tmp_path / "relay-a")))
    a = start_relay(chat, tmp_path / "relay-a")
    alice = joined_relay_client(chat, a, "alice")
    bob = chat.client_key("bob")
    forged = mark(MESSAGE, bob.identity, b'{"type":"join","name":"bob"}')
    # Straight to the broker, and to the relay: both refuse and cut the key.
    direct = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [b"sys/"])
    via_relay = RawPeer(a.port, a.pub_port, a.key.public, [b"sys/"])
    try:
        direct.wait_for(lambda topic, event: topic == "sys/", timeout=10)
        direct.send(forged)
        chat.broker.wait_for(rf"key {direct.identity[:12]}, not a relay, sent a marked frame", timeout=10)
        via_relay.send(forged)
        a.proc.wait_for(rf"key {via_relay.identity[:12]}, not a relay, sent a marked frame", timeout=10)
        alice.send("/who")
        alice.wait_for(r"alice")
        assert alice.count("bob") == 0
    finally:
        direct.close()
        via_relay.close()


def test_kill_9_of_a_relay_announces_its_clients_and_they_move_to_the_other_relay(
        chat: Chat, tmp_path: Path) -> None:
    a, b = _two_relays(chat, tmp_path)
    alice = joined_relay_client(chat, a, "alice")  # relay A only
    both = f"127.0.0.1:{a.port}:{a.pub_port},127.0.0.1:{b.port}:{b.pub_port}"
    bob = chat.client("bob", "--host", both, "--server-key", f"{a.identity},{b.identity}", "--broker-key",
                      keys.identity_of(broker_key(chat.config_dir)))
    bob.wait_for(rf"{CLOCK} \* Welcome, bob!", timeout=15)
    carol = chat.joined_client("carol")  # on the broker itself
    carol.send("before the crash")
    bob.wait_for(rf"{CLOCK} carol: before the crash$")
    killed_at = time.monotonic()
    a.proc.proc.send_signal(signal.SIGKILL)
    carol.wait_for(rf"^{CLOCK} - alice has left the chat\.$", timeout=2.0)
    assert time.monotonic() - killed_at < 2.0
    for n in range(5):  # said while bob moves: he must see them all, not a silent gap
        carol.send(f"while-moving-{n}")
    bob.wait_for(r"Reconnected|rejoined", timeout=15)
    for n in range(5):
        bob.wait_for(rf"carol: while-moving-{n}$", timeout=15)
    bob.send("bob via relay b")
    carol.wait_for(rf"{CLOCK} bob: bob via relay b$", timeout=10)
    assert alice.proc.poll() is None  # alice has no other endpoint: she waits, reconnecting


def test_kill_9_of_the_broker_and_a_restart_everyone_behind_relays_recovers(
        chat: Chat, tmp_path: Path) -> None:
    a, b = _two_relays(chat, tmp_path)
    alice = joined_relay_client(chat, a, "alice")
    bob = joined_relay_client(chat, b, "bob")
    alice.wait_for(r"bob has joined the chat")
    chat.broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    chat.broker.proc.wait(5)  # type: ignore[union-attr]
    for proc in (alice, bob):
        proc.wait_for(rf"{CLOCK} \* Connection to the broker lost", timeout=10)
    chat.start_broker("--relay-keys", str(chat.config_dir.parent / "relay-keys"))
    for proc in (alice, bob):
        proc.wait_for(rf"{CLOCK} \* Reconnected", timeout=15)
    alice.send("after the restart")
    bob.wait_for(rf"{CLOCK} alice: after the restart$", timeout=10)
    bob.send("/msg alice still-private-42")
    alice.wait_for(r"<- bob: still-private-42$", timeout=10)


def test_the_tap_works_through_a_relay(chat: Chat, tmp_path: Path) -> None:
    (a, _) = _two_relays(chat, tmp_path)
    path = tmp_path / "tap.jsonl"
    tap = Proc(["-m", "zchat", "tap", "--port", str(a.port), "--pub-port", str(a.pub_port),
                "--config-dir", str(chat.config_dir), "--server-key", a.identity, "--broker-key",
                keys.identity_of(broker_key(chat.config_dir)), "--output", str(path)],
               env=chat.env, stdin=False)
    chat.procs.append(tap)
    out = Output(path, tap)
    out.wait_record(type="epoch", timeout=15)
    alice = chat.joined_client("alice")  # on the broker; the tap is behind relay A
    alice.send("seen by the tap")
    out.wait_record(type="message", text="seen by the tap", timeout=10)


def test_a_chained_relay_relay_to_relay_to_broker(chat: Chat, tmp_path: Path) -> None:
    a, b = _two_relays(chat, tmp_path)
    # Relay C's upstream is relay A, which keeps C's marks (C is in A's relay-keys)...
    c_dir = tmp_path / "relay-c"
    (a.config_dir / "relay" / "relay-keys").write_text(f"{relay_key(c_dir).identity}\n")
    a.proc.stop()  # ...read at start: restart A with it
    a = start_relay(chat, a.config_dir)
    c = start_relay(chat, c_dir, a.port, a.pub_port, a.identity, "--broker-key",
                    keys.identity_of(broker_key(chat.config_dir)))
    dave = joined_relay_client(chat, c, "dave")
    bob = joined_relay_client(chat, b, "bob")
    dave.wait_for(r"bob has joined the chat")
    dave.send("hello from two hops away")
    bob.wait_for(rf"{CLOCK} dave: hello from two hops away$")
    bob.send("/msg dave sealed-two-hops")
    dave.wait_for(r"<- bob: sealed-two-hops$")
    dave.send("/join #deep")
    dave.wait_for(r"#deep")
    erin = joined_relay_client(chat, c, "erin")
    bob.wait_for(r"erin has joined the chat")
    killed_at = time.monotonic()
    dave.proc.send_signal(signal.SIGKILL)  # a client of C: C tells A, A passes it on
    bob.wait_for(rf"^{CLOCK} - dave has left the chat\.$", timeout=2.0)
    assert time.monotonic() - killed_at < 2.0
    c.proc.proc.send_signal(signal.SIGKILL)  # C itself: A announces its clients
    bob.wait_for(rf"^{CLOCK} - erin has left the chat\.$", timeout=2.0)
    assert erin.proc.poll() is None


def test_one_join_through_a_relay_is_enough_no_slow_joiner_loss(chat: Chat, tmp_path: Path) -> None:
    """The broker completes a relayed join only once the relay's upstream subscriptions are
    live (installed downstream first): a single join, sent before the connection is even up,
    gets the welcome and the client's own joined notice on the room, every time."""
    dirs = [tmp_path / "relay-a"]
    chat.start_broker("--relay-keys", str(trust_relays(chat, *dirs)))
    # The relay's subscriptions reach the broker late (its reports of them do not): the
    # broker must wait for the subscriptions themselves.
    slow = FaultyProxy(chat.pub_port, delay=0.3)
    a = start_relay(chat, dirs[0], chat.port, slow.port)
    sealing = broker_key(chat.config_dir)
    join = json.dumps({"type": "join", "name": "x", "rooms": ["lobby"]})
    try:
        for n in range(8):
            _join_once(a, sealing, join.replace('"x"', f'"joiner{n}"'), f"joiner{n}")
    finally:
        slow.close()


def _join_once(relay: RelayProc, sealing: bytes, join: str, name: str) -> None:
    peer = RawPeer(relay.port, relay.pub_port, relay.key.public, [])
    peer.box = box_for(peer.keypair.secret, sealing)
    for topic in (f"u/{peer.identity}/", "r/lobby/", "sys/"):
        peer.sub.subscribe(topic.encode())
    try:
        peer.send(join.encode())  # once, at once
        peer.wait_for(lambda topic, event: isinstance(event, Welcome), timeout=10)
        peer.wait_for(lambda topic, event: topic == "r/lobby/" and isinstance(event, Joined)
                      and event.name == name, timeout=5)
    finally:
        peer.close()


def test_sighup_rereads_the_relay_keys(chat: Chat, tmp_path: Path) -> None:
    broker = chat.start_broker("--relay-keys", str(tmp_path / "relay-keys"))  # no such file yet
    a = start_relay(chat, tmp_path / "relay-a")
    alice = relay_client(chat, a, "alice")
    broker.wait_for(rf"key {a.identity[:12]}, not a relay, sent a marked frame", timeout=15)
    (tmp_path / "relay-keys").write_text(a.identity + "\n")
    broker.proc.send_signal(signal.SIGHUP)
    broker.wait_for(r"1 relay key\(s\) may mark", timeout=10)
    alice.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=20)


def test_a_hung_relay_client_and_a_hung_relay_are_announced_within_5_seconds(
        chat: Chat, tmp_path: Path) -> None:
    a, b = _two_relays(chat, tmp_path)
    alice = joined_relay_client(chat, a, "alice")
    bob = joined_relay_client(chat, b, "bob")
    carol = joined_relay_client(chat, b, "carol")
    alice.wait_for(r"carol has joined the chat")
    stopped_at = time.monotonic()
    carol.proc.send_signal(signal.SIGSTOP)  # a client behind relay B hangs
    alice.wait_for(rf"^{CLOCK} - carol has left the chat\.$", timeout=5.0)
    assert time.monotonic() - stopped_at < 5.0
    stopped_at = time.monotonic()
    b.proc.proc.send_signal(signal.SIGSTOP)  # relay B itself hangs
    alice.wait_for(rf"^{CLOCK} - bob has left the chat\.$", timeout=5.0)
    assert time.monotonic() - stopped_at < 5.0
    mark = len(alice.lines)
    b.proc.proc.send_signal(signal.SIGCONT)
    alice.wait_for(rf"^{CLOCK} - bob has joined the chat\.$", timeout=15, start=mark)
    bob.send("back through relay b")
    alice.wait_for(rf"{CLOCK} bob: back through relay b$", timeout=10)
    carol.proc.send_signal(signal.SIGCONT)
