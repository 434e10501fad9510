"""`zchat stats` and `zchat health`: listen to the broker's sys/ topic over CURVE.

Both connect a SUB with a key of their own (never a chat user's) to the publish
endpoint, subscribe to sys/ and watch the socket monitor, so that when nothing
arrives they can say why: nothing listening, the key refused (ZAP), a handshake
that failed (usually the wrong broker key), or a broker that accepted the
connection but said nothing in time.

Exit codes: 0 answered; 1 no answer (unreachable or timeout); 3 the broker refused
us (key refused or the handshake failed); 2 (from the command line) invalid settings.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

import msgspec
import zmq

from zchat.endpoints import Endpoints
from zchat.keys import KeyPair
from zchat.protocol import SYSTEM_TOPIC, Event, Heartbeat, ProtocolError, Stats, decode_publication
from zchat.transport import HandshakeWatch, curve_client

EXIT_OK = 0
EXIT_NO_ANSWER = 1
EXIT_REFUSED = 3
STATS_GRACE = 1.5  # health: after a heartbeat, how long to wait for the stats that give the uptime


class NoAnswer(Exception):
    """The broker did not answer; `code` is the exit code, the message the reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class SysListener:
    """A CURVE SUB on sys/ with a socket monitor that explains silence."""

    def __init__(self, endpoints: Endpoints, server_key: bytes, keypair: KeyPair) -> None:
        self.endpoints = endpoints
        self.ctx = zmq.Context()
        self.sub = curve_client(self.ctx, zmq.SUB, endpoints, server_key, keypair)
        self.watch = HandshakeWatch(self.sub, keypair.identity)
        self.monitor = self.watch.monitor
        self.sub.subscribe(SYSTEM_TOPIC.encode())
        self.sub.connect(endpoints.publish)
        self.poller = zmq.Poller()
        self.poller.register(self.sub, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def close(self) -> None:
        self.watch.close(self.sub)
        self.sub.close(0)
        self.ctx.term()

    def wait(self, want: Callable[[Event], bool], deadline: float,
             interrupted: Callable[[], bool] = lambda: False) -> Event | None:
        """The next sys/ event `want` accepts before `deadline` (monotonic), or None on timeout.
        Raises NoAnswer at once when the broker refuses our key or the handshake fails."""
        while not interrupted():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = dict(self.poller.poll(min(left, 0.5) * 1000))
            if self.monitor in ready:
                self._drain_monitor()
            if self.sub in ready:
                while True:
                    try:
                        data = self.sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        _, event = decode_publication(data)
                    except ProtocolError:
                        continue  # a newer broker's event type
                    if want(event):
                        return event
        return None

    def _drain_monitor(self) -> None:
        if self.watch.drain():  # refused or failed: no point waiting any longer
            _, line = self.watch.explain(self.endpoints.publish, self.endpoints.flags())
            raise NoAnswer(EXIT_REFUSED, line)

    def silence(self, timeout: float) -> NoAnswer:
        """Why nothing arrived within `timeout` seconds."""
        ep, watch = self.endpoints.publish, self.watch
        if watch.handshake == "ok":
            return NoAnswer(EXIT_NO_ANSWER, f"no answer from {ep} within {timeout:g} s: connected, "
                            "but no heartbeat arrived")
        if watch.refused and not watch.connected:
            return NoAnswer(EXIT_NO_ANSWER, f"no answer from {ep} within {timeout:g} s: connection "
                            "refused (is the broker running?)")
        _, line = watch.explain(ep, self.endpoints.flags())
        return NoAnswer(EXIT_NO_ANSWER, f"no answer within {timeout:g} s: {line}")


# --- formatting (pure) ------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """3d 04h 05m, 2h 03m 04s, 5m 06s, 7s."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {s:02d}s"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def stats_table(stats: Stats) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats.ts))
    rows = [
        ("online", f"{stats.online}"),
        ("rooms", f"{stats.rooms}"),
        ("messages in", f"{stats.messages_in_rate:.1f}/s  ({stats.messages_in} total)"),
        ("frames in", f"{stats.frames_in_rate:.1f}/s  ({stats.frames_in} total)"),
        ("published", f"{stats.published_rate:.1f}/s  ({stats.published} total)"),
        ("drops", f"{stats.drops}" + (f"  ({_kinds(stats.drops_by_kind)})" if stats.drops_by_kind else "")),
        ("rate-limited", f"{stats.rate_limited} sender(s) in the interval  "
                         f"({stats.rate_limited_total} messages refused in total)"),
        ("errors", _kinds(stats.errors) if stats.errors else "none"),
        ("data cuts", f"{stats.data_cuts} key(s) cut for sending data to the publish socket"),
        ("history", f"{stats.history} events stored"),
        ("connections", f"{stats.connections} open" + (f"  (refused: {_kinds(stats.refused)})"
                                                        if stats.refused else "")),
        ("evicted", f"{stats.evicted} key(s) that had not joined, to make room"),
    ]
    head = (f"broker {stats.epoch}, up {duration(stats.uptime)}, at {when} "
            f"(rates over the last {stats.interval:.1f} s)")
    return "\n".join([head, *(f"  {label:<13} {value}" for label, value in rows)])


def health_line(endpoints: Endpoints, epoch: str, online: int, uptime: float | None) -> str:
    up = f"up {duration(uptime)}" if uptime is not None else "uptime unknown (no stats)"
    return f"ok: broker at {endpoints.publish}, epoch {epoch}, {online} online, {up}"


# --- the commands -------------------------------------------------------------------------------


def run_health(endpoints: Endpoints, server_key: bytes, keypair: KeyPair, timeout: float = 5.0) -> int:
    """Exit 0 and print one line when the broker answers on sys/ within `timeout` seconds."""
    started = time.monotonic()
    deadline = started + timeout
    listener = SysListener(endpoints, server_key, keypair)
    try:
        first = listener.wait(lambda e: isinstance(e, (Heartbeat, Stats)), deadline)
        if first is None:
            raise listener.silence(timeout)
        assert isinstance(first, (Heartbeat, Stats))
        stats = first if isinstance(first, Stats) else None
        if stats is None:  # the broker answers a new sys/ subscriber with stats within a second or so
            grace = min(deadline, time.monotonic() + STATS_GRACE)
            got = listener.wait(lambda e: isinstance(e, Stats) and e.epoch == first.epoch, grace)
            stats = got if isinstance(got, Stats) else None
        online = stats.online if stats is not None else first.online
        print(health_line(endpoints, first.epoch, online, stats.uptime if stats is not None else None))
        return EXIT_OK
    except NoAnswer as exc:
        print(f"zchat health: {exc.reason}", file=sys.stderr)
        return exc.code
    finally:
        listener.close()


def run_stats(endpoints: Endpoints, server_key: bytes, keypair: KeyPair, watch: bool = False,
              as_json: bool = False, timeout: float = 15.0) -> int:
    """Print the next stats event (or, with `watch`, each one until SIGINT/SIGTERM)."""
    stopping: list[int] = []  # the listener polls in short slices, so a signal is seen soon
    old_handlers = {sig: signal.signal(sig, lambda signum, _: stopping.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    listener = SysListener(endpoints, server_key, keypair)
    encode = msgspec.json.Encoder().encode
    shown = 0
    try:
        while not stopping:
            # The first must come within `timeout`; a watcher then waits as long as it takes.
            wait = timeout if shown == 0 else 3600.0
            stats = listener.wait(lambda e: isinstance(e, Stats), time.monotonic() + wait,
                                  interrupted=lambda: bool(stopping))
            if stats is None:
                if stopping:
                    break
                if shown == 0:
                    raise listener.silence(timeout)
                continue
            assert isinstance(stats, Stats)
            text = encode(stats).decode() if as_json else stats_table(stats)
            try:
                print(text + ("" if as_json or not watch else "\n"), flush=True)
            except BrokenPipeError:  # `zchat stats --watch | head`
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                break
            shown += 1
            if not watch:
                break
        return EXIT_OK
    except NoAnswer as exc:
        print(f"zchat stats: {exc.reason}", file=sys.stderr)
        return exc.code
    finally:
        listener.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
