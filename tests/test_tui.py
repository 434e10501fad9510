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
from conftest import CLOCK, FRAGILE_CLIENT, ROOT, Chat
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
    # The list is taller than the pane: its head is in the scrollback.
    tmux.wait_until(lambda _: "Commands:" in tmux.screen(history=True), "the head of /help")
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


# --- Issue 3's terminal UI: completion, history, colours and the bell, a burst, the status line ---
#
# `Tmux.screen()` leaves out reverse-video lines (the toolbar), and with colours
# on a mention is drawn in reverse video too; so these tests also read the pane
# with its attributes: `capture-pane -e` writes only the SGR changes from one
# cell to the next, carried from line to line, so the whole capture is replayed
# through a small SGR interpreter.

CSI = re.compile(r"\x1b\[([0-9;:?]*)([@-~])")


class Painted:
    """One captured line: its text and, for each character, (bold, reverse, foreground)."""

    def __init__(self, text: str, looks: list[tuple[bool, bool, str | None]]) -> None:
        self.text, self.looks = text, looks

    def plain(self) -> str:
        return self.text.rstrip()

    def looks_of(self, part: str) -> list[tuple[bool, bool, str | None]]:
        """The look of each character of the first occurrence of `part`."""
        start = self.text.index(part)
        return self.looks[start:start + len(part)]

    def reversed_chars(self) -> str:
        return "".join(ch for ch, (_, rev, _) in zip(self.text, self.looks, strict=True) if rev)

    def all_reversed(self) -> bool:
        """Every visible character of the line is in reverse video."""
        visible = [rev for ch, (_, rev, _) in zip(self.text, self.looks, strict=True) if ch != " "]
        return bool(visible) and all(visible)

    def __repr__(self) -> str:
        return f"Painted({self.text.rstrip()!r}, reversed={self.reversed_chars().strip()!r})"


def paint(capture: str) -> list[Painted]:
    """Replay `capture-pane -e` output: each line's text with each character's look."""
    bold, rev, fg = False, False, None
    painted = []
    for raw in capture.split("\n"):
        text, looks, pos = [], [], 0
        for match in CSI.finditer(raw):
            for ch in raw[pos:match.start()]:
                text.append(ch)
                looks.append((bold, rev, fg))
            pos = match.end()
            if match.group(2) != "m":
                continue  # not SGR: nothing to do with looks
            params = [int(p) if p.isdigit() else 0 for p in match.group(1).replace(":", ";").split(";")]
            i = 0
            while i < len(params):
                p = params[i]
                if p == 0:
                    bold, rev, fg = False, False, None
                elif p == 1:
                    bold = True
                elif p == 22:
                    bold = False
                elif p == 7:
                    rev = True
                elif p == 27:
                    rev = False
                elif 30 <= p <= 37 or 90 <= p <= 97:
                    fg = str(p)
                elif p == 39:
                    fg = None
                elif p in (38, 48, 58):
                    n = 3 if params[i + 1:i + 2] == [5] else 5
                    if p == 38:
                        fg = ";".join(str(x) for x in params[i:i + n])
                    i += n
                    continue
                i += 1
        for ch in raw[pos:]:
            text.append(ch)
            looks.append((bold, rev, fg))
        painted.append(Painted("".join(text), looks))
    return painted


def painted_screen(tmux: Tmux, history: bool = False) -> list[Painted]:
    """The pane (scrollback too if asked) with every character's look."""
    args = ["capture-pane", "-p", "-e", "-J", "-t", tmux.target]
    if history:
        args += ["-S", "-"]
    return paint(tmux.tmux(*args))


def wait_painted(tmux: Tmux, check: Callable[[list[Painted]], object], what: str,
                 timeout: float = 10.0) -> object:
    """Poll the painted screen until `check` returns something true; that result."""
    deadline = time.monotonic() + timeout
    while True:
        lines = painted_screen(tmux)
        found = check(lines)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"tmux screen: no {what} within {timeout} s; screen:\n"
                                 + "\n".join(repr(line) for line in lines))
        time.sleep(0.05)


def toolbar(lines: list[Painted]) -> str | None:
    """The bottom toolbar (status line): the last non-empty line, all in reverse video."""
    shown = [line for line in lines if line.plain()]
    if shown and shown[-1].all_reversed():
        return shown[-1].plain().strip()
    return None


def wait_status(tmux: Tmux, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    regex = re.compile(pattern)

    def check(lines: list[Painted]) -> re.Match[str] | None:
        status = toolbar(lines)
        return regex.fullmatch(status) if status is not None else None

    found = wait_painted(tmux, check, f"status line matching {pattern!r}", timeout)
    assert isinstance(found, re.Match)
    return found


def wait_painted_line(tmux: Tmux, pattern: str, timeout: float = 10.0) -> Painted:
    """The first screen line matching `pattern`, whatever its look (reverse video included)."""
    regex = re.compile(pattern)

    def check(lines: list[Painted]) -> Painted | None:
        return next((line for line in lines if regex.search(line.plain())), None)

    found = wait_painted(tmux, check, f"line matching {pattern!r}", timeout)
    assert isinstance(found, Painted)
    return found


def colour_client_command(chat: Chat, name: str) -> str:
    """`client_command` with colours left on: NO_COLOR taken out of the environment."""
    command = client_command(chat, name)
    assert " NO_COLOR=1 " in command and "env PYTHONPATH=" in command, command
    command = command.replace(" NO_COLOR=1 ", " ", 1)
    return command.replace("env PYTHONPATH=", "env -u NO_COLOR PYTHONPATH=", 1)


def ring_bells(tmux: Tmux) -> None:
    """Have tmux note a bell in the (detached) window: #{window_bell_flag} becomes 1."""
    with tmux.conf.open("a") as conf:
        conf.write("set -g monitor-bell on\nset -g bell-action any\n")


def bell_rang(tmux: Tmux) -> bool:
    return tmux.tmux("display-message", "-p", "-t", tmux.target, "#{window_bell_flag}").strip() == "1"


def wait_bell(tmux: Tmux, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not bell_rang(tmux):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def clear_input(tmux: Tmux) -> None:
    tmux.key("C-u")  # emacs unix-line-discard: the input line is empty again
    tmux.wait_last_line(PROMPT)


def test_tab_completes_commands_names_and_rooms(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")

    # A command.
    tmux.type("/jo")
    tmux.wait_last_line(f"{PROMPT} /jo")
    tmux.key("Tab")
    tmux.wait_last_line(f"{PROMPT} /join")
    clear_input(tmux)

    # A name: someone else online.
    bobby = chat.joined_client("bobby")
    tmux.wait_for(rf"^{CLOCK} - bobby has joined the chat\.$")
    tmux.type("hello bo")
    tmux.wait_last_line(f"{PROMPT} hello bo")
    tmux.key("Tab")
    tmux.wait_last_line(f"{PROMPT} hello bobby")
    tmux.key("Enter")
    bobby.wait_for(rf"^{CLOCK} typist: hello bobby$")
    tmux.wait_last_line(PROMPT)

    # A room: bobby opens #games; typist hears of it with /rooms.
    bobby.send("/join games")
    bobby.wait_for(rf"^{CLOCK} - bobby has joined #games\.$")
    tmux.type("/rooms")
    tmux.key("Enter")
    tmux.wait_for(rf"^{CLOCK} \* Rooms: .*#games \(1\)")
    tmux.wait_last_line(PROMPT)
    tmux.type("/join #")
    tmux.wait_last_line(f"{PROMPT} /join #")
    tmux.key("Tab")  # two rooms known: a menu of both

    def menu(lines: list[Painted]) -> bool:
        texts = [line.plain().strip() for line in lines]
        return f"{PROMPT} /join #" in texts and "#games" in texts and "#lobby" in texts

    wait_painted(tmux, menu, "a completion menu offering #games and #lobby", timeout=5)
    tmux.key("Tab")  # the first candidate
    tmux.wait_for(rf"^{re.escape(PROMPT)} /join #games$", timeout=5)
    tmux.key("Enter")
    tmux.wait_last_line("#games>")
    bobby.wait_for(rf"^{CLOCK} - typist has joined #games\.$")

    # Unique room prefix, without the '#': completed in one go.
    tmux.type("/leave lob")
    tmux.wait_last_line("#games> /leave lob")
    tmux.key("Tab")
    tmux.wait_last_line("#games> /leave lobby")


def test_up_and_down_walk_the_input_history(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")
    listener = chat.joined_client("listener")
    for text in ("the first line", "the second line"):
        tmux.type(text)
        tmux.key("Enter")
        listener.wait_for(rf"^{CLOCK} typist: {text}$")
        tmux.wait_for(rf"^{CLOCK} typist: {text}$")
        tmux.wait_last_line(PROMPT)

    tmux.key("Up")
    tmux.wait_last_line(f"{PROMPT} the second line", timeout=5)
    tmux.key("Up")
    tmux.wait_last_line(f"{PROMPT} the first line", timeout=5)
    tmux.key("Down")
    tmux.wait_last_line(f"{PROMPT} the second line", timeout=5)
    tmux.key("Down")
    tmux.wait_last_line(PROMPT, timeout=5)

    # A line recalled from history is sent like a typed one (and only when Enter is pressed).
    tmux.key("Up", "Up")
    tmux.wait_last_line(f"{PROMPT} the first line", timeout=5)
    assert listener.count(r"typist: the first line$") == 1
    mark = len(listener.lines)
    tmux.key("Enter")
    listener.wait_for(rf"^{CLOCK} typist: the first line$", start=mark)
    tmux.wait_last_line(PROMPT)
    assert listener.count(r"typist: the first line$") == 2


def test_mention_is_reversed_and_rings_the_bell_and_own_name_is_bold(chat: Chat, tmux: Tmux) -> None:
    from zchat.render import name_color

    chat.start_broker()
    ring_bells(tmux)
    tmux.start(colour_client_command(chat, "typist"))  # colours on: a terminal, no NO_COLOR
    wait_painted_line(tmux, rf"^{CLOCK} \* Welcome, typist!", timeout=15)
    tmux.wait_last_line(PROMPT)
    sayer = chat.joined_client("sayer")
    wait_painted_line(tmux, rf"^{CLOCK} - sayer has joined the chat\.$")

    sayer.send("just talking")
    wait_painted_line(tmux, rf"^{CLOCK} sayer: just talking$")
    tmux.type("my own words")
    tmux.key("Enter")
    wait_painted_line(tmux, rf"^{CLOCK} typist: my own words$")
    tmux.wait_last_line(PROMPT)
    assert not bell_rang(tmux), "the bell rang before anyone mentioned typist"

    sayer.send("hey typist, look")
    mention = rf"^{CLOCK} sayer: hey typist, look$"
    wait_painted_line(tmux, mention)
    # The bell: tmux flags a window whose pane rang it (the session is detached).
    assert wait_bell(tmux, 5), "no bell rang for the mention"
    tmux.wait_last_line(PROMPT)
    # The online count comes with the broker's heartbeats: it may lag sayer's arrival a little.
    wait_status(tmux, r"#lobby \| typist \| connected \| 2 online", timeout=5)

    lines = painted_screen(tmux)
    line = next(line for line in lines if re.search(mention, line.plain()))
    assert line.all_reversed(), line
    status = toolbar(lines)
    assert status is not None and re.fullmatch(r"#lobby \| typist \| connected \| 2 online", status), lines
    for other in lines:
        if other is line or other.plain().strip() == status or not other.plain():
            continue
        assert not other.reversed_chars().strip(), f"{other!r} is in reverse video too:\n{lines}"

    # Own name bold wherever it is shown as a name; others' names not bold; each name in
    # its own stable colour (the same on every line, the one render.name_color gives).
    welcome = [other for other in lines if re.match(rf"{CLOCK} \* Welcome, typist!", other.plain())]
    said = [other for other in lines if re.fullmatch(rf"{CLOCK} typist: my own words", other.plain())]
    own = [other for other in lines if re.match(rf"{CLOCK} (typist: |\* Welcome, typist!|- typist )",
                                                  other.plain())]
    assert len(welcome) == 1 and len(said) == 1 and set(map(id, welcome + said)) <= set(map(id, own)), lines
    for other in own:
        assert all(bold and fg == name_color("typist") for bold, _, fg in other.looks_of("typist")), other
        assert not any(bold for bold, _, _ in other.looks_of(other.plain()[:10])), other  # the clock
    theirs = [other for other in lines if re.search(r"\bsayer\b", other.plain())]
    assert len(theirs) == 3, lines  # joined, just talking, the mention
    for other in theirs:
        assert all(not bold and fg == name_color("sayer") for bold, _, fg in other.looks_of("sayer")), other
    assert name_color("sayer") != name_color("typist")


def test_no_color_means_plain_text_and_no_bell(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    ring_bells(tmux)
    join_in_tmux(chat, tmux, "typist")  # NO_COLOR=1
    sayer = chat.joined_client("sayer")
    tmux.wait_for(rf"^{CLOCK} - sayer has joined the chat\.$")
    sayer.send("hey typist, look")
    wait_painted_line(tmux, rf"^{CLOCK} sayer: hey typist, look$")
    sayer.send("and after it")
    wait_painted_line(tmux, rf"^{CLOCK} sayer: and after it$")
    tmux.wait_last_line(PROMPT)
    lines = painted_screen(tmux)
    status = toolbar(lines)
    for line in lines:
        if line.plain() and line.plain().strip() != status:
            assert all(look == (False, False, None) for look in line.looks), line
    assert not bell_rang(tmux)


@pytest.mark.timeout(120)
def test_input_line_survives_a_burst_of_200_messages(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker("--rate-per-second", "0")  # no flood control: all 200 at once
    join_in_tmux(chat, tmux, "typist")
    spammer = chat.joined_client("spammer")
    tmux.wait_for(rf"^{CLOCK} - spammer has joined the chat\.$")

    partial = "a partial line, typed slowly: 1 < 2 & 3 > 2"
    tmux.type(partial)
    tmux.wait_last_line(f"{PROMPT} {partial}")
    for i in range(200):
        spammer.send(f"burst {i:03d}")
    spammer.wait_for(rf"^{CLOCK} spammer: burst 199$", timeout=30)
    tmux.wait_for(rf"^{CLOCK} spammer: burst 199$", timeout=30)
    tmux.wait_last_line(f"{PROMPT} {partial}", timeout=5)
    assert spammer.count(r"^! ") == 0, spammer.lines  # none refused

    history = [line for line in tmux.screen(history=True) if line]
    burst = [line for line in history if "burst " in line]
    assert [line.split(": ", 1)[-1] for line in burst] == [f"burst {i:03d}" for i in range(200)], history
    for line in burst:
        assert re.fullmatch(rf"{CLOCK} spammer: burst \d\d\d", line), line
    assert [line for line in history if PROMPT in line or "partial" in line] == [f"{PROMPT} {partial}"], \
        history[-40:]

    tmux.type(", finished")
    tmux.wait_last_line(f"{PROMPT} {partial}, finished")
    tmux.key("Enter")
    spammer.wait_for(rf"^{CLOCK} typist: {re.escape(partial)}, finished$")
    tmux.wait_for(rf"^{CLOCK} typist: {re.escape(partial)}, finished$")
    tmux.wait_last_line(PROMPT)
    # Exactly once, and nothing else from typist: a later message through the broker first, so a
    # duplicate sent right after the original has had its chance to arrive.
    spammer.send("after the burst")
    spammer.wait_for(rf"^{CLOCK} spammer: after the burst$")
    assert spammer.count(r"typist:") == 1, spammer.lines
    assert spammer.count(rf"^{CLOCK} typist: {re.escape(partial)}, finished$") == 1


def test_status_line_shows_room_name_connection_and_online_count(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")
    wait_status(tmux, r"#lobby \| typist \| connected \| 1 online", timeout=5)
    watcher = chat.joined_client("watcher")
    wait_status(tmux, r"#lobby \| typist \| connected \| 2 online", timeout=5)

    assert chat.broker is not None
    chat.broker.proc.send_signal(signal.SIGKILL)
    killed = time.time()
    chat.broker.proc.wait(5)
    since = wait_status(tmux, r"#lobby \| typist \| reconnecting since (\d\d:\d\d:\d\d) \| \d+ online",
                        timeout=5.5)
    assert time.time() - killed < 5.5
    allowed = {time.strftime("%H:%M:%S", time.localtime(t))
               for t in range(int(killed) - 1, int(time.time()) + 2)}
    assert since.group(1) in allowed, (since.group(0), sorted(allowed))
    tmux.wait_for(rf"^{CLOCK} \* Connection to the broker lost; reconnecting\.\.\.$", timeout=5)
    tmux.wait_last_line(PROMPT)

    chat.start_broker()  # same ports, same config dir (same keys)
    restarted = time.monotonic()
    wait_status(tmux, r"#lobby \| typist \| connected \| \d+ online", timeout=5)
    assert time.monotonic() - restarted < 5
    watcher.wait_for(rf"^{CLOCK} \* Reconnected", timeout=10)
    wait_status(tmux, r"#lobby \| typist \| connected \| 2 online", timeout=10)
    tmux.wait_for(rf"^{CLOCK} \* Reconnected \(.*\)\.$", timeout=5)

    # The status follows the current room.
    tmux.type("/join games")
    tmux.key("Enter")
    wait_status(tmux, r"#games \(\+1 more\) \| typist \| connected \| 2 online", timeout=5)


def test_lines_typed_ahead_are_sent_in_order_and_never_echoed_raw(chat: Chat, tmux: Tmux) -> None:
    """Three lines arrive at once (fast typing, or a paste without bracketed paste): each is
    sent, in order, and none shows up as raw typed text (the terminal stays in our hands
    between lines, so its own echo never prints them)."""
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")
    listener = chat.joined_client("listener")
    tmux.wait_for(rf"^{CLOCK} - listener has joined the chat\.$")
    typed = ["/me stretches", "/msg listener psst", "a third line"]
    for text in typed:  # one burst each, as a fast typist's lines come
        tmux.type(text)
        tmux.key("Enter")
    listener.wait_for(rf"^{CLOCK} <- typist: psst$")
    listener.wait_for(rf"^{CLOCK} typist: a third line$")
    tmux.wait_for(rf"^{CLOCK} typist: a third line$")
    tmux.wait_last_line(PROMPT)
    said = [line for line in listener.lines if re.match(rf"^{CLOCK} (\* typist|<- typist|typist:)", line)]
    assert [line.split(" ", 1)[1] for line in said] == ["* typist stretches", "<- typist: psst",
                                                        "typist: a third line"]
    raw = [line for line in tmux.screen(history=True) if any(line.endswith(text) for text in typed)
           and not re.match(rf"^{CLOCK} ", line)]
    assert raw == [], tmux.screen(history=True)


def test_a_pasted_block_waits_for_enter_then_goes_as_one_message(chat: Chat, tmux: Tmux) -> None:
    """A paste of several lines (bracketed, as terminals send it) is one message: its line
    breaks and indentation kept, each continuation line indented under the first on every
    screen (here a piped client's), so a line cannot pass for another speaker's."""
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")
    listener = chat.joined_client("listener")
    tmux.wait_for(rf"^{CLOCK} - listener has joined the chat\.$")
    block = ["def f():", "    return 1", "[12:00:00] mallory: fake"]
    tmux.tmux("set-buffer", "-b", "block", "\n".join(block))
    tmux.tmux("paste-buffer", "-p", "-b", "block", "-t", tmux.target)  # -p: bracketed, as terminals do
    tmux.wait_for(r"mallory: fake$")  # still in the input, nothing sent yet
    assert listener.count(r"typist: ") == 0
    tmux.key("Enter")
    indent = " " * len("[00:00:00] ")
    listener.wait_for(rf"^{indent}\[12:00:00\] mallory: fake$")
    first = rf"^{CLOCK} typist: def f\(\):$"
    start = max(i for i, line in enumerate(listener.lines) if re.match(first, line))
    assert listener.lines[start + 1:start + 3] == [f"{indent}    return 1",
                                                   f"{indent}[12:00:00] mallory: fake"]
    tmux.wait_for(rf"^{indent}    return 1$")  # the typist's own screen too
    tmux.wait_last_line(PROMPT)
    assert listener.count(r"^\[12:00:00\] mallory") == 0


def test_alt_enter_inserts_a_line_break_while_typing(chat: Chat, tmux: Tmux) -> None:
    chat.start_broker()
    join_in_tmux(chat, tmux, "typist")
    listener = chat.joined_client("listener")
    tmux.wait_for(rf"^{CLOCK} - listener has joined the chat\.$")
    tmux.type("first")
    tmux.key("M-Enter")
    tmux.type("  second")
    tmux.wait_for(r"^  second$")  # the input shows two lines; nothing sent yet
    assert listener.count(r"typist: ") == 0
    tmux.key("Enter")
    indent = " " * len("[00:00:00] ")
    listener.wait_for(rf"^{indent}  second$")
    assert listener.count(rf"^{CLOCK} typist: first$") == 1


def test_the_prompt_ends_when_the_clients_io_thread_dies(chat: Chat, tmux: Tmux, tmp_path: Path) -> None:
    """A bug in handling an event kills the I/O thread: the screen says so and the client
    exits (status 1) instead of showing "connected" over a dead connection."""
    chat.start_broker()
    fragile = tmp_path / "fragile_client.py"
    fragile.write_text(FRAGILE_CLIENT)
    command = client_command(chat, "alice").replace(shlex.quote("client.py"), shlex.quote(str(fragile)), 1)
    tmux.start(command)
    tmux.wait_for(rf"^{CLOCK} \* Welcome, alice!", timeout=15)
    tmux.wait_last_line(PROMPT)
    bob = chat.joined_client("bob")
    bob.send("boom")
    tmux.wait_for(rf"^{CLOCK} \* The client stopped working \(ValueError: handling went wrong\); start zchat "
                  r"again\.$", timeout=10)
    tmux.wait_for(re.escape(f"{EXITED} 1]"), timeout=10)
