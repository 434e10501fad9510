"""End to end: `zchat tap` as a process against a real broker process, tcp loopback, CURVE.

Every wait is for records to appear in the tap's output, with a deadline.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Chat, Proc
from peers import RawPeer, broker_key

from zchat import limits as L
from zchat.protocol import History, Welcome

pytestmark = pytest.mark.timeout(120)

STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]"


def start_tap(chat: Chat, *extra: str) -> Proc:
    tap = Proc(["-m", "zchat", "tap", *chat.endpoint_args(), *extra], env=chat.env, stdin=False)
    chat.procs.append(tap)
    return tap


class Output:
    """A file the tap writes: complete lines only, waited for with a deadline."""

    def __init__(self, path: Path, tap: Proc) -> None:
        self.path = path
        self.tap = tap

    def lines(self) -> list[str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return text.split("\n")[:-1]  # a last line without its newline is not written yet

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]

    def wait(self, predicate: Callable[[list], bool], timeout: float = 10.0, text: bool = False) -> list:
        deadline = time.monotonic() + timeout
        while True:
            got = self.lines() if text else self.records()
            if predicate(got):
                return got
            if time.monotonic() > deadline or self.tap.proc.poll() is not None:
                raise AssertionError(f"not in {self.path.name} within {timeout} s; last lines:\n"
                                     + "\n".join(self.lines()[-15:]) + "\ntap said:\n"
                                     + "\n".join(self.tap.lines[-15:]))
            time.sleep(0.05)  # polling a file: the condition is re-checked, not assumed

    def wait_record(self, timeout: float = 10.0, **fields: object) -> dict:
        def match(records: list[dict]) -> bool:
            return any(all(r.get(k) == v for k, v in fields.items()) for r in records)

        records = self.wait(match, timeout)
        return next(r for r in records if all(r.get(k) == v for k, v in fields.items()))


def live_tap(chat: Chat, path: Path) -> tuple[Output, dict]:
    """A jsonl tap writing to `path`, once live (its epoch record is written: subscribed)."""
    out = Output(path, start_tap(chat, "--output", str(path)))
    return out, out.wait_record(type="epoch")


def coverage(records: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """Per room topic, the seq spans the records account for, in written order; a reset
    starts the topic afresh. Fails on anything written twice or out of order."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for r in records:
        topic = r.get("topic", "")
        if not topic.startswith("r/"):
            continue
        if r["type"] == "reset":
            spans[topic] = []
            continue
        span = (r["from"], r["to"]) if r["type"] == "gap" else (r["seq"], r["seq"])
        done = spans.setdefault(topic, [])
        assert not done or span[0] == done[-1][1] + 1, f"{topic}: {span} after {done[-1]}"
        done.append(span)
    return spans


# --- formats ----------------------------------------------------------------------


def test_jsonl_and_text_against_real_traffic(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    jsonl = Output(tmp_path / "tap.jsonl", start_tap(chat, "--output", str(tmp_path / "tap.jsonl")))
    text = Output(tmp_path / "tap.txt", start_tap(chat, "--format", "text", "--name", "tap2",
                                                  "--output", str(tmp_path / "tap.txt")))
    jsonl.wait_record(type="epoch")  # live: its subscriptions are installed
    text.wait(lambda lines: any("!! broker epoch" in line for line in lines), text=True)

    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.send("hello bob, 100% sure")
    alice.send("/me waves")
    jsonl.wait_record(type="action", text="waves")  # two clients: one after the other
    bob.send("/nick robert")
    jsonl.wait_record(type="renamed", new="robert")
    bob.send("/quit bye now")
    assert bob.wait_exit(10) == 0

    left = jsonl.wait_record(type="left", name="robert")
    records = jsonl.records()
    rooms = [r for r in records if r.get("topic") == "r/lobby/"]
    assert [r["type"] for r in rooms] == ["joined", "joined", "message", "action", "renamed", "left"]
    assert [r["seq"] for r in rooms] == list(range(1, 7))
    for r in rooms:
        assert list(r)[:4] == ["topic", "type", "seq", "ts"] and abs(r["ts"] - time.time()) < 60
        assert "backfill" not in r
    message = rooms[2]
    assert isinstance(message["ref"], int)  # the sender's own choice (the client starts at random)
    assert message | {"ts": 0, "ref": 0} == {"topic": "r/lobby/", "type": "message", "seq": 3, "ts": 0,
                                             "room": "lobby", "name": "alice", "text": "hello bob, 100% sure",
                                             "ref": 0}
    assert left["reason"] == "quit" and left["message"] == "bye now"
    assert not [r for r in records if r["type"] in ("heartbeat", "gap")]
    assert coverage(records) == {"r/lobby/": [(s, s) for s in range(1, 7)]}

    lines = text.wait(lambda lines: any("robert left" in line for line in lines), text=True)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(message["ts"]))  # local time
    body = [line for line in lines if "#lobby" in line]
    assert body == [
        f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['ts']))}] {line}" for r, line in zip(rooms, [
            "#lobby -> alice joined the chat", "#lobby -> bob joined the chat",
            "#lobby alice: hello bob, 100% sure", "#lobby * alice waves",
            "#lobby -- bob is now robert", "#lobby <- robert left (quit: bye now)"], strict=True)]
    assert f"[{when}] #lobby alice: hello bob, 100% sure" in lines
    assert all(re.match(STAMP + " ", line) for line in lines)


def test_room_and_type_filters(chat: Chat, tmp_path: Path) -> None:
    """--room dev subscribes to r/dev/ only; --type keeps the named types (join: joined)."""
    chat.start_broker()
    path = tmp_path / "dev.jsonl"
    dev = Output(path, start_tap(chat, "--output", str(path), "--room", "#Dev",
                                 "--type", "message,join,epoch"))
    everything, _ = live_tap(chat, tmp_path / "all.jsonl")
    dev.wait_record(type="epoch")  # live
    alice = chat.joined_client("alice")
    alice.send("in the lobby")
    alice.send("/join dev")
    alice.wait_for(r"alice has joined #dev")  # her current room now
    alice.send("in dev")
    alice.send("/me acts in dev")
    everything.wait_record(type="action", text="acts in dev")
    records = dev.wait(lambda rs: any(r.get("text") == "in dev" for r in rs))
    assert [(r.get("topic"), r["type"]) for r in records] == [
        (None, "epoch"), ("r/dev/", "joined"), ("r/dev/", "message")]
    # The broker never sent the lobby's events: no gap either (nothing was missed, nothing asked).
    assert any(r.get("text") == "in the lobby" for r in everything.records())


def test_unknown_type_room_or_template_field_is_one_line(chat: Chat) -> None:
    for flags, said in ((("--type", "message,chatter"), "--type: unknown type chatter"),
                        (("--room", "no room!"), "--room 'no room!': not a valid room name"),
                        (("--format", "{time} {nmae}"), "unknown field {nmae}")):
        tap = start_tap(chat, *flags, "--server-key", "0" * 64)
        assert tap.wait_exit(10) == 2
        assert len(tap.lines) == 1 and said in tap.lines[0], tap.lines


def test_size_rotation(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    path = tmp_path / "tap.jsonl"
    out = Output(path, start_tap(chat, "--output", str(path), "--rotate-bytes", "1500", "--backups", "3"))
    out.wait_record(type="epoch")
    alice = chat.joined_client("alice")
    for i in range(15):
        alice.send(f"line {i} " + "x" * 300)
    out.wait(lambda records: any(r.get("text", "").startswith("line 14 ") for r in records))
    files = sorted(tmp_path.glob("tap.jsonl*"))
    assert [p.name for p in files] == ["tap.jsonl", "tap.jsonl.1", "tap.jsonl.2", "tap.jsonl.3"]
    assert all(p.stat().st_size <= 1500 for p in files)
    assert {p.stat().st_mode & 0o777 for p in files} == {0o600}  # private, rotated files too
    records = [json.loads(line) for name in ("tap.jsonl.3", "tap.jsonl.2", "tap.jsonl.1", "tap.jsonl")
               for line in (tmp_path / name).read_text().splitlines()]
    spans = coverage(records)["r/lobby/"]
    assert spans[-1][0] == spans[0][0] + len(spans) - 1  # what is kept is contiguous


# --- completeness under publishing drops ---------------------------------------------

# A real broker process, configured like `zchat broker` but with a rate limit (and member
# timeout) high enough for a few raw peers to flood it. `zchat broker` has no option for that.
def start_fast_broker(chat: Chat) -> Proc:
    """A broker that lets raw senders flood (no rate limit) and stay silent (no pings)."""
    return chat.start_broker("--rate-per-second", "0", "--client-timeout", "600")


def join_raw(chat: Chat, name: str, rooms: list[str]) -> RawPeer:
    """A raw CURVE member of `rooms` that hears only its private stream once joined."""
    peer = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [b"r/"])
    peer.sub.subscribe(f"u/{peer.identity}/".encode())
    join = json.dumps({"type": "join", "name": name, "rooms": rooms, "history": 0}).encode()
    deadline = time.monotonic() + 10
    while True:
        peer.send(join)
        try:
            peer.wait_for(lambda t, e: isinstance(e, Welcome), timeout=0.3)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    peer.sub.unsubscribe(b"r/")  # still a member; the flood is for the tap alone
    return peer


def last_seq(peer: RawPeer, room: str, ref: int) -> int:
    """The room's last seq once everything `peer` sent before is processed (same connection)."""
    peer.send(json.dumps({"type": "history", "room": room, "limit": 0, "ref": ref}).encode())
    _, reply = peer.wait_for(lambda t, e: isinstance(e, History) and e.ref == ref, timeout=60)
    return reply.upto


def test_burst_with_publishing_drops_every_seq_accounted_for(chat: Chat, tmp_path: Path) -> None:
    start_fast_broker(chat)
    path = tmp_path / "tap.jsonl"
    out, _ = live_tap(chat, path)
    tap = out.tap
    rooms = ["b0", "b1", "b2"]
    peers = [join_raw(chat, f"pub{i}", rooms) for i in range(3)]
    try:
        out.wait(lambda records: sum(r["type"] == "joined" for r in records) == 9)
        # Well over what can be queued for the tap: XPUB_SNDHWM messages, plus the kernel's
        # socket buffers (a few MB), of large messages.
        per_peer = (L.XPUB_SNDHWM + 6000) // len(peers)
        filler = "y" * (L.MAX_TEXT_CHARS - 100)
        tap.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            for n in range(per_peer):
                for i, peer in enumerate(peers):
                    room = rooms[(n + i) % len(rooms)]
                    peer.send(json.dumps({"type": "say", "room": room,
                                          "text": f"{peer.identity[:6]} {n} {filler}"}).encode())
            final = {room: max(last_seq(peer, room, 900 + j) for peer in peers)
                     for j, room in enumerate(rooms)}
        finally:
            tap.proc.send_signal(signal.SIGCONT)
        published = time.monotonic() - stopped
        # A drop at the end of a burst shows only with the next event on that topic: say one
        # more thing in each room until it shows (it may be dropped too, while the tap catches up).
        markers: dict[str, int] = {}
        for room in rooms:
            for attempt in range(20):
                text = f"marker {room} {attempt}"
                peers[0].send(json.dumps({"type": "say", "room": room, "text": text}).encode())
                try:
                    markers[room] = out.wait_record(timeout=3, type="message", text=text)["seq"]
                    break
                except AssertionError:
                    continue
            assert room in markers, f"no marker reached the tap in #{room}"
        tap.proc.send_signal(signal.SIGTERM)
        assert tap.wait_exit(10) == 0
    finally:
        for peer in peers:
            peer.close()

    records = out.records()
    spans = coverage(records)
    stats = {}
    for room in rooms:
        topic = f"r/{room}/"
        assert spans[topic][0][0] == 1 and spans[topic][-1][1] >= markers[room] > final[room]
        of_room = [r for r in records if r.get("topic") == topic]
        stats[room] = {
            "published": final[room],
            "live": sum(r["type"] != "gap" and not r.get("backfill") for r in of_room),
            "backfilled": sum(bool(r.get("backfill")) for r in of_room),
            "in_gaps": sum(r["missing"] for r in of_room if r["type"] == "gap")}
    print(f"\nburst: {len(peers) * per_peer} messages of {len(filler) + 20} bytes in {published:.1f} s "
          f"while the tap was stopped; per room: {stats}")
    recovered = sum(s["backfilled"] + s["in_gaps"] for s in stats.values())
    assert recovered > 0, f"no drop was forced: {stats}"


# --- broker restarts --------------------------------------------------------------------


def test_broker_kill_and_restart(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    path = tmp_path / "tap.jsonl"
    out, first = live_tap(chat, path)
    tap = out.tap
    alice = chat.joined_client("alice")
    for i in range(5):
        alice.send(f"before {i}")
    out.wait_record(type="message", text="before 4")
    for i in range(5):  # some of these may be in flight when the broker dies
        alice.send(f"racing {i}")
    chat.broker.proc.kill()
    chat.broker.proc.wait(5)

    chat.start_broker()
    epoch = json.loads((chat.config_dir / "broker" / "broker.json").read_text())["epoch"]
    assert epoch != first["epoch"]
    restarted = out.wait_record(type="epoch", epoch=epoch, timeout=15)
    assert restarted["previous"] == first["epoch"]
    alice.send("after the restart")
    out.wait_record(type="message", text="after the restart", timeout=20)
    tap.proc.send_signal(signal.SIGTERM)
    assert tap.wait_exit(10) == 0

    records = out.records()
    spans = coverage(records)["r/lobby/"]  # no seq twice, none skipped without a gap record
    assert spans[0][0] == 1
    seqs = [r["seq"] for r in records if r.get("topic") == "r/lobby/" and r["type"] != "gap"]
    assert len(seqs) == len(set(seqs))
    assert not [r for r in records if r["type"] == "reset"]  # history survived: numbering continued


def test_a_restarted_brokers_epoch_record_comes_before_its_events(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    out, _ = live_tap(chat, tmp_path / "tap.jsonl")
    names = ["alice", "bob", "carol", "dave", "erin"]
    for name in names:
        chat.joined_client(name)
    for name in names:
        out.wait_record(type="joined", name=name)
    chat.broker.proc.kill()
    chat.broker.proc.wait(5)
    restarted_at = time.time()
    chat.start_broker()
    # The clients rejoin the new broker: its first events.
    out.wait(lambda records: {r.get("name") for r in records if r["type"] == "joined"
                              and r["ts"] >= restarted_at} == set(names), 20)
    records = out.records()
    epochs = [i for i, r in enumerate(records) if r["type"] == "epoch"]
    assert len(epochs) == 2
    new_events = [i for i, r in enumerate(records)
                  if r["type"] not in ("epoch", "gap", "reset") and r["ts"] >= restarted_at]
    assert new_events and min(new_events) > epochs[1], records[epochs[1] - 3:epochs[1] + 3]


def test_broker_losing_its_database_is_a_reset(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    path = tmp_path / "tap.jsonl"
    out, _ = live_tap(chat, path)
    alice = chat.joined_client("alice")
    for i in range(3):
        alice.send(f"old {i}")
    old = out.wait_record(type="message", text="old 2")
    chat.broker.proc.kill()
    chat.broker.proc.wait(5)
    for db in (chat.config_dir / "broker").glob("history.sqlite3*"):
        db.unlink()

    chat.start_broker()
    alice.send("new numbering")
    new = out.wait_record(type="message", text="new numbering", timeout=20)
    assert new["seq"] < old["seq"]
    records = out.records()
    resets = [r for r in records if r["type"] == "reset"]
    assert len(resets) == 1 and resets[0]["topic"] == "r/lobby/" and resets[0]["last"] == old["seq"]
    assert records.index(resets[0]) < records.index(new)
    spans = coverage(records)["r/lobby/"]  # from the new baseline on, complete
    assert spans[0][0] == resets[0]["seq"] and spans[-1] == (new["seq"], new["seq"])


# --- stopping -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_and_exits_zero(chat: Chat, tmp_path: Path, sig: signal.Signals) -> None:
    chat.start_broker()
    path = tmp_path / "tap.jsonl"
    out, _ = live_tap(chat, path)
    tap = out.tap
    alice = chat.joined_client("alice")
    for i in range(10):
        alice.send(f"message {i}")
    out.wait_record(type="message", text="message 9")
    tap.proc.send_signal(sig)
    assert tap.wait_exit(10) == 0
    data = path.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.decode().splitlines()]
    assert [r["text"] for r in records if r["type"] == "message"] == [f"message {i}" for i in range(10)]


def test_text_to_stdout_and_sigint(chat: Chat) -> None:
    chat.start_broker()
    tap = start_tap(chat, "--format", "text")
    tap.wait_for(r"!! broker epoch [0-9a-f]+$")
    alice = chat.joined_client("alice")
    alice.send("to stdout")
    tap.wait_for(rf"^{STAMP} #lobby alice: to stdout$")
    tap.proc.send_signal(signal.SIGINT)
    assert tap.wait_exit(10) == 0
    assert not [line for line in tap.lines if "Traceback" in line]


def test_rotation_needs_an_output_file(chat: Chat) -> None:
    tap = start_tap(chat, "--rotate-bytes", "100", "--server-key", "0" * 64)
    assert tap.wait_exit(10) == 2
    assert "rotation needs --output" in "\n".join(tap.lines)


# --- bounds -------------------------------------------------------------------------


def test_a_template_and_a_count_to_stdout(chat: Chat) -> None:
    """-C 3 exits 0 after three events (its own epoch record not counted), formatted by a template."""
    chat.start_broker()
    tap = start_tap(chat, "--type", "message,epoch", "-C", "3", "--format", "{type}: {room} <{name}> {text}")
    tap.wait_for(r"^epoch:  <> $")
    alice = chat.joined_client("alice")
    for i in range(5):
        alice.send(f"number {i}")
    assert tap.wait_exit(10) == 0
    assert tap.lines == ["epoch:  <> "] + [f"message: lobby <alice> number {i}" for i in range(3)]


def test_seconds_bound_exits_zero(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    path = tmp_path / "tap.jsonl"
    started = time.monotonic()
    out = Output(path, start_tap(chat, "-W", "1.5", "--output", str(path)))
    out.wait_record(type="epoch")
    assert out.tap.wait_exit(10) == 0
    assert 1.5 <= time.monotonic() - started < 8


# --- resuming ---------------------------------------------------------------------------


def test_a_resumed_tap_writes_the_same_file_as_one_that_never_stopped(chat: Chat, tmp_path: Path) -> None:
    """Stopped for ~10 s while 500 messages are sent, then restarted with --resume: the same room
    records as a tap that ran throughout, in the same order, once each, with no gap record."""
    start_fast_broker(chat)
    steady, _ = live_tap(chat, tmp_path / "steady.jsonl")
    path = tmp_path / "resumed.jsonl"

    def resumed_tap() -> Output:
        out = Output(path, start_tap(chat, "--name", "logger", "--resume", "--output", str(path)))
        out.wait(lambda records: sum(r["type"] == "epoch" for r in records) == epochs + 1)
        return out

    epochs = 0
    resumed = resumed_tap()
    peer = join_raw(chat, "pub", ["lobby"])
    try:
        def say(n: int) -> None:
            peer.send(json.dumps({"type": "say", "room": "lobby", "text": f"number {n}"}).encode())

        for n in range(20):
            say(n)
        resumed.wait_record(type="message", text="number 19")
        resumed.tap.proc.send_signal(signal.SIGTERM)
        assert resumed.tap.wait_exit(10) == 0
        stopped = time.monotonic()
        for n in range(20, 520):
            say(n)
            time.sleep(0.02)  # the scenario: 500 messages over ~10 s while the logger is down
        steady.wait_record(type="message", text="number 519")
        down = time.monotonic() - stopped
        epochs = 1
        resumed = resumed_tap()
        for n in range(520, 540):
            say(n)
        resumed.wait_record(type="message", text="number 539", timeout=30)
        steady.wait_record(type="message", text="number 539")
        for out in (steady, resumed):  # before the sender leaves: its `left` is not compared
            out.tap.proc.send_signal(signal.SIGTERM)
            assert out.tap.wait_exit(10) == 0
    finally:
        peer.close()

    def room_records(out: Output) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "backfill"} for r in out.records()
                if r.get("topic") == "r/lobby/"]

    records = resumed.records()
    assert not [r for r in records if r["type"] == "gap"]
    assert room_records(resumed) == room_records(steady)
    texts = [r["text"] for r in room_records(resumed) if r["type"] == "message"]
    assert texts == [f"number {n}" for n in range(540)]
    backfilled = [r["text"] for r in records if r.get("backfill")]
    assert backfilled == [f"number {n}" for n in range(20, 520)]  # from the broker's history
    print(f"\nresume: {len(backfilled)} events backfilled after {down:.1f} s down")
