"""End-to-end private messages: the sender's client encrypts, the reader's client opens.

Pure: PyNaCl (libsodium) only, no sockets, no clock. A zchat key pair is a
Curve25519 pair (CURVE uses the same keys), so a private message is NaCl
`crypto_box`: Box(own secret, other's public).encrypt(UTF-8 text), i.e. a random
24-byte nonce followed by the ciphertext and its 16-byte MAC, carried in
standard base64. The sender makes two boxes of each message: one for the
recipient's key and one for its own (its readable copy). A reader opens a
`direct` with Box(own secret, the key in its `from` field), which is right for
both copies. The broker routes and stores the boxes and can open neither.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

MAX_BOXES = 256  # peers whose shared key a Keyring keeps (making one is a scalar multiplication)


class OpenError(Exception):
    """A box that does not open: not encrypted to this key, from another sender, or damaged."""


def public_key(identity: str) -> PublicKey:
    """The NaCl public key of a hex identity (the ZAP User-Id); ValueError if malformed."""
    raw = bytes.fromhex(identity)
    if len(raw) != PublicKey.SIZE:
        raise ValueError(f"an identity is {PublicKey.SIZE * 2} hex digits")
    return PublicKey(raw)


def fingerprint(identity: str) -> str:
    """The start of a key, grouped for reading aloud: '1a2b 3c4d 5e6f 7081'."""
    return " ".join(identity[i:i + 4] for i in range(0, 16, 4))


def seal(box: Box, text: str) -> str:
    """base64(nonce + ciphertext + MAC) of `text` in UTF-8, with a random nonce."""
    return base64.b64encode(bytes(box.encrypt(text.encode()))).decode("ascii")


def open_box(box: Box, data: str) -> str:
    """The text sealed in `data`; OpenError if it is not base64, does not authenticate,
    or is not UTF-8."""
    try:
        raw = base64.b64decode(data, validate=True)
        return box.decrypt(raw).decode("utf-8")
    except (binascii.Error, CryptoError, ValueError, UnicodeDecodeError, TypeError) as exc:
        raise OpenError(str(exc) or type(exc).__name__) from None


class Keyring:
    """One key's view: its secret key, and the Box with each peer key it has used."""

    def __init__(self, secret: bytes, max_boxes: int = MAX_BOXES) -> None:
        """`secret` is the 32-byte Curve25519 secret key (z85-decoded from a zchat key file)."""
        self._secret = PrivateKey(secret)
        self.identity = bytes(self._secret.public_key).hex()
        self._boxes: OrderedDict[str, Box] = OrderedDict()
        self._max_boxes = max_boxes

    def box(self, identity: str) -> Box:
        """Box(own secret, identity's public key), kept for reuse (least recently used go)."""
        box = self._boxes.get(identity)
        if box is None:
            box = self._boxes[identity] = Box(self._secret, public_key(identity))
            if len(self._boxes) > self._max_boxes:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(identity)
        return box

    def seal_for(self, recipient: str, text: str) -> tuple[str, str]:
        """(box for `recipient`, self_box for ourselves): the two boxes of a `msg`."""
        return seal(self.box(recipient), text), seal(self.box(self.identity), text)

    def open_from(self, sender: str, data: str) -> str:
        """Open a box that `sender` (a hex identity: a direct's `from`) sealed for us."""
        try:
            box = self.box(sender)
        except (ValueError, TypeError, CryptoError) as exc:  # malformed, or a low-order point
            raise OpenError(f"not a usable key: {exc}") from None
        return open_box(box, data)
