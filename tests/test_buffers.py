"""One buffer per conversation (the interactive client's view), driven in process: a typed
line or a pressed key, then the exact lines on the screen and the bar (tests/chatkit.py).

A buffered user's screen shows CLEARED each time a buffer is drawn again from the top.
Lines are compared without their `[HH:MM:SS] ` clock.
"""

from __future__ import annotations

from chatkit import CLEARED, World
from test_chat_screens import after
from test_chat_screens import world as world  # noqa: F401  (the fixture)

from zchat.buffers import MARKER, MAX_LINES, Buffers, Destination
from zchat.protocol import Msg, Say


def three_buffers(world: World):  # type: ignore[no-untyped-def]
    """alice (buffered) in #lobby and #dev (current), bob talking in both and to her."""
    alice = world.join("alice", buffers=True)
    bob = world.join("bob")
    world.type("alice", "/join dev")
    world.type("bob", "/join dev")
    world.type("bob", "in dev")
    world.type("bob", "/join lobby")
    world.type("bob", "hi alice, in lobby")
    world.type("bob", "plain in lobby")
    world.type("bob", "/msg alice secret")
    return alice, bob


DEV = [CLEARED, "- alice has joined #dev.", "- bob has joined #dev.", "bob: in dev"]
LOBBY_BEFORE = ["* Welcome, alice! nobody else is online yet. Type /help for commands.",
                "- alice has joined the chat.", "- bob has joined the chat."]


def test_each_conversation_is_its_own_buffer_and_the_bar_counts_and_marks_unread(world: World) -> None:
    alice, bob = three_buffers(world)
    # Only the buffer on screen is drawn: #dev, entered with /join (drawn from the top).
    assert alice.screen == LOBBY_BEFORE + [CLEARED, "- alice has joined #dev.", "- bob has joined #dev.",
                                           "bob: in dev"]
    # #lobby: two unread, one naming alice (!); bob's private message opened its buffer (!).
    assert alice.session.bar() == "1:#lobby(2!) [2:#dev] 3:bob(1!)"
    assert alice.session.prompt() == "#dev> "
    # The status line is as before (the bar is drawn above the input line).
    assert alice.session.status() == " #dev (+1 more) | alice | connected | 2 online "


def test_alt_n_switches_and_draws_the_new_since_you_looked_marker(world: World) -> None:
    alice, _ = three_buffers(world)
    mark = len(alice.screen)
    world.press("alice", "alt-1")
    assert after(alice, mark) == [CLEARED, *LOBBY_BEFORE, MARKER, "bob: hi alice, in lobby",
                                  "bob: plain in lobby"]
    assert alice.session.bar() == "[1:#lobby] 2:#dev 3:bob(1!)"
    assert alice.session.prompt() == "#lobby> "
    # Back to #dev, where nothing came meanwhile: no marker. Then something comes in #dev.
    mark = len(alice.screen)
    world.press("alice", "alt-2")
    assert after(alice, mark) == DEV
    world.type("bob", "late in lobby")
    assert alice.session.bar() == "1:#lobby(1) [2:#dev] 3:bob(1!)"
    mark = len(alice.screen)
    world.press("alice", "alt-1")
    assert after(alice, mark) == [CLEARED, *LOBBY_BEFORE, "bob: hi alice, in lobby", "bob: plain in lobby",
                                  MARKER, "bob: late in lobby"]
    world.press("alice", "alt-9")  # no ninth buffer: nothing happens
    assert alice.session.bar() == "[1:#lobby] 2:#dev 3:bob(1!)"


def test_ctrl_n_and_ctrl_p_go_round_the_bar(world: World) -> None:
    alice, _ = three_buffers(world)
    world.press("alice", "c-n")
    assert alice.session.bar() == "1:#lobby(2!) 2:#dev [3:bob]"
    assert alice.session.prompt() == "@bob> "
    world.press("alice", "c-n")
    assert alice.session.bar() == "[1:#lobby] 2:#dev 3:bob"
    world.press("alice", "c-p")
    assert alice.session.bar() == "1:#lobby 2:#dev [3:bob]"
    mark = len(alice.screen)
    world.press("alice", "c-p")
    assert after(alice, mark) == DEV


def test_buffer_command_by_number_room_or_name(world: World) -> None:
    alice, _ = three_buffers(world)
    world.type("alice", "/buffer 3")
    assert alice.session.bar() == "1:#lobby(2!) 2:#dev [3:bob]"
    world.type("alice", "/buffer #lobby")
    assert alice.session.bar() == "[1:#lobby] 2:#dev 3:bob"
    world.type("alice", "/buffer dev")
    assert alice.session.bar() == "1:#lobby [2:#dev] 3:bob"
    mark = len(alice.screen)
    world.type("alice", "/buffer 7")
    world.type("alice", "/buffer nobody")
    world.type("alice", "/buffer")
    assert after(alice, mark) == ["! no buffer 7: the bar at the bottom lists them",
                                  "! no buffer nobody: the bar at the bottom lists them",
                                  "! usage: /buffer N|NAME"]


def test_join_of_a_room_already_joined_switches_to_its_buffer(world: World) -> None:
    alice, _ = three_buffers(world)
    mark = len(alice.screen)
    world.type("alice", "/join lobby")
    assert after(alice, mark) == [CLEARED, *LOBBY_BEFORE, MARKER, "bob: hi alice, in lobby",
                                  "bob: plain in lobby", "* Now talking in #lobby."]
    assert alice.session.bar() == "[1:#lobby] 2:#dev 3:bob(1!)"
    world.type("alice", "in lobby now")
    assert alice.screen[-1] == "alice: in lobby now"


def test_query_opens_a_private_buffer_where_plain_lines_go_sealed_to_that_person(world: World) -> None:
    alice = world.join("alice", buffers=True)
    bob, carol = world.join("bob"), world.join("carol")
    b, c = len(bob.screen), len(carol.screen)
    mark = len(alice.screen)
    world.type("alice", "/query bob")
    assert after(alice, mark) == [CLEARED]  # a new, empty conversation
    assert alice.session.prompt() == "@bob> "
    assert alice.session.bar() == "1:#lobby [2:bob]"
    says = len(alice.client.sent_of(Say))
    world.type("alice", "are you there?")
    world.type("alice", "/me waves")
    assert after(alice, mark) == [CLEARED, "-> bob: are you there?",
                                  "! this is your private conversation with bob: switch to a room for that"]
    sent = alice.client.sent_of(Msg)
    assert [m.to for m in sent] == ["bob"] and "are you there" not in sent[0].box  # sealed, as /msg
    assert len(alice.client.sent_of(Say)) == says
    assert after(bob, b) == ["<- alice: are you there?"]
    assert after(carol, c) == []
    # The answer arrives in the conversation on screen.
    world.type("bob", "/msg alice yes")
    assert alice.screen[-1] == "<- bob: yes"
    assert alice.session.bar() == "1:#lobby [2:bob]"
    # /leave closes the conversation: back to the room.
    mark = len(alice.screen)
    world.type("alice", "/leave")
    assert after(alice, mark) == [CLEARED, *LOBBY_BEFORE, "- carol has joined the chat."]
    assert alice.session.bar() == "" and alice.session.prompt() == "#lobby> "


def test_an_incoming_private_message_opens_its_buffer_without_switching(world: World) -> None:
    alice = world.join("alice", buffers=True)
    world.join("bob")
    mark = len(alice.screen)
    world.type("bob", "/msg alice psst")
    world.type("bob", "/msg alice still there?")
    assert after(alice, mark) == []  # not on screen: in its own buffer
    assert alice.session.bar() == "[1:#lobby] 2:bob(2!)"
    assert alice.session.prompt() == "#lobby> "
    world.press("alice", "alt-2")
    assert after(alice, mark) == [CLEARED, "<- bob: psst", "<- bob: still there?"]  # all new: no marker
    assert alice.session.bar() == "1:#lobby [2:bob]"


def test_msg_from_a_room_shows_there_and_goes_into_the_conversations_buffer(world: World) -> None:
    alice = world.join("alice", buffers=True)
    world.join("bob")
    mark = len(alice.screen)
    world.type("alice", "/msg bob hello")
    assert after(alice, mark) == ["-> bob: hello"]  # where you typed it
    assert alice.session.bar() == "[1:#lobby] 2:bob"  # your own line: nothing unread
    world.press("alice", "alt-2")
    assert alice.screen[-2:] == [CLEARED, "-> bob: hello"]


def test_leaving_a_room_closes_its_buffer(world: World) -> None:
    alice = world.join("alice", buffers=True)
    world.type("alice", "/join dev")
    world.type("alice", "/join games")
    world.press("alice", "alt-2")
    mark = len(alice.screen)
    world.type("alice", "/leave games")  # not on screen: told here, its buffer gone
    assert after(alice, mark) == ["- alice has left #games."]
    assert alice.session.bar() == "1:#lobby [2:#dev]"
    world.type("alice", "/leave")
    assert after(alice, mark) == ["- alice has left #games.", CLEARED, *LOBBY_BEFORE[:2],
                                  "- alice has left #dev."]
    assert alice.session.bar() == "" and alice.session.prompt() == "#lobby> "
    assert alice.screen[-1] == "- alice has left #dev."
    assert alice.client.snapshot.rooms == ("lobby",)


def test_pageup_and_pagedown_scroll_the_current_buffer(world: World) -> None:
    alice = world.join("alice", buffers=True)
    world.join("bob")
    alice.session.page = 4
    for i in range(10):
        world.type("bob", f"line {i}")
    lines = [*LOBBY_BEFORE, *[f"bob: line {i}" for i in range(10)]]
    mark = len(alice.screen)
    world.press("alice", "pageup")
    assert after(alice, mark) == [CLEARED, *lines[-8:-4]]
    assert alice.session.bar() == "[1:#lobby (scrolled up)]"
    world.press("alice", "pageup")
    world.press("alice", "pageup")
    world.press("alice", "pageup")  # stops at the top
    assert alice.screen[-5:] == [CLEARED, *lines[:4]]
    # What arrives meanwhile is kept, not drawn over the page being read.
    mark = len(alice.screen)
    world.type("bob", "while scrolled")
    assert after(alice, mark) == []
    assert alice.session.bar() == "[1:#lobby (scrolled up; 1 new below)]"
    world.press("alice", "pagedown")
    assert after(alice, mark) == [CLEARED, *lines[4:8]]
    world.press("alice", "pagedown")
    world.press("alice", "pagedown")  # at the bottom: following again
    assert alice.screen[-5:] == [CLEARED, *lines[-3:], "bob: while scrolled"]
    assert alice.session.bar() == ""
    mark = len(alice.screen)
    world.press("alice", "pagedown")  # nothing below: nothing drawn
    world.type("bob", "live again")
    assert after(alice, mark) == ["bob: live again"]


def test_search_finds_text_in_the_buffer_then_in_the_rooms_stored_history(world: World) -> None:
    world.join("bob")
    for text in ["the deploy broke", "coffee?", "deploy fixed", "lunch"]:
        world.type("bob", text)
    alice = world.join("alice", buffers=True, history=1)  # the buffer starts at bob's last word
    world.type("bob", "deploy again tomorrow")
    mark = len(alice.screen)
    world.type("alice", "/search DEPLOY")
    assert after(alice, mark) == [
        "--- 1 line(s) matching 'DEPLOY' in #lobby ---",
        "bob: deploy again tomorrow",
        "--- 2 stored event(s) matching 'DEPLOY' before this buffer ---",
        "bob: the deploy broke",
        "bob: deploy fixed",
        "--- end of search ---",
    ]
    # The search's lines are not part of the buffer: drawing it again shows the conversation.
    world.type("alice", "/join dev")
    mark = len(alice.screen)
    world.press("alice", "alt-1")
    assert "--- end of search ---" not in after(alice, mark)
    # In a private conversation only its buffer is searched (there is no stored history of it).
    world.type("alice", "/query bob")
    world.type("alice", "deploy or not?")
    mark = len(alice.screen)
    world.type("alice", "/search deploy")
    assert after(alice, mark) == ["--- 1 line(s) matching 'deploy' in bob ---", "-> bob: deploy or not?",
                                  "--- end of search ---"]


def test_buffer_commands_are_for_the_interactive_client_only(world: World) -> None:
    alice = world.join("alice")  # a pipe: one flow of lines, as ever
    world.join("bob")
    mark = len(alice.screen)
    for line in ["/buffer 1", "/query bob", "/search x"]:
        world.type("alice", line)
    world.type("bob", "/msg alice psst")
    assert after(alice, mark) == ["! /buffer works in the interactive client only (on a terminal)",
                                  "! /query works in the interactive client only (on a terminal)",
                                  "! /search works in the interactive client only (on a terminal)",
                                  "<- bob: psst"]
    alice.session.press("alt-1")  # no buffers: keys do nothing
    assert after(alice, mark)[-1] == "<- bob: psst"


# --- the pure model -------------------------------------------------------------------------


def test_a_buffer_keeps_its_last_lines_and_the_marker_follows_them() -> None:
    buffers = Buffers(["lobby", "dev"])
    lobby, dev = buffers.all
    buffers.add(lobby, ["old"] * 10)
    buffers.switch(dev, page=5)
    buffers.add(lobby, [f"new {i}" for i in range(MAX_LINES)], unread=True)
    assert len(lobby.lines) == MAX_LINES and lobby.seen == 0 and lobby.unread == 1
    drawn = buffers.switch(lobby, page=3)
    assert drawn == [f"new {i}" for i in range(MAX_LINES - 3, MAX_LINES)]


def test_find_prefers_the_exact_label() -> None:
    buffers = Buffers(["bob"])
    conversation = buffers.get(Destination(peer="bob"))
    assert buffers.find("bob") is conversation
    assert buffers.find("#bob") is buffers.all[0]
    assert buffers.find("BOB") is conversation
    assert buffers.find("0") is None and buffers.find("3") is None


def test_a_bar_too_wide_shows_the_current_buffer_and_those_with_unread() -> None:
    buffers = Buffers([f"room{i:02d}" for i in range(1, 21)])
    buffers.add(buffers.all[14], ["x"], unread=True)
    buffers.add(buffers.all[16], ["y"], unread=True, highlight=True)
    assert len(buffers.bar()) > 100
    assert buffers.bar(100) == "[1:#room01] 15:#room15(1) 17:#room17(1!)"
    assert buffers.bar(20) == "[1:#room01] 15:#r..."


def test_after_leaving_every_room_a_private_message_still_has_its_buffer(world: World) -> None:
    alice = world.join("alice", buffers=True)
    world.join("bob")
    world.type("alice", "/leave")
    assert alice.session.prompt() == "(no room)> "
    world.type("bob", "/msg alice where did you go?")
    assert alice.session.bar() == "[1:(no room)] 2:bob(1!)"
    world.type("alice", "/join lobby")
    assert alice.session.bar() == "[1:#lobby] 2:bob(1!)"
    assert alice.session.prompt() == "#lobby> "


def test_buffers_draw_day_change_lines_of_their_own_and_the_configured_clock(world: World) -> None:
    import re
    import time

    from zchat.render import day_line

    alice = world.join("alice", buffers=True)
    world.join("bob")
    world.type("alice", "/join dev")
    t = time.localtime(world.wall)
    world.wall = time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 1, 0, 0, -1))  # past midnight
    world.type("bob", "/join dev")
    world.type("bob", "in dev after midnight")
    assert alice.screen[-3:] == [day_line(world.wall), "- bob has joined #dev.", "bob: in dev after midnight"]
    alice.session.clock_format = "%H:%M"
    world.type("bob", "short clock")
    assert re.fullmatch(r"\[\d\d:\d\d\] bob: short clock", alice.raw[-1])
    alice.session.clock_format = "%H:%M:%S"
    # #lobby draws its own day line when its next event comes, once.
    world.type("bob", "/join lobby")
    world.type("bob", "in lobby")
    mark = len(alice.screen)
    world.press("alice", "alt-1")
    assert after(alice, mark).count(day_line(world.wall)) == 1
