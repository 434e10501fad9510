"""The tap's pure parts: sequence bookkeeping (SeqTracker), text lines, output handlers."""

from __future__ import annotations

import json
import logging
import random
import re
import time
import typing
from pathlib import Path

import msgspec
import msgspec.inspect
import pytest

from zchat import limits as L
from zchat.protocol import EventType
from zchat.tap import (
    Gap,
    Probe,
    Request,
    Reset,
    SeqTracker,
    TapLog,
    Write,
    make_handler,
    parse_types,
    resume_points,
    text_line,
)

T = "r/lobby/"


def writes(out: list) -> list[tuple[int, bool]]:
    return [(o.seq, o.backfill) for o in out if isinstance(o, Write)]


def only(out: list, kind: type) -> list:
    return [o for o in out if isinstance(o, kind)]


def account(out: list) -> list[tuple[int, int]]:
    """What the records say about `T`, in written order: (first, last) spans."""
    spans = []
    for o in out:
        if isinstance(o, Write) and o.topic == T:
            spans.append((o.seq, o.seq))
        elif isinstance(o, Gap) and o.topic == T:
            spans.append((o.first, o.last))
    return spans


def contiguous(spans: list[tuple[int, int]]) -> bool:
    return all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:], strict=False))


# --- the bookkeeping -------------------------------------------------------------


def test_first_event_is_the_baseline_and_in_order_events_are_written() -> None:
    t = SeqTracker()
    out = t.event(T, 7, "e7", 0.0) + t.event(T, 8, "e8", 0.0) + t.event("r/dev/", 1, "d1", 0.0)
    assert [(o.topic, o.seq, o.item) for o in out] == [(T, 7, "e7"), (T, 8, "e8"), ("r/dev/", 1, "d1")]
    assert t.deadline() is None


def test_a_jump_asks_for_the_range_holds_live_events_then_writes_in_seq_order() -> None:
    t = SeqTracker()
    t.event(T, 1, "e1", 0.0)
    out = t.event(T, 5, "e5", 0.0)
    assert out == [Request(T, after=1, before=5, ref=out[0].ref)]
    assert out[0].limit == 3
    assert t.deadline() == pytest.approx(3.0)
    assert t.event(T, 6, "e6", 0.1) == []  # held behind the gap
    assert t.event("r/dev/", 1, "d1", 0.1) != []  # other topics are not held
    done = t.history(out[0].ref, T, 1, [(4, "e4"), (2, "e2"), (3, "e3")], 0.2)
    assert writes(done) == [(2, True), (3, True), (4, True), (5, False), (6, False)]
    assert [o.item for o in done] == ["e2", "e3", "e4", "e5", "e6"]
    assert t.deadline() is None
    assert writes(t.event(T, 7, "e7", 0.3)) == [(7, False)]


def test_what_storage_no_longer_has_becomes_a_gap_record_in_seq_order() -> None:
    t = SeqTracker()
    t.event(T, 10, "x", 0.0)
    req = t.event(T, 20, "x", 0.0)[0]
    out = t.history(req.ref, T, 10, [(13, "x"), (14, "x"), (17, "x")], 0.1)
    assert account(out) == [(11, 12), (13, 13), (14, 14), (15, 16), (17, 17), (18, 19), (20, 20)]
    assert [g.missing for g in only(out, Gap)] == [2, 2, 2]


def test_answers_to_other_requests_and_events_outside_the_range_are_ignored() -> None:
    t = SeqTracker()
    t.event(T, 1, "x", 0.0)
    req = t.event(T, 4, "x", 0.0)[0]
    assert t.history(req.ref + 1, T, 1, [(2, "x")], 0.1) == []  # another tap's, same key
    assert t.history(req.ref, "r/dev/", 1, [(2, "x")], 0.1) == []
    assert t.history(req.ref, T, 0, [(2, "x")], 0.1) == []
    out = t.history(req.ref, T, 1, [(1, "dup"), (2, "x"), (3, "x"), (4, "dup"), (9, "future")], 0.1)
    assert writes(out) == [(2, True), (3, True), (4, False)]


def test_no_answer_in_time_writes_a_gap_then_the_held_events_and_a_late_answer_is_ignored() -> None:
    t = SeqTracker(wait=3.0)
    t.event(T, 1, "x", 0.0)
    req = t.event(T, 4, "x", 0.0)[0]
    t.event(T, 5, "x", 1.0)
    assert t.tick(2.9) == []
    out = t.tick(3.0)
    assert account(out) == [(2, 3), (4, 4), (5, 5)]
    assert t.history(req.ref, T, 1, [(2, "x"), (3, "x")], 3.5) == []
    assert t.deadline() is None


def test_a_second_jump_among_held_events_is_recovered_after_the_first() -> None:
    t = SeqTracker()
    t.event(T, 1, "x", 0.0)
    first = t.event(T, 3, "x", 0.0)[0]
    t.event(T, 4, "x", 0.0)
    t.event(T, 7, "x", 0.0)  # held too, with its own gap before it
    out = t.history(first.ref, T, 1, [(2, "x")], 0.1)
    assert writes(out) == [(2, True), (3, False), (4, False)]
    second = only(out, Request)
    assert [(r.after, r.before) for r in second] == [(4, 7)]
    out = t.history(second[0].ref, T, 4, [(5, "x"), (6, "x")], 0.2)
    assert writes(out) == [(5, True), (6, True), (7, False)]


def test_a_long_gap_is_recovered_oldest_chunk_first() -> None:
    t = SeqTracker(burst=100)
    t.event(T, 1, "x", 0.0)
    out = t.event(T, 1202, "x", 0.0)
    ranges, written = [], []
    while requests := only(out, Request):
        (req,) = requests
        ranges.append((req.after, req.before, req.limit))
        assert req.limit <= L.MAX_HISTORY_PER_REQUEST
        out = t.history(req.ref, T, req.after, [(s, "x") for s in range(req.after + 1, req.before)], 0.1)
        written += writes(out)
    assert ranges == [(1, 502, 500), (501, 1002, 500), (1001, 1202, 200)]
    assert [s for s, _ in written] == list(range(2, 1203))
    assert all(backfill for s, backfill in written if s < 1202)


def test_seq_going_back_is_a_reset_and_a_new_baseline() -> None:
    t = SeqTracker()
    t.event(T, 41, "x", 0.0)
    t.event(T, 42, "x", 0.0)
    out = t.event(T, 1, "x", 1.0)
    assert out == [Reset(T, last=42, seq=1), Write(T, 1, "x")]
    assert writes(t.event(T, 2, "x", 1.0)) == [(2, False)]


def test_a_reset_while_recovering_writes_the_gap_and_held_events_first() -> None:
    t = SeqTracker()
    t.event(T, 10, "x", 0.0)
    req = t.event(T, 13, "x", 0.0)[0]
    t.event(T, 14, "x", 0.0)
    out = t.event(T, 2, "x", 0.5)
    assert account(out[:3]) == [(11, 12), (13, 13), (14, 14)]
    assert out[3:] == [Reset(T, last=14, seq=2), Write(T, 2, "x")]
    assert t.history(req.ref, T, 10, [(11, "x")], 0.6) == []
    assert t.deadline() is None


def test_close_writes_what_is_held_after_a_gap_record() -> None:
    t = SeqTracker()
    t.event(T, 1, "x", 0.0)
    t.event(T, 3, "x", 0.0)
    t.event(T, 4, "x", 0.0)
    t.event(T, 9, "x", 0.0)
    assert account(t.close()) == [(2, 2), (3, 3), (4, 4), (5, 8), (9, 9)]
    assert t.deadline() is None


def test_requests_are_paced_by_a_token_bucket() -> None:
    t = SeqTracker(burst=2, rate=4.0)
    topics = [f"r/room{i}/" for i in range(3)]
    for topic in topics:
        t.event(topic, 1, "x", 0.0)
    sent = [o for topic in topics for o in t.event(topic, 3, "x", 0.0)]
    assert [r.topic for r in sent] == topics[:2]  # the third waits for a token
    assert t.deadline() == pytest.approx(0.25)
    assert t.tick(0.2) == []
    late = t.tick(0.25)
    assert [(r.topic, r.after, r.before) for r in late] == [(topics[2], 1, 3)]
    assert t.deadline() == pytest.approx(3.0)  # the first two give up first
    assert len(only(t.tick(3.0), Gap)) == 2
    assert t.deadline() == pytest.approx(3.25)


def test_after_a_broker_restart_outstanding_requests_are_sent_again() -> None:
    t = SeqTracker()
    t.event(T, 1, "x", 0.0)
    old = t.event(T, 4, "x", 0.0)[0]
    again = t.restarted(1.0)
    assert [(r.after, r.before) for r in again] == [(1, 4)] and again[0].ref != old.ref
    assert t.history(old.ref, T, 1, [(2, "x"), (3, "x")], 1.1) == []
    assert t.deadline() == pytest.approx(4.0)
    done = t.history(again[0].ref, T, 1, [(2, "x"), (3, "x")], 1.2)
    assert writes(done) == [(2, True), (3, True), (4, False)]


def test_a_mark_past_the_last_event_recovers_the_lost_tail() -> None:
    t = SeqTracker()
    t.event(T, 1, "x", 0.0)
    t.event(T, 2, "x", 0.0)
    assert t.mark(T, 2, 1.0) == []  # nothing new: marks take no number of their own
    (req,) = t.mark(T, 5, 1.0)
    assert (req.after, req.before, req.limit) == (2, 6, 3)
    assert t.mark(T, 7, 1.1) == []  # recovering: the new top is remembered
    out = t.history(req.ref, T, 2, [(3, "x"), (4, "x"), (5, "x")], 1.2)
    assert writes(out) == [(3, True), (4, True), (5, True)]
    (tail,) = only(out, Request)
    assert (tail.after, tail.before) == (5, 8)
    assert account(t.tick(4.2)) == [(6, 7)]  # never answered
    assert writes(t.event(T, 8, "x", 5.0)) == [(8, False)]


def test_a_first_mark_is_a_baseline_and_a_known_tail_is_a_gap_on_close() -> None:
    t = SeqTracker()
    assert t.mark(T, 40, 0.0) == []
    assert writes(t.event(T, 41, "x", 0.0)) == [(41, False)]
    assert only(t.mark(T, 44, 0.1), Request)
    assert account(t.close()) == [(42, 44)]


def test_every_seq_is_accounted_for_exactly_once_whatever_is_lost() -> None:
    """A random stream with drops, late, partial and lost answers: the records of each topic
    cover every seq from the baseline to the last one exactly once, in order."""
    rng = random.Random(4)
    for _ in range(200):
        t = SeqTracker(wait=1.0, burst=3, rate=2.0)
        topics = ["r/a/", "r/b/"]
        nxt = {topic: rng.randint(1, 50) for topic in topics}
        top = dict.fromkeys(topics, 0)
        out: list = []
        inflight: list[Request] = []
        now = 0.0
        for _ in range(rng.randint(1, 120)):
            now += rng.random() * 0.3
            topic = rng.choice(topics)
            if rng.random() < 0.3:  # dropped on the way
                nxt[topic] += rng.randint(1, 700)
            if rng.random() < 0.1:  # the broker repeats the latest seq
                out += t.mark(topic, nxt[topic] - 1, now)
            else:
                out += t.event(topic, nxt[topic], "x", now)
                top[topic] = nxt[topic]
                nxt[topic] += 1
            out += t.tick(now)
            inflight += [o for o in out if isinstance(o, Request) and o not in inflight]
            if inflight and rng.random() < 0.5:
                req = inflight.pop(rng.randrange(len(inflight)))
                if rng.random() < 0.8:  # answered, maybe partly
                    kept = [(s, "x") for s in range(req.after + 1, req.before) if rng.random() < 0.9]
                    out += t.history(req.ref, req.topic, req.after, kept, now)
        out += t.close()
        for topic in topics:
            spans = [(o.seq, o.seq) if isinstance(o, Write) else (o.first, o.last)
                     for o in out if isinstance(o, Write | Gap) and o.topic == topic]
            if spans:
                assert contiguous(spans), spans
                assert spans[-1][1] == max(top[topic], nxt[topic] - 1)  # up to the last event or mark


# --- output ---------------------------------------------------------------------------

TS = 1795681304.77


def clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@pytest.mark.parametrize(("event", "line"), [
    ({"type": "message", "seq": 3, "ts": TS, "room": "lobby", "name": "alice", "text": "hi bob"},
     "#lobby alice: hi bob"),
    ({"type": "action", "seq": 3, "ts": TS, "room": "lobby", "name": "alice", "text": "waves"},
     "#lobby * alice waves"),
    ({"type": "joined", "seq": 1, "ts": TS, "room": "lobby", "name": "bob", "chat": True},
     "#lobby -> bob joined the chat"),
    ({"type": "joined", "seq": 1, "ts": TS, "room": "lobby", "name": "bob"}, "#lobby -> bob entered"),
    ({"type": "left", "seq": 4, "ts": TS, "room": "lobby", "name": "bob", "reason": "quit", "message": "bye"},
     "#lobby <- bob left (quit: bye)"),
    ({"type": "left", "seq": 4, "ts": TS, "room": "lobby", "name": "bob", "reason": "timeout"},
     "#lobby <- bob left (timeout)"),
    ({"type": "renamed", "seq": 5, "ts": TS, "room": "lobby", "old": "bob", "new": "rob"},
     "#lobby -- bob is now rob"),
    ({"type": "shutdown", "seq": 9, "ts": TS, "epoch": "e", "detail": "bye all"},
     "!! broker shutting down: bye all"),
])
def test_text_lines(event: dict, line: str) -> None:
    topic = "sys/" if event["type"] == "shutdown" else "r/lobby/"
    assert text_line(topic, event) == f"[{clock(TS)}] {line}"


@pytest.mark.parametrize(("event", "line"), [
    ({"type": "muted", "seq": 6, "ts": TS, "room": "lobby", "name": "bob", "by": "root", "seconds": 300,
      "reason": "spam"}, "#lobby -- bob was muted by root for 300 s: spam"),
    ({"type": "muted", "seq": 7, "ts": TS, "room": "lobby", "name": "bob", "by": "root", "seconds": 0},
     "#lobby -- bob may speak again (by root)"),
    ({"type": "mark", "seq": 7, "ts": TS, "room": "lobby"}, "#lobby -- latest seq 7"),
])
def test_text_lines_of_moderation_and_marks(event: dict, line: str) -> None:
    assert text_line("r/lobby/", event) == f"[{clock(TS)}] {line}"


def _sample(event_type: type) -> dict:
    """An event of `event_type` with a plausible value in every field, as the broker would encode it."""
    values = {str: "x", int: 1, float: 1.5, bool: True}
    fields = {}
    for field in msgspec.structs.fields(event_type):
        info = msgspec.inspect.type_info(field.type)
        kinds = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
        kind = next(k for k in kinds if not isinstance(k, msgspec.inspect.NoneType))
        if isinstance(kind, msgspec.inspect.ListType):
            fields[field.encode_name] = []
        elif isinstance(kind, msgspec.inspect.DictType):
            fields[field.encode_name] = {}
        else:
            fields[field.encode_name] = next(v for t, v in values.items()
                                             if type(kind).__name__.lower().startswith(t.__name__))
    return {"type": event_type.__struct_config__.tag, **fields}


@pytest.mark.parametrize("event_type", typing.get_args(EventType), ids=lambda t: t.__name__)
def test_every_event_type_has_a_text_form(event_type: type) -> None:
    event = _sample(event_type)
    msgspec.convert(event, event_type)  # the sample really is one
    line = text_line("r/lobby/", event)
    assert '{"' not in line, line  # not the raw-JSON fallback for unknown types
    assert line.isprintable()


def test_kept_mail_is_sealed_unless_opened() -> None:
    """`zchat history` writes kept private messages with these lines: the text only when it
    opened the box with the recipient's key (and added `text`), cleaned like any other."""
    kept = {"type": "direct", "seq": 0, "ts": TS, "name": "alice", "to": "carol", "from": "a1" * 32,
            "box": "QUJD" * 14, "offline": True}
    carol = "u/" + "c3" * 32 + "/"
    assert text_line(carol, kept) == f"[{clock(TS)}] mail alice -> carol: (private, sealed)"
    opened = {**kept, "text": "the secret\x1b[2J is 1234"}
    assert text_line(carol, opened) == f"[{clock(TS)}] mail alice -> carol: the secret is 1234"


def test_text_lines_are_cleaned_and_backfill_is_marked() -> None:
    evil = {"type": "message", "seq": 1, "ts": TS, "room": "lobby", "name": "al\x1b[2Jice",
            "text": "red \x1b[31malert\x1b[0m\nfake line\u202e"}
    line = text_line("r/lobby/", evil, backfill=True)
    # A line break someone typed is kept; the next line is indented, never a record of its own.
    indent = " " * len(f"[{clock(TS)}] ")
    assert line == f"[{clock(TS)}] (backfill) #lobby alice: red alert\n{indent}fake line"
    assert all(row.isprintable() for row in line.split("\n"))
    unknown = text_line("r/lobby/", {"type": "poll", "seq": 2, "ts": TS, "q": "tea?\x07"})
    assert re.fullmatch(r"\[.+\] #lobby poll: \{.*\"q\":\"tea\?.*\}", unknown) and unknown.isprintable()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_jsonl_records() -> None:
    handler = Lines()
    out = TapLog(handler, "jsonl")
    out.event("r/lobby/", {"type": "message", "seq": 3, "ts": TS, "room": "lobby", "name": "a", "text": "%s"})
    out.event("r/lobby/", {"type": "message", "seq": 4, "ts": TS, "topic": "spoof"}, backfill=True)
    out.gap(Gap("r/lobby/", 5, 7), TS)
    out.reset(Reset("r/lobby/", 9, 1), TS)
    out.epoch("abc", None, TS)
    records = [json.loads(line) for line in handler.lines]
    assert list(records[0])[:4] == ["topic", "type", "seq", "ts"] and records[0]["text"] == "%s"
    assert records[1]["topic"] == "r/lobby/" and records[1]["backfill"] is True
    assert records[2] == {"type": "gap", "topic": "r/lobby/", "from": 5, "to": 7, "missing": 3, "ts": TS}
    assert records[3] == {"type": "reset", "topic": "r/lobby/", "last": 9, "seq": 1, "ts": TS}
    assert records[4] == {"type": "epoch", "epoch": "abc", "previous": None, "ts": TS}


def test_text_records_for_gaps_resets_and_epochs() -> None:
    handler = Lines()
    out = TapLog(handler, "text")
    out.gap(Gap("r/dev/", 5, 7), TS)
    out.reset(Reset("r/dev/", 9, 1), TS)
    out.epoch("new", "old", TS)
    when = clock(TS)
    assert handler.lines == [
        f"[{when}] !! gap in #dev: 3 events missing (seq 5-7)",
        f"[{when}] !! #dev: seq went back from 9 to 1; the broker lost its history, counting again from here",
        f"[{when}] !! broker restarted: epoch old -> new"]


def test_size_rotation_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "tap.log"
    out = TapLog(make_handler(path, rotate_bytes=300, backups=2), "jsonl")
    for seq in range(1, 41):
        out.event("r/lobby/", {"type": "message", "seq": seq, "ts": TS, "text": "x" * 20})
    out.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tap.log", "tap.log.1", "tap.log.2"]
    seqs = [json.loads(line)["seq"] for name in ("tap.log.2", "tap.log.1", "tap.log")
            for line in (tmp_path / name).read_text().splitlines()]
    assert seqs == list(range(seqs[0], 41))
    assert all(p.stat().st_size <= 300 for p in tmp_path.iterdir())


def test_time_rotation_and_bad_options(tmp_path: Path) -> None:
    handler = make_handler(tmp_path / "t.log", rotate_when="midnight", backups=0)
    assert isinstance(handler, logging.handlers.TimedRotatingFileHandler) and handler.when == "MIDNIGHT"
    handler.close()
    with pytest.raises(ValueError):
        make_handler(tmp_path / "t.log", rotate_when="fortnightly")
    with pytest.raises(ValueError):
        make_handler(None, rotate_bytes=100)
    with pytest.raises(ValueError):
        make_handler(tmp_path / "t.log", rotate_bytes=100, backups=0)


def test_a_page_cut_short_by_the_brokers_byte_cap_asks_for_the_older_part() -> None:
    t = SeqTracker()
    t.event(T, 1, "e1", 0.0)
    ask = t.event(T, 10, "e10", 0.0)[0]
    assert (ask.after, ask.before) == (1, 10)
    # The newest events that fit, with `more`: nothing is written or declared lost yet.
    out = t.history(ask.ref, T, 1, [(7, "e7"), (8, "e8"), (9, "e9")], 0.1, more=True)
    assert only(out, Write) == [] and only(out, Gap) == []
    again = only(out, Request)[0]
    assert (again.after, again.before) == (1, 7)
    out = t.history(again.ref, T, 1, [(2, "e2"), (3, "e3"), (5, "e5"), (6, "e6")], 0.2)
    assert account(out) == [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (9, 9), (10, 10)]
    assert only(out, Gap)[0].first == 4  # storage no longer had 4
    assert t.deadline() is None


# --- filters, templates, counts ---------------------------------------------------------


def test_type_names_are_the_json_type_values_with_join_and_leave_as_aliases() -> None:
    assert parse_types("message, action,join,LEAVE") == {"message", "action", "joined", "left"}
    assert parse_types("gap,epoch,reset") == {"gap", "epoch", "reset"}
    with pytest.raises(ValueError, match=r"unknown type chatter, talk; known: action, away, bans, direct"):
        parse_types("talk,message,chatter")
    with pytest.raises(ValueError, match="unknown type"):
        parse_types(",")


def test_type_filter_and_count_in_the_log() -> None:
    handler = Lines()
    out = TapLog(handler, "jsonl", types=frozenset({"message", "gap"}), count=2)
    out.event(T, {"type": "joined", "seq": 1, "ts": TS, "name": "a"})
    out.gap(Gap(T, 2, 2), TS)
    out.epoch("abc", None, TS)
    assert not out.done
    out.event(T, {"type": "message", "seq": 3, "ts": TS, "text": "one"})
    assert not out.done  # the tap's own records are not counted
    out.event(T, {"type": "message", "seq": 4, "ts": TS, "text": "two"})
    assert out.done
    out.event(T, {"type": "message", "seq": 5, "ts": TS, "text": "three"})  # past the count: dropped
    out.gap(Gap(T, 6, 6), TS)
    assert [json.loads(line).get("text", "gap") for line in handler.lines] == ["gap", "one", "two"]


def test_a_template_names_record_fields_time_is_a_datetime_and_missing_fields_render_empty() -> None:
    handler = Lines()
    out = TapLog(handler, "{time:%H:%M:%S} {room} <{name}> {text}|{seq:>4}|{backfill}|{topic}")
    out.event(T, {"type": "message", "seq": 3, "ts": TS, "room": "lobby", "name": "al\x1b[2Jice",
                  "text": "hi\nthere"}, backfill=True)
    out.event(T, {"type": "joined", "seq": 4, "ts": TS, "room": "lobby", "name": "bob"})
    out.gap(Gap(T, 5, 7), TS)
    hms = time.strftime("%H:%M:%S", time.localtime(TS))
    assert handler.lines == [f"{hms} lobby <alice> hi there|   3|True|r/lobby/",
                             f"{hms} lobby <bob> |   4||r/lobby/",
                             f"{hms}  <> |||r/lobby/"]  # no seq: empty, its spec ignored
    gaps = Lines()
    TapLog(gaps, "{type} {from}-{to} ({missing})").gap(Gap(T, 5, 7), TS)
    assert gaps.lines == ["gap 5-7 (3)"]


@pytest.mark.parametrize(("template", "said"), [
    ("{time} {nmae}", "unknown field {nmae}"),
    ("{0} {text}", "name each field"),
    ("{text", "expected '}'"),
    ("plain", "unknown format 'plain'"),
])
def test_a_bad_template_is_refused_at_start(template: str, said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        TapLog(None, template)


# --- resuming ---------------------------------------------------------------------------


def test_resume_probes_a_quiet_topic_and_backfills_what_came_after_the_file() -> None:
    t = SeqTracker()
    probe = t.resume(T, 40, 0.0)[0]
    assert isinstance(probe, Probe) and (probe.topic, probe.after) == (T, 40)
    ask = only(t.probed(probe.ref, 45, 0.1), Request)[0]  # the topic got to 45 meanwhile
    assert (ask.after, ask.before) == (40, 46)
    out = t.history(ask.ref, T, 40, [(s, f"e{s}") for s in range(41, 46)], 0.2)
    assert writes(out) == [(s, True) for s in range(41, 46)] and not only(out, Gap)
    assert writes(t.event(T, 46, "e46", 0.3)) == [(46, False)]
    assert t.probed(probe.ref, 99, 0.4) == []  # answered once


def test_a_live_event_before_the_probe_answer_recovers_the_range_once() -> None:
    t = SeqTracker()
    probe = t.resume(T, 10, 0.0)[0]
    ask = only(t.event(T, 13, "e13", 0.1), Request)[0]
    assert (ask.after, ask.before) == (10, 13)
    assert t.probed(probe.ref, 13, 0.2) == []  # nothing new beyond what is held
    out = t.history(ask.ref, T, 10, [(11, "e11"), (12, "e12")], 0.3)
    assert account(out) == [(11, 11), (12, 12), (13, 13)]


def test_probes_are_paced_and_sent_again_after_a_broker_restart() -> None:
    t = SeqTracker(burst=1, rate=1.0)
    first = t.resume("r/a/", 5, 0.0)
    assert only(first, Probe) and t.resume("r/b/", 7, 0.0) == []
    assert t.deadline() == pytest.approx(1.0)
    later = only(t.tick(1.0), Probe)
    assert [(p.topic, p.after) for p in later] == [("r/b/", 7)]
    again = only(t.restarted(5.0), Probe)
    assert sorted(p.topic for p in again) == ["r/a/"]  # the token refilled for one of two
    assert sorted(p.topic for p in only(t.tick(6.0), Probe)) == ["r/b/"]


def test_resume_points_read_the_last_seq_of_each_room_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "tap.jsonl"
    lines = [{"type": "epoch", "epoch": "e", "ts": TS},
             {"topic": "r/a/", "type": "message", "seq": 3},
             {"topic": "r/b/", "type": "joined", "seq": 8},
             {"topic": "r/a/", "type": "gap", "from": 4, "to": 6},
             {"topic": "r/b/", "type": "reset", "last": 8, "seq": 1},
             {"topic": "sys/", "type": "shutdown", "seq": 99}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"topic": "r/a/", "type": "mess')
    assert resume_points(path, ["r/"]) == {"r/a/": 6, "r/b/": 0}
    assert resume_points(path, ["r/b/"]) == {"r/b/": 0}
    assert resume_points(tmp_path / "none.jsonl", ["r/"]) == {}
