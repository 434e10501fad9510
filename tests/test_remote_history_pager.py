"""Issue 14, item 18: the remote `zchat history` pages through a room (before/more) until
the room's start, its --limit, or an event older than --since; pure, no sockets."""

from __future__ import annotations

import json

import msgspec

from zchat.protocol import History, HistoryRequest
from zchat.remote_history import HistoryPager

ROOM = "lobby"


def _stored(count: int) -> list[bytes]:
    return [json.dumps({"type": "message", "seq": seq, "ts": 1000.0 + seq, "room": ROOM, "name": "a",
                        "text": f"line {seq}"}).encode() for seq in range(1, count + 1)]


def _answer(stored: list[bytes], request: HistoryRequest, page: int) -> History:
    """What the broker answers: the newest `limit` below `before`, at most `page` of them
    (standing in for the byte cap), `more` when the cap left some out."""
    upto = len(stored) if request.before is None else request.before - 1
    found = stored[max(0, upto - request.limit):upto]
    events = found[-page:]
    return History(seq=1, ts=0.0, room=ROOM, events=[msgspec.Raw(body) for body in events], after=0,
                   upto=upto, ref=request.ref, more=len(events) < len(found))


def _run(pager: HistoryPager, stored: list[bytes], page: int = 1000) -> tuple[list[int], int]:
    requests = 0
    while not pager.done:
        requests += 1
        request = pager.request(requests)
        pager.take(_answer(stored, request, page), request.limit)
    return [json.loads(body)["seq"] for body in pager.oldest_first()], requests


def test_pages_through_a_room_capped_in_bytes_to_its_start() -> None:
    seqs, requests = _run(HistoryPager(ROOM), _stored(1234), page=100)
    assert seqs == list(range(1, 1235)) and requests == 13


def test_pages_past_the_per_request_count() -> None:
    seqs, requests = _run(HistoryPager(ROOM), _stored(1234))
    assert seqs == list(range(1, 1235)) and requests == 3  # 500 + 500 + 234


def test_limit_since_and_grep() -> None:
    assert _run(HistoryPager(ROOM, limit=7), _stored(1234), page=5)[0] == list(range(1228, 1235))
    since = HistoryPager(ROOM, since=1000.0 + 1200)
    assert _run(since, _stored(1234), page=100)[0] == list(range(1200, 1235))
    assert _run(HistoryPager(ROOM, grep="LINE 12", limit=3), _stored(1234), page=100)[0] == [1232, 1233, 1234]
    assert _run(HistoryPager(ROOM, grep="LINE 12"), _stored(1234), page=100)[0] == \
        [12, *range(120, 130), *range(1200, 1235)]


def test_an_empty_room_is_told_apart() -> None:
    pager = HistoryPager(ROOM)
    _run(pager, [])
    assert pager.done and not pager.found_any and pager.oldest_first() == []
