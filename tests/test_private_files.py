"""Files on disk are private (issue 13, item 9): the history database with its -wal/-shm
files, and the tap's log, are created 0600 whatever the umask; the tap's --mode chooses.

The end-to-end tests run the real broker and tap as processes under umask 022, the
common default that made every one of these files world-readable before.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Chat, Proc
from test_tap import Output, start_tap

from zchat.history import HistoryStore
from zchat.tap import TapLog, make_handler, parse_file_mode

pytestmark = pytest.mark.timeout(60)

TS = 1_700_000_000.0


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask (group and others may read), for this process and its children."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- the history database ------------------------------------------------------------


def test_broker_db_files_are_private_in_an_open_directory(chat: Chat, tmp_path: Path,
                                                          umask_022: None) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    db = shared / "history.sqlite3"
    broker = chat.start_broker("--db", str(db))
    chat.joined_client("alice").send("hello")  # a write: the WAL is in use
    warning = broker.wait_for(r"WARNING .*directory .*open to others")
    assert str(shared.resolve()) in warning and "0755" in warning and "chmod go-rwx" in warning
    files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    assert all(path.exists() for path in files), sorted(p.name for p in shared.iterdir())
    assert {path.name: oct(mode_of(path)) for path in files} == {path.name: "0o600" for path in files}


def test_store_tightens_old_files_and_reports_them(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "history.sqlite3"
    HistoryStore(db).close()  # leaves the database (and maybe a -wal) behind
    for path in [db, Path(f"{db}-wal"), Path(f"{db}-shm")]:
        path.touch()
        path.chmod(0o644)  # as an older zchat left them
    store = HistoryStore(db)
    try:
        assert sorted(store.tightened) == sorted(str(p) for p in [db, f"{db}-wal", f"{db}-shm"])
        assert [oct(mode_of(Path(p))) for p in store.tightened] == ["0o600"] * 3
    finally:
        store.close()
    again = HistoryStore(db)  # nothing left to fix
    assert again.tightened == []
    again.close()


def test_store_is_private_even_under_a_umask_that_drops_owner_bits(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        store = HistoryStore(tmp_path / "h.sqlite3")
    finally:
        os.umask(old)
    store.close()
    assert mode_of(tmp_path / "h.sqlite3") == 0o600


def test_no_warning_in_a_private_directory(chat: Chat, tmp_path: Path, umask_022: None) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    broker = chat.start_broker("--db", str(private / "h.sqlite3"))
    chat.joined_client("alice")
    assert not broker.count("open to others")


# --- the tap's log -------------------------------------------------------------------


def test_tap_output_is_private_by_default(chat: Chat, tmp_path: Path, umask_022: None) -> None:
    chat.start_broker()
    path = tmp_path / "tap.jsonl"
    out = Output(path, start_tap(chat, "--output", str(path)))
    out.wait_record(type="epoch")
    assert mode_of(path) == 0o600


def test_tap_mode_chooses_the_permissions(chat: Chat, tmp_path: Path) -> None:
    old = os.umask(0o077)  # --mode wins over the umask both ways
    try:
        chat.start_broker()
        path = tmp_path / "tap.jsonl"
        tap: Proc = start_tap(chat, "--output", str(path), "--mode", "640")
    finally:
        os.umask(old)
    Output(path, tap).wait_record(type="epoch")
    assert mode_of(path) == 0o640  # rotated files: test_tap.py's test_size_rotation, test_handler_modes


def test_tap_refuses_a_bad_mode(chat: Chat, tmp_path: Path) -> None:
    tap = start_tap(chat, "--output", str(tmp_path / "t.log"), "--mode", "u+rw", "--server-key", "0" * 64)
    assert tap.wait_exit(10) == 2
    assert "--mode 'u+rw'" in "\n".join(tap.lines)
    assert not (tmp_path / "t.log").exists()


def test_handler_modes(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "tap.log"
    path.write_text("")
    path.chmod(0o644)  # an existing, readable log is made private too
    out = TapLog(make_handler(path, rotate_bytes=200, backups=2), "jsonl")
    for seq in range(1, 20):
        out.event("r/lobby/", {"type": "message", "seq": seq, "ts": TS, "text": "x" * 20})
    out.close()
    assert {p.name: mode_of(p) for p in tmp_path.glob("tap.log*")} == {
        "tap.log": 0o600, "tap.log.1": 0o600, "tap.log.2": 0o600}
    chosen = TapLog(make_handler(tmp_path / "c.log", rotate_bytes=200, backups=1, file_mode=0o660), "jsonl")
    for seq in range(1, 20):
        chosen.event("r/lobby/", {"type": "message", "seq": seq, "ts": TS, "text": "x" * 20})
    chosen.close()
    assert mode_of(tmp_path / "c.log") == mode_of(tmp_path / "c.log.1") == 0o660  # not 0o640 (umask)
    timed = make_handler(tmp_path / "timed.log", rotate_when="midnight", file_mode=0o660)
    timed.close()
    assert mode_of(tmp_path / "timed.log") == 0o660
    with pytest.raises(ValueError, match="--mode needs --output"):
        make_handler(None, file_mode=0o600)


@pytest.mark.parametrize(("text", "mode"),
                         [("600", 0o600), ("0640", 0o640), ("0o644", 0o644), ("777", 0o777)])
def test_parse_file_mode(text: str, mode: int) -> None:
    assert parse_file_mode(text) == mode


@pytest.mark.parametrize("text", ["u+rw", "8", "1777", "400", "-600", ""])
def test_parse_file_mode_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="--mode"):
        parse_file_mode(text)
