"""The client core's subscriptions while a join waits for its welcome.

A join unanswered for RESUBSCRIBE_WAIT subscribes its topics again (the broker may have
skipped them). It must never unsubscribe first: until the broker read the subscribe after
it, whatever the broker sent on the topic (the first join's welcome, a ban notice) reached
nobody. Seen in CI: a ban notice lost that way, the banned client only saw the cut.
"""

from __future__ import annotations

from chatkit import identity_of

from zchat.clientcore import (
    RESUBSCRIBE_RESET,
    RESUBSCRIBE_WAIT,
    ClientCore,
    JoinChat,
    Now,
    Subscribe,
    Unsubscribe,
)
from zchat.protocol import private_topic, room_topic

WALL = 5e9


def subscription_effects(core: ClientCore, start: float, seconds: float, step: float = 0.05) -> list:
    effects = []
    for i in range(1, int(seconds / step) + 1):
        out = core.tick(Now(start + i * step, WALL))
        effects += [e for e in out if isinstance(e, Subscribe | Unsubscribe)]
    return effects


def joining(name: str) -> tuple[ClientCore, list]:
    core = ClientCore(identity_of(name), rooms=["lobby"])
    made = core.start()
    core.request(JoinChat(name), Now(100.0, WALL))
    return core, made


def test_an_unanswered_join_subscribes_again_without_unsubscribing_first() -> None:
    core, made = joining("slow")
    mine, lobby = private_topic(identity_of("slow")), room_topic("lobby")
    assert Subscribe(mine) in made and Subscribe(lobby) in made
    effects = subscription_effects(core, 100.0, RESUBSCRIBE_WAIT + 0.5)
    assert Subscribe(mine) in effects and Subscribe(lobby) in effects  # asked again
    assert not [e for e in effects if isinstance(e, Unsubscribe)]


def test_a_long_wait_keeps_the_count_a_leave_must_undo_small() -> None:
    core, made = joining("patient")
    mine = private_topic(identity_of("patient"))
    effects = made + subscription_effects(core, 100.0, 3 * RESUBSCRIBE_RESET * RESUBSCRIBE_WAIT)
    held, most = 0, 0
    for effect in effects:
        if effect.topic == mine:
            held += 1 if isinstance(effect, Subscribe) else -1
            assert held >= 1 or isinstance(effect, Unsubscribe)  # only a reset goes through zero
            most = max(most, held)
    assert held >= 1 and most <= RESUBSCRIBE_RESET
    assert sum(isinstance(e, Subscribe) and e.topic == mine for e in effects) > RESUBSCRIBE_RESET
