"""End to end: what a room needs across processes and restarts (issue 15 §2) - a topic kept
by the broker's database and seen by a tap, a ban lifted by an admin (and the banned-keys file
rewritten), an ignore list kept in the client's config dir."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import CLOCK, Chat, Proc
from test_e2e_closed import _write_keys

from zchat import keys
from zchat.e2e import fingerprint

pytestmark = pytest.mark.timeout(120)

TAP_STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]"


def _restart(chat: Chat, *extra: str) -> None:
    assert chat.broker is not None
    chat.broker.stop()  # SIGTERM: a clean stop
    chat.start_broker(*extra)


def test_a_topic_is_seen_by_the_tap_and_kept_across_a_broker_restart(chat: Chat) -> None:
    chat.start_broker()
    tap = Proc(["-m", "zchat", "tap", "--format", "text", *chat.endpoint_args()], env=chat.env, stdin=False)
    chat.procs.append(tap)
    tap.wait_for("epoch", timeout=15)
    alice = chat.joined_client("alice")
    alice.send("/topic release day: 17:00")
    alice.wait_for(rf"{CLOCK} - alice changed the topic of #lobby to: release day: 17:00$")
    tap.wait_for(rf"{TAP_STAMP} #lobby -- alice changed the topic to: release day: 17:00$")
    _restart(chat)
    carol = chat.joined_client("carol")
    carol.wait_for(rf"{CLOCK} \* Topic of #lobby: release day: 17:00 \(set by alice\)$")
    carol.send("/rooms")
    carol.wait_for(rf"{CLOCK} \* Rooms: #lobby \(\d, topic: release day: 17:00\)$")


def test_an_admin_lifts_a_ban_for_good(chat: Chat, tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    _write_keys(path, [("alice", chat.client_key("alice"), "admin"), ("bob", chat.client_key("bob"), "user")])
    chat.start_broker("--authorized-keys", str(path))
    alice, bob = chat.joined_client("alice"), chat.joined_client("bob")
    alice.send("/ban bob")
    bob.wait_exit(15)
    bans = keys.broker_dir(chat.config_dir) / "banned-keys"
    bob_key = chat.client_key("bob").identity
    assert bob_key in bans.read_text()
    _restart(chat, "--authorized-keys", str(path))  # the ban holds across the restart
    refused = chat.client("bob")
    refused.wait_for(r"the broker refused this key", timeout=15)
    alice.wait_for(rf"{CLOCK} \* Reconnected", timeout=15)
    alice.send("/bans")
    alice.wait_for(rf"{CLOCK} \* Banned keys \(1\): bob \({re.escape(fingerprint(bob_key))}\)$")
    alice.send("/unban bob")
    alice.wait_for(rf"{CLOCK} \* bob \({re.escape(fingerprint(bob_key))}\) is no longer banned \(alice\): "
                   r"that key may come back\.$")
    assert bob_key not in bans.read_text()
    chat.joined_client("bob")  # at once, and after another restart
    _restart(chat, "--authorized-keys", str(path))
    chat.joined_client("bob")


def test_an_ignore_list_is_kept_in_the_config_dir_across_client_restarts(chat: Chat) -> None:
    chat.start_broker()
    alice, bob = chat.joined_client("alice"), chat.joined_client("bob")
    alice.send("/ignore bob")
    alice.wait_for(rf"{CLOCK} \* Ignoring bob \(key ")
    ignored = chat.config_dir / "ignored" / chat.client_key("alice").identity  # alice's key's own list
    assert ignored.read_text() == f"{chat.client_key('bob').identity} bob\n"
    alice.send("/quit")
    assert alice.wait_exit(10) == 0
    bob.send("/nick robert")
    again = chat.joined_client("alice")
    # Joining, the client asked which key holds "bob" now (robert's); /who, asked after it, is
    # answered after it.
    again.send("/who")
    again.wait_for(rf"{CLOCK} \* Online \(2\): alice, robert$")
    carol = chat.joined_client("carol")
    bob.send("you cannot hear me")
    carol.wait_for(rf"{CLOCK} robert: you cannot hear me$")
    carol.send("can you hear me?")
    again.wait_for(rf"{CLOCK} carol: can you hear me\?$")
    assert again.count("you cannot hear me") == 0


def test_a_broker_restart_shows_one_line_for_everyone_who_lost_the_connection(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    crowd = [chat.joined_client(f"user{i}") for i in range(5)]
    alice.wait_for(rf"{CLOCK} - user4 has joined the chat\.$")
    alice.send("/who")  # (answered after every arrival above)
    alice.wait_for(rf"{CLOCK} \* Online \(6\): ")
    mark = len(alice.lines)
    _restart(chat)
    alice.wait_for(rf"{CLOCK} - 5 people lost their connection; 5 back\.$", timeout=30, start=mark)
    crowd[0].send("all good?")
    alice.wait_for(rf"{CLOCK} user0: all good\?$", start=mark)
    since = alice.lines[mark:]
    assert [line for line in since if "has joined" in line or "has left" in line] == [], since
