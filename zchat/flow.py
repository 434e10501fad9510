"""Flow control and sequence bookkeeping, shared by the broker core, the client core and the tap.

Pure: no sockets, no clock. Every call gets `now`, in seconds of a MONOTONIC clock
(time.monotonic() in the shells): a wall clock stepped back or forward must not
stop a bucket from refilling or a request from timing out.

- `TokenBucket`: the one token bucket. The broker charges each sender with it,
  and a client or tap paces what it sends with it, so it is never refused.
- `SeqTracker`: per-topic sequence numbers. From a topic's baseline on, every
  seq is accounted for exactly once, in order: written live, recovered from the
  broker's stored history (live events are held meanwhile, at most `wait`
  seconds per request), or reported inside a gap record. The tap and the chat
  client both use it; they differ only in their settings.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zchat import limits as L

BACKFILL_WAIT = 3.0  # seconds to wait for one history answer while a room's live events are held
# Pacing under the broker's default bucket, a little below it: network jitter bunches messages up.
# Clients replace these with the broker's own values (from the welcome); the tap never gets one.
REQUEST_BURST = L.RATE_BURST - 2
REQUEST_RATE = L.RATE_PER_SECOND * 0.9


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second; one token per message."""

    __slots__ = ("burst", "rate", "tokens", "refilled_at")

    def __init__(self, burst: float, rate: float, now: float | None = None) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.tokens = float(burst)
        self.refilled_at = now  # None: full until first used

    def refill(self, now: float) -> None:
        if self.refilled_at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def ready_at(self) -> float:
        """When the next token is there: already (-inf) or at this monotonic time."""
        if self.tokens >= 1.0 or self.refilled_at is None:
            return float("-inf")
        if self.rate <= 0:
            return float("inf")
        return self.refilled_at + (1.0 - self.tokens) / self.rate

    def configure(self, burst: float, rate: float) -> None:
        """New limits (a broker's welcome, a reload); never more tokens than the new burst."""
        self.burst, self.rate = float(burst), rate
        self.tokens = min(self.tokens, self.burst)


# --- records the tracker returns ----------------------------------------------------


@dataclass(slots=True)
class Write:
    """Write (show) this event (`backfill`: recovered from storage, not received live)."""

    topic: str
    seq: int
    item: Any
    backfill: bool = False


@dataclass(slots=True)
class Gap:
    """Sequence numbers first..last of `topic` are lost for good."""

    topic: str
    first: int
    last: int

    @property
    def missing(self) -> int:
        return self.last - self.first + 1


@dataclass(slots=True)
class Reset:
    """`topic` went back from `last` to `seq`: its numbering restarted (the broker lost its
    history). The new numbering starts a new baseline."""

    topic: str
    last: int
    seq: int


@dataclass(slots=True)
class Request:
    """Ask for the stored events of `topic` with after < seq < before."""

    topic: str
    after: int
    before: int
    ref: int

    @property
    def limit(self) -> int:
        return self.before - self.after - 1


@dataclass(slots=True)
class Probe:
    """Ask how far `topic` has got: a history request for no events after `after`, whose
    answer's `upto` is the topic's latest seq (see SeqTracker.resume)."""

    topic: str
    after: int
    ref: int


Out = Write | Gap | Reset | Request | Probe


@dataclass(slots=True)
class _Topic:
    last: int  # every seq up to this one is accounted for (written, or inside a gap record)
    top: int  # the highest seq known to exist: received live, or announced by a mark
    recover: bool = True  # False: a jump is a gap at once (nothing stored to ask for)
    held: list[tuple[int, Any]] | None = None  # while recovering a gap: the live events behind it
    ref: int | None = None  # the outstanding history request (None while waiting for a token)
    before: int = 0  # ...which asked for last < seq < before
    deadline: float = 0.0


class SeqTracker:
    """Per-topic sequence bookkeeping: what to write, what to ask for, in which order.

    Every call returns the records to write and the requests to send, in order. A gap
    is recovered in chunks of at most MAX_HISTORY_PER_REQUEST, oldest first, one
    outstanding request per topic; requests are paced by `bucket` (shared with whatever
    else the caller sends: the broker charges it all to one bucket).

    The tap keeps the defaults. The chat client passes its own bucket, `resets=False`
    (an old seq is a repeat to drop, never a restarted numbering: its baselines come from
    welcomes) and `max_recover` (a gap wider than that is fetched only in its newest part).
    """

    def __init__(self, wait: float = BACKFILL_WAIT, burst: int = REQUEST_BURST,
                 rate: float = REQUEST_RATE, *, bucket: TokenBucket | None = None,
                 first_ref: int | None = None, resets: bool = True,
                 max_recover: int | None = None) -> None:
        self.wait = wait
        self.topics: dict[str, _Topic] = {}
        self.refs: dict[int, str] = {}  # outstanding request -> topic
        # Sessions sharing a key share a private stream: start refs where another's are unlikely.
        self._next_ref = itertools.count(first_ref if first_ref is not None else 1 + secrets.randbelow(2**48))
        self.bucket = bucket if bucket is not None else TokenBucket(burst, rate)
        self.resets = resets
        self.max_recover = max_recover
        self._waiting: deque[str] = deque()  # topics waiting for a request token, in order
        self.probes: dict[int, str] = {}  # outstanding probe -> topic
        self._probes_waiting: deque[str] = deque()  # topics to probe once a token is there

    def baseline(self, topic: str, seq: int, recover: bool = True) -> None:
        """Count `topic` from `seq` on (a welcome's baseline), forgetting what was held or asked."""
        self.forget(topic)
        self.topics[topic] = _Topic(last=seq, top=seq, recover=recover)

    def forget(self, topic: str) -> None:
        """Stop tracking `topic` (unsubscribed), dropping what was held for it."""
        t = self.topics.pop(topic, None)
        if t is not None and t.ref is not None:
            self.refs.pop(t.ref, None)
        if topic in self._waiting:
            self._waiting.remove(topic)
        if topic in self._probes_waiting:
            self._probes_waiting.remove(topic)
        for ref in [ref for ref, probed in self.probes.items() if probed == topic]:
            del self.probes[ref]

    def resume(self, topic: str, seq: int, now: float) -> list[Out]:
        """Count `topic` from `seq` on (what an earlier run wrote) and probe how far it has got:
        the answer (`probed`) acts as a mark, so what was published after `seq` is backfilled by
        the usual machinery even if the topic stays quiet. A live event before the answer
        recovers the same range itself."""
        self.baseline(topic, seq)
        return self._ask_probe(topic, now)

    def probed(self, ref: int, upto: int, now: float) -> list[Out]:
        """The answer to probe `ref`: `upto` is its topic's latest seq."""
        topic = self.probes.pop(ref, None)
        if topic is None or topic not in self.topics:
            return []
        return self.mark(topic, upto, now)

    def last(self, topic: str) -> int | None:
        """Every seq of `topic` up to this one is accounted for (None: not tracked)."""
        t = self.topics.get(topic)
        return t.last if t is not None else None

    def event(self, topic: str, seq: int, item: Any, now: float) -> list[Out]:
        """A live event arrived."""
        t = self.topics.get(topic)
        if t is None:  # the baseline: nothing before it is ours to account for
            self.topics[topic] = _Topic(last=seq, top=seq)
            return [Write(topic, seq, item)]
        if seq <= t.top:
            if not self.resets:
                return []  # old or repeated: already written, held, or inside a gap record
            # Never repeated while the broker keeps its history: numbering restarted.
            out = self._release(topic, t)
            out.append(Reset(topic, t.top, seq))
            self.topics[topic] = _Topic(last=seq, top=seq, recover=t.recover)
            out.append(Write(topic, seq, item))
            return out
        t.top = seq
        if t.held is not None:
            t.held.append((seq, item))
            return []
        return self._advance(topic, t, [(seq, item)], now)

    def mark(self, topic: str, seq: int, now: float) -> list[Out]:
        """The broker says `seq` is the latest on `topic`: anything after ours never came."""
        t = self.topics.get(topic)
        if t is None:  # a baseline too: everything up to `seq` was before our time
            self.topics[topic] = _Topic(last=seq, top=seq)
            return []
        if seq <= t.top:  # nothing new (a mark never takes a number of its own)
            return []
        t.top = seq
        if t.held is not None:
            return []  # recovering already: it goes on up to the new top
        return self._advance(topic, t, [], now)

    def history(self, ref: int, topic: str, after: int, events: Iterable[tuple[int, Any]],
                now: float, more: bool = False) -> list[Out]:
        """The broker answered request `ref` (for `topic`, seqs after `after`) with these stored
        (seq, item) pairs; `more`: its byte cap left out older ones of the range."""
        t = self.topics.get(topic)
        if self.refs.get(ref) != topic or t is None or t.last != after:
            return []  # given up already, or not ours (another session with our key asked)
        del self.refs[ref]
        t.ref = None
        found = {seq: item for seq, item in events if t.last < seq < t.before}
        if more and found:  # the newest part of the chunk: hold it, ask for what comes before
            t.held = sorted(found.items()) + (t.held or [])
            return self._ask(topic, t, now)
        out: list[Out] = []
        for seq in sorted(found):
            if seq > t.last + 1:
                out.append(Gap(topic, t.last + 1, seq - 1))
            out.append(Write(topic, seq, found[seq], backfill=True))
            t.last = seq
        if t.last < t.before - 1:
            out.append(Gap(topic, t.last + 1, t.before - 1))
            t.last = t.before - 1
        held, t.held = t.held or [], None
        return out + self._advance(topic, t, held, now)

    def tick(self, now: float) -> list[Out]:
        """Give up on unanswered requests; send the requests that waited for a token."""
        out: list[Out] = []
        for ref, topic in list(self.refs.items()):
            t = self.topics[topic]
            if now >= t.deadline:
                del self.refs[ref]
                t.ref = None
                held, t.held = t.held or [], None
                end = held[0][0] - 1 if held else t.top
                out.append(Gap(topic, t.last + 1, end))
                t.last = end
                out += self._advance(topic, t, held, now)
        while self._waiting and self.bucket.take(now):
            topic = self._waiting.popleft()
            out += self._request(topic, self.topics[topic], now)
        while self._probes_waiting and self.bucket.take(now):
            out.append(self._probe(self._probes_waiting.popleft()))
        return out

    def restarted(self, now: float) -> list[Out]:
        """The broker restarted: requests sent to the old one may be lost, ask again."""
        out: list[Out] = []
        for ref, topic in list(self.refs.items()):
            del self.refs[ref]
            self.topics[topic].ref = None
            out += self._ask(topic, self.topics[topic], now)
        for ref, topic in list(self.probes.items()):
            del self.probes[ref]
            out += self._ask_probe(topic, now)
        return out

    def close(self) -> list[Out]:
        """Stopping: whatever is held is written now, after a gap for what was not recovered."""
        out: list[Out] = []
        for topic, t in self.topics.items():
            out += self._release(topic, t)
        return out

    def deadline(self) -> float | None:
        """When `tick` next has something to do (None: nothing pending)."""
        times = [self.topics[topic].deadline for topic in self.refs.values()]
        if self._waiting or self._probes_waiting:
            times.append(self.bucket.ready_at())
        return min(times, default=None)

    # --- helpers ---------------------------------------------------------------

    def _advance(self, topic: str, t: _Topic, items: list[tuple[int, Any]], now: float) -> list[Out]:
        """Write events in order until one reveals a jump; hold it and the rest, ask for the gap."""
        out: list[Out] = []
        for i, (seq, item) in enumerate(items):
            if seq > t.last + 1:
                if not t.recover:
                    out.append(Gap(topic, t.last + 1, seq - 1))
                else:
                    t.held = items[i:]
                    return out + self._ask(topic, t, now)
            out.append(Write(topic, seq, item))
            t.last = seq
        if t.last < t.top:  # a mark announced events that never came
            if not t.recover:
                out.append(Gap(topic, t.last + 1, t.top))
                t.last = t.top
            else:
                t.held = []
                return out + self._ask(topic, t, now)
        t.held = None
        return out

    def _ask(self, topic: str, t: _Topic, now: float) -> list[Out]:
        if self.bucket.take(now):
            return self._request(topic, t, now)
        self._waiting.append(topic)
        return []

    def _ask_probe(self, topic: str, now: float) -> list[Out]:
        if self.bucket.take(now):
            return [self._probe(topic)]
        self._probes_waiting.append(topic)
        return []

    def _probe(self, topic: str) -> Probe:
        ref = next(self._next_ref)
        self.probes[ref] = topic
        return Probe(topic, self.topics[topic].last, ref)

    def _request(self, topic: str, t: _Topic, now: float) -> list[Out]:
        assert t.held is not None
        out: list[Out] = []
        end = t.held[0][0] if t.held else t.top + 1
        if self.max_recover is not None and end - t.last - 1 > self.max_recover:
            skipped = end - 1 - self.max_recover  # too old to fetch: the newest part is what counts
            out.append(Gap(topic, t.last + 1, skipped))
            t.last = skipped
        ref = next(self._next_ref)
        self.refs[ref] = topic
        t.ref, t.deadline = ref, now + self.wait
        t.before = min(end, t.last + 1 + L.MAX_HISTORY_PER_REQUEST)  # oldest chunk first
        out.append(Request(topic, t.last, t.before, ref))
        return out

    def _release(self, topic: str, t: _Topic) -> list[Out]:
        """Stop recovering `topic`: gaps for whatever is missing, then the held events."""
        if t.ref is not None:
            self.refs.pop(t.ref, None)
            t.ref = None
        if topic in self._waiting:
            self._waiting.remove(topic)
        out: list[Out] = []
        for seq, item in t.held or []:
            if seq > t.last + 1:
                out.append(Gap(topic, t.last + 1, seq - 1))
            out.append(Write(topic, seq, item))
            t.last = seq
        if t.last < t.top:
            out.append(Gap(topic, t.last + 1, t.top))
            t.last = t.top
        t.held = None
        return out
