"""Who may connect, without sockets: the ZAP answers and the authorized-keys file."""

from __future__ import annotations

import pytest
import zmq

from zchat.auth import (
    NOT_AUTHORIZED,
    Account,
    KeyFileError,
    Refusal,
    load_authorized_keys,
    parse_authorized_keys,
    zap_reply,
)
from zchat.keys import identity_of

pytestmark = pytest.mark.timeout(30)


def key_with_a_hash() -> bytes:
    """A real z85 public key with '#' in it (about one key in six has one)."""
    while True:
        public, _secret = zmq.curve_keypair()
        if b"#" in public:
            return public


# --- ZAP ----------------------------------------------------------------------------------------


KEY = bytes(range(32))


def request(mechanism: bytes = b"CURVE", credentials: tuple[bytes, ...] = (KEY,), version: bytes = b"1.0",
            request_id: bytes = b"7") -> list[bytes]:
    return [version, request_id, b"zchat", b"127.0.0.1", b"", mechanism, *credentials]


def test_zap_admits_a_curve_key_and_names_it_by_its_hex() -> None:
    assert zap_reply(request()) == [b"1.0", b"7", b"200", b"OK", KEY.hex().encode(), b""]


def test_zap_asks_admit_with_the_identity_and_refuses_what_it_refuses() -> None:
    asked: list[str] = []

    def admit(identity: str, domain: bytes, address: str) -> Refusal | None:
        asked.append(identity)
        return NOT_AUTHORIZED

    assert zap_reply(request(), admit) == [b"1.0", b"7", b"400", b"key not authorized", b"", b""]
    assert asked == [KEY.hex()]


@pytest.mark.parametrize("mechanism, credentials", [
    (b"NULL", ()), (b"PLAIN", (b"user", b"password")), (b"CURVE", ()), (b"CURVE", (KEY[:31],)),
    (b"CURVE", (KEY, KEY)),
], ids=["null", "plain", "curve without key", "short key", "two keys"])
def test_zap_refuses_anything_but_one_curve_key(mechanism: bytes, credentials: tuple[bytes, ...]) -> None:
    reply = zap_reply(request(mechanism, credentials), lambda identity: True)
    assert reply == [b"1.0", b"7", b"400", b"CURVE required", b"", b""]


def test_zap_answers_a_wrong_version_and_a_malformed_request_with_500() -> None:
    assert zap_reply(request(version=b"2.0"))[:4] == [b"1.0", b"7", b"500", b"unsupported ZAP version"]
    assert zap_reply([b"1.0", b"9", b"zchat"]) == [b"1.0", b"9", b"500", b"malformed ZAP request", b"", b""]
    assert zap_reply([]) == [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
    assert all(len(zap_reply(r)) == 6 for r in ([], [b"1.0"], request(), request(b"NULL", ())))


# --- the authorized-keys file -----------------------------------------------------------------------


def test_names_keys_roles_and_comments() -> None:
    alice, bob = zmq.curve_keypair()[0], zmq.curve_keypair()[0]
    text = (f"# name key role\n\nalice {identity_of(alice).upper()} admin  # until March\n"
            f"   bob\t{bob.decode()}\n")
    assert parse_authorized_keys(text) == {identity_of(alice): Account("alice", "admin"),
                                           identity_of(bob): Account("bob", "user")}


def test_a_z85_key_with_a_hash_in_it_is_read_whole() -> None:
    key = key_with_a_hash()
    accounts = parse_authorized_keys(f"carol {key.decode()} tap # a comment\n")
    assert accounts == {identity_of(key): Account("carol", "tap")}
    assert parse_authorized_keys(f"carol {key.decode()}\n") == {identity_of(key): Account("carol")}
    # No z85 key starts with '#' (each 5-character group's first character is one of the
    # alphabet's first 83), so a word starting with '#' is always a comment.
    assert all(not zmq.curve_keypair()[0].startswith(b"#") for _ in range(200))


def test_a_comment_in_the_keys_place_is_still_a_comment() -> None:
    with pytest.raises(KeyFileError, match=r"^keys:1: expected 'name public-key \[role\]', got 1 fields$"):
        parse_authorized_keys("alice #no key yet\n", "keys")


@pytest.mark.parametrize("line, problem", [
    ("alice", "expected 'name public-key [role]', got 1 fields"),
    ("alice KEY user extra", "expected 'name public-key [role]', got 4 fields"),
    ("al/ice {key}", "invalid name 'al/ice'"),
    ("alice {key} root", "unknown role 'root' (use user, tap, admin, relay)"),
    ("alice nothex", "a public key is 40 z85 characters or 64 hex digits"),
    ("alice " + "~" * 40, "a public key is 40 z85 characters or 64 hex digits"),
])
def test_each_mistake_names_its_line(line: str, problem: str) -> None:
    key = zmq.curve_keypair()[0].decode()
    with pytest.raises(KeyFileError) as refused:
        parse_authorized_keys("# ok\n" + line.format(key=key) + "\n", "keys")
    assert str(refused.value) == f"keys:2: {problem}"


def test_a_key_or_a_name_listed_twice_is_refused() -> None:
    one, two = zmq.curve_keypair()[0], zmq.curve_keypair()[0]
    with pytest.raises(KeyFileError, match=r"keys:2: this key is already listed for 'alice'"):
        parse_authorized_keys(f"alice {one.decode()}\nbob {identity_of(one)}\n", "keys")
    with pytest.raises(KeyFileError, match=r"keys:2: the name 'Alice' is already used on line 1"):
        parse_authorized_keys(f"alice {one.decode()}\nAlice {two.decode()}\n", "keys")


def test_an_unreadable_file_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyFileError, match=r"cannot read .*missing: No such file or directory$"):
        load_authorized_keys(tmp_path / "missing")
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    with pytest.raises(KeyFileError, match=r"cannot read .*binary: not UTF-8 text$"):
        load_authorized_keys(tmp_path / "binary")
