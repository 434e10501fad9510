"""Who may connect: ZAP (ZeroMQ authentication protocol, RFC 27) decisions and
the authorized-keys file of closed mode. No sockets here.

The broker binds a REP socket on inproc://zeromq.zap.01 before it binds its
CURVE sockets and answers each request with `zap_reply`. The User-Id handed
back is the hex of the client's public key: every message and subscription
the broker receives then carries a sender identity no client can forge.

Open mode (no file): any CURVE key may connect. Closed mode: only keys listed
in the authorized-keys file, one per line as `name public-key [role]`
(public key in z85 or hex; roles user, tap, admin, relay; a word starting with `#`
starts a comment).
Banned keys are refused in both modes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zchat.accounts import ROLES, Account
from zchat.keys import identity_of, parse_public_key
from zchat.protocol import RESERVED_ROLE, lookalike_key, reserved_name, valid_name

log = logging.getLogger("zchat.broker")

__all__ = ["ROLES", "Account", "KeyFileError", "load_authorized_keys", "parse_authorized_keys", "zap_reply"]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zchat"  # the input (PULL) socket's
PUBLISH_ZAP_DOMAIN = b"zchat.publish"  # the publishing socket's: ZAP requests say which socket


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a handshake is refused. Only `status` reaches the client: libzmq 4.3.5 turns it into
    the client's HANDSHAKE_FAILED_AUTH event (value 400 or 500) and sends no text. A status
    of three hundred ("temporary") is worse: the client is dropped with no event that says why, so a refusal
    for now (a limit) is a 500. `reason` names it in logs and stats; `text` goes in the ZAP reply."""

    status: bytes
    reason: str
    text: str


NOT_AUTHORIZED = Refusal(b"400", "not_authorized", "key not authorized")
KEY_CONNECTIONS = Refusal(b"500", "key_connections", "too many connections for this key")
CONNECTIONS_FULL = Refusal(b"500", "connections", "the broker is at its connection limit")
PEERS_FULL = Refusal(b"500", "peers", "every place the broker tracks is held by a member")
NEW_KEYS = Refusal(b"500", "new_keys", "too many new keys from this address")
EVICTED = Refusal(b"500", "evicted", "dropped a moment ago to make room; try again later")
DATA_SENDER = Refusal(b"500", "data_sender", "cut for sending data on its subscriber connection")


class KeyFileError(ValueError):
    """The authorized-keys file is wrong; the message names the line."""


def parse_authorized_keys(text: str, source: str = "authorized-keys") -> dict[str, Account]:
    """identity (hex of the public key) -> Account, from `name key [role]` lines."""
    accounts: dict[str, Account] = {}
    names: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        fields = _fields(raw)
        if not fields:
            continue
        where = f"{source}:{number}"
        if len(fields) not in (2, 3):
            raise KeyFileError(f"{where}: expected 'name public-key [role]', got {len(fields)} fields")
        name, key_text = fields[0], fields[1]
        role = fields[2] if len(fields) == 3 else "user"
        if not valid_name(name):
            raise KeyFileError(f"{where}: invalid name {name!r}")
        if role not in ROLES:
            raise KeyFileError(f"{where}: unknown role {role!r} (use {', '.join(ROLES)})")
        reserved = reserved_name(name)
        if reserved is not None and role != RESERVED_ROLE:
            looks = "" if name.casefold() == reserved else f" (it looks like {reserved!r})"
            raise KeyFileError(f"{where}: the name {name!r} is reserved{looks} for keys with the role "
                               f"{RESERVED_ROLE}: give it that role, or another name")
        try:
            identity = identity_of(parse_public_key(key_text))
        except ValueError as exc:
            raise KeyFileError(f"{where}: {exc}") from None
        if identity in accounts:
            raise KeyFileError(f"{where}: this key is already listed for {accounts[identity].name!r}")
        if name.casefold() in names:
            raise KeyFileError(f"{where}: the name {name!r} is already used on line {names[name.casefold()]}")
        names[name.casefold()] = number
        accounts[identity] = Account(name, role)
    return accounts


def lookalike_names(accounts: dict[str, Account]) -> list[list[str]]:
    """Groups of names in the file that look alike (protocol.lookalike_key). Allowed, since
    the operator chose them, but worth a warning: users may take one for the other."""
    groups: dict[str, list[str]] = {}
    for account in accounts.values():
        groups.setdefault(lookalike_key(account.name), []).append(account.name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def _fields(line: str) -> list[str]:
    """The words of a line before its comment: a comment starts with a word that starts with
    '#'. A '#' inside a word is kept, as in a z85 key; no z85 key starts with '#' (the first
    character of each 5-character group is at most the 83rd of the alphabet, '#' is the 85th)."""
    words = line.split()
    for index, word in enumerate(words):
        if word.startswith("#"):
            return words[:index]
    return words


def load_authorized_keys(path: Path) -> dict[str, Account]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"cannot read {path}: not UTF-8 text") from None
    accounts = parse_authorized_keys(text, str(path))
    for names in lookalike_names(accounts):
        log.warning("%s: these names look alike, users may take one for the other: %s",
                    path, ", ".join(names))
    return accounts


def zap_reply(request: list[bytes],
              admit: Callable[[str, bytes, str], Refusal | None] = lambda identity, domain, address: None,
              ) -> list[bytes]:
    """Answer one ZAP request: CURVE only, and only identities `admit(identity, domain,
    address)` does not refuse (domain: which socket; address: the peer's IP, no port)."""
    if len(request) < 6:
        # Malformed: RFC 27 says reply 500 when we can still address it.
        request_id = request[1] if len(request) > 1 else b""
        return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
    version, request_id, domain, address, _identity, mechanism = request[:6]
    credentials = request[6:]
    if version != b"1.0":
        return [b"1.0", request_id, b"500", b"unsupported ZAP version", b"", b""]
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
    identity = credentials[0].hex()
    refusal = admit(identity, domain, address.decode("ascii", "replace"))
    if refusal is not None:
        return [b"1.0", request_id, refusal.status, refusal.text.encode(), b"", b""]
    return [b"1.0", request_id, b"200", b"OK", identity.encode(), b""]
