#!/usr/bin/env python3
"""Does a tap's replay of 100,000 stored events (`zchat tap --since`) disturb live delivery?

    python benchmarks/replay.py [--events 100000] [--seconds 15] [--rate 200]

A broker (default settings, except no per-key message rate, so that one sender can offer
--rate messages/s) starts on a history database prefilled with --events messages in one room
from the last hour. A raw CURVE member says a message every 1/--rate s in another room and
measures its echo's round trip (say -> broker -> publish -> back). Phase 1: --seconds without a
replay. Phase 2: --seconds while `zchat tap --since 2h` replays the whole room (its pace: the
tap's request bucket and the broker's history byte bucket per key). Reported side by side:
live p50/p99/max round trip, and how many events the tap wrote during phase 2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import msgspec  # noqa: E402
import zmq  # noqa: E402
from peers import RawPeer, broker_key  # noqa: E402

from zchat.history import HistoryStore  # noqa: E402
from zchat.protocol import Message, Welcome, decode_publication  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefill(db: Path, events: int) -> None:
    store = HistoryStore(db)
    start = time.time() - 3600
    batch = 10_000
    for first in range(1, events + 1, batch):
        rows = []
        for seq in range(first, min(first + batch, events + 1)):
            ts = start + seq * 3000 / events
            body = msgspec.json.encode(Message(seq=seq, ts=ts, room="archive", name="old",
                                               text=f"stored message number {seq} " + "x" * 60))
            rows.append(("r/archive/", seq, ts, body))
        store.write(rows, [], [], time.time())
    store.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


def live_phase(peer: RawPeer, seconds: float, rate: float) -> list[float]:
    """Say a message every 1/rate s for `seconds`; the round trips (ms) of the echoes."""
    sent: dict[str, int] = {}
    rtts: list[float] = []
    interval = int(1e9 / rate)
    next_send = time.monotonic_ns()
    end = next_send + int(seconds * 1e9)
    n = 0
    while True:
        now = time.monotonic_ns()
        if now >= next_send and now < end:
            key = f"p{n}"
            n += 1
            sent[key] = now
            peer.send(json.dumps({"type": "say", "room": "live", "text": key}).encode())
            next_send += interval
        if now >= end + 2_000_000_000:  # the last echoes: 2 s more
            break
        wait = max(0, (next_send - time.monotonic_ns()) // 1_000_000) if now < end else 50
        if peer.sub.poll(wait):
            while True:
                try:
                    data = peer.sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                at = time.monotonic_ns()
                topic, event = decode_publication(data)
                if isinstance(event, Message) and event.text in sent:
                    rtts.append((at - sent.pop(event.text)) / 1e6)
    lost = len(sent)
    if lost:
        print(f"  {lost} echoes never came", file=sys.stderr)
    return rtts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--nice", type=int, default=0,
                        help="run the tap at this niceness: shows what is the tap's CPU (it parses and "
                        "writes every replayed event) rather than the broker's work")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        db = Path(tmp) / "history.sqlite3"
        t0 = time.monotonic()
        prefill(db, args.events)
        print(f"prefilled {args.events} events in {time.monotonic() - t0:.1f} s")
        port, pub = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        common = ["--config-dir", str(config), "--port", str(port), "--pub-port", str(pub)]
        broker = subprocess.Popen([sys.executable, "-m", "zchat", "broker", *common, "--db", str(db),
                                   "--rate-per-second", "0", "--client-timeout", "600"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tap = None
        try:
            for line in broker.stdout:  # type: ignore[union-attr]
                if "clients on other machines" in line:
                    break
            peer = RawPeer(port, pub, broker_key(config), [b"r/live/"])
            peer.sub.subscribe(f"u/{peer.identity}/".encode())
            join = json.dumps({"type": "join", "name": "pinger", "rooms": ["live"], "history": 0}).encode()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                peer.send(join)
                try:
                    peer.wait_for(lambda t, e: isinstance(e, Welcome), timeout=0.3)
                    break
                except AssertionError:
                    continue
            live_phase(peer, 1.0, args.rate)  # warm up
            cpu0 = cpu_seconds(broker.pid)
            quiet = live_phase(peer, args.seconds, args.rate)
            cpu1 = cpu_seconds(broker.pid)
            out = Path(tmp) / "replay.jsonl"
            command = ["nice", "-n", str(args.nice), sys.executable, "-m", "zchat", "tap", *common,
                       "--room", "archive", "--since", "2h", "-o", str(out)]
            tap = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started = time.monotonic()
            busy = live_phase(peer, args.seconds, args.rate)
            cpu2 = cpu_seconds(broker.pid)
            tap_cpu = cpu_seconds(tap.pid)  # nice's exec: the same process
            written = sum(1 for _ in out.open()) if out.exists() else 0
            while written < args.events and time.monotonic() - started < 300:
                time.sleep(1)  # a benchmark, not a test: poll the file for the replay's end
                written = sum(1 for _ in out.open())
            took = time.monotonic() - started
            print(f"live round trip at {args.rate:g} msg/s, {args.seconds:g} s each phase (ms):")
            print(f"  {'':18} {'n':>6} {'p50':>7} {'p99':>7} {'max':>7}")
            for name, rtts in (("no replay", quiet), ("during replay", busy)):
                p50, p99, top = percentile(rtts, 0.5), percentile(rtts, 0.99), max(rtts, default=float("nan"))
                print(f"  {name:18} {len(rtts):6d} {p50:7.2f} {p99:7.2f} {top:7.2f}")
            print(f"  p99 ratio during/without: {percentile(busy, 0.99) / percentile(quiet, 0.99):.2f}")
            print(f"broker CPU per phase: {cpu1 - cpu0:.2f} s without, {cpu2 - cpu1:.2f} s during the "
                  f"replay; the tap's {tap_cpu:.2f} s (same cores)")
            print(f"replay: {written} records written in {took:.1f} s ({written / took:.0f}/s)")
            peer.close()
        finally:
            for proc in (tap, broker):
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
