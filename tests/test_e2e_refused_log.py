"""Issue 14, item 22: the README says refused subscriptions are logged at INFO (the default
level); they were logged at DEBUG only. Now at INFO, and at most once per key per interval,
then summed, so one peer subscribing to many refused topics cannot flood the log."""

from __future__ import annotations

import secrets

import pytest
from conftest import Chat
from peers import RawPeer, broker_key

from zchat import limits as L

pytestmark = pytest.mark.timeout(60)

REFUSALS = 20


def _refused_topics() -> list[bytes]:
    """Private streams of keys that are not ours: always refused."""
    return [f"u/{secrets.token_hex(32)}/".encode() for _ in range(REFUSALS)]


def test_refused_subscriptions_are_logged_at_info_once_per_key(chat: Chat) -> None:
    broker = chat.start_broker()
    key = broker_key(chat.config_dir)
    # sys/ last: once its heartbeat arrives, the broker has read every subscription before it.
    peers = [RawPeer(chat.port, chat.pub_port, key, [*_refused_topics(), b"sys/"]) for _ in range(2)]
    try:
        for peer in peers:
            peer.wait_for(lambda topic, event: topic == "sys/", timeout=10)
        for peer in peers:
            broker.wait_for(rf"refused subscription 'u/[0-9a-f]+/' from {peer.identity[:12]}", timeout=5)
        assert broker.count("refused subscription") == 2, broker.lines[-30:]  # one per key
        for peer in peers:  # the rest, counted when the interval ends
            broker.wait_for(rf"\.\.\. and {REFUSALS - 1} more like it \(refused subscription from "
                            rf"{peer.identity[:12]}\) in the last {L.LOG_FOLD_SECONDS:g} s",
                            timeout=L.LOG_FOLD_SECONDS + 5)
    finally:
        for peer in peers:
            peer.close()
