"""End to end: private messages are sealed from sender to recipient (issue 13 items 1 and 6).

A real broker and real clients over tcp with CURVE. What the broker publishes on a private
stream, what a tap writes, what the database holds and what `zchat history` shows carry
no text of a private message; the recipient reads it; offline mail goes to the key it was
sealed to and not to whoever takes the name meanwhile; junk from many keys cannot push a
real message out of a mailbox, and a sender hears when its kept mail is dropped.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest
from conftest import CLOCK, Chat, Proc
from peers import RawPeer, broker_key
from test_e2e import raw_join
from test_tap import live_tap

from zchat import keys
from zchat import limits as L
from zchat.protocol import Code, Error, KeyReply

pytestmark = pytest.mark.timeout(120)


def _history(chat: Chat, *args: str) -> list[str]:
    proc = Proc(["-m", "zchat", "history", "--config-dir", str(chat.config_dir), *args],
                env=chat.env, stdin=False)
    chat.procs.append(proc)
    assert proc.wait_exit(15) == 0, proc.lines
    proc._reader.join(5)
    return proc.lines


def _stored_bytes(chat: Chat) -> bytes:
    """Every byte of the broker's database files, the write-ahead log included."""
    broker_dir = chat.config_dir / "broker"
    return b"".join(path.read_bytes() for path in sorted(broker_dir.glob("history.sqlite3*")))


def _left_and_gone(proc: Proc) -> None:
    proc.send("/quit")
    assert proc.wait_exit(10) == 0


def test_a_private_message_is_sealed_on_its_way_in_storage_and_in_history(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    tap, _ = live_tap(chat, tmp_path / "tap.jsonl")
    _left_and_gone(chat.joined_client("carol"))  # the broker now knows carol's key
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    # bob's private stream as the broker sends it, read by a second connection with bob's
    # key: what a copy delivered to the wrong pipe would carry (issue 13 item 1).
    bob_key = chat.client_key("bob")
    copy = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [f"u/{bob_key.identity}/".encode()],
                   keypair=bob_key)
    try:
        for _ in range(20):  # until the copy's subscription is live: bob's /who answers reach it
            bob.send("/who")
            if copy.poll(0.5):
                break
        assert copy.received, "the second reader of bob's stream never got going"
        alice.send("/msg bob orange-elephant-7731")
        bob.wait_for(rf"^{CLOCK} <- alice: orange-elephant-7731$")
        alice.wait_for(rf"^{CLOCK} -> bob: orange-elephant-7731$")
        alice.send("/msg carol purple-giraffe-4410")
        alice.wait_for(rf"^{CLOCK} -> carol \(offline: delivered when they next join\): purple-giraffe-4410$")
        alice.send("a public marker")
        tap.wait(lambda records: any(r.get("text") == "a public marker" for r in records))
        before = len(copy.received)
        copy.poll(1.0)
        assert len(copy.received) >= before and len(copy.received) >= 2  # the /who and the direct
        for secret in (b"orange-elephant", b"purple-giraffe"):
            assert not any(secret in frame for frame in copy.received)
            assert secret not in tap.path.read_bytes()
            assert secret not in _stored_bytes(chat)
    finally:
        copy.close()
    # The operator's tool shows kept mail as sealed, and opens it only with the recipient's key.
    sealed = [line for line in _history(chat) if "] mail " in line]
    assert [line.split("] ", 1)[1] for line in sealed] == ["mail alice -> carol: (private, sealed)"]
    carol_key = keys.client_keys_dir(chat.config_dir) / (keys.client_key_file_name("carol") + ".key_secret")
    alice_key = keys.client_keys_dir(chat.config_dir) / (keys.client_key_file_name("alice") + ".key_secret")
    opened = [line for line in _history(chat, "--key", str(carol_key)) if "] mail " in line]
    assert [line.split("] ", 1)[1] for line in opened] == ["mail alice -> carol: purple-giraffe-4410"]
    assert any(line.endswith("(private, sealed)") for line in _history(chat, "--key", str(alice_key)))
    exported = [json.loads(line) for line in _history(chat, "--json", "--key", str(carol_key))]
    [mail] = [record for record in exported if record["type"] == "direct"]
    carol_pair = chat.client_key("carol")
    assert mail["topic"] == f"u/{carol_pair.identity}/" and mail["text"] == "purple-giraffe-4410"
    # carol reads it when she is back, and the broker keeps nothing of it afterwards (it is
    # deleted with the broker's first commit after publishing it: the next heartbeat's turn).
    carol = chat.joined_client("carol")
    carol.wait_for(rf"^{CLOCK} <- alice \(while you were away\): purple-giraffe-4410$")
    deadline = time.monotonic() + 10
    while any("] mail " in line for line in _history(chat)):
        assert time.monotonic() < deadline, "delivered mail is still stored"


def test_mail_goes_to_the_key_it_was_sealed_to_not_to_whoever_takes_the_name(chat: Chat,
                                                                            tmp_path: Path) -> None:
    """Issue 13 item 6: mallory takes the name alice while alice is away."""
    chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    bob.send("/msg alice hello alice")  # bob's client learns alice's key
    alice.wait_for(rf"^{CLOCK} <- bob: hello alice$")
    _left_and_gone(alice)
    bob.wait_for(r"- alice has left the chat\.")
    bob.send("/msg alice kept for alice")
    bob.wait_for(rf"^{CLOCK} -> alice \(offline: delivered when they next join\): kept for alice$")

    mallory_key = keys.load_or_create(tmp_path / "mallory", "mallory")
    mallory = chat.client("alice", "--key", str(tmp_path / "mallory" / "mallory.key_secret"))
    mallory.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=15)
    assert mallory_key.identity != chat.client_key("alice").identity
    bob.wait_for(r"- alice has joined the chat\.")
    # bob still holds alice's key: he is told it changed, and nothing goes to the new one
    # unless he sends it again.
    bob.send("/msg alice the secret plan")
    warning = bob.wait_for(rf"^{CLOCK} ! alice's key changed \(was [0-9a-f ]{{19}}, now [0-9a-f ]{{19}}\): "
                           r"another key holds that name now, and your message to alice was NOT sent\. Send "
                           r"it again if you trust the new key\.$")
    bob.send("/msg alice are you still you?")  # his choice, after the warning
    sent = bob.wait_for(rf"^{CLOCK} -> alice: are you still you\?$")
    assert bob.lines.index(warning) < bob.lines.index(sent)
    mallory.wait_for(rf"^{CLOCK} <- bob: are you still you\?$")
    bob.send("a public marker")
    mallory.wait_for(rf"^{CLOCK} bob: a public marker$")
    assert mallory.count("kept for alice") == 0  # sealed to alice's key: never mallory's
    assert mallory.count("the secret plan") == 0  # sealed to alice's key, and not sent again
    assert bob.count("key changed") == 1  # once per change, not per message

    _left_and_gone(mallory)
    bob.wait_for(r"- alice has left the chat\.", start=bob.lines.index(sent))
    alice = chat.joined_client("alice")  # alice's own key again
    alice.wait_for(rf"^{CLOCK} <- bob \(while you were away\): kept for alice$")
    bob.send("another public marker")
    alice.wait_for(rf"^{CLOCK} bob: another public marker$")
    assert alice.count("are you still you") == 0


def _raw_member(chat: Chat, name: str) -> RawPeer:
    peer = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [b"sys/", b"r/lobby/"])
    peer.sub.subscribe(f"u/{peer.identity}/".encode())
    raw_join(peer, name)
    return peer


def _key_of(peer: RawPeer, name: str) -> str:
    peer.send(json.dumps({"type": "key", "name": name, "ref": 1}).encode())
    _, reply = peer.wait_for(lambda t, e: isinstance(e, KeyReply) and e.ref == 1)
    return reply.key  # type: ignore[attr-defined]


def _errors(peer: RawPeer, code: str) -> list[Error]:
    return [e for _, e in peer.decoded() if isinstance(e, Error) and e.code == code]


@pytest.mark.timeout(180)
def test_junk_from_many_keys_cannot_push_a_real_message_out_and_senders_hear_of_drops(chat: Chat) -> None:
    """Issue 13 item 6: 108 junk DMs from 6 throwaway keys pushed bob's message out of a
    100-message mailbox. Here 4 more keys then fill it past full."""
    chat.start_broker()
    _left_and_gone(chat.joined_client("alice"))
    bob = chat.joined_client("bob")
    bob.send("/msg alice the real one")
    bob.wait_for(rf"^{CLOCK} -> alice \(offline: delivered when they next join\): the real one$")
    junk = [_raw_member(chat, f"junk{i}") for i in range(10)]
    try:
        box = base64.b64encode(b"j" * 60).decode()  # well-formed, sealed to nobody
        for i, peer in enumerate(junk):
            key = _key_of(peer, "alice")
            for n in range(18 if i < 6 else L.MAILBOX_PER_SENDER):  # 108, then 40 more
                peer.send(json.dumps({"type": "msg", "to": "alice", "key": key, "box": box,
                                      "self_box": box, "ref": 100 + n}).encode())
            # Each has its share kept and is told about the rest; the 101st message pushes
            # out the oldest of a biggest sender (junk0's first), whose sender is told.
            if i < 6:
                peer.wait_for(lambda t, e: isinstance(e, Error) and e.code == Code.MAILBOX_FULL
                              and e.ref == 117)
        junk[0].wait_for(lambda t, e: isinstance(e, Error) and e.code == Code.MAIL_DROPPED)
        for peer in junk:
            peer.poll(0.2)
        refused = [[e.ref for e in _errors(peer, Code.MAILBOX_FULL)] for peer in junk]
        assert refused == [list(range(110, 118))] * 6 + [[]] * 4
        dropped = [[e.ref for e in _errors(peer, Code.MAIL_DROPPED)] for peer in junk]
        assert dropped == [[100]] + [[]] * 9
        assert _errors(junk[0], Code.MAIL_DROPPED)[0].detail.startswith(
            "a message you left for alice was dropped unread")
    finally:
        for peer in junk:
            peer.close()
    alice = chat.joined_client("alice")
    alice.wait_for(rf"^{CLOCK} <- bob \(while you were away\): the real one$")
    # The junk is shown as what it is, one line each, never as garbage.
    alice.wait_for(rf"^{CLOCK} ! a private message from junk\d could not be opened \(it was not sealed to")
    assert all(re.match(rf"^{CLOCK} (! a private message from junk|<- bob|[-*] )", line) or
               line.startswith("---") for line in alice.lines[1:])
