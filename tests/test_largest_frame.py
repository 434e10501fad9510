"""Issue 14, item 21: PROTOCOL.md states the largest frame the broker sends a client
(MAX_PUBLISHED_FRAME_BYTES), so a client can size its receive limit. A history answer is
the largest: a full page, its envelope, its topic and its seal must fit the bound."""

from __future__ import annotations

import json

import msgspec
import zmq
from corekit import sub, u
from zmq.utils import z85

from zchat import limits as L
from zchat.core import BrokerCore
from zchat.dispatch import Dispatcher
from zchat.history import HistoryStore
from zchat.protocol import History, RoomList, WhoReply, encode_publication, room_topic
from zchat.sealing import OVERHEAD, BoxCache, box_for, open_publication

ROOM = "r" * L.MAX_ROOM_CHARS
EVENTS = L.MAX_HISTORY_PER_REQUEST


def _bodies(total: int, count: int, first_seq: int) -> list[bytes]:
    """`count` stored room events of `total` bytes together (sizes differ by at most one)."""
    bodies = []
    for index in range(count):
        size = total // count + (1 if index < total % count else 0)
        seq = first_seq + index
        head = json.dumps({"type": "message", "seq": seq, "ts": 1.5e9, "room": ROOM, "name": "a",
                           "text": ""}, separators=(",", ":")).encode()
        body = head[:-2] + b"x" * (size - len(head)) + b'"}'
        assert len(body) == size
        bodies.append(body)
    return bodies


def test_a_full_history_page_from_the_dispatcher_fits_the_stated_bound() -> None:
    public, secret = zmq.curve_keypair()
    server_public, server_secret = zmq.curve_keypair()
    identity = z85.decode(public).hex()
    core = BrokerCore("epoch", 0.0)
    store = HistoryStore(":memory:")
    sent: list[bytes] = []
    dispatch = Dispatcher(core, store, sent.append, BoxCache(server_secret))
    # One older event than a page holds, so the answer is a full page and says `more`.
    bodies = _bodies(L.MAX_HISTORY_PAGE_BYTES + 600, EVENTS + 1, first_seq=1)
    store.write([(room_topic(ROOM), seq, 1.5e9, body) for seq, body in enumerate(bodies, 1)], [], [], 0.0)
    core.seqs[room_topic(ROOM)] = len(bodies)
    ok, _ = sub(core, identity, u(identity))
    assert ok
    request = {"type": "history", "room": ROOM, "limit": EVENTS, "ref": 2**53}
    dispatch.add(core.on_message(identity, json.dumps(request).encode(), 1, 0.0))
    dispatch.flush(1.5e9)
    [frame] = [frame for frame in sent if frame.startswith(u(identity).encode())]
    answer = json.loads(open_publication(box_for(secret, server_public), frame).partition(b" ")[2])
    assert answer["type"] == "history" and answer["more"] is True and answer["ref"] == 2**53
    stored = sum(len(json.dumps(event, separators=(",", ":"))) for event in answer["events"])
    assert L.MAX_HISTORY_PAGE_BYTES - 600 <= stored <= L.MAX_HISTORY_PAGE_BYTES  # a full page
    assert len(frame) <= L.MAX_PUBLISHED_FRAME_BYTES


def test_a_maximal_history_answer_fits_the_stated_bound_exactly_as_derived() -> None:
    """Every field at its largest: the page's bytes exactly, 500 events, numbers at 2^53,
    the longest JSON float, a 32-character room: the 826 bytes PROTOCOL.md §13.3 adds up."""
    raw = [msgspec.Raw(body) for body in _bodies(L.MAX_HISTORY_PAGE_BYTES, EVENTS, first_seq=1)]
    assert sum(len(item) for item in raw) == L.MAX_HISTORY_PAGE_BYTES
    answer = History(seq=2**53, ts=-1.7976931348623157e308, room=ROOM, events=raw, after=2**53,
                     upto=2**53, lost=EVENTS, ref=2**53, more=True)
    _, server_secret = zmq.curve_keypair()
    public, _ = zmq.curve_keypair()
    topic = u(z85.decode(public).hex())
    plain = encode_publication(topic.encode(), answer)
    frame = BoxCache(server_secret).seal_publication(topic, plain.partition(b" ")[2])
    assert len(frame) == L.MAX_HISTORY_PAGE_BYTES + 826
    assert len(frame) <= L.MAX_PUBLISHED_FRAME_BYTES


def test_who_and_rooms_replies_at_their_caps_are_far_smaller() -> None:
    names = [f"{index:0{L.MAX_NAME_CHARS}d}" for index in range(L.MAX_NAMES_IN_REPLY)]
    rooms = {f"{index:0{L.MAX_ROOM_CHARS}d}": L.MAX_PEERS for index in range(L.MAX_ROOMS_IN_REPLY)}
    topic = u("f" * 64).encode()
    for reply in (WhoReply(seq=2**53, ts=1.5e9, room=ROOM, names=names, count=L.MAX_PEERS, ref=2**53),
                  RoomList(seq=2**53, ts=1.5e9, rooms=rooms, count=10**6, ref=2**53)):
        assert len(encode_publication(topic, reply)) + OVERHEAD < 32 * 1024  # as PROTOCOL.md says


def test_the_bound_is_a_page_and_one_kib() -> None:
    assert L.MAX_PUBLISHED_FRAME_BYTES == L.MAX_HISTORY_PAGE_BYTES + 1024
