"""End to end: closed mode (authorized keys, fixed names, roles), moderation, SIGHUP reload."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import CLOCK, Chat, Proc
from peers import RawPeer, broker_key

from zchat import keys
from zchat.e2e import fingerprint
from zchat.protocol import Message
from zchat.tui import EXIT_BANNED

pytestmark = pytest.mark.timeout(90)


def _secret_file(chat: Chat, name: str) -> Path:
    return keys.client_keys_dir(chat.config_dir) / f"{keys.client_key_file_name(name)}.key_secret"


def _write_keys(path: Path, entries: list[tuple[str, keys.KeyPair, str]]) -> None:
    path.write_text("# name public-key role\n" + "".join(
        f"{name} {pair.identity} {role}\n" for name, pair, role in entries))


@pytest.fixture
def closed(chat: Chat, tmp_path: Path) -> tuple[Chat, Path]:
    entries = [("alice", chat.client_key("alice"), "admin"), ("bob", chat.client_key("bob"), "user"),
               ("carol", chat.client_key("carol"), "user")]
    path = tmp_path / "authorized_keys"
    _write_keys(path, entries)
    chat.start_broker("--authorized-keys", str(path))
    return chat, path


def test_unknown_key_is_refused_plainly(closed: tuple[Chat, Path]) -> None:
    chat, _ = closed
    mallory = chat.client("mallory")  # gets a fresh key nobody authorized
    mallory.wait_for(r"the broker refused this key", timeout=15)
    assert mallory.wait_exit(10) == 1


@pytest.mark.parametrize("command", [["tap"], ["send", "--name", "mallory", "hello"],
                                     ["client", "--name", "mallory"]])
def test_a_refused_key_is_named_and_every_command_exits(closed: tuple[Chat, Path],
                                                        command: list[str]) -> None:
    """Issue 14, item 4: `zchat tap` printed nothing and never exited; send and the client said
    "refused this key" without naming it. Each names the key and tells the user what to do."""
    chat, _ = closed
    pair = chat.client_key("mallory")  # nobody authorized it
    args = ["-m", "zchat", command[0], *chat.endpoint_args(), "--key", str(_secret_file(chat, "mallory")),
            *command[1:]]
    started = time.monotonic()
    proc = Proc(args, env=chat.env)
    chat.procs.append(proc)
    assert proc.wait_exit(15) != 0
    assert time.monotonic() - started < 10
    print_ = fingerprint(pair.identity)
    refused = [line for line in proc.lines if "refused this key" in line]
    assert len(refused) == 1, proc.lines
    endpoint = f"tcp://127.0.0.1:{chat.port}"
    assert f"refused this key {print_} ({endpoint}): ask its operator to add your public key" in refused[0]
    assert pair.identity in refused[0]


def test_names_are_fixed_by_the_file(closed: tuple[Chat, Path]) -> None:
    chat, _ = closed
    alice_key = keys.client_keys_dir(chat.config_dir) / (keys.client_key_file_name("alice") + ".key_secret")
    impostor = chat.client("queen", "--key", str(alice_key))
    impostor.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=15)  # the key decides, not the request
    impostor.send("/nick queen")
    impostor.wait_for(r"! names are fixed by the operator here")


def test_only_the_tap_role_may_read_every_room(chat: Chat, tmp_path: Path) -> None:
    reader, tapper = RawPeer.keypair(), RawPeer.keypair()
    path = tmp_path / "authorized_keys"
    _write_keys(path, [("alice", chat.client_key("alice"), "user"), ("reader", reader, "user"),
                       ("tapper", tapper, "tap")])
    chat.start_broker("--authorized-keys", str(path))
    key = broker_key(chat.config_dir)
    user_peer = RawPeer(chat.port, chat.pub_port, key, [b"r/", b"sys/"], keypair=reader)
    tap_peer = RawPeer(chat.port, chat.pub_port, key, [b"r/", b"sys/"], keypair=tapper)
    try:
        for peer in (user_peer, tap_peer):  # both connected and subscribed to what they may
            peer.wait_for(lambda t, e: t == "sys/", timeout=10)
        alice = chat.joined_client("alice")
        alice.send("visible to taps")
        tap_peer.wait_for(lambda t, e: isinstance(e, Message) and e.text == "visible to taps")
        user_peer.poll(0.3)
        assert not [d for d in user_peer.received if d.startswith(b"r/")]
    finally:
        user_peer.close()
        tap_peer.close()


def test_admin_kicks_mutes_and_bans(closed: tuple[Chat, Path]) -> None:
    chat, _ = closed
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    carol = chat.joined_client("carol")
    carol.send("/kick bob no reason")
    carol.wait_for(rf"{CLOCK} ! only admins may do that")

    alice.send("/mute bob 60")
    for proc in (alice, carol):
        proc.wait_for(rf"{CLOCK} - bob was muted for 60 s until \d\d:\d\d:\d\d by alice\.")
    bob.wait_for(rf"{CLOCK} - You were muted for 60 s by alice\. You may speak again at \d\d:\d\d:\d\d\.")
    bob.send("can I talk?")
    bob.wait_for(rf"{CLOCK} ! you are muted for \d+ more seconds")
    alice.send("/mute bob 0")
    bob.wait_for(rf"{CLOCK} - bob may speak again \(alice\)\.")
    bob.send("I can talk")
    carol.wait_for(rf"{CLOCK} bob: I can talk$")

    alice.send("/kick bob be nice")
    bob.wait_for(rf"{CLOCK} \* You were kicked by alice: be nice\. Type /reconnect to come back, "
                 r"or /quit to leave\.$")
    carol.wait_for(rf"{CLOCK} - bob was kicked by alice\. \(be nice\)$")
    bob.send("/quit")
    assert bob.wait_exit(10) == 0
    assert alice.count("bob has joined") == 1  # a kicked client does not come back by itself

    bob = chat.joined_client("bob")  # a kick is not a ban
    alice.send("/ban bob for good")
    bob.wait_for(rf"{CLOCK} \* You were banned by alice: for good\. You cannot come back with this key\.$")
    carol.wait_for(rf"{CLOCK} - bob was banned by alice\. \(for good\)$")
    assert bob.wait_exit(10) == EXIT_BANNED  # by itself: there is no way back
    again = chat.client("bob")
    again.wait_for(r"the broker refused this key", timeout=15)
    assert again.wait_exit(10) == 1


def test_sighup_rereads_the_file_and_disconnects_removed_keys(closed: tuple[Chat, Path]) -> None:
    chat, path = closed
    alice = chat.joined_client("alice")
    carol = chat.joined_client("carol")
    _write_keys(path, [("alice", chat.client_key("alice"), "admin"), ("bob", chat.client_key("bob"), "user")])
    chat.broker.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    carol.wait_for(rf"{CLOCK} \* Your key is no longer authorized here\.", timeout=10)
    alice.wait_for(rf"{CLOCK} - carol has left the chat\.", timeout=10)
    alice.send("still here after the reload")
    alice.wait_for(rf"{CLOCK} alice: still here after the reload$")
    assert carol.wait_exit(10) == EXIT_BANNED
    again = chat.client("carol")
    again.wait_for(r"the broker refused this key", timeout=15)


def test_a_ban_that_cannot_be_written_down_is_logged_and_the_broker_keeps_serving(
        chat: Chat, tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    _write_keys(path, [("alice", chat.client_key("alice"), "admin"), ("bob", chat.client_key("bob"), "user"),
                       ("carol", chat.client_key("carol"), "user")])
    # A directory where the banned-keys file goes: appending to it fails, as root too.
    (keys.broker_dir(chat.config_dir) / "banned-keys").mkdir(parents=True)
    broker = chat.start_broker("--authorized-keys", str(path))
    alice, bob, carol = (chat.joined_client(name) for name in ("alice", "bob", "carol"))
    alice.send("/ban bob for good")
    bob.wait_for(rf"{CLOCK} \* You were banned by alice: for good\.")
    broker.wait_for(r"cannot record the ban of [0-9a-f]{12} in .*banned-keys", timeout=10)
    carol.send("the broker still serves")
    alice.wait_for(rf"{CLOCK} carol: the broker still serves$")
    assert broker.proc.poll() is None and broker.count("Traceback") == 0
    bob.send("/quit")
    bob.wait_exit(10)
    again = chat.client("bob")  # the ban holds for this broker's life
    again.wait_for(r"the broker refused this key", timeout=15)
