"""Client-side sockets: a CURVE client socket, and what its monitor says about the handshake.

Shared by the client library, the tap and `zchat stats`/`health`, so they all
connect the same way and explain silence the same way (nothing listening,
key refused, wrong server key).
"""

from __future__ import annotations

import zmq
from zmq.utils.monitor import recv_monitor_message

from zchat import limits as L
from zchat.e2e import fingerprint
from zchat.endpoints import Endpoints
from zchat.keys import KeyPair

BUSY_STATUS = 500  # ZAP status of a refusal for now (a limit), as the handshake monitor reports it


def curve_client(ctx: zmq.Context, kind: int, endpoints: Endpoints, server_key: bytes,
                 keypair: KeyPair, linger: int = 0) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = linger
    sock.curve_serverkey = server_key
    sock.curve_publickey = keypair.public
    sock.curve_secretkey = keypair.secret
    sock.heartbeat_ivl = L.ZMQ_HEARTBEAT_IVL_MS
    sock.heartbeat_timeout = L.ZMQ_HEARTBEAT_TIMEOUT_MS
    if endpoints.ipv6:
        sock.ipv6 = True  # without it a tcp://[::1] connect silently never happens
    return sock


class HandshakeWatch:
    """Reads a client socket's monitor and remembers how far connecting got."""

    def __init__(self, sock: zmq.Socket, identity: str = "") -> None:
        self.identity = identity  # our public key (hex): named when the broker refuses it
        self.monitor = sock.get_monitor_socket()
        self.connected = False  # a TCP connection was made
        self.refused = 0  # connection attempts that failed (nothing listening)
        self.handshake = "none"  # none | ok | auth | failed
        self.status = 0  # the ZAP status of a refusal: 400 this key may not connect, 500 not now
        self.disconnects = 0  # established connections that closed (the peer went away)

    def drain(self) -> list[str]:
        """Read pending monitor events; return the handshake failures among them
        ("auth": the broker refused our key; "failed": wrong server key or protocol;
        "refused": our key refused at a reconnection, after a handshake that succeeded)."""
        failures = []
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return failures
            kind = event["event"]
            if kind == zmq.EVENT_CONNECTED:
                self.connected = True
            elif kind == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
            elif kind == zmq.EVENT_CONNECT_RETRIED:
                self.refused += 1
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake = "ok"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH and self.handshake != "ok":
                self.handshake = "auth"
                self.status = event["value"]
                failures.append("auth")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                # Refused at a reconnection. libzmq never tries again after a refusal: the
                # caller must (status 500, "not now") or give up (400: banned, revoked).
                self.status = event["value"]
                failures.append("refused")
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                if self.handshake != "ok":
                    self.handshake = "failed"
                    failures.append("failed")

    def explain(self, endpoint: str, flags: str = "") -> tuple[str, str]:
        """Why nothing came back, as (code, one line for the user); `flags`: the connection
        flags the user gave (Endpoints.flags), repeated in the hint."""
        if self.handshake == "auth" and self.status == BUSY_STATUS:
            return "busy", (f"the broker at {endpoint} refused the connection for now: too many "
                            "connections with this key, too many new keys from this address, or it "
                            "is full (its log says which); try again later")
        if self.handshake == "auth":
            key = f" {fingerprint(self.identity)}" if self.identity else ""
            public = f" (your public key: {self.identity})" if self.identity else ""
            return "auth", (f"the broker refused this key{key} ({endpoint}): ask its operator to add "
                            f"your public key to its authorized keys{public}, or pass --key")
        if self.handshake == "failed" or (self.connected and self.handshake == "none"):
            return "handshake", (f"the security handshake with {endpoint} failed: is --server-key the "
                                 "broker's public key?")
        if self.handshake == "none":
            return "unreachable", (f"no broker answers at {endpoint}: is it running? "
                                   f"(start one with: zchat broker{flags})")
        return "timeout", f"the broker at {endpoint} accepted the connection but did not answer"

    def close(self, sock: zmq.Socket) -> None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
