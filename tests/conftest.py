"""Shared fixtures: real broker and client processes on loopback with CURVE.

Every wait here is for an observable event (a line on a pipe, a file, a
socket message) with a deadline; every process started is stopped at
teardown.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zchat import keys

ROOT = Path(__file__).resolve().parent.parent
CLOCK = r"\[\d\d:\d\d:\d\d\]"
# Python source that runs `zchat client ARGS...` with a bug planted in its I/O thread: handling
# a message whose text is "boom" raises ValueError("handling went wrong").
FRAGILE_CLIENT = ("import sys\n"
                  "import zchat.client as c\n"
                  "from zchat.protocol import Message\n"
                  "decode = c.ChatClient.decode\n"
                  "def fragile(self, data):\n"
                  "    found = decode(self, data)\n"
                  "    if found and isinstance(found[1], Message) and found[1].text == 'boom':\n"
                  "        raise ValueError('handling went wrong')\n"
                  "    return found\n"
                  "c.ChatClient.decode = fragile\n"
                  "from zchat.cli import main\n"
                  "sys.exit(main(['client', *sys.argv[1:]]))\n")


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where outgoing
    connections of other tests cannot grab it between our check and the bind."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Proc:
    """A child process whose stdout lines are collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, stdin: bool = True,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-u", *args], cwd=ROOT, env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=preexec_fn)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first line (from index `start`) matching `pattern`; fail after `timeout`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            scanned = start
            while True:
                for line in self.lines[scanned:]:  # only lines not looked at yet
                    if regex.search(line):
                        return line
                scanned = max(scanned, len(self.lines))
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout} s from {self.args[:2]}; "
                        f"got:\n" + "\n".join(self.lines[-30:]))
                self._cond.wait(min(left, 0.5))

    def tail(self, count: int) -> list[str]:
        with self._cond:
            return self.lines[-count:]

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class Chat:
    """One test's chat: a config dir, two ports, a broker and its clients."""

    def __init__(self, tmp: Path) -> None:
        self.config_dir = tmp / "config"
        self.port = free_port()
        self.pub_port = free_port()
        self.procs: list[Proc] = []
        self.broker: Proc | None = None
        # The developer's own ZCHAT_* settings must not reach the processes under test.
        clean = {key: value for key, value in os.environ.items() if not key.startswith("ZCHAT_")}
        self.env = {**clean, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}

    def endpoint_args(self) -> list[str]:
        return ["--port", str(self.port), "--pub-port", str(self.pub_port),
                "--config-dir", str(self.config_dir)]

    def start_broker(self, *extra: str, preexec_fn: Callable[[], None] | None = None) -> Proc:
        """`preexec_fn` runs in the broker's process before it starts (e.g. a lower fd limit)."""
        broker = Proc(["broker.py", *self.endpoint_args(), *extra], env=self.env, stdin=False,
                      preexec_fn=preexec_fn)
        self.procs.append(broker)
        broker.wait_for("Server started, waiting for clients|cannot bind", timeout=15)
        if broker.count("cannot bind") and self.broker is None:
            # Someone took a port between our check and the bind: pick new ones, once.
            self.port, self.pub_port = free_port(), free_port()
            broker = Proc(["broker.py", *self.endpoint_args(), *extra], env=self.env, stdin=False,
                          preexec_fn=preexec_fn)
            self.procs.append(broker)
        broker.wait_for("Server started, waiting for clients", timeout=15)
        broker.wait_for(r"clients on other machines", timeout=5)
        self.broker = broker
        return broker

    def client(self, name: str | None, *extra: str, config_dir: Path | None = None) -> Proc:
        args = ["client.py", "--port", str(self.port), "--pub-port", str(self.pub_port),
                "--config-dir", str(config_dir or self.config_dir), *extra]
        if name is not None:
            args += ["--name", name]
        proc = Proc(args, env=self.env)
        self.procs.append(proc)
        return proc

    def client_key(self, name: str) -> keys.KeyPair:
        """The key the client started with `--name NAME` picks (made now if it has none yet)."""
        return keys.load_or_create(keys.client_keys_dir(self.config_dir), keys.client_key_file_name(name))

    def joined_client(self, name: str, *extra: str) -> Proc:
        proc = self.client(name, *extra)
        proc.wait_for(rf"{CLOCK} \* Welcome, {re.escape(name)}!", timeout=15)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def chat(tmp_path: Path) -> Iterator[Chat]:
    c = Chat(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed end-to-end test shows the broker's last log lines: a CI run's only clue to
    what the broker saw (its log is otherwise dropped with the test)."""
    outcome = yield
    report = outcome.get_result()
    chat = getattr(item, "funcargs", {}).get("chat")
    if report.failed and isinstance(chat, Chat):
        for number, proc in enumerate(p for p in chat.procs if p.args and p.args[0] == "broker.py"):
            tail = proc.tail(60)
            report.sections.append((f"broker {number} log (last {len(tail)} lines)", "\n".join(tail)))
