"""Who may connect: ZAP (ZeroMQ authentication protocol, RFC 27) decisions and
the authorized-keys file of closed mode. No sockets here.

The broker binds a REP socket on inproc://zeromq.zap.01 before it binds its
CURVE sockets and answers each request with `zap_reply`. The User-Id handed
back is the hex of the client's public key: every message and subscription
the broker receives then carries a sender identity no client can forge.

Open mode (no file): any CURVE key may connect. Closed mode: only keys listed
in the authorized-keys file, one per line as `name public-key [role]`
(public key in z85 or hex; roles user, tap, admin; a word starting with `#`
starts a comment).
Banned keys are refused in both modes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zchat.keys import identity_of, parse_public_key
from zchat.protocol import valid_name

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zchat"
ROLES = ("user", "tap", "admin")


@dataclass(frozen=True)
class Account:
    """A closed-mode key's fixed name and role."""

    name: str
    role: str = "user"


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
    return parse_authorized_keys(text, str(path))


def zap_reply(request: list[bytes], admit: Callable[[str], bool] = lambda identity: True) -> list[bytes]:
    """Answer one ZAP request: CURVE only, and only identities `admit` accepts."""
    if len(request) < 6:
        # Malformed: RFC 27 says reply 500 when we can still address it.
        request_id = request[1] if len(request) > 1 else b""
        return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
    version, request_id, _domain, _address, _identity, mechanism = request[:6]
    credentials = request[6:]
    if version != b"1.0":
        return [b"1.0", request_id, b"500", b"unsupported ZAP version", b"", b""]
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
    identity = credentials[0].hex()
    if not admit(identity):
        return [b"1.0", request_id, b"400", b"key not authorized", b"", b""]
    return [b"1.0", request_id, b"200", b"OK", identity.encode(), b""]
