"""The client library's delivery confirmation against a real broker: a message counts as
delivered only on its own echo, and a refusal is never hidden by a stale confirmation."""

from __future__ import annotations

import itertools
import threading

from conftest import Chat

from zchat import keys
from zchat.client import ChatClient, ClientEvent, ClientSettings
from zchat.endpoints import Endpoints
from zchat.protocol import Error, Message, Welcome


def _client(chat: Chat, name: str, on_event=None) -> ChatClient:  # type: ignore[no-untyped-def]
    pair = keys.load_or_create(keys.client_keys_dir(chat.config_dir), name)
    server_key = keys.load_public(keys.broker_public_key_path(chat.config_dir))
    settings = ClientSettings(Endpoints(port=chat.port, pub_port=chat.pub_port), server_key, pair)
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
