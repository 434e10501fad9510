"""Unit tests of zchat.protocol: no sockets, no processes, no clock."""

from __future__ import annotations

import json

import msgspec
import pytest

from zchat import limits
from zchat.protocol import (
    DEFAULT_ROOM,
    SYSTEM_TOPIC,
    Code,
    Error,
    Heartbeat,
    Join,
    Joined,
    KeyRequest,
    Leave,
    Left,
    Message,
    Msg,
    Ping,
    ProtocolError,
    Renamed,
    Say,
    Shutdown,
    Welcome,
    clean_text,
    decode_client_message,
    decode_publication,
    encode_client_message,
    encode_publication,
    name_key,
    normalize_room,
    private_topic,
    room_of_topic,
    room_topic,
    valid_name,
)

ID = "0123456789abcdef" * 4


def js(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def bad(body: bytes | memoryview, frames: int = 1) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_client_message(body, frames)
    return info.value


# --- decoding every message type ---------------------------------------------


def test_decode_join_with_rooms() -> None:
    msg = decode_client_message(js(type="join", name="alice", rooms=["lobby", "#Dev"]))
    assert msg == Join(name="alice", rooms=["lobby", "#Dev"])


def test_decode_join_rooms_default_to_none_meaning_the_default_room() -> None:
    msg = decode_client_message(js(type="join", name="alice"))
    assert isinstance(msg, Join)
    assert msg.name == "alice"
    assert msg.rooms is None  # the core reads None as [lobby]; [] is "no room at all"
    assert decode_client_message(js(type="join", name="alice", rooms=[])).rooms == []


def test_decode_say_with_and_without_ref() -> None:
    assert decode_client_message(js(type="say", room="lobby", text="hi")) == Say(
        room="lobby", text="hi", ref=None)
    assert decode_client_message(js(type="say", room="lobby", text="hi", ref=7)) == Say(
        room="lobby", text="hi", ref=7)
    assert decode_client_message(js(type="say", room="lobby", text="hi", ref=None)).ref is None


def test_decode_leave_with_and_without_message() -> None:
    assert decode_client_message(js(type="leave")) == Leave(message="")
    assert decode_client_message(js(type="leave", message="bye")) == Leave(message="bye")


def test_decode_ping() -> None:
    assert decode_client_message(js(type="ping")) == Ping()


def test_decode_accepts_memoryview() -> None:
    body = bytearray(js(type="say", room="lobby", text="hi"))
    assert decode_client_message(memoryview(body)) == Say(room="lobby", text="hi")


def test_decode_keeps_unicode_text() -> None:
    text = "héllo 世界 🎉 ñ"
    assert decode_client_message(js(type="say", room="lobby", text=text)).text == text


def test_unknown_fields_are_ignored_and_not_part_of_the_message() -> None:
    msg = decode_client_message(js(type="say", room="lobby", text="hi", name="mallory",
                                   id="f" * 64, extra=[1, {"x": None}]))
    assert isinstance(msg, Say)
    assert msgspec.structs.asdict(msg) == {"room": "lobby", "text": "hi", "ref": None}
    assert not hasattr(msg, "name")
    assert not hasattr(msg, "id")


def test_unknown_fields_ignored_in_every_type() -> None:
    assert decode_client_message(js(type="ping", name="x", seq=3)) == Ping()
    assert decode_client_message(js(type="leave", reason="x")) == Leave()
    assert decode_client_message(js(type="join", name="bob", identity="a" * 64)) == Join(name="bob")


@pytest.mark.parametrize("msg", [
    Join(name="alice"),
    Join(name="alice", rooms=["lobby", "dev"]),
    Say(room="lobby", text="hello"),
    Say(room="lobby", text="hello", ref=42),
    Leave(),
    Leave(message="gone fishing"),
    Ping(),
])
def test_encode_decode_client_message_roundtrip(msg: object) -> None:
    data = encode_client_message(msg)  # type: ignore[arg-type]
    assert json.loads(data)["type"] == type(msg).__name__.lower()
    assert decode_client_message(data) == msg


def test_encode_client_message_omits_defaults() -> None:
    assert json.loads(encode_client_message(Ping())) == {"type": "ping"}
    assert json.loads(encode_client_message(Say(room="lobby", text="x"))) == {
        "type": "say", "room": "lobby", "text": "x"}


# --- limits at the edge are accepted --------------------------------------------


def test_fields_exactly_at_their_limits_are_accepted() -> None:
    name = "n" * limits.MAX_NAME_CHARS
    rooms = [f"r{i}" for i in range(limits.MAX_ROOMS_PER_JOIN)]
    assert decode_client_message(js(type="join", name=name, rooms=rooms)) == Join(name=name, rooms=rooms)
    room = "#" + "r" * limits.MAX_ROOM_CHARS  # a leading '#' is allowed on top of the room's length
    text = "t" * limits.MAX_TEXT_CHARS
    assert decode_client_message(js(type="say", room=room, text=text, ref=2**53)) == Say(
        room=room, text=text, ref=2**53)
    reason = "r" * limits.MAX_REASON_CHARS
    assert decode_client_message(js(type="leave", message=reason)) == Leave(message=reason)


def test_longest_text_of_four_byte_characters_fits_in_a_body() -> None:
    # The text limit (characters) and the body limit (bytes) must agree.
    body = msgspec.json.encode({"type": "say", "room": "#" + "r" * limits.MAX_ROOM_CHARS,
                                "text": "🎉" * limits.MAX_TEXT_CHARS, "ref": 2**53})
    assert len(body) <= limits.MAX_BODY_BYTES
    msg = decode_client_message(body)
    assert isinstance(msg, Say)
    assert len(msg.text) == limits.MAX_TEXT_CHARS


def test_body_of_exactly_max_bytes_is_accepted() -> None:
    base = js(type="ping")
    body = base + b" " * (limits.MAX_BODY_BYTES - len(base))
    assert len(body) == limits.MAX_BODY_BYTES
    assert decode_client_message(body) == Ping()


# --- bad input --------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"",
    b"\xff\xfe\x00",
    b"\x80abc",
    b"not json",
    b"{",
    b'{"type": "ping"',
    b'{"type": "ping"} trailing',
    b"{'type': 'ping'}",
])
def test_undecodable_or_not_json_is_bad_request(body: bytes) -> None:
    err = bad(body)
    assert err.code == Code.BAD_REQUEST
    assert err.detail


@pytest.mark.parametrize("body", [
    b'{"type": "say", "room": "lobby", "text": "\xff"}',
    b'{"type": "join", "name": "al\xc3"}',
    b'{"type": "leave", "message": "\xed\xa0\x80"}',
])
def test_invalid_utf8_inside_a_string_is_bad_request(body: bytes) -> None:
    # Must be a ProtocolError, not a UnicodeDecodeError escaping to the broker loop.
    err = bad(body)
    assert err.code == Code.BAD_REQUEST


@pytest.mark.parametrize("body", [b"[]", b"[1, 2]", b"5", b"1.5", b'"join"', b"null", b"true"])
def test_json_that_is_not_an_object_is_bad_request(body: bytes) -> None:
    assert bad(body).code == Code.BAD_REQUEST


@pytest.mark.parametrize("fields", [
    {},
    {"name": "alice"},
    {"type": "nope"},
    {"type": "JOIN", "name": "alice"},
    {"type": "message", "room": "lobby", "name": "x", "text": "x"},
    {"type": "welcome"},
    {"type": None},
    {"type": 1},
])
def test_missing_or_unknown_type_is_bad_request(fields: dict[str, object]) -> None:
    assert bad(js(**fields)).code == Code.BAD_REQUEST


@pytest.mark.parametrize("fields", [
    {"type": "join"},
    {"type": "join", "rooms": ["lobby"]},
    {"type": "say"},
    {"type": "say", "room": "lobby"},
    {"type": "say", "text": "hi"},
])
def test_missing_required_fields_is_bad_request(fields: dict[str, object]) -> None:
    err = bad(js(**fields))
    assert err.code == Code.BAD_REQUEST
    assert "missing" in err.detail


@pytest.mark.parametrize("fields", [
    {"type": "join", "name": 5},
    {"type": "join", "name": None},
    {"type": "join", "name": ["alice"]},
    {"type": "join", "name": "alice", "rooms": "lobby"},
    {"type": "join", "name": "alice", "rooms": [1]},
    {"type": "join", "name": "alice", "rooms": {"lobby": 1}},
    {"type": "say", "room": 1, "text": "hi"},
    {"type": "say", "room": None, "text": "hi"},
    {"type": "say", "room": "lobby", "text": 5},
    {"type": "say", "room": "lobby", "text": {"a": 1}},
    {"type": "say", "room": "lobby", "text": "hi", "ref": "1"},
    {"type": "say", "room": "lobby", "text": "hi", "ref": True},
    {"type": "say", "room": "lobby", "text": "hi", "ref": 1.5},
    {"type": "say", "room": "lobby", "text": "hi", "ref": -1},
    {"type": "say", "room": "lobby", "text": "hi", "ref": 2**53 + 1},
    {"type": "leave", "message": 5},
    {"type": "leave", "message": None},
])
def test_wrong_field_types_are_bad_request(fields: dict[str, object]) -> None:
    assert bad(js(**fields)).code == Code.BAD_REQUEST


@pytest.mark.parametrize("fields", [
    {"type": "say", "room": "lobby", "text": "t" * (limits.MAX_TEXT_CHARS + 1)},
    {"type": "join", "name": "n" * (limits.MAX_NAME_CHARS + 1)},
    {"type": "join", "name": "alice", "rooms": ["r" * (limits.MAX_ROOM_CHARS + 2)]},
    {"type": "join", "name": "alice", "rooms": [f"r{i}" for i in range(limits.MAX_ROOMS_PER_JOIN + 1)]},
    {"type": "say", "room": "r" * (limits.MAX_ROOM_CHARS + 2), "text": "hi"},
    {"type": "leave", "message": "m" * (limits.MAX_REASON_CHARS + 1)},
])
def test_over_long_fields_are_bad_request(fields: dict[str, object]) -> None:
    body = js(**fields)
    assert len(body) <= limits.MAX_BODY_BYTES  # rejected for the field, not the size
    assert bad(body).code == Code.BAD_REQUEST


def test_oversized_body_is_too_large_before_decoding() -> None:
    base = js(type="ping")
    body = base + b" " * (limits.MAX_BODY_BYTES + 1 - len(base))
    assert len(body) == limits.MAX_BODY_BYTES + 1
    err = bad(body)
    assert err.code == Code.TOO_LARGE
    assert str(limits.MAX_BODY_BYTES) in err.detail
    assert bad(b"\xff" * (limits.MAX_BODY_BYTES * 4)).code == Code.TOO_LARGE
    assert bad(memoryview(b"x" * (limits.MAX_BODY_BYTES + 1))).code == Code.TOO_LARGE


@pytest.mark.parametrize("frames", [0, 2, 3, 1000])
def test_frame_count_other_than_one_is_too_many_frames(frames: int) -> None:
    err = bad(js(type="ping"), frames=frames)
    assert err.code == Code.TOO_MANY_FRAMES
    assert str(frames) in err.detail


def test_frame_count_is_checked_before_size() -> None:
    assert bad(b"x" * (limits.MAX_BODY_BYTES + 1), frames=2).code == Code.TOO_MANY_FRAMES


def test_protocol_error_carries_code_and_detail() -> None:
    err = ProtocolError(Code.NAME_TAKEN, "the name is taken")
    assert err.code == "name_taken"
    assert err.detail == "the name is taken"
    assert str(err) == "the name is taken"


# --- publications ------------------------------------------------------------------

EVENTS = [
    Welcome(seq=1, ts=1700000000.25, id=ID, name="alice", epoch="ep1", rooms={"lobby": 3, "dev": 0},
            online=2, members=["alice", "bob"], heartbeat=1.0, rate_burst=20, rate_per_second=5.0),
    Message(seq=2, ts=1.5, room="lobby", name="alice", text="hi 🎉", ref=9),
    Message(seq=3, ts=1.5, room="lobby", name="alice", text="no ref"),
    Joined(seq=4, ts=2.0, room="lobby", name="bob"),
    Left(seq=5, ts=3.0, room="lobby", name="bob", reason="quit", message="bye"),
    Left(seq=6, ts=3.0, room="lobby", name="bob", reason="timeout"),
    Renamed(seq=7, ts=4.0, room="lobby", old="bob", new="robert"),
    Error(seq=8, ts=5.0, code=Code.NOT_IN_ROOM, detail="you are not in room 'x'", ref=3),
    Error(seq=9, ts=5.0, code=Code.BAD_REQUEST, detail="nope"),
    Heartbeat(seq=10, ts=6.0, epoch="ep1", interval=1.0, online=0),
    Shutdown(seq=11, ts=7.0, epoch="ep1", detail="broker stopping"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("topic", ["r/lobby/", "sys/", f"u/{ID}/"])
def test_publication_roundtrip(topic: str, event: object) -> None:
    data = encode_publication(topic.encode(), event)  # type: ignore[arg-type]
    assert data.startswith(topic.encode() + b" {")
    assert data.count(b"\n") == 0
    body = json.loads(data[len(topic) + 1:])
    assert body["type"] == type(event).__name__.lower()
    assert body["seq"] == event.seq  # type: ignore[attr-defined]
    assert body["ts"] == event.ts  # type: ignore[attr-defined]
    got_topic, got = decode_publication(data)
    assert got_topic == topic
    assert got == event
    assert type(got) is type(event)


def test_publication_omits_absent_ref() -> None:
    data = encode_publication(b"r/lobby/", Message(seq=1, ts=0.0, room="lobby", name="a", text="x"))
    assert b'"ref"' not in data


@pytest.mark.parametrize("data", [
    b"r/lobby/",
    b"",
    b'r/lobby/{"type":"heartbeat"}',
    b"r/lobby/ not json",
    b'r/lobby/ {"type":"nope","seq":1,"ts":0}',
    b'r/lobby/ {"type":"joined","seq":1,"ts":0}',
    b'r/lobby/ {"type":"joined","seq":"1","ts":0,"room":"lobby","name":"a"}',
    b'r/\xff/ {"type":"joined","seq":1,"ts":0,"room":"lobby","name":"a"}',
])
def test_decode_publication_rejects_malformed_frames(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_publication(data)
    assert info.value.code == Code.BAD_REQUEST


# --- clean_text ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "hello",
    "héllo wörld",
    "日本語のテキスト",
    "emoji 🎉👍🏽 and 👨‍👩‍👧",
    "Ελληνικά, русский, עברית, العربية",
    "symbols: <>&\"'\\ ~`!@#$%^*()[]{}",
    "",
])
def test_clean_text_keeps_normal_text(text: str) -> None:
    assert clean_text(text) == text


@pytest.mark.parametrize("dirty, clean", [
    ("\x1b[31mred\x1b[0m", "red"),
    ("\x1b[1;32;40mbold\x1b[m!", "bold!"),
    ("a\x1b[2Jb", "ab"),
    ("a\x1b[?25lb", "ab"),
    ("\x1b[10;20Hmoved", "moved"),
    ("x\x1b[", "x"),
    ("\x1b]0;evil title\x07text", "text"),
    ("\x1b]0;evil title\x1b\\text", "text"),
    ("\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\ here", "click here"),
    ("\x1bPdcs payload\x1b\\after", "after"),
    ("\x1b_apc\x1b\\after", "after"),
    ("lone escape\x1b", "lone escape"),
    ("\x9b31mc1 csi", "c1 csi"),
    ("\x9d0;title\x9cc1 osc", "c1 osc"),
    ("\x9d0;title\x07c1 osc bel", "c1 osc bel"),
    ("a\x85b\x8dc", "abc"),
    ("\x9fapc string\x9cd", "d"),
    ("bell\x07 back\x08space", "bell backspace"),
    ("nul\x00byte", "nulbyte"),
    ("car\rriage", "car riage"),  # line breaks become spaces: words stay apart
    ("new\nline", "new line"),
    ("crlf\r\nline", "crlf line"),
    ("del\x7fete", "delete"),
    ("tab\there", "tab here"),
    ("\u202eevil\u202c", "evil"),
    ("a\u202ab\u202bc\u202dd", "abcd"),
    ("\u2066iso\u2069\u2067x\u2068y", "isoxy"),
    ("zoë \x1b[1m🎉\x1b[0m 世界", "zoë 🎉 世界"),
])
def test_clean_text_strips_control_and_escape_sequences(dirty: str, clean: str) -> None:
    assert clean_text(dirty) == clean


@pytest.mark.parametrize("text", ["a\x1bcb", "a\x1b7b\x1b8c", "a\x1b=b\x1b>c"])
def test_clean_text_removes_escape_of_other_two_byte_sequences(text: str) -> None:
    # ESC c (reset), ESC 7/8 (save/restore cursor), ESC =/>: the ESC itself must go.
    out = clean_text(text)
    assert "\x1b" not in out
    assert out.startswith("a")
    assert len(out) < len(text)


def test_clean_text_output_has_no_controls() -> None:
    everything = "".join(chr(c) for c in range(0x00, 0xA0)) + "\u202a\u202b\u202c\u202d\u202e\u2066\u2069"
    out = clean_text(everything)
    assert "\x1b" not in out
    assert all(not (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F) for ch in out)
    assert not any(ch in out for ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


# --- names, rooms, topics ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "alice", "Bob", "a", "7", "a" * limits.MAX_NAME_CHARS, "a.b-c_d", "R2-D2", "x.",
])
def test_valid_names(name: str) -> None:
    assert valid_name(name) is True


@pytest.mark.parametrize("name", [
    "", "a" * (limits.MAX_NAME_CHARS + 1), " alice", "alice ", "al ice", "a/b", "u/x", "-a", ".a",
    "a:b", "a#", "a@b", "a\x1b[31m", "\x00", "a\tb", "🎉", "a\u202eb",
    "zoë", "日本", "аlice",  # non-ASCII: "аlice" starts with a Cyrillic а that looks like a Latin a
])
def test_invalid_names(name: str) -> None:
    assert valid_name(name) is False


@pytest.mark.parametrize("name", ["alice\n", "\nalice", "al\nice"])
def test_names_with_a_newline_are_invalid(name: str) -> None:
    # "$" in a regex also matches just before a trailing newline: names must still be refused.
    assert valid_name(name) is False


@pytest.mark.parametrize("raw, room", [
    ("lobby", "lobby"),
    ("Lobby", "lobby"),
    ("LOBBY", "lobby"),
    ("#lobby", "lobby"),
    ("#Dev-Ops", "dev-ops"),
    ("a.b_c", "a.b_c"),
    ("r" * limits.MAX_ROOM_CHARS, "r" * limits.MAX_ROOM_CHARS),
    ("#" + "R" * limits.MAX_ROOM_CHARS, "r" * limits.MAX_ROOM_CHARS),
])
def test_normalize_room_valid(raw: str, room: str) -> None:
    assert normalize_room(raw) == room


@pytest.mark.parametrize("raw", [
    "", "#", "##lobby", "bad room", "a/b", "lobby/", "-x", "r" * (limits.MAX_ROOM_CHARS + 1),
    " lobby", "lobby\x1b", "lobby\n",
])
def test_normalize_room_invalid(raw: str) -> None:
    assert normalize_room(raw) is None


def test_name_key_is_case_insensitive() -> None:
    assert name_key("Alice") == name_key("alice") == name_key("ALICE") == "alice"
    assert name_key("Straße") == name_key("STRASSE")
    assert name_key("alice") != name_key("alicia")


def test_topic_builders() -> None:
    assert room_topic("lobby") == "r/lobby/"
    assert private_topic(ID) == f"u/{ID}/"
    assert SYSTEM_TOPIC == "sys/"
    assert DEFAULT_ROOM == "lobby"
    assert room_of_topic(room_topic(DEFAULT_ROOM)) == DEFAULT_ROOM


@pytest.mark.parametrize("topic, room", [
    ("r/lobby/", "lobby"),
    ("r/dev-ops/", "dev-ops"),
    ("r/" + "x" * limits.MAX_ROOM_CHARS + "/", "x" * limits.MAX_ROOM_CHARS),
    ("r/", None),
    ("r//", None),
    ("r/lobby", None),
    ("r/a/b/", None),
    ("r/bad room/", None),
    ("r/#lobby/", None),
    ("r/" + "x" * (limits.MAX_ROOM_CHARS + 1) + "/", None),
    ("r/lobby\n/", None),
    ("sys/", None),
    (f"u/{ID}/", None),
    ("", None),
    ("x/lobby/", None),
])
def test_room_of_topic(topic: str, room: str | None) -> None:
    assert room_of_topic(topic) == room


# --- end-to-end private messages: the broker bounds what it cannot read ---------------------------


def test_msg_carries_boxes_within_their_bounds_and_a_key() -> None:
    key, box = "ab" * 32, "A" * limits.MIN_BOX_CHARS
    longest = "B" * limits.MAX_BOX_CHARS
    ok = decode_client_message(js(type="msg", to="bob", key=key, box=box, self_box=longest))
    assert ok == Msg(to="bob", key=key, box=box, self_box=longest)
    for fields in ({"box": "A" * (limits.MIN_BOX_CHARS - 1)}, {"self_box": "A" * (limits.MAX_BOX_CHARS + 1)},
                   {"key": "AB" * 32}, {"key": "ab" * 31}, {"key": "ab" * 32 + "\n"}):
        assert bad(js(**{"type": "msg", "to": "bob", "key": key, "box": box, "self_box": box,
                         **fields})).code == Code.BAD_REQUEST, fields
    # A clear-text msg, as before end-to-end encryption, is refused: no text ever travels.
    assert bad(js(type="msg", to="bob", text="psst")).code == Code.BAD_REQUEST


def test_key_request_round_trips() -> None:
    assert decode_client_message(js(type="key", name="bob", ref=3)) == KeyRequest(name="bob", ref=3)
    assert bad(js(type="key")).code == Code.BAD_REQUEST
