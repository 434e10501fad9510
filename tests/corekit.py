"""Helpers shared by the pure-core unit tests: topics, message bodies, checked output, and
the usual steps (subscribe, send, read an error)."""

from __future__ import annotations

import base64
import json

from zchat.core import Banned, BrokerCore, DeliverMail, Disconnect, Fetch, FindSince, Mail, Publish, Remember
from zchat.protocol import Error, decode_publication, encode_publication

SYS = "sys/"
LOBBY = "r/lobby/"


def u(identity: str) -> str:
    return f"u/{identity}/"


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def sealed(tag: str = "for the recipient") -> str:
    """A well-formed box (base64 of nonce + ciphertext + MAC): the core never opens one."""
    return base64.b64encode(tag.encode().ljust(48, b".")).decode()


BOX, SELF_BOX = sealed(), sealed("the sender's own copy")


def dm(to: str, key: str, ref: int | None = None) -> dict[str, object]:
    """The fields of a `msg` to `to`, sealed to `key` (a hex identity)."""
    fields: dict[str, object] = {"type": "msg", "to": to, "key": key, "box": BOX, "self_box": SELF_BOX}
    if ref is not None:
        fields["ref"] = ref
    return fields


def checked(out: list) -> list[Publish]:
    """The publications in `out` (other records are the shell's work: mail, fetches, cuts);
    every publication must survive the wire encoding unchanged."""
    assert isinstance(out, list)
    publications = []
    for item in out:
        if not isinstance(item, Publish):
            assert isinstance(item, (Fetch, Mail, DeliverMail, Remember, Disconnect, Banned, FindSince)), item
            continue
        topic, event = decode_publication(encode_publication(item.topic.encode(), item.event))
        assert topic == item.topic
        assert event == item.event
        publications.append(item)
    return publications


def sub(core: BrokerCore, identity: str | None, topic: str, now: float = 0.0) -> tuple[bool, list[Publish]]:
    ok, out = core.on_subscribe(identity, topic, now)
    return ok, checked(out)


def send(core: BrokerCore, identity: str | None, now: float = 0.0, **fields: object) -> list[Publish]:
    return checked(core.on_message(identity, body(**fields), 1, now))


def raw(core: BrokerCore, identity: str | None, data: bytes, now: float = 0.0,
        frames: int = 1) -> list[Publish]:
    return checked(core.on_message(identity, data, frames, now))


def subscribe_all(core: BrokerCore, identity: str, now: float = 0.0,
                  topics: tuple[str, ...] = (LOBBY,)) -> None:
    for topic in (SYS, u(identity), *topics):
        ok, out = sub(core, identity, topic, now)
        assert ok is True
        assert out == []


def kinds(out: list[Publish]) -> list[tuple[str, str]]:
    return [(p.topic, type(p.event).__name__) for p in out]


def error(out: list[Publish], identity: str) -> Error:
    assert len(out) == 1, kinds(out)
    assert out[0].topic == u(identity)
    assert isinstance(out[0].event, Error)
    return out[0].event


class Unsealed:
    """Leaves private frames readable, for tests about what is said to whom: sealing has tests
    of its own (test_sealing.py, test_security_sealing.py)."""

    @staticmethod
    def seal_publication(topic: str, body: bytes) -> bytes:
        return topic.encode() + b" " + body
