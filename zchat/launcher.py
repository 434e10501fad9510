"""The one-command start: find the local broker, or start one in the background."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from zchat import keys
from zchat.brokerstate import read_state
from zchat.endpoints import Endpoints

AUTOSTART_IDLE_EXIT = 120.0  # a background broker stops this long after the last user leaves
START_DEADLINE = 10.0


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_broker(config_dir: Path, endpoints: Endpoints,
                  idle_exit: float = AUTOSTART_IDLE_EXIT) -> str | None:
    """Make sure a broker serves `endpoints`; return a note for the user if one was started."""
    if port_open(endpoints.host, endpoints.port):
        return None
    log_path = keys.broker_dir(config_dir) / "broker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    command = [sys.executable, "-m", "zchat", "broker", "--config-dir", str(config_dir),
               "--host", endpoints.host, "--port", str(endpoints.port),
               "--pub-port", str(endpoints.publish_port), "--idle-exit", str(idle_exit)]
    pid = _spawn_detached(command, log_path)
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:  # wait for the broker's state file, an observable event
        state = read_state(config_dir)
        if state is not None and state.get("pid") == pid:
            return (f"Started a background broker (pid {pid}, log {log_path}); it stops "
                    f"{idle_exit:g} s after the last user leaves, or with: zchat broker --stop")
        if not _alive(pid):
            break
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError("could not start a broker: " + (" / ".join(tail) or "no output"))


def _spawn_detached(command: list[str], log_path: Path) -> int:
    """Start `command` as a grandchild: it outlives us and is never our zombie."""
    shim = ("import subprocess, sys\n"
            "log = open(sys.argv[1], 'ab')\n"
            "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,"
            " start_new_session=True, close_fds=True)\n"
            "print(p.pid)\n")
    result = subprocess.run([sys.executable, "-c", shim, str(log_path), *command],
                            capture_output=True, text=True, timeout=START_DEADLINE, check=True)
    return int(result.stdout.strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_broker(config_dir: Path, timeout: float = 5.0) -> str:
    state = read_state(config_dir)
    if state is None:
        return "no broker is running for " + str(config_dir)
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return f"stopped the broker (pid {pid})"
        time.sleep(0.05)
    return f"the broker (pid {pid}) did not stop within {timeout:.0f} s"
