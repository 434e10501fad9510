"""Connections: which descriptors belong to which identity, and cutting them, on real sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from zchat.connections import Connections

pytestmark = pytest.mark.timeout(30)

ALICE, BOB = "a1" * 32, "b2" * 32


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for ours, theirs in made:
        ours.close()
        theirs.close()


def pair(pairs: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    """(the broker's end, the peer's end) of a connection."""
    made = socket.socketpair()
    pairs.append(made)
    made[1].settimeout(5)
    return made


def test_seen_and_closed_follow_each_descriptor() -> None:
    connections = Connections()
    connections.seen(ALICE, 10)
    connections.seen(ALICE, 11)
    connections.seen(BOB, 12)
    assert connections.knows(ALICE) and connections.knows(BOB)
    assert connections.closed(10) == ALICE and connections.knows(ALICE)  # one left
    assert connections.closed(11) == ALICE and not connections.knows(ALICE)
    assert connections.closed(11) is None  # already forgotten
    assert connections.closed(99) is None  # never known


def test_a_reused_descriptor_belongs_to_its_new_identity() -> None:
    """The kernel hands a closed descriptor to the next connection; the close event may come
    late. The old owner must not keep it (or be cut through it)."""
    connections = Connections()
    connections.seen(ALICE, 10)
    connections.seen(BOB, 10)
    assert not connections.knows(ALICE) and connections.knows(BOB)
    assert connections.closed(10) == BOB


def test_seen_twice_is_counted_once() -> None:
    connections = Connections()
    connections.seen(ALICE, 10)
    connections.seen(ALICE, 10)
    assert connections.closed(10) == ALICE and not connections.knows(ALICE)


def test_cut_shuts_down_every_connection_of_one_identity_only(pairs) -> None:  # type: ignore[no-untyped-def]
    (a1, peer_a1), (a2, peer_a2), (b1, peer_b1) = pair(pairs), pair(pairs), pair(pairs)
    connections = Connections()
    connections.seen(ALICE, a1.fileno())
    connections.seen(ALICE, a2.fileno())
    connections.seen(BOB, b1.fileno())
    assert connections.cut(ALICE) == 2
    assert peer_a1.recv(1) == b"" and peer_a2.recv(1) == b""  # alice's peers see the end
    b1.sendall(b"x")
    assert peer_b1.recv(1) == b"x"  # bob's connection untouched
    # The descriptors stay open (libzmq owns them): only the connection was shut down.
    os.fstat(a1.fileno())  # EBADF if the descriptor had been closed
    os.fstat(a2.fileno())
    assert connections.knows(ALICE)  # until the monitor reports them closed
    assert connections.cut("c3" * 32) == 0


def test_cut_skips_a_descriptor_already_gone(pairs) -> None:  # type: ignore[no-untyped-def]
    ours, peer = pair(pairs)
    gone = socket.socket()
    fd = gone.fileno()
    gone.close()  # a stale number: nothing to shut down (or someone else's by now)
    connections = Connections()
    connections.seen(ALICE, fd)
    connections.seen(ALICE, ours.fileno())
    assert connections.cut(ALICE) == 1
    assert peer.recv(1) == b""
