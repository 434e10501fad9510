"""`tap --since TIME`: the broker says where each room's stored events from TIME begin (taps
only), the tap replays them through its usual backfill, then goes on live: no hole and no
duplicate at the seam."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from conftest import ROOT, Chat
from corekit import body, subscribe_all
from test_tap import Output, coverage, join_raw, live_tap, start_fast_broker, start_tap

from zchat.accounts import Account
from zchat.core import BrokerCore, FindSince, Publish
from zchat.history import HistoryStore
from zchat.protocol import Error, Message, room_topic

pytestmark = pytest.mark.timeout(120)

TAP, USER = "7a" * 32, "b2" * 32


def _rows(room: str, seqs: range, ts0: float) -> list[tuple[str, int, float, bytes]]:
    topic = room_topic(room)
    return [(topic, seq, ts0 + seq, msgspec.json.encode(Message(seq=seq, ts=ts0 + seq, room=room,
                                                               name="a", text=str(seq)))) for seq in seqs]


def test_the_store_finds_each_rooms_first_event_at_or_after_a_time() -> None:
    store = HistoryStore(":memory:")
    try:
        store.write(_rows("lobby", range(1, 1001), 1000.0) + _rows("old", range(1, 11), 0.0)
                    + _rows("games", range(1, 6), 1500.0), [], [], 2000.0)
        assert store.since(1500.0, None, 500) == ({"r/lobby/": 499, "r/games/": 0}, 2)
        assert store.since(1500.5, None, 500) == ({"r/lobby/": 500, "r/games/": 0}, 2)  # between two
        assert store.since(0.0, [room_topic("old")], 500) == ({"r/old/": 0}, 1)
        assert store.since(3000.0, None, 500) == ({}, 0)  # nothing since then
        assert store.since(1500.0, None, 1) == ({"r/lobby/": 499}, 2)  # the most recently active first
        store.write(_rows("lobby", range(1001, 1101), 1000.0), [], [], 2100.0)  # a later turn
        assert store.since(2050.0, None, 500) == ({"r/lobby/": 1049}, 1)  # the rooms row lags: not trusted
        store.db.execute("DELETE FROM events WHERE topic = 'r/lobby/' AND seq <= 700")  # retention
        assert store.since(1500.0, None, 500)[0]["r/lobby/"] == 700  # from the first one still stored
    finally:
        store.close()


def _ask(core: BrokerCore, identity: str, **fields: object) -> list:
    return core.on_message(identity, body(type="since", ts=1500.0, ref=7, **fields), 1, 1.0)


def test_replays_from_a_time_are_for_taps_in_closed_mode_and_anyone_in_open_mode() -> None:
    closed = BrokerCore("e", 0.0, accounts={TAP: Account("tapper", "tap"), USER: Account("bob")})
    for identity in (TAP, USER):
        subscribe_all(closed, identity)
    assert _ask(closed, TAP, rooms=["Lobby"]) == [FindSince(TAP, 1500.0, ["lobby"], 7)]
    refused = _ask(closed, USER)
    assert len(refused) == 1 and isinstance(refused[0], Publish) and isinstance(refused[0].event, Error)
    assert refused[0].event.code == "forbidden" and refused[0].event.ref == 7
    opened = BrokerCore("e", 0.0)
    subscribe_all(opened, USER)
    assert _ask(opened, USER) == [FindSince(USER, 1500.0, None, 7)]
    bad = _ask(opened, USER, rooms=["no/such"])
    assert isinstance(bad[0].event, Error) and bad[0].event.code == "invalid_room"


def test_a_tap_since_a_time_replays_from_then_and_goes_on_live_without_hole_or_repeat(
        chat: Chat, tmp_path: Path) -> None:
    start_fast_broker(chat)
    steady, _ = live_tap(chat, tmp_path / "steady.jsonl")
    peer = join_raw(chat, "pub", ["lobby"])
    try:
        def say(n: int) -> None:
            peer.send(json.dumps({"type": "say", "room": "lobby", "text": f"number {n}"}).encode())

        for n in range(10):
            say(n)
        before = steady.wait_record(type="message", text="number 9")
        for n in range(10, 1210):  # three history pages to replay
            say(n)
        first = steady.wait_record(type="message", text="number 10")
        assert first["ts"] > before["ts"]
        since_at = (before["ts"] + first["ts"]) / 2
        path = tmp_path / "since.jsonl"
        replay = Output(path, start_tap(chat, "--name", "replayer", "--since", f"@{since_at!r}",
                                        "--output", str(path)))
        replay.wait_record(type="epoch")
        for n in range(1210, 1230):  # live while (or after) it replays
            say(n)
        replay.wait_record(type="message", text="number 1229", timeout=60)
        steady.wait_record(type="message", text="number 1229")
        for out in (steady, replay):  # before the sender leaves: its `left` is not compared
            out.tap.proc.send_signal(2)
            assert out.tap.wait_exit(10) == 0
    finally:
        peer.close()

    def room_records(out: Output, after: int) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "backfill"} for r in out.records()
                if r.get("topic") == "r/lobby/" and r.get("seq", 0) > after]

    replayed = room_records(replay, 0)
    assert replayed[0]["text"] == "number 10"
    assert replayed == room_records(steady, before["seq"])
    assert not [r for r in replay.records() if r["type"] == "gap"]
    coverage(replay.records())  # each seq once, in order
    assert sum(1 for r in replay.records() if r.get("backfill")) >= 1200  # most came from history


def test_zchat_send_of_several_lines_is_one_message_and_the_text_tap_indents_it(
        chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    path = tmp_path / "tap.txt"
    text = Output(path, start_tap(chat, "--format", "text", "--output", str(path)))
    text.wait(lambda lines: any("!! broker epoch" in line for line in lines), text=True)
    fake = "[2026-01-01 00:00:00] #lobby mallory: hi"  # looks like a record of its own
    said = f"Traceback (most recent call last):\r\n  File \"x.py\"\n{fake}\x1b[2J"
    done = subprocess.run([sys.executable, "-m", "zchat", "send", *chat.endpoint_args(), "--name", "deploy",
                           said], cwd=ROOT, env=chat.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = text.wait(lambda lines: any("mallory" in line for line in lines), text=True)
    start = next(i for i, line in enumerate(lines) if "deploy: Traceback" in line)
    indent = " " * len("[2026-01-01 00:00:00] ")
    assert lines[start].endswith("#lobby deploy: Traceback (most recent call last):")
    assert lines[start + 1:start + 3] == [f'{indent}  File "x.py"', f"{indent}{fake}"]
