"""The broker's loop turn, in process: what a turn received is stored and published before the
turn's housekeeping (the tick, policing, stats) runs, so that housekeeping never delays it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import free_port
from peers import RawPeer

from zchat import limits as L
from zchat.broker import Broker, BrokerSettings
from zchat.core import Publish
from zchat.endpoints import Endpoints
from zchat.protocol import Join, Message, Say, Welcome, encode_client_message


def test_a_turns_messages_are_published_before_its_housekeeping(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "TICK_INTERVAL", 0.0)  # every turn ticks: a message always shares one
    settings = BrokerSettings(endpoints=Endpoints(host="127.0.0.1", port=free_port(), pub_port=free_port()),
                              config_dir=tmp_path / "config", stats_interval=0)
    broker = Broker(settings)
    broker.bind()
    waiting: list[str] = []  # what a tick found not yet published: messages received this turn
    tick = broker.core.tick

    def checked_tick(now: float):  # type: ignore[no-untyped-def]
        waiting.extend(item.event.text for item in broker.dispatch.pending
                       if isinstance(item, Publish) and isinstance(item.event, Message))
        return tick(now)

    broker.core.tick = checked_tick  # type: ignore[method-assign]
    keypair = RawPeer.keypair()
    peer = RawPeer(settings.endpoints.port, settings.endpoints.publish_port, broker.keypair.public,
                   [b"sys/", b"r/lobby/", f"u/{keypair.identity}/".encode()], keypair)
    said: list[Message] = []
    failure: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(50):  # the join is resent until welcomed, as a client does
                peer.send(encode_client_message(Join(name="alice")))
                try:
                    peer.wait_for(lambda t, e: isinstance(e, Welcome), timeout=L.JOIN_RETRY_INTERVAL)
                    break
                except AssertionError:
                    continue
            for i in range(20):
                peer.send(encode_client_message(Say(room="lobby", text=f"line {i}")))
            said.extend(peer.wait_for(lambda t, e, i=i: isinstance(e, Message) and e.text == f"line {i}")[1]
                        for i in range(20))
        except BaseException as exc:  # reported by the test thread
            failure.append(exc)
        finally:
            broker.request_stop()

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert broker.run() == 0  # the loop runs here: signals are the main thread's
    finally:
        thread.join(30)
        peer.close()
    assert not failure, failure
    assert len(said) == 20
    assert waiting == []
