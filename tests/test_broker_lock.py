"""One broker per config dir and per history database: a second one refuses to start and
says who holds them (two brokers on one config dir used to overwrite each other's history)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Chat, Proc, free_port


def second_broker(chat: Chat, *args: str) -> Proc:
    proc = Proc(["broker.py", "--port", str(free_port()), "--pub-port", str(free_port()), *args],
                env=chat.env, stdin=False)
    chat.procs.append(proc)
    return proc


def test_a_second_broker_on_the_same_config_dir_refuses_to_start(chat: Chat) -> None:
    first = chat.start_broker()
    second = second_broker(chat, "--config-dir", str(chat.config_dir))
    assert second.wait_exit(15) == 1
    line = second.wait_for(r"zchat broker:", timeout=5)
    assert re.search(rf"another broker \(pid {first.proc.pid}, ports {chat.port}/{chat.pub_port}\)", line)
    assert "Traceback" not in "\n".join(second.lines)
    # The first one still serves.
    chat.joined_client("alice")


def test_a_second_broker_on_the_same_database_refuses_to_start(chat: Chat, tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    first = chat.start_broker("--db", str(db))
    second = second_broker(chat, "--config-dir", str(tmp_path / "other"), "--db", str(db))
    assert second.wait_exit(15) == 1
    assert re.search(rf"another broker \(pid {first.proc.pid}.*shared\.sqlite3\.lock",
                     second.wait_for(r"zchat broker:", timeout=5))


def test_the_lock_goes_with_the_broker(chat: Chat) -> None:
    first = chat.start_broker()
    first.proc.kill()  # kill -9: the kernel drops the lock
    first.wait_exit(10)
    chat.broker = None
    chat.start_broker()
    chat.joined_client("alice")
