"""What a room needs (issue 15 §2), in process from typed line to the exact lines on each
screen (tests/chatkit.py): topics, away, ignore, unban and bans, the end of a mute, and
mass departures folded into one line.

Lines are compared without their `[HH:MM:SS] ` clock.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import test_chat_screens as screens
from chatkit import World, identity_of

from zchat.client import read_ignored, write_ignored
from zchat.clientcore import FOLD_QUIET
from zchat.e2e import fingerprint
from zchat.protocol import RoomTopic, decode_event
from zchat.render import clock

# The in-process worlds and screen helpers of tests/test_chat_screens.py.
world, closed, after, marks = screens.world, screens.closed, screens.after, screens.marks


# --- /topic -------------------------------------------------------------------------------------


def test_topic_is_set_for_everyone_shown_on_join_in_rooms_and_on_asking(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    a, b = marks(alice, bob)
    world.type("bob", "/topic")
    assert after(bob, b) == ["* #lobby has no topic."]
    world.type("alice", "/topic Rust,  \x1b[2Jand more")
    changed = "- alice changed the topic of #lobby to: Rust,  and more"
    assert after(alice, a) == [changed]
    assert after(bob, b + 1) == [changed]
    b = len(bob.screen)
    world.type("bob", "/topic")
    world.type("bob", "/rooms")
    assert after(bob, b) == ["* Topic of #lobby: Rust,  and more (set by alice)",
                             "* Rooms: #lobby (2, topic: Rust,  and more)"]
    carol = world.join("carol")  # the topic first, then the room's history
    assert carol.screen[1:3] == ["* Topic of #lobby: Rust,  and more (set by alice)",
                                 "--- history of #lobby: 3 event(s) ---"]
    # Another room has its own (no) topic; entering a room with one shows it.
    world.type("bob", "/join games")
    b = len(bob.screen)
    world.type("bob", "/topic")
    world.type("bob", "/topic dice")
    assert after(bob, b) == ["* #games has no topic.", "- bob changed the topic of #games to: dice"]
    c = len(carol.screen)
    world.type("carol", "/join games")
    assert after(carol, c) == ["* Topic of #games: dice (set by bob)",
                               "--- history of #games: 2 event(s) ---",
                               "- bob has joined #games.", "- bob changed the topic of #games to: dice",
                               "--- end of history ---", "- carol has joined #games."]
    # "-" clears it.
    a = len(alice.screen)
    world.type("alice", "/topic -")
    world.type("alice", "/topic")
    assert after(alice, a) == ["- alice cleared the topic of #lobby.", "* #lobby has no topic."]


def test_topic_changes_are_room_events_kept_in_history_seen_by_taps_and_survive_a_restart(
        world: World) -> None:
    alice = world.join("alice")
    world.type("alice", "/topic release day")
    # On the room's topic (what a tap subscribed to r/ receives), and stored with its history.
    published = [(topic, event) for topic, event in world.published if isinstance(event, RoomTopic)]
    assert [(topic, event.text, event.by, event.changed) for topic, event in published] == [
        ("r/lobby/", "release day", "alice", True)]
    stored = [decode_event(body) for body in world.store.range("r/lobby/", 0, 100, 100)]
    assert [event.text for event in stored if isinstance(event, RoomTopic)] == ["release day"]
    assert world.store.topics() == {"lobby": ("release day", "alice")}
    world.kill_broker()
    world.start_broker()
    world.advance_until(lambda: "* Reconnected (the broker restarted; rejoined)." in alice.screen, 10)
    a = len(alice.screen)
    world.type("alice", "/topic")
    assert after(alice, a) == ["* Topic of #lobby: release day (set by alice)"]


def test_topic_in_closed_mode_is_for_admins(closed: World) -> None:
    alice, bob = closed.join("alice"), closed.join("bob")
    a, b = marks(alice, bob)
    closed.type("bob", "/topic mine now")
    assert after(bob, b) == ["! only admins may change a topic here"]
    closed.type("alice", "/topic rules apply")
    assert after(alice, a) == after(bob, b + 1) == ["- alice changed the topic of #lobby to: rules apply"]


def test_only_a_member_of_the_room_sets_its_topic_and_a_muted_one_may_not(closed: World) -> None:
    alice = closed.join("alice")
    a = len(alice.screen)
    alice.client.topic("elsewhere", "x")
    closed.type("alice", "/mute alice 60")
    closed.type("alice", "/topic muted words")
    assert after(alice, a)[0] == "! you are not in room 'elsewhere'"
    assert after(alice, a)[2:] == ["! you are muted for 60 more seconds"]


# --- /away and /back ----------------------------------------------------------------------------


def test_away_is_shown_in_who_and_told_once_per_sender_per_away_period(world: World) -> None:
    alice, bob, carol = world.join("alice"), world.join("bob"), world.join("carol")
    a, b, c = marks(alice, bob, carol)
    world.type("bob", "/away lunch")
    assert after(bob, b) == ["* You are marked as away: lunch"]
    assert after(alice, a) == after(carol, c) == []  # not announced: /who shows it
    world.type("alice", "/who")
    world.type("alice", "/msg bob are you there?")
    world.type("alice", "/msg bob hello?")
    assert after(alice, a) == ["* Online (3): alice, bob (away: lunch), carol", "-> bob: are you there?",
                               "* bob is away: lunch", "-> bob: hello?"]
    world.type("carol", "/msg bob hi")
    assert after(carol, c) == ["-> bob: hi", "* bob is away: lunch"]
    b = len(bob.screen)
    world.type("bob", "/back")
    assert after(bob, b) == ["* You are no longer marked as away."]
    a = len(alice.screen)
    world.type("alice", "/msg bob welcome back")
    world.type("alice", "/who")
    assert after(alice, a) == ["-> bob: welcome back", "* Online (3): alice, bob, carol"]
    # A new away period: everyone is told again, once.
    world.type("bob", "/away")
    a = len(alice.screen)
    world.type("alice", "/msg bob and now?")
    world.type("alice", "/msg bob still?")
    assert after(alice, a) == ["-> bob: and now?", "* bob is away: away", "-> bob: still?"]


def test_a_muted_member_cannot_speak_through_an_away_message(closed: World) -> None:
    alice, bob = closed.join("alice"), closed.join("bob")
    closed.type("alice", "/mute bob 60")
    b = len(bob.screen)
    closed.type("bob", "/away listen to me")
    closed.type("bob", "/back")
    assert after(bob, b) == ["! you are muted for 60 more seconds", "* You are no longer marked as away."]
    a = len(alice.screen)
    closed.type("alice", "/who")
    assert after(alice, a) == ["* Online (2): alice, bob"]


def test_away_is_set_again_after_the_broker_restarts(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    world.type("bob", "/away gone fishing")
    world.kill_broker()
    world.start_broker()
    world.advance_until(lambda: "* Reconnected (the broker restarted; rejoined)." in alice.screen
                        and bob.screen[-1] == "* You are marked as away: gone fishing", 10)
    a = len(alice.screen)
    world.type("alice", "/msg bob there?")
    assert after(alice, a) == ["-> bob: there?", "* bob is away: gone fishing"]


# --- /ignore ------------------------------------------------------------------------------------


def test_ignore_hides_a_key_whatever_its_name_and_is_kept_across_restarts(world: World) -> None:
    alice, _, carol = world.join("alice"), world.join("bob"), world.join("carol")
    a, c = marks(alice, carol)
    world.type("alice", "/ignore bob")
    bob_key = fingerprint(identity_of("bob"))
    assert after(alice, a) == [f"* Ignoring bob (key {bob_key}): what that key says is hidden, whatever "
                               "its name. /unignore bob to undo."]
    assert alice.client.ignored_file == {identity_of("bob"): "bob"}
    a = len(alice.screen)
    world.type("bob", "spam")
    world.type("bob", "/me spams")
    world.type("bob", "/msg alice private spam")
    world.type("bob", "/nick robert")
    world.type("bob", "spam again")  # (typed by bob's session: robert now)
    world.type("carol", "still here")
    assert after(alice, a) == ["- bob is now known as robert.", "carol: still here"]
    assert after(carol, c) == ["bob: spam", "* bob spams", "- bob is now known as robert.",
                               "robert: spam again", "carol: still here"]
    world.type("alice", "/ignore")
    assert alice.screen[-1] == f"* Ignored: bob ({bob_key})."
    # alice comes back later with the list her client kept: robert is still hidden, even in the
    # history shown on joining.
    world.type("alice", "/quit")
    alice.client.close("")
    kept = alice.client.ignored_file
    world.type("bob", "while you were out")
    again = world.join("alice", ignored=kept)
    assert not any("while you were out" in line or "spam" in line for line in again.screen)
    assert "carol: still here" in again.screen
    a = len(again.screen)
    world.type("bob", "hidden still")
    world.type("alice", "/unignore robert")
    world.type("bob", "visible now")
    assert after(again, a) == ["* No longer ignoring robert.", "robert: visible now"]
    assert again.client.ignored_file == {}


def test_ignore_of_an_unknown_name_or_of_oneself_is_refused(world: World) -> None:
    alice = world.join("alice")
    a = len(alice.screen)
    world.type("alice", "/ignore nobody")
    world.type("alice", "/ignore alice")
    world.type("alice", "/unignore nobody")
    world.type("alice", "/ignore")
    assert after(alice, a) == [
        "! unknown user 'nobody': nobody of that name has been here, so there is no key to encrypt to",
        "* You cannot ignore yourself.", "* You do not ignore nobody.", "* You ignore nobody."]
    assert alice.client.ignored_file is None  # nothing changed: nothing written


def test_a_new_holder_of_an_ignored_name_is_not_hidden(world: World) -> None:
    """Bound to the key: someone else who takes the name later is heard."""
    alice, bob = world.join("alice"), world.join("bob")
    world.type("alice", "/ignore bob")
    world.type("bob", "/quit")
    bob.client.close("")
    world.join("bob", key="other-bob")
    a = len(alice.screen)
    world.type("other-bob", "I am another bob")
    assert after(alice, a) == ["bob: I am another bob"]


def test_the_ignore_file_holds_key_and_name_per_line(tmp_path: Path) -> None:
    path = tmp_path / "zchat" / "ignored-keys"
    assert read_ignored(path) == {}
    write_ignored(path, {"ab" * 32: "bob", "cd" * 32: "eve"})
    assert path.read_text() == f"{'ab' * 32} bob\n{'cd' * 32} eve\n"
    path.write_text(path.read_text() + "junk\n\n" + "short bob\n")
    assert read_ignored(path) == {"ab" * 32: "bob", "cd" * 32: "eve"}


# --- /unban, /bans, mute ------------------------------------------------------------------------


def test_admin_lists_bans_and_unbans_by_name_or_key(closed: World) -> None:
    alice, _, _ = closed.join("alice"), closed.join("bob"), closed.join("carol")
    closed.type("alice", "/ban bob")
    closed.type("alice", "/ban carol")
    a = len(alice.screen)
    closed.type("alice", "/bans")
    bob_key, carol_key = identity_of("bob"), identity_of("carol")
    first, second = sorted([(bob_key, "bob"), (carol_key, "carol")])
    assert after(alice, a) == [f"* Banned keys (2): {first[1]} ({fingerprint(first[0])}), "
                               f"{second[1]} ({fingerprint(second[0])})"]
    a = len(alice.screen)
    closed.type("alice", "/unban bob")
    closed.type("alice", f"/unban {carol_key}")
    closed.type("alice", "/unban bob")
    closed.type("alice", "/bans")
    assert after(alice, a) == [
        f"* bob ({fingerprint(bob_key)}) is no longer banned (alice): that key may come back.",
        f"* carol ({fingerprint(carol_key)}) is no longer banned (alice): that key may come back.",
        "! 'bob' (the last key to hold that name) is not banned",
        "* Banned keys (0): none"]
    assert closed.banned == set()  # the shell forgot them too (the broker's banned-keys file)
    back = closed.join("bob")
    assert back.screen[0].startswith("* Welcome, bob!")


def test_bans_and_unban_are_for_admins(closed: World) -> None:
    closed.join("alice")
    bob = closed.join("bob")
    b = len(bob.screen)
    closed.type("bob", "/bans")
    closed.type("bob", "/unban alice")
    assert after(bob, b) == ["! only admins may do that", "! only admins may do that"]


def test_mute_shows_when_it_ends_to_the_admin_and_to_the_muted(closed: World) -> None:
    alice, bob, carol = closed.join("alice"), closed.join("bob"), closed.join("carol")
    closed.type("bob", "/join quiet")
    closed.type("bob", "/leave lobby")
    a, b, c = marks(alice, bob, carol)
    closed.type("alice", "/mute bob 90")
    until = clock(closed.wall - 0.01 + 90)
    # alice shares no room with bob now: she is told on her own stream, with the end time.
    assert after(alice, a) == [f"- bob was muted for 90 s until {until} by alice."]
    assert after(bob, b) == [f"- You were muted for 90 s by alice. You may speak again at {until}."]
    assert after(carol, c) == []
    closed.advance(30)
    b = len(bob.screen)
    closed.type("bob", "let me speak")
    assert after(bob, b) == ["! you are muted for 60 more seconds"]


# --- folding mass departures --------------------------------------------------------------------

CROWD = [f"user{i:02}" for i in range(40)]


def test_a_broker_restart_shows_one_line_per_room_not_eighty(world: World) -> None:
    alice = world.join("alice", rooms=["lobby", "games"])
    crowd = [world.join(name, history=0, own_arrival=False) for name in CROWD]
    for user in crowd[:5]:  # five of them are in #games too
        world.type(user.name, "/join games")
    world.advance(1)
    a = len(alice.screen)
    seen = marks(*crowd)
    world.kill_broker()
    world.advance(5)
    for user in crowd[-2:]:  # two never come back
        user.client.link_up = False
    world.start_broker()
    world.advance_until(lambda: alice.client.core.online == 39, 20)
    world.advance(FOLD_QUIET + 1)
    world.type("user00", "all good?")
    assert after(alice, a) == ["* Connection to the broker lost; reconnecting...",
                               "* Reconnected (the broker restarted; rejoined).",
                               "- alice has joined the chat.",  # (her own arrival, as always)
                               "- 40 people lost their connection; 38 back.",
                               "#games - 5 people lost their connection; 5 back.",
                               "#games user00: all good?"]
    # And what the crowd sees of each other is folded too: one line per room, no run of 80.
    for i, user in enumerate(crowd[:38]):
        since = after(user, seen[i])
        assert len([line for line in since if "lost their connection" in line]) == (2 if i < 5 else 1), since
        assert [line for line in since if "has joined" in line or "has left" in line] == [], since


def test_many_lost_connections_at_once_fold_into_one_line_after_the_first(world: World) -> None:
    """A relay's death: the broker sees 40 connections go at once, then come back."""
    alice = world.join("alice")
    crowd = [world.join(name, history=0, own_arrival=False) for name in CROWD]
    a = len(alice.screen)
    for user in crowd:
        user.client.link_up = False
    world.advance_until(lambda: alice.client.core.online <= 1 and len(alice.screen) > a, 10)
    for user in crowd:
        user.client.link_up = True
    world.advance_until(lambda: alice.client.core.online == 41, 20)
    world.advance(FOLD_QUIET + 1)
    assert after(alice, a) == ["- user00 has left the chat.", "- user01 has left the chat.",
                               "- 40 people lost their connection; 40 back."]


def test_two_lost_connections_at_once_both_show_at_once(world: World) -> None:
    """Folding never holds back the first few departures: 'left' stays as prompt as without it."""
    alice, bob, carol = world.join("alice"), world.join("bob"), world.join("carol")
    a = len(alice.screen)
    bob.client.link_up = carol.client.link_up = False
    world.advance_until(lambda: len(alice.screen) > a, 10)
    world.advance_until(lambda: len(alice.screen) >= a + 2, FOLD_QUIET - 0.5)  # held: FOLD_QUIET
    assert after(alice, a) == ["- bob has left the chat.", "- carol has left the chat."]


def test_a_few_lost_connections_are_shown_one_by_one_in_order(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    carol = world.join("carol")
    a = len(alice.screen)
    bob.client.link_up = False
    world.advance_until(lambda: len(alice.screen) > a, 10)
    bob.client.link_up = True
    world.advance_until(lambda: "- bob has joined the chat." in carol.screen[a:], 10)
    world.type("carol", "welcome back")  # shows bob's return first: the order is kept
    assert after(alice, a) == ["- bob has left the chat.", "- bob has joined the chat.",
                               "carol: welcome back"]


def test_the_new_commands_parse_and_misuse_is_told_without_sending() -> None:
    from zchat.commands import Command, UsageError, parse

    assert parse("/topic") == Command("topic", ("",))
    assert parse("/topic  Rust  & more ") == Command("topic", ("Rust  & more",))
    assert parse("/away gone for lunch") == Command("away", ("gone for lunch",))
    assert parse("/back") == Command("back", ())
    assert parse("/ignore") == Command("ignore", ())
    assert parse("/unban " + "ab" * 32) == Command("unban", ("ab" * 32,))
    for line, usage in [("/unban", "usage: /unban NAME|KEY"), ("/unignore", "usage: /unignore NAME"),
                        ("/back now", "usage: /back"), ("/bans all", "usage: /bans"),
                        ("/ignore a b", "usage: /ignore [NAME]")]:
        with pytest.raises(UsageError, match=re.escape(usage)):
            parse(line)


def test_topics_are_bounded_in_the_store_and_in_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from zchat import limits as L
    from zchat.core import BrokerCore
    from zchat.history import HistoryStore

    monkeypatch.setattr(L, "ROOM_TOPICS_KEPT", 2)
    store = HistoryStore(":memory:")
    try:
        for i, room in enumerate(["a", "b", "c"]):
            store.set_topic(f"r/{room}/", f"topic {room}", "alice", 100.0 + i)
        assert store.topics() == {"b": ("topic b", "alice"), "c": ("topic c", "alice")}  # oldest first
        store.set_topic("r/b/", "", "bob", 200.0)  # cleared
        assert store.topics() == {"c": ("topic c", "alice")}
    finally:
        store.close()
    core = BrokerCore("e", 0.0, topics={"a": ("x", "alice")})
    identity = "a1" * 32
    core.on_subscribe(identity, f"u/{identity}/", 0.0)
    core.on_subscribe(identity, "r/lobby/", 0.0)
    core.on_message(identity, b'{"type":"join","name":"alice","rooms":["lobby","b","c"]}', 1, 0.0)
    for room in ("lobby", "b", "c"):
        core.on_subscribe(identity, f"r/{room}/", 0.0)
    for room in ("lobby", "b", "c"):
        core.on_message(identity, f'{{"type":"topic","room":"{room}","text":"t {room}"}}'.encode(), 1, 1.0)
    assert list(core.topics) == ["b", "c"]  # the one set longest ago went first
