"""Issue 14, item 18: `zchat history` with --host/--port asks the broker over the protocol
with the user's own key (CURVE, answers sealed to that key, paged with before/more), in the
same output formats as the local tool; an unreachable broker is one line and a non-zero exit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import Chat, Proc, free_port

from zchat import keys

pytestmark = pytest.mark.timeout(120)


def _history(chat: Chat, *args: str, config_dir: Path | None = None, code: int = 0) -> list[str]:
    proc = Proc(["-m", "zchat", "history", "--config-dir", str(config_dir or chat.config_dir), *args],
                env=chat.env, stdin=False)
    chat.procs.append(proc)
    assert proc.wait_exit(30) == code, proc.lines
    proc._reader.join(5)
    return proc.lines


def test_history_from_a_remote_broker_matches_the_local_tool(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    for text in ("the deploy went fine", "lunch?", "deploy again at five"):
        alice.send(text)
    alice.wait_for(r"alice: deploy again at five$")
    server_key = keys.load_public(keys.broker_public_key_path(chat.config_dir)).decode()
    # Another machine: its own config dir, no database, a key of its own.
    elsewhere = tmp_path / "elsewhere"
    remote = ["--host", "127.0.0.1", "--port", str(chat.port), "--pub-port", str(chat.pub_port),
              f"--server-key={server_key}", "--name", "carol"]
    for flags in ([], ["--json"], ["--limit", "2"], ["--grep", "DEPLOY"], ["--since", "1h"]):
        local = _history(chat, "--room", "lobby", *flags)
        assert local, flags
        assert _history(chat, "--room", "lobby", *remote, *flags, config_dir=elsewhere) == local, flags
    assert not (elsewhere / "broker").exists()  # nothing read or made on the broker's side
    assert (keys.client_keys_dir(elsewhere) / "client-carol.key_secret").exists()  # carol's own key


def test_remote_history_of_an_unknown_room_or_without_a_room_fails(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    server_key = keys.load_public(keys.broker_public_key_path(chat.config_dir)).decode()
    remote = ["--port", str(chat.port), "--pub-port", str(chat.pub_port), f"--server-key={server_key}"]
    lines = _history(chat, "--room", "nosuch", *remote, config_dir=tmp_path / "c", code=1)
    assert len(lines) == 1 and "no history of #nosuch" in lines[0]
    lines = _history(chat, *remote, config_dir=tmp_path / "c", code=2)
    assert len(lines) == 1 and "--room is required" in lines[0]


def test_remote_history_from_nowhere_is_one_line_and_non_zero(chat: Chat, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    key = keys.load_or_create(tmp_path / "k", "broker").public.decode()
    started = time.monotonic()
    lines = _history(chat, "--room", "lobby", "--port", str(port), f"--server-key={key}", "--timeout", "2",
                     config_dir=tmp_path / "c", code=1)
    assert time.monotonic() - started < 15
    assert len(lines) == 1 and lines[0].startswith("zchat history: no broker answers at "), lines
    assert f"--port {port}" in lines[0]
