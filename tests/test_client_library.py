"""The client library (in-process) against a real broker: a message counts as delivered only
on its own echo, a refusal is never hidden by a stale confirmation, and entering a busy room
shows each event once."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from conftest import CLOCK, FRAGILE_CLIENT, Chat, Proc

from zchat import keys
from zchat.client import ChatClient, ClientEvent, ClientSettings, JoinError, Replay, SendError, Status
from zchat.endpoints import Endpoints
from zchat.protocol import Error, Joined, Message, Welcome


def _client(chat: Chat, name: str, on_event=None,  # type: ignore[no-untyped-def]
            rooms: tuple[str, ...] = ("lobby",)) -> ChatClient:
    pair = keys.load_or_create(keys.client_keys_dir(chat.config_dir), name)
    server_key = keys.load_public(keys.broker_public_key_path(chat.config_dir))
    endpoints = Endpoints(port=chat.port, pub_port=chat.pub_port)
    settings = ClientSettings(endpoints, server_key, pair, list(rooms))
    return ChatClient(settings, on_event)


def test_refs_differ_between_sessions_of_one_key(chat: Chat) -> None:
    chat.start_broker()
    first, second = _client(chat, "deploy"), _client(chat, "deploy")
    try:
        assert next(first._refs) != next(second._refs)
    finally:
        first.close(leave=False)
        second.close(leave=False)


def test_own_words_in_join_history_do_not_confirm_a_new_message(chat: Chat) -> None:
    """An earlier session with the same key said something with ref R; a new session whose
    next ref is also R (refs are the sender's choice) sends to an unknown user. The history
    shown on joining carries the old R; only the broker's answer to the new message may
    settle it, so the refusal must be seen by the time delivery is reported."""
    chat.start_broker()
    earlier = _client(chat, "deploy")
    earlier.start()
    try:
        earlier.join("deploy", timeout=10)
        used_ref = earlier.say("build 41 is red", "lobby")
        assert earlier.wait_delivered(10)
    finally:
        earlier.close()

    queued = threading.Event()
    seen: list[ClientEvent] = []

    def on_event(event: ClientEvent) -> None:
        seen.append(event)
        if isinstance(event, Welcome):
            # Hold the I/O thread until the new message is queued, so the join's history
            # is handled while that message waits for its confirmation.
            queued.wait(10)

    later = _client(chat, "deploy", on_event)
    later._refs = itertools.count(used_ref)  # the collision a client counting 1, 2, 3 would hit
    later.start()
    try:
        later.join("deploy", timeout=10)
        ref = later.direct("ghost", "anyone?")
        assert ref == used_ref
        queued.set()
        assert later.wait_delivered(10)
        refusals = [e for e in seen if isinstance(e, Error) and e.ref == ref]
        assert [e.code for e in refusals] == ["no_such_user"], seen
        replayed = [e for e in seen if getattr(e, "events", None)]
        assert any(isinstance(m, Message) and m.ref == used_ref for r in replayed for m in r.events)
    finally:
        later.close()


def test_entering_a_busy_room_shows_each_event_once(chat: Chat) -> None:
    """/join while others talk there: events published between our subscription and the
    broker's handling of the request reach us live and also in the room's history. Each must
    be shown once, history then live, with no gap. Several people join, for several chances
    at the race."""
    chat.start_broker("--rate-per-second", "0")
    talker = _client(chat, "talker", rooms=("busy",))
    talker.start()
    names = [f"observer{i}" for i in range(4)]
    seen: dict[str, list[ClientEvent]] = {name: [] for name in names}
    observers = [_client(chat, name, seen[name].append) for name in names]
    stop = threading.Event()

    def talk() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            talker.say(f"line {n}", "busy")
            if n % 20 == 0:
                talker.wait_delivered(5)  # stay within what the broker queues for us

    chatter = threading.Thread(target=talk, daemon=True)
    try:
        talker.join("talker", timeout=10)
        for name, observer in zip(names, observers, strict=True):
            observer.start()
            observer.join(name, timeout=10)
        chatter.start()
        for observer in observers:
            observer.enter("busy")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(
                any(isinstance(e, Message) and e.room == "busy" and e.seq > _joined_seq(events, name) + 50
                    for e in list(events)) for name, events in seen.items()):
            time.sleep(0.05)  # polling what was recorded, not a synchronisation
        stop.set()
        chatter.join(10)
        for name, events in seen.items():
            shown = []
            for event in events:
                if isinstance(event, Replay) and event.room == "busy":
                    shown += [e.seq for e in event.events]
                elif isinstance(event, (Message, Joined)) and event.room == "busy":
                    shown.append(event.seq)
            assert _joined_seq(events, name) < 10**9, f"{name} never saw itself arrive"
            assert len(shown) == len(set(shown)), f"{name} was shown an event twice"
            assert shown == sorted(shown)
            assert shown == list(range(shown[0], shown[-1] + 1)), f"{name}: a gap between history and live"
    finally:
        stop.set()
        for observer in observers:
            observer.close()
        talker.close()


def _joined_seq(seen: list[ClientEvent], name: str) -> int:
    return next((e.seq for e in list(seen) if isinstance(e, Joined) and e.name == name and e.room == "busy"),
                10**9)


def _close_within(client: ChatClient, seconds: float) -> bool:
    """close() in a thread of its own: True if it returned in time (it must never hang)."""
    closer = threading.Thread(target=client.close, daemon=True)
    closer.start()
    closer.join(seconds)
    return not closer.is_alive()


def test_an_io_thread_that_dies_while_starting_is_reported_and_closes(chat: Chat) -> None:
    chat.start_broker()
    seen: list[ClientEvent] = []
    client = _client(chat, "alice", seen.append)

    def broken() -> None:
        raise RuntimeError("no sockets today")

    client._make_sockets = broken  # type: ignore[method-assign]
    client.start()
    started = time.monotonic()
    with pytest.raises(JoinError) as refused:
        client.join("alice", timeout=20)
    assert time.monotonic() - started < 5  # told at once, not after the join's timeout
    assert refused.value.code == "failed" and "no sockets today" in str(refused.value)
    assert [(e.state, e.detail) for e in seen if isinstance(e, Status)] == [
        ("failed", "the client stopped working (RuntimeError: no sockets today)")]
    with pytest.raises(SendError, match="no sockets today"):
        client.say("anyone?")
    assert _close_within(client, 10), "close() hung in ctx.term()"


def test_an_io_thread_that_dies_on_an_event_is_reported_and_closes(chat: Chat) -> None:
    chat.start_broker()
    failed = threading.Event()
    seen: list[ClientEvent] = []

    def on_event(event: ClientEvent) -> None:
        seen.append(event)
        if isinstance(event, Status) and event.state == "failed":
            failed.set()

    alice, bob = _client(chat, "alice", on_event), _client(chat, "bob")
    try:
        alice.start()
        alice.join("alice", timeout=10)
        decode = alice.decode

        def fragile(data: bytes) -> object:
            found = decode(data)
            if found is not None and isinstance(found[1], Message):
                raise KeyError("a bug in handling a message")
            return found

        alice.decode = fragile  # type: ignore[method-assign]
        bob.start()
        bob.join("bob", timeout=10)
        bob.say("this one breaks alice's client")
        assert failed.wait(10), "the I/O thread's death never reached the UI"
        assert alice.failure is not None and "KeyError" in alice.failure
        with pytest.raises(SendError):
            alice.say("still there?")
        assert alice.wait_delivered(10) is True  # nothing was pending; and it returns at once
    finally:
        assert _close_within(alice, 10), "close() hung"
        bob.close()


def test_the_plain_client_exits_when_its_io_thread_dies(chat: Chat) -> None:
    """The front end: a line saying what happened, exit 1, though its input is still open."""
    chat.start_broker()
    alice = Proc(["-c", FRAGILE_CLIENT, "--name", "alice", "--port", str(chat.port), "--pub-port",
                  str(chat.pub_port), "--config-dir", str(chat.config_dir)], env=chat.env)
    chat.procs.append(alice)
    alice.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=15)
    bob = chat.joined_client("bob")
    bob.send("boom")
    alice.wait_for(rf"{CLOCK} \* The client stopped working \(ValueError: handling went wrong\); start zchat "
                   r"again\.", timeout=10)
    assert alice.wait_exit(10) == 1  # stdin is still open: it did not wait for EOF
    alice.wait_for(r"^zchat: the client stopped working \(ValueError: handling went wrong\)$")
    assert alice.count("Traceback") == 0
