"""The dispatcher's history pages in bytes (issue 13, item 4): a page holds the newest events
that fit the key's allowance and says `more`; what each key was sent on its private stream is
counted for the shell's slow-consumer check. A real (in-memory) store, no sockets."""

from __future__ import annotations

import json

import msgspec
import pytest
from corekit import Unsealed, body, subscribe_all, u

from zchat import limits as L
from zchat.core import BrokerCore, Limits
from zchat.dispatch import Dispatcher
from zchat.history import HistoryStore
from zchat.protocol import Code, Error, History, decode_publication

pytestmark = pytest.mark.timeout(30)

A = "a1" * 32
LOBBY = "r/lobby/"
TEXT = "x" * 1900  # about 2 KB stored per event


def stored(seq: int) -> bytes:
    return json.dumps({"type": "message", "seq": seq, "ts": 1.0, "room": "lobby", "name": "bob",
                       "text": TEXT}).encode()


def setup(events: int, **limits: int) -> tuple[BrokerCore, Dispatcher, list[bytes]]:
    store = HistoryStore(":memory:")
    store.write([(LOBBY, seq, 1.0, stored(seq)) for seq in range(1, events + 1)], [], [], 1.0)
    core = BrokerCore("e", 0.0, Limits(**limits), seqs=store.last_seqs())
    sent: list[bytes] = []
    subscribe_all(core, A)
    return core, Dispatcher(core, store, sent.append, Unsealed()), sent  # type: ignore[arg-type]


def ask(core: BrokerCore, dispatch: Dispatcher, sent: list[bytes], now: float,
        **fields: object) -> History | Error:
    dispatch.add(core.on_message(A, body(type="history", room="lobby", **fields), 1, now))
    dispatch.flush(now)
    topic, event = decode_publication(sent[-1])
    assert topic == u(A)
    assert isinstance(event, (History, Error))
    return event


def seqs(page: History) -> list[int]:
    return [msgspec.json.decode(raw)["seq"] for raw in page.events]


def test_a_page_holds_the_newest_events_that_fit_and_says_there_is_more() -> None:
    core, dispatch, sent = setup(500)
    page = ask(core, dispatch, sent, 1.0, limit=500, ref=1)
    assert isinstance(page, History) and page.more and page.ref == 1
    assert sum(len(raw) for raw in page.events) <= L.MAX_HISTORY_PAGE_BYTES
    got = seqs(page)
    assert got == list(range(500 - len(got) + 1, 501))  # the newest, oldest first
    assert 100 < len(got) < 500
    assert len(sent[-1]) < L.MAX_HISTORY_PAGE_BYTES + 1024
    # Paging on with `before` reaches the rest.
    older = ask(core, dispatch, sent, 1.1, before=got[0], limit=500, ref=2)
    assert isinstance(older, History)
    assert seqs(older)[-1] == got[0] - 1


def test_a_page_that_fits_whole_has_no_more() -> None:
    core, dispatch, sent = setup(50)
    page = ask(core, dispatch, sent, 1.0, limit=500)
    assert isinstance(page, History) and not page.more and seqs(page) == list(range(1, 51))


def test_history_bytes_are_charged_until_requests_are_refused_naming_their_ref() -> None:
    core, dispatch, sent = setup(500, history_bytes_burst=600_000, history_bytes_per_second=1000)
    pages = 0
    for ref in range(1, 10):
        answer = ask(core, dispatch, sent, 1.0, limit=500, ref=ref)
        if isinstance(answer, Error):
            assert (answer.code, answer.ref) == (Code.RATE_LIMITED, ref)
            break
        pages += 1
    # 600 KB at 256 KiB a page: two whole pages, then the remainder, then one event on the
    # last few bytes (a page always brings one when any are left), then no more.
    assert pages == 4
    assert core.history_allowance(A, 1.0) == 0


def test_a_join_brings_less_history_while_the_bucket_is_spent() -> None:
    core, dispatch, sent = setup(500, history_bytes_burst=100_000, history_bytes_per_second=0)
    core.spend_history(A, 100_000)
    dispatch.add(core.on_message(A, body(type="join", name="alice", history=500), 1, 1.0))
    dispatch.flush(1.0)
    pages = [event for _, event in map(decode_publication, sent) if isinstance(event, History)]
    assert len(pages) == 1 and pages[0].events == [] and pages[0].more


def test_what_a_key_is_sent_on_its_private_stream_is_counted_for_the_shell() -> None:
    core, dispatch, sent = setup(500)
    ask(core, dispatch, sent, 1.0, limit=500)
    dispatch.add(core.on_message(A, body(type="history", room="No Such Room"), 1, 1.0))  # an error
    dispatch.flush(1.0)
    assert [type(event) for _, event in map(decode_publication, sent)] == [History, Error]
    assert dispatch.unread == {u(A): sum(len(frame) for frame in sent)}
