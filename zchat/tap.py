"""The tap: subscribe to every public room and the system topic, log each event.

Just another SUB holding a CURVE key: everything the broker publishes is a
complete, timestamped record, so this needs no extra protocol.
"""

from __future__ import annotations

import signal
import sys
from typing import TextIO

import msgspec
import zmq

from zchat import limits as L
from zchat.endpoints import Endpoints
from zchat.keys import KeyPair
from zchat.protocol import ROOM_PREFIX, SYSTEM_TOPIC

_to_builtins = msgspec.to_builtins
_json = msgspec.json.Encoder()


def run_tap(endpoints: Endpoints, server_key: bytes, keypair: KeyPair,
            out: TextIO = sys.stdout, heartbeats: bool = False) -> int:
    """Write one JSON object per published event: {"topic": ..., "event": {...}}."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.curve_serverkey = server_key
    sub.curve_publickey = keypair.public
    sub.curve_secretkey = keypair.secret
    sub.heartbeat_ivl = L.ZMQ_HEARTBEAT_IVL_MS
    sub.heartbeat_timeout = L.ZMQ_HEARTBEAT_TIMEOUT_MS
    if endpoints.ipv6:
        sub.ipv6 = True
    sub.subscribe(ROOM_PREFIX.encode())
    sub.subscribe(SYSTEM_TOPIC.encode())
    sub.connect(endpoints.publish)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            data = sub.recv()
            topic, _, body = data.partition(b" ")
            if not heartbeats and topic == SYSTEM_TOPIC.encode() and b'"type":"heartbeat"' in body[:40]:
                continue
            out.write('{"topic":' + _json.encode(topic.decode("utf-8", "replace")).decode()
                      + ',"event":' + body.decode("utf-8", "replace") + "}\n")
            out.flush()
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close(0)
        ctx.term()
