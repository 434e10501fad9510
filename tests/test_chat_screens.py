"""The client core driven in process, ssh-chat style: a typed line, then the exact lines on
each user's screen. Real broker core, dispatcher and history store, real client core, real
terminal session and renderer; no sockets, virtual time (tests/chatkit.py).

Lines are compared without their `[HH:MM:SS] ` clock.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from chatkit import World, chatkit_secret, identity_of

from zchat import limits as L
from zchat.accounts import Account
from zchat.clientcore import ClientCore, JoinChat, Now, Send, Speak
from zchat.core import Limits
from zchat.e2e import Keyring
from zchat.events import Connection, DirectDraft
from zchat.protocol import (
    Heartbeat,
    History,
    Join,
    KeyReply,
    KeyRequest,
    Message,
    Msg,
    Ping,
    Say,
    Welcome,
    WhoReply,
    decode_client_message,
)
from zchat.render import clock
from zchat.tui import EXIT_BANNED


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def closed() -> Iterator[World]:
    """Closed mode: alice is an admin, bob and carol are users."""
    w = World(accounts={identity_of("alice"): Account("alice", "admin"),
                        identity_of("bob"): Account("bob"), identity_of("carol"): Account("carol")})
    try:
        yield w
    finally:
        w.close()


def after(user, mark: int) -> list[str]:  # type: ignore[no-untyped-def]
    return user.screen[mark:]


def marks(*users) -> list[int]:  # type: ignore[no-untyped-def]
    return [len(user.screen) for user in users]


# --- the pure cores -----------------------------------------------------------------------------


def test_both_cores_import_without_zmq() -> None:
    code = ("import zchat.core, zchat.clientcore, zchat.flow, zchat.events, sys; "
            "assert 'zmq' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# --- every command --------------------------------------------------------------------------


def test_joining_shows_the_welcome_history_and_arrivals(world: World) -> None:
    alice = world.join("alice")
    bob = world.join("bob")
    assert alice.screen == [
        "* Welcome, alice! nobody else is online yet. Type /help for commands.",
        "- alice has joined the chat.",
        "- bob has joined the chat.",
    ]
    assert bob.screen == [
        "* Welcome, bob! 1 other(s) online: alice. Type /help for commands.",
        "--- history of #lobby: 1 event(s) ---",
        "- alice has joined the chat.",
        "--- end of history ---",
        "- bob has joined the chat.",
    ]


def test_say_me_and_msg(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    carol = world.join("carol")
    a, b, c = marks(alice, bob, carol)
    world.type("alice", "hello all")
    world.type("bob", "/me waves")
    world.type("alice", "/msg bob psst")
    world.type("alice", "//not a command")
    assert after(alice, a) == ["alice: hello all", "* bob waves", "-> bob: psst", "alice: /not a command"]
    assert after(bob, b) == ["alice: hello all", "* bob waves", "<- alice: psst", "alice: /not a command"]
    assert after(carol, c) == ["alice: hello all", "* bob waves", "alice: /not a command"]
    assert alice.client.core.pending == 0


def test_nick_who_rooms_join_leave_history(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    a, b = marks(alice, bob)
    for line in ["/nick alicia", "/who", "/rooms", "/join games", "in games", "/join lobby", "/leave games",
                 "/history 3"]:
        world.type("alice", line)
    assert after(alice, a) == [
        "- alice is now known as alicia.",
        "* Online (2): alicia, bob",
        "* Rooms: #lobby (2)",
        "- alicia has joined #games.",
        "alicia: in games",
        "* Now talking in #lobby.",
        "- alicia has left #games.",
        "--- history of #lobby: 3 event(s) ---",
        "- alice has joined the chat.",
        "- bob has joined the chat.",
        "- alice is now known as alicia.",
        "--- end of history ---",
    ]
    assert after(bob, b) == ["- alice is now known as alicia."]
    assert alice.session.prompt() == "#lobby> "
    assert alice.client.snapshot.rooms == ("lobby",)
    world.type("bob", "/who lobby")
    assert bob.screen[-1] == "* Online in #lobby (2): alicia, bob"


def test_local_commands_send_nothing(world: World) -> None:
    alice = world.join("alice")
    a = len(alice.screen)
    read = len([m for m in world.received(alice.client) if not isinstance(m, Ping)])
    for line in ["/help me", "/frob", "/msg", "/history 0", "/leave nowhere", "/join no/such"]:
        world.type("alice", line)
    assert after(alice, a) == [
        "usage: /me ACTION",
        "  describe what you do: * alice waves",
        "! unknown command /frob; type /help for the list",
        "! usage: /msg NAME TEXT",
        f"! usage: /history [N], N from 1 to {L.MAX_HISTORY_PER_REQUEST}",
        "! you are not in #nowhere",
        "! invalid room name 'no/such'",
    ]
    assert len([m for m in world.received(alice.client) if not isinstance(m, Ping)]) == read


def test_quit_leaves_with_a_message(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    b = len(bob.screen)
    assert world.type("alice", "/quit see you") == "see you"
    alice.client.close("see you")
    world.settle()
    assert after(bob, b) == ["- alice has left the chat. (see you)"]


def test_moderation_commands_in_closed_mode(closed: World) -> None:
    alice, bob, carol = closed.join("alice"), closed.join("bob"), closed.join("carol")
    a, b, c = marks(alice, bob, carol)
    closed.type("carol", "/kick bob")
    closed.type("alice", "/mute bob 60")
    closed.type("alice", "/mute bob 0")
    closed.type("bob", "free again")
    closed.type("bob", "/nick robert")
    until = clock(closed.wall - 0.02 + 60)  # (each typed line takes 0.01 s)
    shared = [f"- bob was muted for 60 s until {until} by alice.", "- bob may speak again (alice).",
              "bob: free again"]
    assert after(alice, a) == shared
    assert after(bob, b) == [f"- You were muted for 60 s by alice. You may speak again at {until}.",
                             *shared[1:], "! names are fixed by the operator here"]
    assert after(carol, c) == ["! only admins may do that"] + shared


def test_a_private_message_to_someone_offline_waits_for_them(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    world.type("bob", "/quit")
    bob.client.close("")
    a = len(alice.screen)
    world.type("alice", "/msg bob are you there?")
    assert alice.screen[a - 1:] == ["- bob has left the chat.",
                                    "-> bob (offline: delivered when they next join): are you there?"]
    back = world.join("bob")
    assert back.screen[-2:] == ["<- alice (while you were away): are you there?",
                                "- bob has joined the chat."]


# --- refusals -------------------------------------------------------------------------------------


def test_a_private_message_is_never_overtaken_while_its_key_is_fetched() -> None:
    """The first /msg to a name waits for that name's key: what was said after it waits too."""
    me = identity_of("alice")
    core = ClientCore(me, keyring=Keyring(chatkit_secret(me)))
    core.start()
    core.request(JoinChat("alice"), Now(100.0, 5e9))
    core.publication(f"u/{me}/", Welcome(seq=1, ts=5e9, id=me, name="alice", epoch="e", rooms={"lobby": 0},
                                         online=2, members=["alice", "bob"], heartbeat=1.0, rate_burst=20,
                                         rate_per_second=5.0), Now(100.1, 5e9))
    sent = [e.message for e in core.request(Speak(DirectDraft("bob", "first", 7)), Now(100.2, 5e9))
            + core.request(Speak(Say(room="lobby", text="then this", ref=8)), Now(100.3, 5e9))
            if isinstance(e, Send)]
    assert [type(m) for m in sent] == [KeyRequest]  # the room message waits behind the draft
    bob = identity_of("bob")
    sent = [e.message for e in core.publication(f"u/{me}/", KeyReply(seq=2, ts=5e9, name="bob", key=bob,
                                                                      online=True, ref=7), Now(100.4, 5e9))
            if isinstance(e, Send)]
    assert [(type(m), m.ref) for m in sent] == [(Msg, 7), (Say, 8)]


def test_a_changed_key_is_reported_and_the_message_is_not_sent_to_it(world: World) -> None:
    """Mail is sealed to the key the sender saw. When another key holds the name by the time it
    arrives, nothing goes to that key by itself: the person is told and decides."""
    alice, bob = world.join("alice"), world.join("bob")
    world.type("alice", "/msg bob first")  # alice learns bob's key
    world.type("bob", "/quit")
    bob.client.close()
    world.settle()
    mallory = world.join("bob", key="mallory")  # another key takes the name
    a, m = marks(alice, mallory)
    world.type("alice", "/msg bob the secret")
    [warning] = after(alice, a)
    assert re.fullmatch(r"! bob's key changed \(was \w{4} \w{4} \w{4} \w{4}, now \w{4} \w{4} \w{4} \w{4}\): "
                        r"another key holds that name now, and your message to bob was NOT sent\. Send it "
                        r"again if you trust the new key\.", warning), warning
    assert after(mallory, m) == []
    assert alice.client.core.pending == 0
    world.type("alice", "/msg bob hello, whoever you are")  # her choice: to the new key
    assert after(mallory, m) == ["<- alice: hello, whoever you are"]
    assert "the secret" not in "\n".join(mallory.screen)


def test_an_over_long_line_goes_as_several_messages_cut_at_spaces(world: World) -> None:
    """Issue 14, item 8: the line is split at word boundaries, as IRC clients do, and the
    person is told; it used to be refused (before that, with the validator's wording)."""
    alice, bob = world.join("alice"), world.join("bob")
    a, b = marks(alice, bob)
    words = [f"word{i:04d}" for i in range(300)]  # 8 characters and a space each: 2,699 in all
    line = " ".join(words)
    world.type("alice", line)
    first = " ".join(words[:222])  # 1,997 characters: one word more would be 2,006
    second = " ".join(words[222:])
    assert after(alice, a) == [
        f"* message too long ({len(line)} characters, the limit is {L.MAX_TEXT_CHARS}): sent as 2 messages.",
        f"alice: {first}",
        f"alice: {second}",
    ]
    assert after(bob, b) == [f"alice: {first}", f"alice: {second}"]
    world.type("alice", "/me " + "y" * (L.MAX_TEXT_CHARS + 5))  # no space: cut inside the word
    assert after(bob, b)[2:] == ["* alice " + "y" * L.MAX_TEXT_CHARS, "* alice yyyyy"]
    world.type("bob", "/msg alice " + line)
    assert after(alice, a)[-2:] == [f"<- bob: {first}", f"<- bob: {second}"]


def test_no_validator_wording_reaches_the_screen(world: World) -> None:
    """Issue 14, item 8: fields the broker's decoder bounds are checked here and refused in
    words; a `bad_request` that still comes back is not quoted."""
    alice = world.join("alice")
    world.join("bob")
    a = len(alice.screen)
    world.type("alice", "/nick " + "n" * (L.MAX_NAME_CHARS + 1))
    world.type("alice", "/kick bob " + "r" * (L.MAX_REASON_CHARS + 1))
    world.type("alice", "/who " + "w" * (L.MAX_ROOM_CHARS + 2))
    assert after(alice, a) == [
        f"! names are at most {L.MAX_NAME_CHARS} characters",
        f"! reason too long ({L.MAX_REASON_CHARS + 1} characters, the limit is {L.MAX_REASON_CHARS})",
        f"! no such room: rooms are at most {L.MAX_ROOM_CHARS} characters",
    ]
    world.push_raw(alice.client, b'{"type":"say","room":"lobby","text":1,"ref":7}')
    assert after(alice, a)[3:] == [
        "! the broker could not read a request from this client (bad_request); please report this"]
    assert "Expected" not in "\n".join(alice.screen)


def test_a_piped_session_shows_no_history_and_not_its_own_arrival(world: World) -> None:
    """Issue 14, item 16: `echo hi | zchat client` showed the welcome, up to 50 events of
    history and its own join before its one message. In a pipe (history 0, own arrival off)
    it shows the welcome and what happens from then on; `--history N` asks for some."""
    alice = world.join("alice")
    world.type("alice", "earlier")
    bot = world.join("bot", history=0, own_arrival=False)
    world.type("bot", "hi")
    assert bot.screen == [
        "* Welcome, bot! 1 other(s) online: alice. Type /help for commands.",
        "bot: hi",
    ]
    assert alice.screen[-2:] == ["- bot has joined the chat.", "bot: hi"]
    some = world.join("some", history=1, own_arrival=False)
    assert some.screen == [
        "* Welcome, some! 2 other(s) online: alice, bot. Type /help for commands.",
        "--- history of #lobby: 1 event(s) ---",
        "bot: hi",
        "--- end of history ---",
    ]


def test_refusals_are_shown_and_never_sent_again(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    a, b = marks(alice, bob)
    world.type("alice", "/msg ghost anyone?")
    alice.client.say("x" * (L.MAX_TEXT_CHARS + 1))  # what the session would have split (below)
    world.settle()
    world.type("alice", "/nick bob")
    assert after(alice, a) == [
        "! unknown user 'ghost': nobody of that name has been here, so there is no key to encrypt to",
        f"! message too long ({L.MAX_TEXT_CHARS + 1} characters, the limit is {L.MAX_TEXT_CHARS})",
        "! the name 'bob' is taken",
    ]
    assert alice.client.core.pending == 0
    assert not [m for m in world.received(alice.client) if isinstance(m, Say)]  # the long one never went
    # A reconnection resends nothing that was refused.
    read = len(world.read)
    world.kill_broker()
    world.advance(5)
    world.start_broker()
    world.advance(3)
    assert alice.client.snapshot.connection == Connection.CONNECTED
    assert [m for m in world.received(alice.client)[read:] if getattr(m, "to", None) == "ghost"] == []
    assert "* Reconnected (the broker restarted; rejoined)." in after(bob, b)
    assert "anyone?" not in "\n".join(bob.screen)


def test_muted_and_rate_limited_refusals_name_their_message(closed: World) -> None:
    _, bob = closed.join("alice"), closed.join("bob")
    b = len(bob.screen)
    closed.type("alice", "/mute bob 60")
    closed.type("bob", "can I talk?")
    until = clock(closed.wall - 0.01 + 60)
    assert after(bob, b) == [f"- You were muted for 60 s by alice. You may speak again at {until}.",
                             "! you are muted for 60 more seconds"]
    assert bob.client.core.pending == 0  # settled by the refusal: never sent again


# --- the broker goes away and comes back -------------------------------------------------------------


def test_lines_typed_during_an_outage_are_pending_then_sent_once_in_order(world: World) -> None:
    """Issue 14, item 1: the broker is killed, alice types while it is down, it comes back."""
    alice, bob = world.join("alice"), world.join("bob")
    world.advance(1)  # a heartbeat: 2 online
    a, b = marks(alice, bob)
    world.kill_broker()
    world.advance(12)
    lines = [f"typed in the dark {i}" for i in range(30)]  # more than one burst of the bucket
    for line in lines:
        world.type("alice", line)
    world.advance(10)
    assert after(alice, a) == ["* Connection to the broker lost; reconnecting..."] + [
        f"(pending) alice: {line}" for line in lines]
    assert alice.session.status() == (f" #lobby | alice | reconnecting since {alice.raw[a][1:9]}, 30 pending "
                                      "| 2 online ")
    # While it was down alice queued nothing for it: no pings, no joins, no messages.
    assert list(alice.client.pipe) == []

    read_before = len(world.read)
    world.start_broker()
    world.advance(10)
    said = [f"alice: {line}" for line in lines]
    assert after(alice, a)[31:] == ["* Reconnected (the broker restarted; rejoined).",
                                    "- alice has joined the chat.", "- bob has joined the chat."] + said
    assert after(bob, b) == [
        "* Connection to the broker lost; reconnecting...",
        "* Reconnected (the broker restarted; rejoined).",
        "--- 1 event(s) in #lobby while you were away ---",
        "- alice has joined the chat.",
        "--- end of missed events ---",
        "- bob has joined the chat.",
    ] + said
    assert alice.client.core.pending == 0
    # The new broker read alice's join first, and nothing it had to refuse.
    first = next(body for who, body in world.read[read_before:] if who is alice.client)
    assert isinstance(decode_client_message(first), Join)
    assert not [line for line in alice.screen if line.startswith("!")]


def test_a_message_whose_echo_was_lost_is_not_sent_twice(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    b = len(bob.screen)
    world.drop("alice", lambda topic, event: isinstance(event, Message), 1)
    world.type("alice", "did you get this?")
    assert alice.client.core.pending == 1  # published, but alice never saw her echo
    world.kill_broker()
    world.advance(2)
    world.start_broker()
    world.advance(5)
    assert alice.client.core.pending == 0  # the replay of what she missed confirmed it
    assert bob.screen.count("alice: did you get this?") == 1
    assert after(bob, b)[0] == "alice: did you get this?"
    assert "alice: did you get this?" not in alice.screen[-3:]


def test_a_message_the_broker_never_read_is_sent_again_after_the_rejoin(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    world.busy = True  # the broker is stuck: what alice sends waits in its queue...
    world.type("alice", "lost with the broker")
    world.kill_broker(noticed=False)  # ...and is gone with it; alice notices only the silence
    world.busy = False
    world.advance(4)
    assert alice.screen[-1] == "* Connection to the broker lost; reconnecting..."
    world.start_broker()
    world.advance(5)
    assert bob.screen.count("alice: lost with the broker") == 1
    assert alice.screen.count("alice: lost with the broker") == 1
    assert alice.client.core.pending == 0


def test_busy_client_core_has_nothing_to_do_while_the_broker_is_away(world: World) -> None:
    """Issue 14, item 2: lost, the core has no deadline (the shell sleeps on its poller)."""
    alice = world.join("alice")
    world.kill_broker()
    world.advance(5)
    assert alice.client.core.deadline() is None
    world.type("alice", "still nothing to do")
    assert alice.client.core.deadline() is None


def test_a_rejoin_that_finds_the_name_taken_asks_for_another(world: World) -> None:
    alice, bob = world.join("alice"), world.join("bob")
    alice.client.link_up = False  # alice's network goes; the broker times her out
    world.advance(5)
    carol = world.join("alice", key="carol")  # someone else takes the name meanwhile
    assert carol.screen[0].startswith("* Welcome, alice!")
    a = len(alice.screen)
    alice.client.link_up = True
    world.advance(2)
    assert after(alice, a) == [
        "* Could not rejoin: could not rejoin as alice: the name 'alice' is taken; choose another name "
        "with /nick NEW"]
    assert alice.session.status().startswith(" #lobby | alice | name taken: /nick NEW |")
    world.advance(3)
    assert len(alice.screen) == a + 1  # it waits for the user, quietly
    world.type("alice", "/nick alice2")
    world.advance(1)
    assert alice.screen[a + 1] == "* Reconnected (rejoined)."
    assert alice.client.snapshot.name == "alice2"
    assert "- alice2 has joined the chat." in bob.screen


@pytest.mark.parametrize("history", [L.DEFAULT_HISTORY, 0])
def test_a_rejoin_while_still_a_member_shows_what_was_missed_once(history: int) -> None:
    """The broker did not time alice out (a short cut): it resumes her membership. What was
    said meanwhile comes as the replay of what she missed, also when she shows no history on
    joining (a pipe, issue 14 item 16): what was said meanwhile is not history."""
    world = World(limits=Limits(client_timeout=30.0))
    try:
        alice, _ = world.join("alice", history=history), world.join("bob")
        a = len(alice.screen)
        alice.client.link_up = False
        world.advance(4)
        world.type("bob", "while you were cut off 1")
        world.type("bob", "while you were cut off 2")
        alice.client.link_up = True
        world.advance(2)
        said = ["bob: while you were cut off 1", "bob: while you were cut off 2"]
        replay = ["--- 2 event(s) in #lobby while you were away ---", *said, "--- end of missed events ---"]
        assert after(alice, a) == ["* Connection to the broker lost; reconnecting...",
                                   "* Reconnected (rejoined).", *replay]
    finally:
        world.close()


# --- gaps -------------------------------------------------------------------------------------------


def test_a_gap_is_recovered_from_history_before_the_live_events(world: World) -> None:
    _, bob = world.join("alice"), world.join("bob")
    b = len(bob.screen)
    world.drop("bob", lambda topic, event: isinstance(event, Message), 3)
    for i in range(5):
        world.type("alice", f"line {i}")
    assert after(bob, b) == [
        "--- 3 missed event(s) recovered in #lobby ---",
        "alice: line 0", "alice: line 1", "alice: line 2",
        "--- end of missed events ---",
        "alice: line 3", "alice: line 4",
    ]


def test_a_lost_tail_is_revealed_by_a_mark_and_recovered(world: World) -> None:
    _, bob = world.join("alice"), world.join("bob")
    b = len(bob.screen)
    world.drop("bob", lambda topic, event: isinstance(event, Message), 2)
    world.type("alice", "tail 0")
    world.type("alice", "tail 1")
    assert after(bob, b) == []
    world.advance(1.2)  # the next heartbeat's mark
    assert after(bob, b) == ["--- 2 missed event(s) recovered in #lobby ---", "alice: tail 0",
                             "alice: tail 1", "--- end of missed events ---"]


def test_an_unanswered_gap_is_reported_and_the_held_events_follow(world: World) -> None:
    _, bob = world.join("alice"), world.join("bob")
    b = len(bob.screen)
    world.drop("bob", lambda topic, event: isinstance(event, Message), 1)
    world.drop("bob", lambda topic, event: isinstance(event, History), 1)  # and the answer
    world.type("alice", "first")
    world.type("alice", "second")
    world.type("alice", "third")
    assert after(bob, b) == []  # held while the gap is being recovered
    world.advance(3.1)  # BACKFILL_WAIT
    assert after(bob, b) == ["! 1 event missed on #lobby", "alice: second", "alice: third"]


def test_a_gap_on_the_private_stream_is_reported(world: World) -> None:
    world.join("alice")
    bob = world.join("bob")
    b = len(bob.screen)
    world.drop("bob", lambda topic, event: isinstance(event, WhoReply), 1)
    world.type("bob", "/who")
    world.type("bob", "/who")
    assert after(bob, b) == [f"! 1 event missed on u/{identity_of('bob')}/", "* Online (2): alice, bob"]


# --- kicked, banned -------------------------------------------------------------------------------------


def test_a_kicked_client_is_told_how_to_come_back_and_stays_quiet(closed: World) -> None:
    """Issue 14, item 3."""
    alice, bob = closed.join("alice"), closed.join("bob")
    a, b = marks(alice, bob)
    closed.type("alice", "/kick bob spam")
    kicked = "* You were kicked by alice: spam. Type /reconnect to come back, or /quit to leave."
    assert after(bob, b) == [kicked]
    assert after(alice, a) == ["- bob was kicked by alice. (spam)"]
    assert bob.session.status() == " #lobby | bob | removed: /reconnect to come back | 2 online "
    read = len(closed.received(bob.client))
    closed.type("bob", "hello?")
    closed.type("bob", "/who")
    closed.advance(10)
    assert after(bob, b)[1:] == ["! you were kicked: type /reconnect to come back"] * 2
    assert closed.received(bob.client)[read:] == []  # quiet on the wire: no pings, nothing
    assert bob.client.core.pending == 0

    closed.type("bob", "/reconnect")
    closed.advance(1)
    assert after(bob, b)[3:] == ["* Reconnected (rejoined).",
                                 "--- 1 event(s) in #lobby while you were away ---",
                                 "- bob was kicked by alice. (spam)", "--- end of missed events ---",
                                 "- bob has joined the chat."]
    assert after(alice, a)[1:] == ["- bob has joined the chat."]
    closed.type("bob", "back")
    assert alice.screen[-1] == "bob: back"


def test_join_after_a_kick_comes_back_into_that_room(closed: World) -> None:
    alice, bob = closed.join("alice"), closed.join("bob")
    closed.type("alice", "/kick bob")
    closed.type("bob", "/join games")
    closed.advance(1)
    assert bob.client.snapshot.rooms == ("lobby", "games")
    assert bob.session.room == "lobby"
    assert "- bob has joined the chat." in alice.screen[-1:]


def test_a_banned_client_says_so_stops_and_exits_non_zero(closed: World) -> None:
    _, bob = closed.join("alice"), closed.join("bob")
    b = len(bob.screen)
    closed.type("alice", "/ban bob for good")
    assert after(bob, b) == ["* You were banned by alice: for good. You cannot come back with this key."]
    assert bob.session.exit_code == EXIT_BANNED
    read = len(closed.received(bob.client))
    closed.type("bob", "/reconnect")
    closed.advance(5)
    assert after(bob, b)[1:] == ["! you were removed from this chat and cannot come back with this key"]
    assert closed.received(bob.client)[read:] == []
    assert bob.client.snapshot.connection == Connection.BANNED


# --- clocks -------------------------------------------------------------------------------------------


def test_a_wall_clock_step_changes_no_schedule(world: World) -> None:
    """Heartbeats, pings, loss detection and rate buckets, in broker and client, run on the
    monotonic clock: stepping the wall clock back 60 s (or forward) changes nothing but the
    time stamped on events."""
    alice, bob = world.join("alice"), world.join("bob")
    a, b = marks(alice, bob)
    for step in (-60.0, +3600.0):
        world.wall += step
        world.advance(5)
        for i in range(L.RATE_BURST - 3):  # a burst as big as the bucket allows
            world.type("alice", f"after {step:+.0f}: {i}")
        world.advance(1)
    said = [f"alice: after {step:+.0f}: {i}" for step in (-60.0, 3600.0) for i in range(L.RATE_BURST - 3)]
    assert after(alice, a) == said
    assert after(bob, b) == said
    heartbeats = [t for t, e in world.published if isinstance(e, Heartbeat)]
    assert len(heartbeats) >= 12
    pings = [m for m in alice.client.sent if isinstance(m, Ping)]
    assert len(pings) >= 10 / L.CLIENT_PING_INTERVAL  # 10 s of silence


def test_client_core_times_with_the_monotonic_clock_only() -> None:
    core = ClientCore(identity_of("solo"))
    core.start()
    core.request(JoinChat("solo"), Now(100.0, 5e9))
    assert core.deadline() == pytest.approx(100.0 + L.JOIN_RETRY_INTERVAL)
    for wall in (5e9 - 3600, 5e9 + 3600):  # the wall clock jumps: no join is due
        assert not [e for e in core.tick(Now(100.1, wall)) if getattr(e, "message", None)]
    assert [type(getattr(e, "message", None)) for e in core.tick(Now(100.2, 0.0))].count(Join) == 1
