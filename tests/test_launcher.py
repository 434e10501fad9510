"""`zchat` with no subcommand: start a background broker when none answers, then chat."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import CLOCK, Chat, Proc

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
