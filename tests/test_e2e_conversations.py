"""End to end: private messages, rooms, names, pipes and `zchat send`, as processes over CURVE."""

from __future__ import annotations

import json
import re
import sqlite3
import time

import pytest
from conftest import CLOCK, Chat, Proc
from peers import RawPeer, broker_key

from zchat import keys
from zchat import limits as L
from zchat.protocol import Direct, Mark, Message

pytestmark = pytest.mark.timeout(90)
CLOCK_RE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def _send(chat: Chat, *args: str) -> Proc:
    proc = Proc(["-m", "zchat", "send", "--port", str(chat.port), "--pub-port", str(chat.pub_port),
                 "--config-dir", str(chat.config_dir), *args], env=chat.env, stdin=False)
    chat.procs.append(proc)
    return proc


def test_private_message_reaches_only_its_recipient(chat: Chat) -> None:
    chat.start_broker()
    key = broker_key(chat.config_dir)
    # The widest subscriptions the broker permits to a stranger: every room and sys/.
    tap = RawPeer(chat.port, chat.pub_port, key, [b"r/", b"sys/", b"u/", b""])
    try:
        alice = chat.joined_client("alice")
        bob = chat.joined_client("bob")
        carol = chat.joined_client("carol")
        alice.wait_for(r"- carol has joined the chat\.")
        alice.send("/msg bob the cake is in the fridge")
        bob.wait_for(rf"^{CLOCK} <- alice: the cake is in the fridge$")
        alice.wait_for(rf"^{CLOCK} -> bob: the cake is in the fridge$")
        # A public message after the DM: once everyone has it, the DM would have arrived too.
        alice.send("public after the secret")
        carol.wait_for(r"alice: public after the secret")
        tap.wait_for(lambda t, e: isinstance(e, Message) and e.text == "public after the secret")
        assert carol.count("fridge") == 0
        assert not any(b"fridge" in data for data in tap.received)
        assert not any(isinstance(_event(d), Direct) for d in tap.received)
        # Unknown or offline recipients get an error, to the sender only.
        alice.send("/msg nobody hello?")
        alice.wait_for(rf"^{CLOCK} ! unknown user 'nobody': nobody of that name has been here, so there "
                       "is no key to encrypt to$")
        assert bob.count("unknown user") == 0
    finally:
        tap.close()


def _event(data: bytes):  # type: ignore[no-untyped-def]
    from zchat.protocol import decode_publication

    return decode_publication(data)[1]


def test_rooms_are_isolated(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    carol = chat.joined_client("carol")
    alice.send("/join rust")
    alice.wait_for(rf"^{CLOCK} - alice has joined #rust\.$")
    carol.send("/join #Rust")
    carol.wait_for(rf"^{CLOCK} - carol has joined #rust\.$")
    alice.wait_for(rf"^{CLOCK} - carol has joined #rust\.$")
    carol.send("borrow checker talk")  # carol's current room is now #rust
    alice.wait_for(rf"^{CLOCK} carol: borrow checker talk$")
    bob.send("lobby talk")
    alice.wait_for(rf"^{CLOCK} #lobby bob: lobby talk$")  # tagged: not alice's current room
    carol.wait_for(rf"^{CLOCK} #lobby bob: lobby talk$")
    assert bob.count("borrow checker") == 0 and bob.count("#rust") == 0
    alice.send("/rooms")
    alice.wait_for(rf"^{CLOCK} \* Rooms: #lobby \(3\), #rust \(2\)$")
    alice.send("/who rust")
    alice.wait_for(rf"^{CLOCK} \* Online in #rust \(2\): alice, carol$")
    carol.send("/leave")
    carol.wait_for(rf"^{CLOCK} - carol has left #rust\.$")
    alice.wait_for(rf"^{CLOCK} - carol has left #rust\.$")
    carol.send("back in the lobby")
    bob.wait_for(rf"^{CLOCK} carol: back in the lobby$")


def test_nick_collision_and_rename(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.send("/nick bob")
    alice.wait_for(rf"^{CLOCK} ! the name 'bob' is taken$")
    alice.send("/nick alicia")
    for proc in (alice, bob):
        proc.wait_for(rf"^{CLOCK} - alice is now known as alicia\.$")
    alice.send("renamed and talking")
    bob.wait_for(rf"^{CLOCK} alicia: renamed and talking$")
    bob.send("/me waves at alicia")
    alice.wait_for(rf"^{CLOCK} \* bob waves at alicia$")
    assert bob.count("now known as") == 1  # one notice, not one per shared room


def test_pipe_sends_every_line_in_order_and_leaves_after_delivery(chat: Chat) -> None:
    """More lines than the rate limit's burst: paced, none refused, none lost, order kept."""
    chat.start_broker()
    listener = chat.joined_client("listener")
    bot = chat.client("bot")
    bot.wait_for(r"\* Welcome, bot!")
    count = 45
    for i in range(count):
        bot.send(f"line {i:03d}")
    bot.close_stdin()
    assert bot.wait_exit(30) == 0
    listener.wait_for(rf"bot: line {count - 1:03d}$", timeout=5)
    listener.wait_for(r"- bot has left the chat\.", timeout=5)
    received = [line.split("bot: ")[1] for line in listener.lines if "bot: line" in line]
    assert received == [f"line {i:03d}" for i in range(count)]
    assert listener.count("slow down") == 0 and bot.count("slow down") == 0


def test_zchat_send_exits_0_once_accepted_and_non_zero_with_a_reason(chat: Chat) -> None:
    chat.start_broker()
    bob = chat.joined_client("bob")
    started = time.monotonic()
    ok = _send(chat, "--name", "deploy", "--to", "bob", "build", "42", "is", "green")
    assert ok.wait_exit(15) == 0
    bob.wait_for(rf"^{CLOCK} <- deploy: build 42 is green$", timeout=5)
    assert time.monotonic() - started < 15
    to_room = _send(chat, "--name", "deploy", "--room", "lobby", "to everyone")
    assert to_room.wait_exit(15) == 0
    bob.wait_for(rf"^{CLOCK} deploy: to everyone$", timeout=5)

    offline = _send(chat, "--name", "deploy", "--to", "ghost", "anyone?")
    assert offline.wait_exit(15) == 1
    offline.wait_for(r"^zchat send: unknown user 'ghost'")
    invalid = _send(chat, "--name", "deploy", "--room", "no spaces allowed", "x")
    assert invalid.wait_exit(15) == 2
    invalid.wait_for(r"^zchat send: invalid room")


def test_zchat_send_refuses_an_over_long_text_unless_split(chat: Chat) -> None:
    """Issue 14, item 8: exit 2 at once with the length and the limit (it timed out with exit
    3); --split sends it as several messages, cut at spaces."""
    chat.start_broker()
    bob = chat.joined_client("bob")
    words = [f"word{i:04d}" for i in range(333)]  # 2,996 characters
    text = " ".join(words) + " end"
    too_long = _send(chat, "--name", "deploy", text)
    assert too_long.wait_exit(15) == 2
    too_long.wait_for(rf"^zchat send: message too long \(3000 characters, the limit is {L.MAX_TEXT_CHARS}\); "
                      r"--split sends it as several messages$")
    assert bob.count("deploy") == 0
    split = _send(chat, "--name", "deploy", "--split", text)
    assert split.wait_exit(15) == 0
    bob.wait_for(rf"^{CLOCK} deploy: word0222 .* word0332 end$", timeout=5)
    bob.wait_for(rf"^{CLOCK} deploy: word0000 .* word0221$", timeout=1)


def test_a_piped_client_shows_its_message_not_history_or_its_own_arrival(chat: Chat) -> None:
    """Issue 14, item 16: `echo hi | zchat client` printed the welcome, the room's history and
    its own join before its one message; `--history N` asks for some."""
    chat.start_broker()
    alice = chat.joined_client("alice")
    for i in range(3):
        alice.send(f"earlier {i}")
    alice.wait_for(rf"^{CLOCK} alice: earlier 2$")
    piped = chat.client("bot")
    piped.send("hi")
    piped.close_stdin()
    assert piped.wait_exit(15) == 0
    assert [CLOCK_RE.sub("", line) for line in piped.lines] == [
        "* Welcome, bot! 1 other(s) online: alice. Type /help for commands.", "bot: hi"]
    some = chat.client("some", "--history", "2")
    some.send("hello")
    some.close_stdin()
    assert some.wait_exit(15) == 0
    assert [CLOCK_RE.sub("", line) for line in some.lines][1:] == [
        "--- history of #lobby: 2 event(s) ---", "bot: hi", "- bot has left the chat.",
        "--- end of history ---", "some: hello"]


def test_zchat_send_times_out_without_a_broker(chat: Chat) -> None:
    chat.start_broker()
    chat.broker.stop()  # type: ignore[union-attr]
    lost = _send(chat, "--name", "deploy", "--timeout", "2", "hello?")
    assert lost.wait_exit(15) == 3
    lost.wait_for(r"^zchat send: no broker answers at tcp://")
    # Issue 14, item 11: the hint repeats the flags given (it said just "zchat broker").
    pub = f" --pub-port {chat.pub_port}" if chat.pub_port != chat.port + 1 else ""
    lost.wait_for(rf"\(start one with: zchat broker --port {chat.port}{pub}\)$")


def _stored(chat: Chat, topic: str) -> list[dict]:
    db = sqlite3.connect(chat.config_dir / "broker" / "history.sqlite3")
    try:
        return [json.loads(body) for (body,) in db.execute(
            "SELECT body FROM events WHERE topic = ? ORDER BY seq", (topic,))]
    finally:
        db.close()


def test_zchat_send_adds_one_message_and_no_presence_to_the_room_and_its_history(chat: Chat) -> None:
    """Issue 14, item 14: every `zchat send` added a join and a leave (three events for one
    message). It posts now: the room and its history get the message alone."""
    chat.start_broker()
    key = broker_key(chat.config_dir)
    watcher = RawPeer(chat.port, chat.pub_port, key, [b"r/lobby/"])
    try:
        bob = chat.joined_client("bob")
        bob.send("before")
        watcher.wait_for(lambda t, e: isinstance(e, Message) and e.text == "before")
        sent = _send(chat, "--name", "deploy", "build", "42", "is", "green")
        assert sent.wait_exit(15) == 0
        bob.wait_for(rf"^{CLOCK} deploy: build 42 is green$", timeout=5)
        bob.send("after")
        watcher.wait_for(lambda t, e: isinstance(e, Message) and e.text == "after")
        live = [e for _, e in watcher.decoded() if not isinstance(e, Mark)]
        since = next(i for i, e in enumerate(live) if isinstance(e, Message) and e.text == "before")
        assert [(type(e).__name__, getattr(e, "name", "")) for e in live[since:]] == [
            ("Message", "bob"), ("Message", "deploy"), ("Message", "bob")]
        assert bob.count("deploy has") == 0
        stored = _stored(chat, "r/lobby/")
        texts = [(event["type"], event.get("name")) for event in stored]
        assert texts[-3:] == [("message", "bob"), ("message", "deploy"), ("message", "bob")]
    finally:
        watcher.close()


def test_zchat_send_refuses_a_name_this_key_may_not_use(chat: Chat) -> None:
    """Another key may not post as an online member, nor as a look-alike of one."""
    chat.start_broker()
    bob = chat.joined_client("bob")
    mallory = keys.client_keys_dir(chat.config_dir) / "client-mallory.key_secret"
    keys.load_or_create(mallory.parent, "client-mallory")
    for name, why in [("bob", "the name 'bob' is taken"), ("b0b", "looks like 'bob', who is online")]:
        refused = _send(chat, "--key", str(mallory), "--name", name, "it is me, bob")
        assert refused.wait_exit(15) == 1
        refused.wait_for(rf"^zchat send: .*{re.escape(why)}")
    bob.send("marker")
    bob.wait_for(rf"^{CLOCK} bob: marker$")
    assert bob.count("it is me") == 0


def test_zchat_send_to_a_room_that_does_not_exist_needs_create(chat: Chat) -> None:
    """Issue 14, item 15: `zchat send --room opps` (a typo) created the room `opps`."""
    chat.start_broker()
    bob = chat.joined_client("bob")
    bob.send("/join ops")
    bob.wait_for(rf"^{CLOCK} - bob has joined #ops\.$")
    typo = _send(chat, "--name", "deploy", "--room", "opps", "deployed")
    assert typo.wait_exit(15) == 1
    line = typo.wait_for(r"^zchat send: ")
    assert line == ("zchat send: there is no room #opps (rooms with people in them: #lobby, #ops); "
                    "--create makes it")
    assert _stored(chat, "r/opps/") == []
    created = _send(chat, "--name", "deploy", "--room", "opps", "--create", "deployed")
    assert created.wait_exit(15) == 0
    assert [(e["type"], e["name"], e["text"]) for e in _stored(chat, "r/opps/")] == [
        ("message", "deploy", "deployed")]
    again = _send(chat, "--name", "deploy", "--room", "opps", "it exists now")
    assert again.wait_exit(15) == 0
