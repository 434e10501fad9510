"""Issue 13, item 1: the data-frame race on the publishing socket, for 30 s against a real broker.

An attacker's XSUB sends upstream data frames (b"x": first byte neither 0 nor 1) while another
of its XSUBs sends harmless subscriptions (b"\\x01sys/"), thousands of pairs a second. libzmq
queues a data frame without its pipe, so the broker's next approval (XPUB_MANUAL) lands on the
wrong connection: alice's private stream used to reach the attacker in clear. Meanwhile alice
subscribes her private topic again and again (as joining and rejoining sessions do) and bob
sends her private messages. The broker must cut the attacker's key at its first data frame
(a new key takes over, as an attacker in open mode would), never let it read anything private,
and alice must get every message.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import pytest
import zmq
from conftest import Chat
from peers import RawPeer, broker_key
from test_client_library import _client
from zmq.utils.monitor import recv_monitor_message

from zchat import keys
from zchat.client import ClientEvent
from zchat.events import PrivateMessage
from zchat.keys import KeyPair
from zchat.protocol import Stats, private_topic
from zchat.sealing import SealError, box_for, open_publication

pytestmark = [pytest.mark.security, pytest.mark.timeout(150)]

RACE_SECONDS = 30.0
PAIRS_PER_SECOND = 4000  # data frame + subscription pairs, per attacking key while connected
CUT_WITHIN = 5.0  # seconds from an attacking key's handshake to its cut
MARKER = b"secret-"  # every private message's text starts with it


@dataclass
class AttackKey:
    """One attacking key: socket 0 sends data frames, socket 1 subscriptions. Times are
    monotonic, per socket, 0 until seen."""

    pair: KeyPair
    socks: list[zmq.Socket]
    monitors: list[zmq.Socket]
    started: list[float] = field(default_factory=lambda: [0.0, 0.0])  # its handshake succeeded
    cut: list[float] = field(default_factory=lambda: [0.0, 0.0])  # the broker closed it
    reconnected: list[bool] = field(default_factory=lambda: [False, False])  # let in after the cut
    pairs: int = 0
    received: list[bytes] = field(default_factory=list)  # everything, before or after a cut
    after_cut: list[bytes] = field(default_factory=list)  # received by a socket after its cut

    @property
    def all_cut(self) -> bool:
        """Every connection it made has been closed by the broker."""
        pairs = zip(self.started, self.cut, strict=True)
        return any(self.started) and all(cut for started, cut in pairs if started)


class Attacker:
    """Two XSUBs per key, racing data frames against subscriptions; a new key once every
    connection of the last one is cut. The first key's sockets stay open to the end, to see
    whether it gets back in. An accomplice with a key of its own only subscribes, as fast:
    it never misbehaves, so it is never cut, and a shifted approval could land on it."""

    def __init__(self, pub_port: int, server_key: bytes) -> None:
        self.endpoint = f"tcp://127.0.0.1:{pub_port}"
        self.server_key = server_key
        self.ctx = zmq.Context()
        self.keys: list[AttackKey] = []
        self.accomplice_pair = RawPeer.keypair()
        self.accomplice = self._xsub(self.accomplice_pair)
        self.accomplice_received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _xsub(self, pair: KeyPair) -> zmq.Socket:
        sock = self.ctx.socket(zmq.XSUB)
        sock.linger = 0
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = \
            self.server_key, pair.public, pair.secret
        return sock

    def _key(self) -> AttackKey:
        pair = RawPeer.keypair()
        socks, monitors = [], []
        for _ in range(2):
            sock = self._xsub(pair)
            monitors.append(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED))
            sock.connect(self.endpoint)
            socks.append(sock)
        return AttackKey(pair, socks, monitors)

    def _watch(self, key: AttackKey) -> None:
        """Read what the key's sockets received and what their monitors say."""
        for i, (sock, monitor) in enumerate(zip(key.socks, key.monitors, strict=True)):
            self._read(key, i, sock)
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    if key.cut[i]:
                        key.reconnected[i] = True
                    elif not key.started[i]:
                        key.started[i] = time.monotonic()
                elif event["event"] == zmq.EVENT_DISCONNECTED and key.started[i] and not key.cut[i]:
                    self._read(key, i, sock)  # what was queued before the cut counts as before
                    key.cut[i] = time.monotonic()

    @staticmethod
    def _read(key: AttackKey, i: int, sock: zmq.Socket) -> None:
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            key.received.append(data)
            if key.cut[i]:
                key.after_cut.append(data)

    def _run(self) -> None:
        frames = (b"x", b"\x01sys/")  # an upstream data frame, a harmless subscription
        self.accomplice.connect(self.endpoint)
        while not self.stop.is_set():
            key = self._key()
            self.keys.append(key)
            begun = paced = time.monotonic()
            while not self.stop.is_set() and not key.all_cut:
                for _ in range(40):  # a burst, then pace to PAIRS_PER_SECOND
                    for sock, frame in zip([*key.socks, self.accomplice], [*frames, frames[1]], strict=True):
                        try:
                            sock.send(frame, zmq.NOBLOCK)
                        except zmq.Again:
                            pass
                    key.pairs += 1
                self._watch(key)
                self._read_accomplice()
                if not any(key.started) and time.monotonic() - begun > CUT_WITHIN:
                    break  # never got in (the broker was busy): try another key
                paced += 40 / PAIRS_PER_SECOND
                time.sleep(max(0.0, paced - time.monotonic()))  # pacing, not synchronisation
            if len(self.keys) > 1:
                self._settle(key)
                self._close(key)

    def _read_accomplice(self) -> None:
        while True:
            try:
                self.accomplice_received.append(self.accomplice.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _settle(self, key: AttackKey) -> None:
        """Before closing a key: its monitors' last news (a late handshake), within a moment."""
        poller = zmq.Poller()
        for monitor in key.monitors:
            poller.register(monitor, zmq.POLLIN)
        while poller.poll(200):
            self._watch(key)

    def _close(self, key: AttackKey) -> None:
        for sock in key.socks:
            sock.disable_monitor()
            sock.close(0)
        for monitor in key.monitors:
            monitor.close(0)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        """Stop, read what the first key's sockets hold by now, close everything."""
        if self.ctx.closed:
            return
        self.stop.set()
        self.thread.join(10)
        if self.keys and not self.keys[0].socks[0].closed:
            self._watch(self.keys[0])
            self._close(self.keys[0])
        self._read_accomplice()
        self.accomplice.close(0)
        self.ctx.term()


class Churner(threading.Thread):
    """Alice's key subscribing u/<alice>/ afresh over and over on one more connection, as her
    joining and rejoining sessions do."""

    def __init__(self, port: int, pub_port: int, server_key: bytes, pair: KeyPair) -> None:
        super().__init__(daemon=True)
        self.peer = RawPeer(port, pub_port, server_key, [b"sys/"], pair)
        self.topic = private_topic(pair.identity).encode()
        self.stop = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        sub = self.peer.sub
        while not self.stop.is_set():
            sub.subscribe(self.topic)
            sub.unsubscribe(self.topic)
            self.rounds += 1
            while sub.poll(2):  # drain, and pace the rounds (about one per 2 ms)
                sub.recv()
        self.peer.close()


def test_data_frame_race_reveals_nothing_and_cuts_the_attacker(chat: Chat) -> None:
    chat.start_broker("--stats-interval", "1")
    server_key = broker_key(chat.config_dir)
    sent: list[bytes] = []  # bob's private messages to alice
    got: list[bytes] = []  # those alice received
    finished = threading.Event()  # bob has sent his last one
    all_in = threading.Event()  # ...and alice has them all

    def on_alice(event: ClientEvent) -> None:
        if isinstance(event, PrivateMessage) and event.name == "bob" and event.text is not None:
            got.append(event.text.encode())
            if finished.is_set() and set(sent) <= set(got):
                all_in.set()

    alice, bob = _client(chat, "alice", on_alice), _client(chat, "bob")
    observer = RawPeer(chat.port, chat.pub_port, server_key, [b"sys/"])
    alice_pair = keys.load_or_create(keys.client_keys_dir(chat.config_dir), "alice")
    attacker = Attacker(chat.pub_port, server_key)
    churner = Churner(chat.port, chat.pub_port, server_key, alice_pair)
    try:
        for client, name in ((alice, "alice"), (bob, "bob")):
            client.start()
            client.join(name, timeout=10)
        attacker.start()
        churner.start()
        end = time.monotonic() + RACE_SECONDS
        while time.monotonic() < end:
            text = MARKER + f"{len(sent)}-{secrets.token_hex(4)}".encode()
            sent.append(text)
            bob.direct("alice", text.decode())
            assert bob.wait_delivered(15), f"bob's message {len(sent)} was not confirmed"
        finished.set()
        if set(sent) <= set(got):
            all_in.set()
        churner.stop.set()
        churner.join(10)
        attacker.finish()
        keys_used = [key for key in attacker.keys if key.pairs]
        pairs = sum(key.pairs for key in keys_used)
        print(f"{len(sent)} private messages; {len(keys_used)} attacking key(s), {pairs} pairs sent; "
              f"{churner.rounds} resubscriptions by alice")

        # 1. The attacker read nothing private: no message text, and no u/ publication it can open.
        accomplice = (attacker.accomplice_pair, attacker.accomplice_received)
        for pair, received in [(key.pair, key.received) for key in keys_used] + [accomplice]:
            assert not [data for data in received if MARKER in data], "the attacker read a DM's text"
            private = [data for data in received if data.startswith(b"u/")]
            box = box_for(pair.secret, server_key)
            for data in private:
                with pytest.raises(SealError):
                    open_publication(box, data)
            assert not private, f"{len(private)} private publication(s) reached an attacking key (sealed)"

        # 2. Alice got every private message.
        assert all_in.wait(15), f"alice is missing {len(set(sent) - set(got))} of {len(sent)} messages"

        # 3. Every connection of each attacking key was cut soon after it got in, and stayed out.
        connected = [key for key in keys_used if any(key.started)]
        assert connected, "no attacking key ever connected"
        now = time.monotonic()
        for key in connected:
            for started, cut in zip(key.started, key.cut, strict=True):
                if started:
                    assert cut, f"an attacking connection was not cut ({now - started:.1f} s after it got in)"
                    assert cut - started <= CUT_WITHIN, f"a connection cut only after {cut - started:.1f} s"
            assert not any(key.reconnected), "a cut key was let back in"
            assert not key.after_cut, "a cut key kept receiving"
        first = keys_used[0]
        assert chat.broker is not None
        chat.broker.wait_for(rf"cut key {first.pair.identity[:12]}: it sent data frames", timeout=5)
        observer.wait_for(lambda t, e: isinstance(e, Stats) and e.data_cuts >= 1, timeout=10)
    finally:
        churner.stop.set()
        if churner.is_alive():
            churner.join(10)
        attacker.finish()
        alice.close()
        bob.close()
        observer.close()
