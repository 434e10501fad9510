"""ClientCore's side of `post` (zchat send): sent without joining, resent with the same ref
until the broker answers it, settled by `posted` or an error naming it."""

from __future__ import annotations

from zchat.clientcore import ClientCore, HandshakeFailed, Now, PostOnce, Send, Show
from zchat.protocol import Code, Error, Post, Posted

ME = "e5" * 32


def sends(effects: list) -> list:
    return [effect.message for effect in effects if isinstance(effect, Send)]


def shown(effects: list) -> list:
    return [effect.event for effect in effects if isinstance(effect, Show)]


def started() -> tuple[ClientCore, Post]:
    core = ClientCore(ME, rooms=[])
    core.start()
    post = Post(room="ops", text="deployed", name="deploy", ref=5)
    assert sends(core.request(PostOnce(post), Now(10.0, 100.0))) == [post]
    return core, post


def test_a_post_goes_again_until_posted_arrives_then_stops() -> None:
    core, post = started()
    assert core.pending == 1
    assert sends(core.tick(Now(10.1, 100.1))) == []
    assert sends(core.tick(Now(10.2, 100.2))) == [post]  # same ref: the broker never repeats it
    posted = Posted(seq=1, ts=100.3, room="ops", at=42, ref=5)
    assert shown(core.publication(f"u/{ME}/", posted, Now(10.3, 100.3))) == [posted]
    assert core.pending == 0 and core.deadline() is None
    assert sends(core.tick(Now(20.0, 110.0))) == []


def test_a_refusal_naming_the_ref_settles_the_post() -> None:
    core, _ = started()
    error = Error(seq=1, ts=100.1, code=Code.NO_SUCH_ROOM, detail="there is no room #ops", ref=5)
    assert shown(core.publication(f"u/{ME}/", error, Now(10.1, 100.1))) == [error]
    assert core.pending == 0


def test_a_refused_key_settles_the_post_at_once() -> None:
    core, _ = started()
    out = core.request(HandshakeFailed("auth", "the broker refused this key"), Now(10.1, 100.1))
    assert [(e.code, e.ref) for e in shown(out)] == [("auth", 5)]
    assert core.pending == 0


def test_a_post_after_the_key_was_refused_is_refused_at_once() -> None:
    """The refusal may come before the post is asked for (zchat send waited its whole timeout)."""
    core = ClientCore(ME, rooms=[])
    core.start()
    core.request(HandshakeFailed("auth", "the broker refused this key"), Now(10.0, 100.0))
    post = Post(room="ops", text="deployed", name="deploy", ref=6)
    out = core.request(PostOnce(post), Now(10.1, 100.1))
    assert sends(out) == [] and [(e.code, e.ref) for e in shown(out)] == [("auth", 6)]
    assert core.pending == 0
