"""Keystroke-to-echo of the interactive client while many rooms are busy (issue 15: 20 rooms x
100 events/s arriving while typing, the input line never lags).

The real broker (rate limit off) and the real interactive client in a pseudo-terminal
(100x30, NO_COLOR). The client joins ROOMS rooms; the last one joined is on screen, the
others fill their buffers. A raw member (bench.Member) sends RATE messages/s to each room,
open loop. Meanwhile one key is "typed" every INTERVAL: a character never typed before (a
CJK ideograph: the flood's text is ASCII), timed from the write to the pty until its bytes
come back in the terminal output. The same typing runs first with no load, in the same run,
so the ratio is the cost of the load. Ctrl-U empties the input line every 20 keys.

    python benchmarks/tui_latency.py [--rooms 20] [--rate 100] [--seconds 8] [--interval 0.05]

It needs a few tens of seconds; it is not part of the tests.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import pty
import select
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import zmq  # noqa: E402

ROOT = bench.ROOT
ROWS, COLS = 30, 100
CPR_QUERY = b"\x1b[6n"  # prompt_toolkit asks where the cursor is: answered as a terminal would


class Terminal:
    """The client on a pty; a thread drains its output (as a fast terminal would) and keeps it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                     start_new_session=True)
        os.close(slave)
        self.fd = master
        self.out = bytearray()
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.5)
                data = os.read(self.fd, 65536) if ready else b""
            except OSError:
                break
            if ready and not data:
                break
            if CPR_QUERY in data:
                os.write(self.fd, f"\x1b[{ROWS};1R".encode())
            with self.cond:
                self.out += data
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def mark(self) -> int:
        with self.cond:
            return len(self.out)

    def wait_for(self, needle: bytes, start: int = 0, timeout: float = 15.0) -> float:
        """When `needle` appeared in the output after offset `start` (monotonic seconds)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while needle not in self.out[start:]:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    tail = bytes(self.out[-600:]).decode(errors="replace")
                    raise TimeoutError(f"no {needle!r} in the client's output; its tail:\n{tail}")
                self.cond.wait(left)
            return time.monotonic()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.fd)


def loader(svc: dict, rooms: list[str], rate: float, go, stop, results) -> None:  # type: ignore[no-untyped-def]
    """Raw members (10 rooms each: a join names at most 16), sending `rate` messages/s to each
    room, open loop."""
    ctx = zmq.Context()
    chunks = [rooms[i:i + 10] for i in range(0, len(rooms), 10)]
    specs = [(f"loader{i}", chunk, ()) for i, chunk in enumerate(chunks)]
    members, _, failed = bench.join_members(ctx, svc, specs, timeout=30)  # type: ignore[arg-type]
    for member, chunk in zip(members, chunks, strict=True):
        for room in chunk:  # send-only: no echo
            member.sub.unsubscribe(f"r/{room}/".encode())
    results.put({"joined": not failed})
    while not go.wait(0.5):  # pinging meanwhile, or the broker times the members out
        for member in members:
            member.ping()
    sends = [(member.push, bench.say_prefix(room), rooms.index(room))
             for member, chunk in zip(members, chunks, strict=True) for room in chunk]
    interval = 1.0 / rate
    start = time.monotonic()
    sent, n, next_ping = 0, 0, 0.0
    while not stop.is_set():
        now = time.monotonic()
        due = start + n * interval
        if now < due:
            time.sleep(min(due - now, 0.01))
            continue
        if now - due > 0.05:  # far behind: drop the missed slots rather than burst
            n = int((now - start) / interval)
        for push, prefix, i in sends:
            push.send(prefix + b"load %d in %d" % (n, i) + b'"}')
        sent += len(sends)
        n += 1
        if now >= next_ping:
            for member in members:
                member.ping()
            next_ping = now + 0.5
    results.put({"sent": sent, "seconds": time.monotonic() - start, "last": n - 1})
    for member in members:
        member.close()
    ctx.term()


def typing(term: Terminal, seconds: float, interval: float, first: int) -> tuple[list[float], int]:
    """Type new characters for `seconds`; each one's keystroke-to-echo, in ms."""
    samples: list[float] = []
    code = first
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        char = chr(code).encode()
        code += 1
        start = term.mark()
        t0 = time.monotonic()
        term.write(char)
        samples.append((term.wait_for(char, start, timeout=10) - t0) * 1000)
        if len(samples) % 20 == 0:
            term.write(b"\x15")  # Ctrl-U: empty the input line
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    term.write(b"\x15")
    return samples, code


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second per room")
    parser.add_argument("--seconds", type=float, default=8.0, help="typing time of each phase")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between keys")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tui-latency-"))
    svc = bench.Service("zchat", work, ["--rate-per-second", "0"])
    info = {"input": svc.input, "publish": svc.publish, "key": svc.server_key}
    rooms = [f"r{i:02d}" for i in range(1, args.rooms + 1)]
    env = dict(os.environ, NO_COLOR="1", TERM="xterm-256color", PYTHONPATH=str(ROOT))
    term = Terminal([sys.executable, "-m", "zchat", "client", "--port", str(svc.port), "--pub-port",
                     str(svc.pub_port), "--config-dir", str(svc.dir), "--name", "typist"], env)
    procs = []
    try:
        term.wait_for(b"Welcome, typist")
        for room in rooms:
            mark = term.mark()
            term.write(f"/join {room}\r".encode())
            term.wait_for(f"typist has joined #{room}.".encode(), mark)
        results: mp.Queue = mp.Queue()
        go, stop = mp.Event(), mp.Event()
        proc = mp.Process(target=loader, args=(info, rooms, args.rate, go, stop, results), daemon=True)
        proc.start()
        procs.append(proc)
        if not results.get(timeout=40)["joined"]:
            raise RuntimeError("the loader could not join")
        idle, code = typing(term, args.seconds, args.interval, 0x4E00)
        go.set()
        time.sleep(1.0)  # the flood is on
        loaded, code = typing(term, args.seconds, args.interval, code)
        stop.set()
        sent = results.get(timeout=30)
        # The last message of the room on screen shows up: the client kept up with the flood.
        last = f"load {sent['last']} in {len(rooms) - 1}".encode()
        t_stop = time.monotonic()
        shown_after = term.wait_for(last, 0, timeout=60) - t_stop
    finally:
        if os.environ.get("TUI_LATENCY_DUMP"):
            Path(os.environ["TUI_LATENCY_DUMP"]).write_bytes(bytes(term.out))
        term.close()
        for proc in procs:
            proc.kill()
        svc.stop()
    rate = sent["sent"] / sent["seconds"]
    shown = term.out.count(b"typist") and bytes(term.out).count(f" in {len(rooms) - 1}".encode())
    print(f"# {len(rooms)} rooms, offered {args.rate:g} msg/s each; sent {rate:.0f} msg/s in total "
          f"for {sent['seconds']:.1f} s; the current room's last line drawn {shown_after * 1000:.0f} ms "
          "after the load stopped")
    print(f"# lines of the room on screen written to the terminal: {shown} "
          f"(of {sent['sent'] // len(rooms)} sent to it)")
    print(f"{'keystroke-to-echo (ms)':24} {'n':>4} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
    rows = {"idle": summary(idle), "loaded": summary(loaded)}
    columns = ("p50", "p90", "p99", "max")
    for name, row in rows.items():
        print(f"{name:24} {row['n']:4.0f} " + " ".join(f"{row[k]:7.2f}" for k in columns))
    ratio = {key: rows["loaded"][key] / rows["idle"][key] for key in columns}
    print(f"{'loaded / idle':24} {'':4} " + " ".join(f"{ratio[k]:7.2f}" for k in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
