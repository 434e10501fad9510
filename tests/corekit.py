"""Helpers shared by the pure-core unit tests: topics, message bodies, checked output."""

from __future__ import annotations

import json

from zchat.core import Banned, DeliverMail, Disconnect, Fetch, Mail, Publish, Remember
from zchat.protocol import decode_publication, encode_publication

SYS = "sys/"
LOBBY = "r/lobby/"


def u(identity: str) -> str:
    return f"u/{identity}/"


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def checked(out: list) -> list[Publish]:
    """The publications in `out` (other records are the shell's work: mail, fetches, cuts);
    every publication must survive the wire encoding unchanged."""
    assert isinstance(out, list)
    publications = []
    for item in out:
        if not isinstance(item, Publish):
            assert isinstance(item, (Fetch, Mail, DeliverMail, Remember, Disconnect, Banned)), item
            continue
        topic, event = decode_publication(encode_publication(item.topic.encode(), item.event))
        assert topic == item.topic
        assert event == item.event
        publications.append(item)
    return publications
