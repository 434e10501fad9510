"""End to end: relays (issue 11 §3). A real broker, relays and clients as processes over tcp
loopback with CURVE; clients connect to a relay exactly as to a broker."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import CLOCK, Chat
from relaykit import joined_relay_client, start_relay, trust_relays

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
