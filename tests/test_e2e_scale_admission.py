"""Issue 11: a broker at its descriptor ceiling, against a real broker over tcp with CURVE.

The broker admits RLIMIT_NOFILE - FD_RESERVE connections (here 256 - 128 = 128). Past them a
new client is refused at the handshake at once (ZAP status 500) and told so in plain words,
the members already in keep talking, and the broker does not spin.
"""

from __future__ import annotations

import resource
import time

import pytest
import zmq
from conftest import CLOCK, Chat
from test_e2e_connections import PING, Conns, went_quiet

from zchat import keys
from zchat import limits as L

FD_LIMIT = 256
CAP = FD_LIMIT - L.FD_RESERVE  # connections, both sockets together


@pytest.mark.timeout(90)
def test_past_the_connection_cap_new_clients_are_refused_at_once_and_members_stay_served(chat: Chat) -> None:
    # A long client timeout: the fill below must not be cut for silence while it goes on.
    chat.start_broker("--client-timeout", "60", "--new-keys-per-minute", "0",
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT)))
    chat.broker.wait_for(rf"descriptors: soft limit {FD_LIMIT} .*up to {CAP} connections")
    alice = chat.joined_client("alice")
    conns = Conns(chat)
    try:
        admitted = 2  # alice's
        refused_at = None
        for _ in range(CAP):  # pairs of connections, as clients hold them, until one is refused
            pair = keys.KeyPair(*zmq.curve_keypair())
            push = conns.connect(zmq.PUSH, pair)
            status = push.handshake()
            if status:
                refused_at = admitted
                break
            push.sock.send(PING)  # a connection that speaks, as a client's does
            sub = conns.connect(zmq.SUB, pair, topics=(b"sys/",))
            status = sub.handshake()
            if status:
                refused_at = admitted + 1
                break
            admitted += 2
        assert status == 500, "never refused: the broker would run out of descriptors"
        assert refused_at is not None and CAP <= refused_at <= CAP + 2, refused_at
        chat.broker.wait_for(r"refused key \w+ from 127\.0\.0\.1 at the handshake: the broker is at its "
                             r"connection limit")
        # A new client is told at once, in words, and exits.
        started = time.monotonic()
        bob = chat.client("bob")
        line = bob.wait_for(r"^zchat: ", timeout=15)
        assert "refused the connection for now" in line and "full" in line, line
        assert bob.wait_exit(5) == 1
        assert time.monotonic() - started < 10
        # Those in are still served, and the broker is not busy refusing.
        alice.send("still served")
        alice.wait_for(rf"^{CLOCK} alice: still served$")
        assert went_quiet(chat.broker.proc.pid, within=6.0), "the broker kept spinning at its cap"
        assert chat.broker.proc.poll() is None
    finally:
        conns.close()
