"""Unit tests of admission at the handshake, without sockets: the ZAP reply, the new-key
budget per address, folded logging, and how Connections counts a key's connections."""

from __future__ import annotations

import pytest

from zchat.admission import LogFold, NewKeyLimiter, address_group
from zchat.auth import KEY_CONNECTIONS, NOT_AUTHORIZED, PUBLISH_ZAP_DOMAIN, ZAP_DOMAIN, Refusal, zap_reply
from zchat.connections import Connections
from zchat.endpoints import Endpoints
from zchat.transport import HandshakeWatch

KEY = bytes(range(32))
A, B = "a" * 64, "b" * 64


def request(domain: bytes = ZAP_DOMAIN, address: bytes = b"192.0.2.7") -> list[bytes]:
    return [b"1.0", b"7", domain, address, b"", b"CURVE", KEY]


# --- zap_reply ---------------------------------------------------------------------------------------


def test_zap_reply_passes_identity_socket_and_address_to_admit() -> None:
    seen = []

    def admit(identity: str, domain: bytes, address: str) -> Refusal | None:
        seen.append((identity, domain, address))
        return None

    reply = zap_reply(request(PUBLISH_ZAP_DOMAIN), admit)
    assert reply == [b"1.0", b"7", b"200", b"OK", KEY.hex().encode(), b""]
    assert seen == [(KEY.hex(), PUBLISH_ZAP_DOMAIN, "192.0.2.7")]


@pytest.mark.parametrize("refusal", [NOT_AUTHORIZED, KEY_CONNECTIONS])
def test_zap_reply_refuses_with_the_status_and_text_of_the_refusal(refusal: Refusal) -> None:
    reply = zap_reply(request(), lambda *_: refusal)
    assert reply == [b"1.0", b"7", refusal.status, refusal.text.encode(), b"", b""]
    assert refusal.status in (b"400", b"500")  # 300 would reach the client as no reason at all


def test_zap_reply_without_curve_never_asks() -> None:
    def admit(*_: object) -> Refusal | None:
        raise AssertionError("asked")

    assert zap_reply([b"1.0", b"7", ZAP_DOMAIN, b"", b"", b"NULL"], admit)[2] == b"400"
    assert zap_reply([b"1.0", b"7"], admit)[2] == b"500"


# --- new keys per address ------------------------------------------------------------------------------


def test_new_keys_per_address_are_a_bucket_per_minute() -> None:
    limiter = NewKeyLimiter(per_minute=3)
    assert [limiter.allow("192.0.2.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("192.0.2.2", 0.0)  # another address has its own budget
    assert not limiter.allow("192.0.2.1", 19.0)  # a token every 20 s
    assert limiter.allow("192.0.2.1", 21.0)
    assert not limiter.allow("192.0.2.1", 21.0)
    # Long unused: full again, and no fuller.
    assert [limiter.allow("192.0.2.1", 1000.0) for _ in range(4)] == [True, True, True, False]


def test_zero_means_no_limit() -> None:
    limiter = NewKeyLimiter(per_minute=0)
    assert all(limiter.allow("192.0.2.1", 0.0) for _ in range(1000))
    assert len(limiter) == 0


def test_ipv6_addresses_share_their_64_and_mapped_ipv4_is_ipv4() -> None:
    assert address_group("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:3::1") != address_group("2001:db8:1:2::1")
    assert address_group("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_group("not an address") == "not an address"
    limiter = NewKeyLimiter(per_minute=2)
    assert limiter.allow("2001:db8::1", 0.0) and limiter.allow("2001:db8::2", 0.0)
    assert not limiter.allow("2001:db8::ffff", 0.0)


def test_addresses_remembered_are_bounded() -> None:
    limiter = NewKeyLimiter(per_minute=1, max_groups=100)
    for n in range(1000):
        limiter.allow(f"10.0.{n // 256}.{n % 256}", 0.0)
    assert len(limiter) == 100
    assert not limiter.allow("10.0.3.231", 0.0)  # among the last 100: still spent


# --- folded logging --------------------------------------------------------------------------------


def test_a_kind_is_logged_once_per_interval_and_the_rest_summed() -> None:
    fold = LogFold(interval=10.0)
    assert fold.first("new_keys", 0.0)
    assert not any(fold.first("new_keys", t) for t in (1.0, 2.0, 3.0))
    assert fold.first("key_connections", 1.0)  # another kind is logged at once
    assert fold.due(9.9) == []
    assert fold.due(10.0) == [("new_keys", 3)]
    assert fold.due(11.0) == []  # key_connections ended with nothing more to say
    assert fold.first("new_keys", 12.0)  # a new interval starts with a logged line


# --- Connections: counting a key's connections -------------------------------------------------------


def test_an_admitted_handshake_counts_until_its_first_frame_claims_a_descriptor() -> None:
    conns = Connections()
    conns.accepted(10, 0.0)
    conns.accepted(11, 0.0)
    assert conns.live == 2 and conns.count(A, since=0.0) == 0
    conns.admitted(A, 0.1)
    conns.admitted(A, 0.1)
    assert conns.count(A, since=0.0) == 2  # pending: no frame yet
    assert conns.attribute(A, 10) is True
    assert conns.count(A, since=0.0) == 2  # one attributed, one pending
    assert conns.attribute(A, 10) is False  # already known
    assert conns.attribute(A, 11) is True
    assert conns.count(A, since=0.0) == 2 and conns.unattributed == {}
    assert conns.closed(10) == A
    assert conns.count(A, since=0.0) == 1 and conns.live == 1


def test_a_frame_from_a_descriptor_that_closed_is_not_attributed() -> None:
    conns = Connections()
    conns.accepted(10, 0.0)
    conns.closed(10)
    assert conns.attribute(A, 10) is False
    assert not conns.knows(A) and conns.live == 0


def test_admissions_nobody_claims_expire() -> None:
    conns = Connections()
    conns.admitted(A, 1.0)
    conns.admitted(A, 2.0)
    assert conns.holds(A)
    assert conns.count(A, since=1.5) == 1
    conns.expire_pending(since=3.0)
    assert not conns.holds(A) and conns.count(A, since=0.0) == 0


def test_silent_descriptors_oldest_first_and_reuse() -> None:
    conns = Connections()
    for fd, at in ((12, 0.0), (10, 1.0), (11, 2.0)):
        conns.accepted(fd, at)
    assert conns.silent(before=1.5) == [12, 10]
    assert conns.silent(before=5.0, limit=1) == [12]
    conns.attribute(B, 10)
    assert conns.silent(before=5.0) == [12, 11]
    conns.accepted(10, 3.0)  # reused before we heard it close: a new, silent connection
    assert not conns.knows(B)
    assert conns.silent(before=5.0) == [12, 11, 10]
    assert conns.identities() == []


# --- what the client says ------------------------------------------------------------------------------


def watch_with(status: int) -> HandshakeWatch:
    watch = HandshakeWatch.__new__(HandshakeWatch)
    watch.connected, watch.refused, watch.handshake, watch.status = True, 0, "auth", status
    watch.identity = ""
    return watch


def test_the_client_tells_a_refusal_for_now_from_a_refused_key() -> None:
    code, line = watch_with(500).explain("tcp://127.0.0.1:1234")
    assert code == "busy" and "refused the connection for now" in line and "try again later" in line
    code, line = watch_with(400).explain("tcp://127.0.0.1:1234")
    assert code == "auth" and "refused this key" in line


def test_the_unreachable_hint_repeats_the_connection_flags_given() -> None:
    """Issue 14, item 11: "start one with: zchat broker" even when --port/--host were given."""
    watch = watch_with(0)
    watch.connected, watch.handshake = False, "none"
    default = Endpoints()
    assert watch.explain(default.input, default.flags())[1].endswith("(start one with: zchat broker)")
    given = Endpoints(host="::1", port=5555, pub_port=6000)
    code, line = watch.explain(given.input, given.flags())
    assert code == "unreachable"
    assert line.endswith("(start one with: zchat broker --host ::1 --port 5555 --pub-port 6000)"), line
    assert Endpoints(port=5555, pub_port=5556).flags() == " --port 5555"
