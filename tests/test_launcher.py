"""`zchat` with no subcommand: start a background broker when none answers, then chat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLOCK, Chat, Proc

from zchat import keys
from zchat.broker import read_state

pytestmark = pytest.mark.timeout(60)


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)  # polling a pid for its exit, with a deadline
    return False


def _zchat(chat: Chat, *args: str) -> Proc:
    proc = Proc(["-m", "zchat", "--port", str(chat.port), "--pub-port", str(chat.pub_port),
                 "--config-dir", str(chat.config_dir), *args], env=chat.env)
    chat.procs.append(proc)
    return proc


def _kill_background_broker(config_dir: Path) -> None:
    state = read_state(config_dir)
    if state is not None:
        os.kill(int(state["pid"]), signal.SIGKILL)


def test_one_command_start_shares_the_broker_and_stop_stops_it(chat: Chat) -> None:
    try:
        alice = _zchat(chat, "--name", "alice")
        alice.wait_for(r"Started a background broker \(pid \d+", timeout=15)
        alice.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=15)
        state = read_state(chat.config_dir)
        assert state is not None and state["port"] == chat.port
        bob = _zchat(chat, "--name", "bob")  # the second start finds the running broker
        bob.wait_for(rf"{CLOCK} \* Welcome, bob! 1 other\(s\) online: alice", timeout=15)
        assert bob.count("Started a background broker") == 0
        alice.wait_for(rf"{CLOCK} - bob has joined the chat\.")
        stopper = Proc(["-m", "zchat", "broker", "--stop", "--config-dir", str(chat.config_dir)],
                       env=chat.env, stdin=False)
        chat.procs.append(stopper)
        stopper.wait_for(rf"stopped the broker \(pid {state['pid']}\)", timeout=10)
        assert _wait_dead(int(state["pid"]), 5)
        alice.wait_for(rf"{CLOCK} \* The broker is shutting down", timeout=5)
    finally:
        _kill_background_broker(chat.config_dir)


def test_background_broker_stops_after_the_last_user_leaves(chat: Chat) -> None:
    try:
        alice = _zchat(chat, "--name", "alice", "--idle-exit", "1")
        alice.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=15)
        state = read_state(chat.config_dir)
        assert state is not None
        alice.send("/quit")
        assert alice.wait_exit(10) == 0
        assert _wait_dead(int(state["pid"]), 10)
        assert read_state(chat.config_dir) is None
    finally:
        _kill_background_broker(chat.config_dir)


def test_two_first_starts_at_once_share_one_broker(chat: Chat) -> None:
    try:
        alice = _zchat(chat, "--name", "alice")
        bob = _zchat(chat, "--name", "bob")  # no broker yet: both look, one starts it
        alice.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=20)
        bob.wait_for(rf"{CLOCK} \* Welcome, bob!", timeout=20)
        assert alice.count("could not start") == 0 and bob.count("could not start") == 0
        assert alice.count("Started a background broker") + bob.count("Started a background broker") == 1
        alice.wait_for(rf"{CLOCK} - bob has joined the chat\.|{CLOCK} \* Welcome, alice! 1 other")
    finally:
        _kill_background_broker(chat.config_dir)


def test_stop_never_signals_the_pid_of_a_stale_state_file(chat: Chat, tmp_path: Path) -> None:
    """A broker killed with -9 leaves its state file; its pid may belong to anyone by now."""
    victim = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        state = keys.broker_dir(chat.config_dir) / "broker.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"pid": victim.pid, "port": chat.port}))
        stop = subprocess.run([sys.executable, "-m", "zchat", "broker", "--stop", "--config-dir",
                               str(chat.config_dir)],
                              env=chat.env, capture_output=True, text=True, timeout=20)
        assert stop.returncode == 0
        assert f"no broker is running for {chat.config_dir} (removed a stale state file naming pid " \
            f"{victim.pid})" in stop.stdout
        assert victim.poll() is None  # not signalled
        assert not state.exists()
    finally:
        victim.kill()
        victim.wait(5)


def test_a_second_broker_for_one_config_dir_is_refused(chat: Chat) -> None:
    first = chat.start_broker()
    pid = read_state(chat.config_dir)["pid"]  # type: ignore[index]
    second = Proc(["broker.py", "--port", str(chat.port + 2), "--pub-port", str(chat.port + 3),
                   "--config-dir", str(chat.config_dir)], env=chat.env, stdin=False)
    chat.procs.append(second)
    second.wait_for(rf"another broker \(pid {pid}, ports {chat.port}/{chat.pub_port}\) holds "
                    rf"{chat.config_dir}/broker/broker\.lock")
    assert second.wait_exit(10) == 1
    assert first.proc.poll() is None and read_state(chat.config_dir)["pid"] == pid  # type: ignore[index]
