"""The real interactive terminal client (prompt_toolkit), driven in tmux.

Each test gets a private tmux server (its own socket, no user config, a fixed
100x30 pane) running `client.py` against the test's broker. Keys go in with
`send-keys`, the screen comes out with `capture-pane`; every wait polls the
screen for an observable state with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CLOCK, ROOT, Chat, Proc

pytestmark = pytest.mark.timeout(60)

TMUX = shutil.which("tmux")
WIDTH, HEIGHT = 100, 30
PROMPT = "#lobby>"
SGR = re.compile(r"\x1b\[([0-9;]*)m")


def last_line(lines: list[str]) -> str:
    return next((line for line in reversed(lines) if line), "")


class Tmux:
    """A private tmux server with one detached session running one command."""

    def __init__(self, tmp: Path) -> None:
        assert TMUX is not None
        self.socket = f"zchat-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.conf = tmp / "tmux.conf"
        # remain-on-exit: the pane stays (dead) when the client exits, so we
        # can read its last screen and its exit status.
        self.conf.write_text("set -g remain-on-exit on\n"
                             "set -g status off\n"
                             "set -g history-limit 5000\n"
                             "set -sg escape-time 0\n")
        self.target = "zchat"
        self.pane_pid: int | None = None
        self.socket_path: Path | None = None

    def tmux(self, *args: str, check: bool = True) -> str:
        assert TMUX is not None
        done = subprocess.run([TMUX, "-L", self.socket, "-f", str(self.conf), *args],
                              capture_output=True, text=True, timeout=10)
        if check and done.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def start(self, command: str) -> None:
        self.tmux("new-session", "-d", "-s", self.target, "-x", str(WIDTH), "-y", str(HEIGHT), command)
        pid, path = self.tmux("display-message", "-p", "-t", self.target,
                              "#{pane_pid} #{socket_path}").strip().split(" ", 1)
        self.pane_pid, self.socket_path = int(pid), Path(path)

    def type(self, text: str) -> None:
        """Type literal text (no Enter)."""
        self.tmux("send-keys", "-t", self.target, "-l", text)

    def key(self, *keys: str) -> None:
        """Press named keys: Enter, C-d, C-c..."""
        self.tmux("send-keys", "-t", self.target, *keys)

    def screen(self, history: bool = False) -> list[str]:
        """The pane's text lines (wrapped lines joined, right-stripped), scrollback too if asked.

        Lines drawn in reverse video (prompt_toolkit's bottom toolbar) are left
        out: they are the status bar, not part of the conversation or the input.
        """
        args = ["capture-pane", "-p", "-e", "-J", "-t", self.target]
        if history:
            args += ["-S", "-"]
        lines = []
        for raw in self.tmux(*args).split("\n"):
            if any("7" in sgr.split(";") for sgr in SGR.findall(raw)):
                continue
            lines.append(SGR.sub("", raw).rstrip())
        return lines

    def last_line(self) -> str:
        """The last non-empty line: where the input line must be."""
        return last_line(self.screen())

    def wait_until(self, check: Callable[[list[str]], bool], what: str, timeout: float = 10.0) -> list[str]:
        """Poll the screen every 50 ms until `check(lines)` holds; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if check(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"tmux screen: no {what} within {timeout} s; screen:\n"
                                     + "\n".join(lines))
            time.sleep(0.05)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> str:
        """The first screen line matching `pattern`."""
        regex = re.compile(pattern)
        lines = self.wait_until(lambda ls: any(regex.search(line) for line in ls),
                                f"line matching {pattern!r}", timeout)
        return next(line for line in lines if regex.search(line))

    def wait_last_line(self, expected: str, timeout: float = 10.0) -> None:
        """Wait until the last non-empty screen line is exactly `expected` (right-stripped)."""
        want = expected.rstrip()
        self.wait_until(lambda ls: last_line(ls) == want, f"last line {want!r}", timeout)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the pane's process to end; its exit status.

        tmux marks the pane dead when the pty closes and fills in the status
        once it has reaped the process: wait for the status itself.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.tmux("display-message", "-p", "-t", self.target,
                               "#{pane_dead}:#{pane_dead_status}").strip()
            dead, _, code = status.partition(":")
            if dead == "1" and code:
                return int(code)
            if time.monotonic() > deadline:
                raise AssertionError(f"client still running after {timeout} s ({status!r}); screen:\n"
                                     + "\n".join(self.screen()))
            time.sleep(0.05)

    def kill(self) -> None:
        self.tmux("kill-server", check=False)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        pid = self.pane_pid
        if pid is None:
            return
        # kill-server hangs up the pane; make sure the client really went away.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if TMUX is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.kill()


def client_command(chat: Chat, name: str | None = None) -> str:
    """The shell command a user would type to run the interactive client."""
    args = [sys.executable, "client.py", "--port", str(chat.port), "--pub-port", str(chat.pub_port),
            "--config-dir", str(chat.config_dir)]
    if name is not None:
        args += ["--name", name]
    root = shlex.quote(str(ROOT))
    # exec: the pane's pid is the client's, so teardown can check it is gone.
    return (f"cd {root} && exec env PYTHONPATH={root} NO_COLOR=1 "
            + " ".join(shlex.quote(a) for a in args))


def join_in_tmux(chat: Chat, tmux: Tmux, name: str) -> None:
    """Start the interactive client as `name` and wait for its empty prompt."""
    tmux.start(client_command(chat, name))
    try:
        tmux.wait_for(rf"^{CLOCK} \* Welcome, {re.escape(name)}!", timeout=15)
    except AssertionError as exc:
        broker = chat.broker.lines[-20:] if chat.broker else []
        raise AssertionError(f"{exc}\nbroker said:\n" + "\n".join(broker)) from None
    tmux.wait_last_line(PROMPT)


def start_tap(chat: Chat) -> Proc:
    """A tap (a JSON line per public event), returned once it is live: it has seen a heartbeat."""
    tap = Proc(["-m", "zchat", "tap", "--heartbeats", "--port", str(chat.port),
                "--pub-port", str(chat.pub_port), "--config-dir", str(chat.config_dir)],
               env=chat.env, stdin=False)
    chat.procs.append(tap)
    tap.wait_for(r'"type":"heartbeat"', timeout=10)
    return tap


def left_event(tap: Proc, name: str) -> dict:
    line = tap.wait_for(rf'"type":"left".*"name":"{re.escape(name)}"', timeout=5)
    return json.loads(line)["event"]


def test_asks_for_the_name_then_welcomes_and_prompts(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    tmux.start(client_command(chat))
    tmux.wait_last_line("Enter your name:")
    tmux.type("newbie")
    tmux.key("Enter")
    tmux.wait_for(rf"^{CLOCK} \* Welcome, newbie! nobody else is online yet\. Type /help for commands\.$",
                  timeout=15)
    tmux.wait_last_line(PROMPT)


def test_input_line_survives_incoming_messages_and_is_sent_intact(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")
    spammer = chat.joined_client("spammer")
    tmux.wait_for(rf"^{CLOCK} - spammer has joined the chat\.$")

    tmux.type("half a line")
    tmux.wait_last_line(f"{PROMPT} half a line")
    for i in range(30):
        spammer.send(f"spam {i}")
    spammer.wait_for(rf"^{CLOCK} spammer: spam 29$")
    tmux.wait_for(rf"^{CLOCK} spammer: spam 29$")
    # patch_stdout redraws the prompt below each printed line: once the last
    # message is shown, the prompt with the half-typed text is back at the bottom.
    tmux.wait_last_line(f"{PROMPT} half a line", timeout=5)

    # Nothing garbled on the way: the screen shows exactly the messages the
    # broker published (the spammer's own echo), each as one clean line, in
    # order, and no stale copy of the prompt or the half line is left behind.
    published = [line.split(": ", 1)[1] for line in spammer.lines
                 if re.fullmatch(rf"{CLOCK} spammer: spam \d+", line)]
    assert published[-1] == "spam 29"
    history = [line for line in tmux.screen(history=True) if line]
    spam_lines = [line for line in history if re.search(r"\bspam \d", line)]
    assert [line.split(": ", 1)[-1] for line in spam_lines] == published, history
    for line in spam_lines:
        assert re.fullmatch(rf"{CLOCK} spammer: spam \d+", line), history
    assert [line for line in history if PROMPT in line or "half a line" in line] == \
        [f"{PROMPT} half a line"], history

    tmux.type(" and the rest")
    tmux.key("Enter")
    spammer.wait_for(rf"^{CLOCK} typist: half a line and the rest$")
    tmux.wait_for(rf"^{CLOCK} typist: half a line and the rest$")
    tmux.wait_last_line(PROMPT)
    assert spammer.count(r"typist:") == 1


def test_help_lists_commands_and_quit_leaves_with_a_message(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")
    watcher = chat.joined_client("watcher")
    tmux.wait_for(rf"^{CLOCK} - watcher has joined the chat\.$")

    tmux.type("/help")
    tmux.key("Enter")
    tmux.wait_for(r"^Commands:$")
    tmux.wait_for(r"(?i)^\s+/quit \[message\]\s+leave the chat")
    tmux.wait_for(r"(?i)^\s+/help\b")
    tmux.wait_last_line(PROMPT)
    assert watcher.count(r"typist: /help") == 0  # a command is not said to the room

    tmux.type("/quit bye now")
    tmux.key("Enter")
    assert tmux.wait_exit(10) == 0
    watcher.wait_for(rf"^{CLOCK} - typist has left the chat\. \(bye now\)$", timeout=5)
    assert watcher.count(r"typist: /quit") == 0


@pytest.mark.parametrize("key", ["C-d", "C-c"])
def test_ctrl_key_on_empty_line_leaves_cleanly(chat: Chat, tmux: Tmux, key: str) -> None:
    chat.start_broker()
    tap = start_tap(chat)
    watcher = chat.joined_client("watcher")
    join_in_tmux(chat, tmux, "typist")
    watcher.wait_for(rf"^{CLOCK} - typist has joined the chat\.$")

    pressed = time.monotonic()
    tmux.key(key)
    watcher.wait_for(rf"^{CLOCK} - typist has left the chat\.$", timeout=2.0)
    assert time.monotonic() - pressed < 2.0
    # A real leave sent by the client, not the broker noticing a dropped connection.
    assert left_event(tap, "typist")["reason"] == "quit"
    assert tmux.wait_exit(5) == 0
