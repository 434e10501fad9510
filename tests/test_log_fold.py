"""Issue 14, item 6: the broker logged up to 43 identical `error to KEY: not_joined` lines for
one client after an outage. Identical errors to one key are folded into one line a second."""

from __future__ import annotations

import logging

import pytest
from chatkit import World

from zchat.dispatch import ERROR_FOLD_SECONDS


def test_identical_errors_to_one_key_are_folded(caplog: pytest.LogCaptureFixture) -> None:
    world = World()
    try:
        alice = world.join("alice")
        bob = world.join("bob")
        world.advance(1)  # their buckets full again (joining asks who is in each room: a token)
        caplog.set_level(logging.INFO, logger="zchat.broker")
        for _ in range(20):  # refused alike: the same code to the same key, in one instant
            world.push_raw(alice.client, b'{"type":"nonsense"}')
        world.push_raw(bob.client, b'{"type":"nonsense"}')
        lines = [r.getMessage() for r in caplog.records if "refused input" in r.getMessage()
                 or "error to" in r.getMessage()]
        alice_key, bob_key = alice.client.identity[:12], bob.client.identity[:12]
        assert [line.split(":")[0] for line in lines] == [f"refused input from {alice_key}",
                                                         f"refused input from {bob_key}"]
        world.advance(ERROR_FOLD_SECONDS + 0.5)
        lines = [r.getMessage() for r in caplog.records if "more in" in r.getMessage()]
        assert lines == [f"error to {alice_key}: bad_request ... 19 more in 1 s"]
    finally:
        world.close()
