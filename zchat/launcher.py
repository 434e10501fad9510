"""The one-command start: find the local broker, or start one in the background; and
`zchat broker --stop`.

Two locks (fcntl.flock on files in the broker directory) keep this honest:
- `launch.lock`, held while one `zchat` checks for a broker and starts one, so two first
  starts at once make one broker, not one broker and one "could not start";
- `broker.lock`, held by a running broker for its whole life (see zchat.broker), so a state
  file whose broker died is known to be stale and its pid, maybe reused by now, is never
  signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from zchat import keys
from zchat.brokerstate import LOCK_FILE, read_state, state_path
from zchat.endpoints import Endpoints

AUTOSTART_IDLE_EXIT = 120.0  # a background broker stops this long after the last user leaves
START_DEADLINE = 10.0
LAUNCH_LOCK = "launch.lock"


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
    broker_dir = keys.broker_dir(config_dir)
    broker_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Another `zchat` starting at the same moment waits here for ours, then finds it.
    with _locked(broker_dir / LAUNCH_LOCK, START_DEADLINE + 5):
        if port_open(endpoints.host, endpoints.port):
            return None
        return _start(config_dir, endpoints, idle_exit)


def _start(config_dir: Path, endpoints: Endpoints, idle_exit: float) -> str:
    log_path = keys.broker_dir(config_dir) / "broker.log"
    with open(log_path, "ab") as log:
        log_start = log.tell()  # what this broker writes, not what earlier ones did
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
    if not _alive(pid) and port_open(endpoints.host, endpoints.port):
        return "Found a broker started meanwhile by someone else"  # e.g. from another config dir
    with open(log_path, "rb") as log:
        log.seek(log_start)
        tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError("could not start a broker: " + (" / ".join(tail) or "no output"))


@contextlib.contextmanager
def _locked(path: Path, timeout: float):  # type: ignore[no-untyped-def]
    """Hold an exclusive flock on `path`, waiting for it at most `timeout` seconds."""
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"another zchat has been starting a broker for over {timeout:g} s "
                                       f"(lock {path})") from None
                time.sleep(0.05)  # polling a lock held for at most START_DEADLINE
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def broker_running(config_dir: Path) -> bool:
    """Does a live broker hold this config dir's broker lock?"""
    try:
        with open(keys.broker_dir(config_dir) / LOCK_FILE, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:  # no lock file: no broker has run here (or not one that locks)
        return False


def _is_zchat_broker(pid: int) -> bool:
    """Where the system tells (Linux /proc), the process is a Python running zchat's broker."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc here: the lock alone decides
    except OSError:
        return False
    command = b" ".join(words)  # `zchat broker`, `python -m zchat broker`, `python broker.py`
    return b"broker.py" in command or (b"zchat" in command and b"broker" in command)


def stop_broker(config_dir: Path, timeout: float = 5.0) -> str:
    state = read_state(config_dir)
    if state is None:
        return "no broker is running for " + str(config_dir)
    pid = int(state["pid"])
    if not broker_running(config_dir) or not _is_zchat_broker(pid):
        # The broker died without removing its state file; the pid may be someone else's now.
        with contextlib.suppress(OSError):
            state_path(config_dir).unlink()
        return f"no broker is running for {config_dir} (removed a stale state file naming pid {pid})"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return f"stopped the broker (pid {pid})"
        time.sleep(0.05)
    return f"the broker (pid {pid}) did not stop within {timeout:.0f} s"
