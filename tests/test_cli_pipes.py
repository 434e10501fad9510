"""Commands whose reader goes away (`| head`) exit quietly with status 0, and a history
search for a room that does not exist says so instead of printing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Chat

from zchat.history import HistoryStore


def fill_history(db: Path, rooms: dict[str, int]) -> None:
    store = HistoryStore(db)
    try:
        for room, count in rooms.items():
            rows = [(f"r/{room}/", seq, 1_800_000_000.0 + seq, json.dumps(
                {"type": "message", "seq": seq, "ts": 1_800_000_000.0 + seq, "room": room, "name": "alice",
                 "text": f"line {seq} " + "x" * 80}).encode()) for seq in range(1, count + 1)]
            store.write(rows, [], [], 1_800_000_000.0)
    finally:
        store.close()


def piped(command: str, env: dict[str, str], timeout: float = 20) -> tuple[list[str], str, int]:
    """Run `command | head -1` in bash: (head's lines, the command's stderr, its exit status)."""
    script = f"{command} 2>stderr.txt | head -1; echo \"status=${{PIPESTATUS[0]}}\""
    shell = subprocess.Popen(["bash", "-c", script], cwd=env["TEST_DIR"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, _ = shell.communicate(timeout=timeout)
    finally:  # a command that never ends must not outlive the test
        try:
            os.killpg(shell.pid, signal.SIGKILL)  # the whole pipeline, whatever is left of it
        except ProcessLookupError:
            pass
        shell.wait()
    lines = stdout.splitlines()
    status = int(lines[-1].removeprefix("status="))
    return lines[:-1], (Path(env["TEST_DIR"]) / "stderr.txt").read_text(), status


def test_history_into_head_exits_quietly(chat: Chat, tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    fill_history(db, {"lobby": 3000})  # far more than a pipe holds: the writer meets EPIPE
    env = {**chat.env, "TEST_DIR": str(tmp_path)}
    lines, stderr, status = piped(f"{sys.executable} -m zchat history --db {db}", env)
    assert len(lines) == 1 and "line 1 " in lines[0]
    assert stderr == ""
    assert status == 0


def test_tap_into_head_exits_at_once_and_quietly(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    env = {**chat.env, "TEST_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    # The tap's first record is the broker's epoch; nothing else happens on this broker, so the
    # tap can only stop in time by noticing its reader leave, not by failing a later write.
    lines, stderr, status = piped(f"{sys.executable} -m zchat tap {' '.join(chat.endpoint_args())}", env,
                                  timeout=20)
    assert len(lines) == 1 and json.loads(lines[0])["type"] == "epoch"
    assert stderr == ""
    assert status == 0


def test_history_of_an_unknown_room_is_an_error_listing_the_rooms(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    fill_history(db, {"lobby": 2, "ops": 1})
    result = subprocess.run([sys.executable, "-m", "zchat", "history", "--db", str(db), "--room", "opps"],
                            cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "zchat history: no room #opps in the history (rooms: #lobby, #ops)"
    known = subprocess.run([sys.executable, "-m", "zchat", "history", "--db", str(db), "--room", "ops"],
                           cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert known.returncode == 0 and "line 1" in known.stdout
