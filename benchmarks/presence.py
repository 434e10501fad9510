"""How fast presence follows reality: join time, crash (kill -9) and hang (SIGSTOP) to "left".

    python benchmarks/presence.py [--rounds N]

Starts a real broker and, per round, a real client process; an observer (the
client library) records when the client's join and leave notices arrive.
Prints median/max for: process start -> welcome (the client's own view, read
from its output), kill -9 -> left notice, SIGSTOP -> left notice.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zchat import keys  # noqa: E402
from zchat.client import ChatClient, ClientSettings  # noqa: E402
from zchat.endpoints import Endpoints  # noqa: E402
from zchat.protocol import Joined, Left  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(proc: subprocess.Popen, needle: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return time.monotonic()
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"{needle!r} not seen")


def wait_event(events: queue.Queue, kind: type, name: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            break
        if isinstance(event, kind) and event.name == name:
            return time.monotonic()
    raise RuntimeError(f"no {kind.__name__} for {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    config = Path(tempfile.mkdtemp())
    port, pub = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    common = ["--port", str(port), "--pub-port", str(pub), "--config-dir", str(config)]
    broker = subprocess.Popen([sys.executable, "-u", "broker.py", *common, "--log-level", "WARNING"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    observer = None
    try:
        wait_line(broker, "Server started", 15)
        pair = keys.load_or_create(keys.client_keys_dir(config), "observer")
        server_key = keys.load_public(keys.broker_public_key_path(config))
        observer = ChatClient(ClientSettings(Endpoints(port=port, pub_port=pub), server_key, pair))
        observer.start()
        observer.join("observer")
        joins, crashes, hangs = [], [], []
        for i in range(args.rounds):
            for how in ("kill", "stop"):
                name = f"p{i}{how}"
                started = time.monotonic()
                client = subprocess.Popen([sys.executable, "-u", "client.py", *common, "--name", name],
                                          cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True)
                try:
                    welcomed = wait_line(client, "* Welcome", 15)
                    joins.append(welcomed - started)
                    wait_event(observer.events, Joined, name, 10)
                    hit = time.monotonic()
                    client.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                    seen = wait_event(observer.events, Left, name, 15)
                    (crashes if how == "kill" else hangs).append(seen - hit)
                finally:
                    client.send_signal(signal.SIGKILL)
                    client.wait(5)

        def line(label: str, values: list[float]) -> str:
            return (f"{label:34s} median {statistics.median(values) * 1000:7.0f} ms   "
                    f"max {max(values) * 1000:7.0f} ms   (n={len(values)})")

        print(line("client start -> welcome shown", joins))
        print(line("kill -9 -> left notice", crashes))
        print(line("SIGSTOP -> left notice", hangs))
        return 0
    finally:
        if observer is not None:
            observer.close()
        broker.terminate()
        broker.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
