"""Relays, the pure parts (zchat.relaying, zchat.core.topic_allowed): no sockets."""

from __future__ import annotations

import pytest

from zchat.core import topic_allowed
from zchat.relaying import (
    ALL_UNSUBSCRIBED,
    BAN,
    CUT,
    GONE,
    MESSAGE,
    SUBSCRIBED,
    MarkError,
    RelayBook,
    Subscriptions,
    control_topic,
    cut_notice,
    is_marked,
    mark,
    parse_control,
    parse_mark,
)

ALICE, BOB, RELAY, OTHER = "a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32


def test_a_mark_round_trips_and_carries_the_body_unchanged() -> None:
    body = b'{"type":"say","text":"hi"}'
    data = mark(MESSAGE, ALICE, body)
    assert data[:2] == b"\x00M" and len(data) == 34 + len(body)
    found = parse_mark(data)
    assert (found.kind, found.identity, bytes(found.payload)) == (MESSAGE, ALICE, body)
    assert is_marked(data) and not is_marked(body) and not is_marked(b"")
    assert bytes(parse_mark(mark(SUBSCRIBED, BOB, b"r/lobby/")).payload) == b"r/lobby/"
    assert parse_mark(mark(GONE, BOB)).identity == BOB


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\x00M" + b"\x01" * 31,  # too short
    b"{" + b"M" + b"\x01" * 32,  # not marked
    b"\x00Q" + b"\x01" * 32,  # unknown kind
    b"\x00S" + b"\x01" * 32,  # a subscription report without its topic
    b"\x00X" + b"\x01" * 32 + b"junk",  # gone, with a payload
    b"\x00A" + b"\x01" * 32 + b"junk",
])
def test_bad_marks_are_refused(data: bytes) -> None:
    with pytest.raises(MarkError):
        parse_mark(data)


def test_control_notices_parse() -> None:
    assert parse_control(cut_notice(RELAY, ALICE)) == (CUT, ALICE)
    assert parse_control(cut_notice(RELAY, ALICE, BAN)) == (BAN, ALICE)
    assert cut_notice(RELAY, ALICE).startswith(control_topic(RELAY).encode())
    assert parse_control(b"\x00relay/x/ cut") is None


def test_a_relayed_subscription_counts_only_once_the_relays_own_is_installed() -> None:
    book = RelayBook()
    assert book.client_subscribed(RELAY, ALICE, f"u/{ALICE}/") is False  # reported first: waits
    assert book.relay_subscribed(RELAY, f"u/{ALICE}/") == [ALICE]  # now it counts
    book.relay_subscribed(RELAY, "r/lobby/")  # installed first (another client wanted it)...
    assert book.client_subscribed(RELAY, ALICE, "r/lobby/") is True  # ...counts at once
    assert book.via[ALICE] == RELAY
    assert book.relay_unsubscribed(RELAY, "r/lobby/") == [ALICE]
    assert book.client_subscribed(RELAY, ALICE, "r/lobby/") is False


def test_the_book_after_connections_close_and_clients_move() -> None:
    book = RelayBook()
    for client in (ALICE, BOB):
        book.client_subscribed(RELAY, client, f"u/{client}/")
        book.relay_subscribed(RELAY, f"u/{client}/")
    assert book.relay_output_closed(RELAY) == sorted([ALICE, BOB])  # nothing installed now...
    assert book.client_subscribed(RELAY, ALICE, "r/x/") is False
    assert book.relay_subscribed(RELAY, f"u/{ALICE}/") == [ALICE]  # ...the reports were kept
    book.came_through(OTHER, BOB)  # bob moved to another relay
    assert book.client_gone(RELAY, BOB) is False  # the old relay's news of him is stale
    assert book.through(RELAY) == [ALICE]
    assert book.relay_gone(RELAY) == [ALICE]
    assert book.via == {BOB: OTHER} and RELAY not in book.wanted
    book.client_subscribed(OTHER, BOB, "r/lobby/")
    book.client_unsubscribed_all(OTHER, BOB)
    assert book.wanted[OTHER] == {}


def test_subscriptions_are_counted_per_topic() -> None:
    subs = Subscriptions()
    assert subs.add(ALICE, "r/lobby/") is True  # first: subscribe upstream
    assert subs.add(BOB, "r/lobby/") is False
    assert subs.add(ALICE, "r/lobby/") is False  # twice by one subscriber counts once
    assert subs.remove(ALICE, "r/lobby/") is False  # bob still wants it
    assert subs.remove(ALICE, "r/lobby/") is False  # not alice's any more
    subs.add(BOB, f"u/{BOB}/")
    assert subs.has(BOB, "r/lobby/") and not subs.has(ALICE, "r/lobby/")
    assert subs.remove_all(BOB) == ["r/lobby/", f"u/{BOB}/"]  # the last one: unsubscribe both
    assert subs.counts == {} and subs.topics_of == {}


def test_the_policy_a_relay_shares_with_the_broker() -> None:
    for closed in (False, True):
        assert topic_allowed(ALICE, f"u/{ALICE}/", closed, "user")
        assert not topic_allowed(ALICE, f"u/{BOB}/", closed, "user")
        assert not topic_allowed(ALICE, "u/", closed, "user")
        assert not topic_allowed(ALICE, "", closed, "user")
        assert topic_allowed(ALICE, "r/lobby/", closed, "user")
        assert topic_allowed(ALICE, "sys/", closed, "user")
        # A relay carries any client's private stream (sealed to that client), never a prefix.
        assert topic_allowed(RELAY, f"u/{BOB}/", closed, "relay")
        assert not topic_allowed(RELAY, "u/", closed, "relay")
        assert not topic_allowed(RELAY, "u/b2/", closed, "relay")
        assert not topic_allowed(RELAY, f"u/{BOB.upper()}/", closed, "relay")
        assert topic_allowed(RELAY, "r/", closed, "relay")
    assert topic_allowed(ALICE, "r/", False, "user") and not topic_allowed(ALICE, "r/", True, "user")
    assert ALL_UNSUBSCRIBED != GONE
