"""Closed mode's accounts: each authorized key's fixed name and role. Pure (no sockets, no
key files): the broker core uses these, zchat.auth reads them from the authorized-keys file."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("user", "tap", "admin", "relay")  # relay: may mark its clients' identities


@dataclass(frozen=True)
class Account:
    """A closed-mode key's fixed name and role."""

    name: str
    role: str = "user"
