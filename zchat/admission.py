"""Admission at the handshake, without sockets or a clock: how many new keys one source
address may bring, and how a flood of refusals is logged without flooding the log.

The broker's ZAP handler asks these; `zchat.connections` counts the connections.
"""

from __future__ import annotations

import ipaddress

from zchat import limits as L


def address_group(address: str) -> str:
    """The unit a new-key budget belongs to: an IPv4 address, or an IPv6 /64 (one host
    usually holds a whole /64, so counting single IPv6 addresses would count nothing)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (ipc://, or an odd ZAP request): its own group
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class NewKeyLimiter:
    """A token bucket per source address group for keys the broker does not know yet:
    `per_minute` at once, refilled at `per_minute` a minute. 0 = no limit.

    Memory is bounded: past `max_groups`, the group touched longest ago is forgotten (its
    bucket would be full again within a minute anyway)."""

    def __init__(self, per_minute: int = L.NEW_KEYS_PER_MINUTE,
                 max_groups: int = L.ADDRESSES_TRACKED) -> None:
        self.per_minute = per_minute
        self.max_groups = max_groups
        self._buckets: dict[str, tuple[float, float]] = {}  # group -> (tokens, at), least recent first

    def allow(self, address: str, now: float) -> bool:
        """Take one token for a new key from `address`; False when its budget is spent."""
        if self.per_minute <= 0:
            return True
        group = address_group(address)
        tokens, at = self._buckets.pop(group, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + max(0.0, now - at) * self.per_minute / 60.0)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[group] = (tokens, now)  # re-inserted: most recent last
        while len(self._buckets) > self.max_groups:
            del self._buckets[next(iter(self._buckets))]
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


def remember_until(until_by_key: dict[str, float], key: str, until: float, now: float, cap: int) -> None:
    """Keep `key` in a dict of deadlines ordered by insertion (so by deadline, for one fixed
    length), bounded by `cap`: the expired are forgotten first, then the oldest."""
    if len(until_by_key) >= cap:
        for old, deadline in list(until_by_key.items()):
            if deadline <= now:
                del until_by_key[old]
        if len(until_by_key) >= cap:
            del until_by_key[next(iter(until_by_key))]
    until_by_key.pop(key, None)  # re-inserted last: the oldest go first
    until_by_key[key] = until


class LogFold:
    """Repeated log lines folded: the first of a kind in an interval is logged at once (with
    its details), the rest are only counted and reported as one line when the interval ends.
    So a flood of refusals costs a few lines, and the operator still sees every kind."""

    def __init__(self, interval: float = L.LOG_FOLD_SECONDS) -> None:
        self.interval = interval
        self._open: dict[str, tuple[float, int]] = {}  # kind -> (interval end, repeats not logged)

    def first(self, kind: str, now: float) -> bool:
        """Count one `kind`; True when it should be logged now (the first in its interval)."""
        state = self._open.get(kind)
        if state is None:
            self._open[kind] = (now + self.interval, 0)
            return True
        self._open[kind] = (state[0], state[1] + 1)
        return False

    def due(self, now: float) -> list[tuple[str, int]]:
        """Kinds whose interval ended, with how many repeats went unlogged (0: none, nothing
        to say). A kind that comes back afterwards is logged at once again."""
        ended = [(kind, repeats) for kind, (end, repeats) in self._open.items() if end <= now]
        for kind, _ in ended:
            del self._open[kind]
        return [(kind, repeats) for kind, repeats in ended if repeats]
