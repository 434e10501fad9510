"""Unit tests of the core's flood and size limits (issue 13, items 4, 5, 7 and 8; issue 10, 2.5):
pings past their allowance, the frames-per-second ceiling, refusals that name their ref, deep
JSON, history bytes, slow consumers and oversized messages. Pure: no sockets, explicit `now`."""

from __future__ import annotations

import pytest
from corekit import LOBBY, body, error, kinds, send, subscribe_all, u

from zchat import limits as L
from zchat.core import BrokerCore, Disconnect, Fetch, Limits
from zchat.protocol import Code, Left

pytestmark = pytest.mark.timeout(30)

A = "a1" * 32
B = "b2" * 32
EPOCH = "epoch-l"


def make(now: float = 0.0, **limits: float) -> BrokerCore:
    return BrokerCore(EPOCH, now, Limits(**limits) if limits else None)  # type: ignore[arg-type]


def joined(core: BrokerCore, identity: str, name: str, now: float = 0.0) -> None:
    subscribe_all(core, identity, now)
    assert [kind for _, kind in kinds(send(core, identity, now, type="join", name=name))] == [
        "Welcome", "Joined"]


# --- pings and the frame ceiling (13.8) ---------------------------------------------------


def test_pings_past_the_allowance_are_charged_like_any_message() -> None:
    core = make(rate_burst=2, rate_per_second=0.001)
    joined(core, A, "alice")
    for _ in range(L.PINGS_PER_SECOND):
        assert send(core, A, 1.0, type="ping") == []
    assert send(core, A, 1.0, type="ping") == []  # charged: one token left
    assert send(core, A, 1.0, type="ping") == []
    assert error(send(core, A, 1.0, type="ping"), A).code == Code.RATE_LIMITED
    assert send(core, A, 1.0, type="ping") == []  # told once
    refused = error(send(core, A, 1.5, type="say", room="lobby", text="hi", ref=7), A)
    assert (refused.code, refused.ref) == (Code.RATE_LIMITED, 7)


def test_a_key_past_the_frame_ceiling_is_told_and_cut_whatever_the_frames() -> None:
    core = make()
    joined(core, A, "alice")
    ceiling = int(core.limits.frame_ceiling)
    assert ceiling == L.MAX_FRAMES_PER_SECOND
    frame = body(type="ping")  # pings past their allowance: charged, then silently dropped
    sent, out = 0, []
    while Disconnect(A) not in out:  # a window of a second: at most twice the ceiling
        assert sent <= 2 * ceiling, "never cut"
        out = core.on_message(A, frame, 1, 1.0 + sent * 1e-4)
        sent += 1
    assert sent > ceiling
    assert kinds([item for item in out if not isinstance(item, Disconnect)]) == [(u(A), "Error")]
    assert out[0].event.code == Code.FLOODING
    # The rest of that second is dropped unread, even what would have been valid.
    assert core.on_message(A, body(type="say", room="lobby", text="hi"), 1, 1.5) == []
    assert core.on_message(A, b"[" * 5000, 1, 1.6) == []
    # A new second counts afresh.
    assert kinds(send(core, A, 2.5, type="say", room="lobby", text="hi")) == [(LOBBY, "Message")]


def test_the_frame_ceiling_rises_with_the_rate_limit() -> None:
    core = make(rate_burst=10**9, rate_per_second=1e9)  # the operator's "no limit"
    joined(core, A, "alice")
    for i in range(5 * L.MAX_FRAMES_PER_SECOND):
        out = core.on_message(A, body(type="say", room="lobby", text="go"), 1, 1.0 + i * 1e-5)
        assert kinds(out) == [(LOBBY, "Message")]


# --- refusals name their ref (10.2.5) -----------------------------------------------------------


def test_every_rate_limited_refusal_of_a_message_with_a_ref_names_it() -> None:
    core = make(rate_burst=1, rate_per_second=0.001)
    joined(core, A, "alice")
    assert kinds(send(core, A, 1.0, type="say", room="lobby", text="one", ref=1)) == [(LOBBY, "Message")]
    for ref in (2, 3, 4):  # each refused message's sender waits for its ref
        refused = error(send(core, A, 1.0, type="say", room="lobby", text="more", ref=ref), A)
        assert (refused.code, refused.ref) == (Code.RATE_LIMITED, ref)
    assert send(core, A, 1.0, type="who") == []  # no ref: told once already


def test_a_history_request_refused_for_rate_names_its_ref() -> None:
    core = make(rate_burst=1, rate_per_second=0.001)
    subscribe_all(core, A)
    assert kinds(send(core, A, type="history", room="lobby", ref=5)) == []  # a Fetch
    refused = error(send(core, A, type="history", room="lobby", ref=6), A)
    assert (refused.code, refused.ref) == (Code.RATE_LIMITED, 6)


# --- decoding (13.7) ------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b'{"type":"ping","x":' + b"[" * 8000,
    b'{"type":"say","room":"lobby","text":"x","junk":' + b'{"a":' * 1500,
], ids=["arrays", "objects"])
def test_deeply_nested_json_is_a_charged_bad_request(data: bytes) -> None:
    core = make(rate_burst=1, rate_per_second=0.001)
    joined(core, A, "alice")
    assert error(core_out(core, A, data, 1.0), A).code == Code.BAD_REQUEST
    assert error(core_out(core, A, data, 1.1), A).code == Code.RATE_LIMITED  # it was charged


def core_out(core: BrokerCore, identity: str, data: bytes, now: float) -> list:
    from corekit import checked

    return checked(core.on_message(identity, data, 1, now))


# --- moderation (13.5) ----------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"type": "part", "room": "lobby", "message": "BUY CHEAP PILLS"},
    {"type": "leave", "message": "BUY CHEAP PILLS"},
])
def test_a_muted_members_farewell_text_does_not_reach_the_room(fields: dict[str, object]) -> None:
    core = make()
    core.muted[A] = 100.0
    joined(core, A, "alice")
    out = send(core, A, 10.0, **fields)
    assert [type(p.event) for p in out] == [Left]
    assert out[0].event.message == ""
    core.muted[A] = 0.0  # not muted: the text goes out, cleaned
    joined(core, A, "alice", 20.0)
    assert send(core, A, 21.0, **fields)[0].event.message == "BUY CHEAP PILLS"


def test_a_mute_is_the_keys_across_leave_and_rejoin() -> None:
    core = make()
    joined(core, A, "alice")
    core.muted[A] = 100.0
    send(core, A, 10.0, type="leave")
    assert core.member_name(A) is None
    joined(core, A, "alice", 20.0)
    assert error(send(core, A, 21.0, type="say", room="lobby", text="x", ref=3), A).code == Code.MUTED


def test_an_oversized_multipart_message_is_refused_and_its_sender_cut() -> None:
    core = make()
    joined(core, A, "alice")
    out = core.on_oversized(A, L.MAX_MESSAGE_PARTS + 1, 1000, 1.0)
    assert out[-1] == Disconnect(A)
    assert out[0].event.code == Code.TOO_MANY_FRAMES
    assert core.on_oversized(A, 2, L.MAX_MESSAGE_BYTES + 1, 1.0)[0].event.code == Code.TOO_LARGE
    assert core.on_oversized(None, 100, 1, 1.0) == []


# --- history bytes and slow consumers (13.4) -----------------------------------------------------


def test_history_requests_are_refused_while_the_keys_history_bytes_are_spent() -> None:
    core = make(history_bytes_burst=1000, history_bytes_per_second=100)
    subscribe_all(core, A)
    out = core.on_message(A, body(type="history", room="lobby", ref=1), 1, 0.0)
    assert [type(item) for item in out] == [Fetch]
    assert core.history_allowance(A, 0.0) == 1000
    core.spend_history(A, 1500)  # one page may overdraw
    assert core.history_allowance(A, 0.0) == 0
    refused = error(send(core, A, 1.0, type="history", room="lobby", ref=2), A)
    assert (refused.code, refused.ref) == (Code.RATE_LIMITED, 2)
    assert core.history_allowance(A, 6.0) == 100  # refilled at 100 bytes per second
    assert core.history_allowance(A, 60.0) == 1000  # up to the burst


def test_history_allowance_is_at_most_a_page() -> None:
    core = make()
    subscribe_all(core, A)
    assert core.history_allowance(A, 0.0) == L.MAX_HISTORY_PAGE_BYTES


def test_a_slow_consumer_is_told_why_when_it_subscribes_again() -> None:
    core = make()
    joined(core, A, "alice")
    core.slow_consumer(A, "9000000 bytes waited for you unread")
    core.on_unsubscribed_all(A)  # its publish connection was cut
    ok, out = core.on_subscribe(A, LOBBY, 1.0)
    assert ok and out == []
    ok, out = core.on_subscribe(A, u(A), 1.0)
    assert ok
    told = error(out, A)
    assert told.code == Code.SLOW_CONSUMER and "9000000" in told.detail
    core.on_unsubscribed_all(A)
    assert core.on_subscribe(A, u(A), 2.0) == (True, [])  # once
