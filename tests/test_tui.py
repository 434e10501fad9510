"""The real interactive terminal client (prompt_toolkit), driven in tmux.

Each test gets a private tmux server (its own socket, no user config, a fixed
100x30 pane) running `client.py` against the test's broker. Keys go in with
`send-keys`, the screen comes out with `capture-pane`; every wait polls the
screen for an observable state with a deadline.
"""

from __future__ import annotations

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
from conftest import CLOCK, ROOT, Chat
from peers import RawPeer, broker_key

from zchat.protocol import Heartbeat, Left

pytestmark = pytest.mark.timeout(60)

TMUX = shutil.which("tmux")
WIDTH, HEIGHT = 100, 30
PROMPT = "#lobby>"
EXITED = "[client exited with status"
SGR = re.compile(r"\x1b\[([0-9;]*)m")


def last_line(lines: list[str]) -> str:
    return next((line for line in reversed(lines) if line), "")


def reverse_video(raw: str) -> bool:
    """Does this captured line (capture-pane -e) switch on reverse video (SGR 7)?"""
    for sgr in SGR.findall(raw):
        params = [int(p) if p.isdigit() else 0 for p in sgr.split(";")]
        i = 0
        while i < len(params):
            if params[i] in (38, 48, 58):  # extended colours: skip their arguments
                i += 3 if params[i + 1:i + 2] == [5] else 5
                continue
            if params[i] == 7:
                return True
            i += 1
    return False


def alive(pid: int) -> bool:
    """Is `pid` running (a zombie is not: it has exited, only its parent has not reaped it)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Tmux:
    """A private tmux server with one detached session running one command."""

    def __init__(self, tmp: Path) -> None:
        assert TMUX is not None
        self.socket = f"zchat-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.conf = tmp / "tmux.conf"
        # remain-on-exit: the pane stays (dead) when its shell exits, so we
        # can still read the last screen.
        self.conf.write_text("set -g default-shell /bin/sh\n"
                             "set -g remain-on-exit on\n"
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
            if reverse_video(raw):
                continue
            lines.append(SGR.sub("", raw).rstrip())
        return lines

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
        """Wait for the client to end; its exit status, as the pane's shell reports it.

        Not tmux's #{pane_dead_status}: a tmux built with utempter can miss the
        SIGCHLD and never reap the pane's process (tmux/tmux#311, #4559).
        """
        line = self.wait_for(rf"^{re.escape(EXITED)} \d+\]$", timeout)
        return int(line[len(EXITED):].strip(" ]"))

    def _processes(self) -> list[int]:
        """The pane's process and all its descendants (Linux /proc; else just the pane's)."""
        if self.pane_pid is None:
            return []
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = [], [self.pane_pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def kill(self) -> None:
        """Stop the server; make sure the client it ran is really gone."""
        pids = self._processes()
        self.tmux("kill-server", check=False)  # hangs up the pane's processes
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        deadline = time.monotonic() + 5
        for pid in pids:
            while alive(pid):
                if time.monotonic() > deadline:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    break
                time.sleep(0.05)


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
    # The shell reaps the client and shows its exit status, like a user's shell.
    return (f"cd {root} && env PYTHONPATH={root} NO_COLOR=1 "
            + " ".join(shlex.quote(a) for a in args) + f'; echo "{EXITED} $?]"')


def join_in_tmux(chat: Chat, tmux: Tmux, name: str) -> None:
    """Start the interactive client as `name` and wait for its empty prompt."""
    tmux.start(client_command(chat, name))
    try:
        tmux.wait_for(rf"^{CLOCK} \* Welcome, {re.escape(name)}!", timeout=15)
    except AssertionError as exc:
        broker = chat.broker.lines[-20:] if chat.broker else []
        raise AssertionError(f"{exc}\nbroker said:\n" + "\n".join(broker)) from None
    tmux.wait_last_line(PROMPT)


@pytest.fixture
def spy(chat: Chat) -> Iterator[RawPeer]:
    """A CURVE SUB on every room and the system topic, live (it has seen a heartbeat)."""
    chat.start_broker()
    peer = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [b"r/", b"sys/"])
    try:
        peer.wait_for(lambda topic, event: isinstance(event, Heartbeat), timeout=10)
        yield peer
    finally:
        peer.close()


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

    # Nothing garbled on the way: the screen (scrollback included) shows exactly
    # the messages the broker published (the spammer's own echo: all 30), each
    # as one clean line, in order, and no stale copy of the prompt or of the
    # half line is left behind.
    published = [line.split(": ", 1)[1] for line in spammer.lines
                 if re.fullmatch(rf"{CLOCK} spammer: spam \d+", line)]
    assert published == [f"spam {i}" for i in range(30)], spammer.lines
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
def test_ctrl_key_on_empty_line_leaves_cleanly(chat: Chat, spy: RawPeer, tmux: Tmux, key: str) -> None:
    watcher = chat.joined_client("watcher")
    join_in_tmux(chat, tmux, "typist")
    watcher.wait_for(rf"^{CLOCK} - typist has joined the chat\.$")

    pressed = time.monotonic()
    tmux.key(key)
    watcher.wait_for(rf"^{CLOCK} - typist has left the chat\.$", timeout=2.0)
    assert time.monotonic() - pressed < 2.0
    # A real leave sent by the client, not the broker noticing a dropped connection.
    _, left = spy.wait_for(lambda topic, event: isinstance(event, Left) and event.name == "typist",
                           timeout=5)
    assert left.reason == "quit"
    assert tmux.wait_exit(5) == 0
