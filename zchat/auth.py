"""ZAP (ZeroMQ authentication protocol, RFC 27) decisions, without sockets.

The broker binds a REP socket on inproc://zeromq.zap.01 before it binds its
CURVE sockets and answers each request with `zap_reply`. The User-Id we hand
back is the hex of the client's public key: every message and subscription
the broker receives then carries a sender identity no client can forge.
"""

from __future__ import annotations

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zchat"


def zap_reply(request: list[bytes]) -> list[bytes]:
    """Answer one ZAP request: accept any CURVE key (open mode), refuse the rest."""
    if len(request) < 6:
        # Malformed: RFC 27 says reply 500 when we can still address it.
        request_id = request[1] if len(request) > 1 else b""
        return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
    version, request_id, _domain, _address, _identity, mechanism = request[:6]
    credentials = request[6:]
    if version != b"1.0":
        return [b"1.0", request_id, b"500", b"unsupported ZAP version", b"", b""]
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
    user_id = credentials[0].hex().encode()
    return [b"1.0", request_id, b"200", b"OK", user_id, b""]
