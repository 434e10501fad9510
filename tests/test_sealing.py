"""Sealed private streams (issue 13, item 1): the sealing module, the dispatcher sealing every
u/ publication and nothing else, and the client library opening its own, dropping what does
not open, and subscribing afresh when the broker lost its approval."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from nacl.public import Box, PrivateKey, PublicKey
from peers import RawPeer
from zmq.utils import z85

from zchat.client import ChatClient, ClientEvent, ClientSettings
from zchat.clientcore import RESUBSCRIBE_WAIT
from zchat.core import BrokerCore, Publish
from zchat.dispatch import Dispatcher
from zchat.endpoints import Endpoints
from zchat.history import HistoryStore
from zchat.keys import KeyPair
from zchat.protocol import (
    Error,
    Message,
    Welcome,
    decode_publication,
    encode_publication,
    private_topic,
    room_topic,
)
from zchat.sealing import (
    BoxCache,
    SealError,
    box_for,
    key_bytes,
    open_publication,
    open_sealed,
    seal,
    z85_decode,
)

BROKER, ALICE, EVE = RawPeer.keypair(), RawPeer.keypair(), RawPeer.keypair()


def test_z85_and_hex_keys_decode_to_the_same_32_bytes() -> None:
    raw = z85.decode(ALICE.public)
    assert z85_decode(ALICE.public) == raw
    assert key_bytes(ALICE.public) == key_bytes(ALICE.public.decode()) == key_bytes(ALICE.identity) == raw
    with pytest.raises(ValueError):
        key_bytes("not a key")


def test_a_sealed_body_opens_only_for_its_recipient() -> None:
    sealed = seal(box_for(BROKER.secret, ALICE.public), b'{"type":"direct"}')
    assert open_sealed(box_for(ALICE.secret, BROKER.public), sealed) == b'{"type":"direct"}'
    # PyNaCl's own Box opens it too: the format is nonce + crypto_box, as documented.
    nacl_box = Box(PrivateKey(z85.decode(ALICE.secret)), PublicKey(z85.decode(BROKER.public)))
    assert nacl_box.decrypt(sealed) == b'{"type":"direct"}'
    for wrong in (box_for(EVE.secret, BROKER.public), box_for(ALICE.secret, EVE.public)):
        with pytest.raises(SealError):
            open_sealed(wrong, sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError):
        open_sealed(box_for(ALICE.secret, BROKER.public), tampered)
    with pytest.raises(SealError):
        open_sealed(box_for(ALICE.secret, BROKER.public), b"short")
    to_alice = box_for(BROKER.secret, ALICE.public)
    assert seal(to_alice, b"x") != seal(to_alice, b"x")  # random nonces


def test_open_publication_leaves_public_topics_and_refuses_plain_private_ones() -> None:
    alice = box_for(ALICE.secret, BROKER.public)
    assert open_publication(alice, b'r/lobby/ {"type":"message"}') == b'r/lobby/ {"type":"message"}'
    with pytest.raises(SealError):  # a u/ publication in clear is not one the broker sent
        open_publication(alice, private_topic(ALICE.identity).encode() + b' {"type":"error"}')


def test_box_cache_is_bounded_and_seals_to_the_topic_owner() -> None:
    cache = BoxCache(BROKER.secret, size=3)
    others = [RawPeer.keypair() for _ in range(5)]
    for pair in others:
        frame = cache.seal_publication(private_topic(pair.identity), b"{}")
        assert open_publication(box_for(pair.secret, BROKER.public), frame) == \
            private_topic(pair.identity).encode() + b" {}"
    assert len(cache) == 3


def test_dispatcher_seals_every_private_publication_and_nothing_else(tmp_path: Path) -> None:
    core = BrokerCore("e" * 16, 0.0)
    store = HistoryStore(tmp_path / "h.sqlite3")
    sent: list[bytes] = []
    dispatch = Dispatcher(core, store, sent.append, BoxCache(BROKER.secret))
    try:
        private = private_topic(ALICE.identity)
        dispatch.add([
            Publish(room_topic("lobby"), Message(seq=1, ts=1.0, room="lobby", name="bob", text="public")),
            Publish(private, Error(seq=1, ts=1.0, code="bad_request", detail="private detail")),
        ])
        dispatch.flush(2.0)
        dispatch._send_reply(ALICE.identity, lambda seq: Error(seq=seq, ts=2.0, code="x", detail="reply"))
        room, error, reply = sent[0], sent[1], sent[2]
        assert decode_publication(room)[1].text == "public"  # type: ignore[union-attr]
        for frame in (error, reply):
            assert frame.startswith(private.encode() + b" ") and b"detail" not in frame
            topic, event = decode_publication(open_publication(box_for(ALICE.secret, BROKER.public), frame))
            assert topic == private and isinstance(event, Error)
            with pytest.raises(SealError):
                open_publication(box_for(EVE.secret, BROKER.public), frame)
    finally:
        store.close()


# --- the client library against a scripted broker ------------------------------------------


class ScriptedBroker:
    """A CURVE XPUB (manual) + PULL that plays the broker: it loses the first approval of a
    private topic, as libzmq does when an upstream data frame shifts its bookkeeping, and
    installs any later one; it welcomes a join once the private topic is installed."""

    def __init__(self) -> None:
        self.keys = RawPeer.keypair()
        self.ctx = zmq.Context()
        self.xpub = self._server(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.pull = self._server(zmq.PULL)
        self.pub_port = self.xpub.bind_to_random_port("tcp://127.0.0.1")
        self.port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.subscriptions: list[bytes] = []  # every (un)subscription read, in order
        self.installed: set[bytes] = set()
        self.boxes = BoxCache(self.keys.secret)
        self.outbox: list[bytes] = []  # frames to publish, handed over by the test
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _server(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.keys.public, self.keys.secret
        return sock

    def publish(self, frame: bytes) -> None:
        with self._lock:
            self.outbox.append(frame)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.xpub, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(20))
            if self.xpub in ready:
                self._subscriptions()
            if self.pull in ready:
                self._messages()
            with self._lock:
                frames, self.outbox = self.outbox, []
            for frame in frames:
                self.xpub.send(frame)
        self.xpub.close(0)
        self.pull.close(0)

    def _subscriptions(self) -> None:
        while True:
            try:
                data = self.xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.subscriptions.append(data)
            topic = data[1:]
            if data[:1] == b"\x00":
                self.xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
                self.installed.discard(topic)
            elif topic.startswith(b"u/") and self.subscriptions.count(data) == 1:
                pass  # the first approval of a private topic is lost
            else:
                self.xpub.setsockopt(zmq.SUBSCRIBE, topic)
                self.installed.add(topic)

    def _messages(self) -> None:
        while True:
            try:
                frame = self.pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            message = msgspec.json.decode(frame.bytes)
            topic = private_topic(ALICE.identity)
            if message.get("type") == "join" and topic.encode() in self.installed:
                welcome = Welcome(seq=1, ts=time.time(), id=ALICE.identity, name=message["name"], epoch="e1",
                                  rooms={"lobby": 0}, online=1, members=[message["name"]], heartbeat=1.0,
                                  rate_burst=20, rate_per_second=5.0)
                self.xpub.send(self.sealed(topic, welcome))  # pings and the like: ignored

    def sealed(self, topic: str, event: Error | Welcome, keys: KeyPair | None = None) -> bytes:
        body = msgspec.json.encode(event)
        if keys is None:
            return self.boxes.seal_publication(topic, body)
        return BoxCache(keys.secret).seal_publication(topic, body)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.ctx.term()


@pytest.fixture
def scripted() -> Iterator[ScriptedBroker]:
    broker = ScriptedBroker()
    try:
        yield broker
    finally:
        broker.close()


def _alice(broker: ScriptedBroker, on_event: Callable[[ClientEvent], None]) -> ChatClient:
    settings = ClientSettings(Endpoints(port=broker.port, pub_port=broker.pub_port), broker.keys.public,
                              ALICE, ["lobby"])
    return ChatClient(settings, on_event)


def test_client_subscribes_afresh_when_its_private_approval_is_lost(scripted: ScriptedBroker) -> None:
    """Item 4: no welcome within RESUBSCRIBE_WAIT of subscribing u/<id>/: the client
    subscribes it again (never unsubscribing first: that would drop what the broker sends
    meanwhile), and the join completes."""
    events: list[ClientEvent] = []
    client = _alice(scripted, events.append)
    client.start()
    try:
        started = time.monotonic()
        welcome = client.join("alice", timeout=4 * RESUBSCRIBE_WAIT + 2)
        assert welcome.name == "alice"
        assert time.monotonic() - started >= RESUBSCRIBE_WAIT * 0.9  # it did wait for a welcome
        private = private_topic(ALICE.identity).encode()
        mine = [data for data in scripted.subscriptions if data[1:] == private]
        assert mine[:2] == [b"\x01" + private, b"\x01" + private], mine
        assert b"\x00" + private not in mine, mine
    finally:
        client.close(leave=False)


def test_client_drops_private_publications_that_do_not_open(scripted: ScriptedBroker) -> None:
    """A u/ publication in clear, or sealed by another key, is never shown."""
    events: list[ClientEvent] = []
    genuine = threading.Event()

    def on_event(event: ClientEvent) -> None:
        events.append(event)
        if isinstance(event, Error) and event.detail == "genuine":
            genuine.set()

    client = _alice(scripted, on_event)
    client.start()
    try:
        client.join("alice", timeout=4 * RESUBSCRIBE_WAIT + 2)
        topic = private_topic(ALICE.identity)
        clear = Error(seq=2, ts=1.0, code="x", detail="in clear")
        scripted.publish(encode_publication(topic.encode(), clear))
        scripted.publish(scripted.sealed(topic, Error(seq=3, ts=1.0, code="x", detail="forged"), EVE))
        scripted.publish(scripted.sealed(topic, Error(seq=4, ts=1.0, code="x", detail="genuine")))
        assert genuine.wait(5), events  # published last: the two before it were read first
        assert [e.detail for e in events if isinstance(e, Error)] == ["genuine"]
        assert client.unopened == 2
    finally:
        client.close(leave=False)
