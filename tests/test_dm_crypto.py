"""Unit tests of zchat.e2e: sealing and opening end-to-end private messages. Pure, no sockets.

The keys are CURVE key pairs made by libzmq, as every zchat key is: the point is that they
are NaCl crypto_box keys as they are, and that what a foreign client makes with libsodium's
crypto_box_easy (PyNaCl's low-level binding here) opens, and the other way round.
"""

from __future__ import annotations

import base64

import pytest
import zmq
from nacl.bindings import crypto_box, crypto_box_open
from nacl.utils import random
from zmq.utils import z85

from zchat import limits as L
from zchat.e2e import Keyring, OpenError, fingerprint, open_box, seal
from zchat.protocol import Code, Msg, ProtocolError, decode_client_message, encode_client_message


def curve_keyring() -> tuple[Keyring, bytes, bytes]:
    """A keyring from a fresh CURVE key pair, with the raw public and secret keys."""
    public, secret = zmq.curve_keypair()
    keyring = Keyring(z85.decode(secret))
    assert keyring.identity == z85.decode(public).hex()  # the ZAP User-Id
    return keyring, z85.decode(public), z85.decode(secret)


def test_a_message_opens_for_its_recipient_and_for_its_sender_only() -> None:
    alice, bob, mallory = (curve_keyring()[0] for _ in range(3))
    box, self_box = alice.seal_for(bob.identity, "the cake is in the fridge")
    assert bob.open_from(alice.identity, box) == "the cake is in the fridge"
    assert alice.open_from(alice.identity, self_box) == "the cake is in the fridge"  # her own copy
    # (crypto_box is symmetric within a pair: alice could open `box` too; nobody else can.)
    for reader, sender, data in [(mallory, alice.identity, box), (mallory, bob.identity, box),
                                 (bob, alice.identity, self_box), (mallory, alice.identity, self_box),
                                 (bob, mallory.identity, box)]:  # wrong reader, or a forged `from`
        with pytest.raises(OpenError):
            reader.open_from(sender, data)
    assert "fridge" not in box and "fridge" not in self_box


def test_a_box_has_a_fresh_nonce_each_time() -> None:
    alice, bob = curve_keyring()[0], curve_keyring()[0]
    first, second = (alice.seal_for(bob.identity, "same text")[0] for _ in range(2))
    assert first != second
    assert base64.b64decode(first)[:24] != base64.b64decode(second)[:24]


@pytest.mark.parametrize("damage", [
    lambda data: data[:-4],  # truncated
    lambda data: data[:30] + ("A" if data[30] != "A" else "B") + data[31:],  # a flipped bit
    lambda data: "not base64 at all!",
    lambda data: "",
    lambda data: base64.b64encode(b"x" * 10).decode(),  # shorter than a nonce and a MAC
])
def test_a_damaged_box_does_not_open(damage) -> None:  # type: ignore[no-untyped-def]
    alice, bob = curve_keyring()[0], curve_keyring()[0]
    box = alice.seal_for(bob.identity, "hello")[0]
    with pytest.raises(OpenError):
        bob.open_from(alice.identity, damage(box))


@pytest.mark.parametrize("sender", ["", "zz" * 32, "ab" * 31, "00" * 32])
def test_a_malformed_or_unusable_sender_key_does_not_open(sender: str) -> None:
    bob = curve_keyring()[0]
    with pytest.raises(OpenError):
        bob.open_from(sender, base64.b64encode(b"x" * 60).decode())


def test_not_utf8_inside_does_not_open() -> None:
    alice, bob = curve_keyring()[0], curve_keyring()[0]
    raw = bytes(alice.box(bob.identity).encrypt(b"\xff\xfe"))
    with pytest.raises(OpenError):
        open_box(bob.box(alice.identity), base64.b64encode(raw).decode())


def test_what_libsodium_crypto_box_easy_makes_opens_and_the_other_way_round() -> None:
    """The recipe PROTOCOL.md gives a foreign client: nonce + crypto_box_easy(text, nonce,
    recipient public, own secret), base64; opened with crypto_box_open_easy."""
    alice, alice_public, alice_secret = curve_keyring()
    bob, bob_public, bob_secret = curve_keyring()
    nonce = random(24)
    foreign = base64.b64encode(nonce + crypto_box(b"from C", nonce, bob_public, alice_secret)).decode()
    assert bob.open_from(alice.identity, foreign) == "from C"
    ours = base64.b64decode(alice.seal_for(bob.identity, "to C")[0])
    assert crypto_box_open(ours[24:], ours[:24], alice_public, bob_secret) == b"to C"


def test_the_longest_text_fits_the_box_bound_and_the_body_bound() -> None:
    """MAX_BOX_CHARS is exactly what MAX_TEXT_CHARS 4-byte characters need, and a msg with
    two such boxes, the longest name and the largest ref fits in MAX_BODY_BYTES."""
    alice, bob = curve_keyring()[0], curve_keyring()[0]
    text = "🎉" * L.MAX_TEXT_CHARS
    box, self_box = alice.seal_for(bob.identity, text)
    assert len(box) == len(self_box) == L.MAX_BOX_CHARS
    assert len(seal(alice.box(bob.identity), "x")) == L.MIN_BOX_CHARS
    body = encode_client_message(Msg(to="n" * L.MAX_NAME_CHARS, key=bob.identity, box=box,
                                     self_box=self_box, ref=2**53))
    assert len(body) <= L.MAX_BODY_BYTES
    assert decode_client_message(body) == Msg(to="n" * L.MAX_NAME_CHARS, key=bob.identity, box=box,
                                              self_box=self_box, ref=2**53)
    one_more = alice.seal_for(bob.identity, text + "é")[0]
    with pytest.raises(ProtocolError) as refused:
        decode_client_message(encode_client_message(Msg(to="bob", key=bob.identity, box=one_more,
                                                        self_box=self_box)))
    assert refused.value.code == Code.BAD_REQUEST


def test_a_keyring_keeps_a_bounded_number_of_boxes() -> None:
    alice = Keyring(z85.decode(zmq.curve_keypair()[1]), max_boxes=3)
    peers = [curve_keyring()[0].identity for _ in range(5)]
    for peer in peers:
        alice.box(peer)
    assert list(alice._boxes) == peers[-3:]


def test_fingerprint_is_the_start_of_the_key_in_groups() -> None:
    assert fingerprint("1a2b3c4d5e6f7081" + "f" * 48) == "1a2b 3c4d 5e6f 7081"
