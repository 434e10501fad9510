"""Sealed private streams: every publication on a `u/<id>/` topic is encrypted to its recipient.

libzmq's XPUB cannot be trusted to install an approved subscription on the right
connection (an upstream data frame shifts its record of the last pipe read), so a
private event may reach the wrong subscriber. Sealing makes such a misdelivery
harmless: the broker encrypts each private event with NaCl `crypto_box` from its
own secret key to the recipient's public key (both the Curve25519 keys CURVE
already uses), and only the recipient can open it.

A sealed frame is `u/<id>/`, one space, then the 24-byte nonce and the box
(ciphertext and its 16-byte MAC): exactly what PyNaCl's `Box.encrypt` returns.
Nonces are random. Pure: no sockets, no clock.
"""

from __future__ import annotations

import os

from nacl.bindings import crypto_box_easy_afternm, crypto_box_open_easy_afternm
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from zchat.protocol import PRIVATE_PREFIX

NONCE_BYTES = Box.NONCE_SIZE  # 24
MAC_BYTES = 16
OVERHEAD = NONCE_BYTES + MAC_BYTES  # bytes a sealed body adds to the JSON event
BOX_CACHE_SIZE = 20_000  # recipients whose box the broker keeps (one per online peer at most)

_PRIVATE = PRIVATE_PREFIX.encode()
_Z85 = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_VALUE = {char: value for value, char in enumerate(_Z85)}


class SealError(Exception):
    """A sealed payload that does not open with this box: not ours, damaged or forged."""


def z85_decode(text: bytes | str) -> bytes:
    """ZeroMQ's Z85 (RFC 32): 5 characters carry 4 bytes, big-endian."""
    data = text.encode("ascii") if isinstance(text, str) else text
    if len(data) % 5:
        raise ValueError("Z85 text must be a multiple of 5 characters long")
    out = bytearray()
    for start in range(0, len(data), 5):
        value = 0
        for char in data[start:start + 5]:
            digit = _Z85_VALUE.get(char)
            if digit is None:
                raise ValueError(f"not a Z85 character: {chr(char)!r}")
            value = value * 85 + digit
        if value >= 1 << 32:
            raise ValueError("Z85 group out of range")
        out += value.to_bytes(4, "big")
    return bytes(out)


def key_bytes(key: bytes | str) -> bytes:
    """A 32-byte Curve25519 key from its z85 (40 characters) or hex (64 digits) form."""
    text = key.decode("ascii") if isinstance(key, bytes) else key
    if len(text) == 64:
        return bytes.fromhex(text)
    if len(text) == 40:
        return z85_decode(text)
    raise ValueError("a key is 40 z85 characters or 64 hex digits")


def box_for(secret_z85: bytes, public: bytes | str) -> Box:
    """The box between our secret key (z85, as in KeyPair) and a peer's public key (z85 or hex).
    ValueError for a key no box can be made with (libsodium refuses a low-order point, such as
    all zeros: no shared secret)."""
    try:
        return Box(PrivateKey(key_bytes(secret_z85)), PublicKey(key_bytes(public)))
    except CryptoError as exc:  # nacl's RuntimeError is one
        raise ValueError("not a usable public key (no shared secret can be made with it)") from exc


def seal(box: Box, plaintext: bytes) -> bytes:
    """nonce + crypto_box(plaintext): the same bytes as `box.encrypt(plaintext)`, a little faster."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + crypto_box_easy_afternm(plaintext, nonce, box.shared_key())


def open_sealed(box: Box, payload: bytes) -> bytes:
    """The plaintext of `seal(box', plaintext)` where box' is the other side's box; else SealError."""
    if len(payload) < OVERHEAD:
        raise SealError("too short to be sealed")
    try:
        return crypto_box_open_easy_afternm(payload[NONCE_BYTES:], payload[:NONCE_BYTES], box.shared_key())
    except CryptoError:
        raise SealError("does not open with this key") from None


def open_publication(box: Box, frame: bytes) -> bytes:
    """A received frame made readable: a `u/` publication opened (topic, space, JSON); any other
    returned as it is. Raises SealError for a `u/` publication that does not open."""
    if not frame.startswith(_PRIVATE):
        return frame
    topic, sep, payload = frame.partition(b" ")
    if not sep:
        raise SealError("no topic separator")
    return topic + b" " + open_sealed(box, payload)


class BoxCache:
    """The broker's boxes, one per recipient identity (hex), at most `size` of them.

    Making a box costs a Curve25519 scalar multiplication (tens of microseconds); sealing
    with a kept one costs a few. When full, the oldest entry goes: bounded whatever the
    number of keys that come and go."""

    def __init__(self, secret_z85: bytes, size: int = BOX_CACHE_SIZE) -> None:
        self._secret = PrivateKey(key_bytes(secret_z85))
        self._size = size
        self._boxes: dict[str, Box] = {}

    def __len__(self) -> int:
        return len(self._boxes)

    def box(self, identity: str) -> Box:
        box = self._boxes.get(identity)
        if box is None:
            box = Box(self._secret, PublicKey(bytes.fromhex(identity)))
            if len(self._boxes) >= self._size:
                del self._boxes[next(iter(self._boxes))]
            self._boxes[identity] = box
        return box

    def seal_publication(self, topic: str, body: bytes) -> bytes:
        """The frame for a private topic `u/<id>/`: topic, space, body sealed to <id>."""
        identity = topic[len(PRIVATE_PREFIX):-1]
        return topic.encode() + b" " + seal(self.box(identity), body)
