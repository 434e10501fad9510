"""Unit tests of zchat.commands: parsing what a person typed, and the help text. Pure."""

from __future__ import annotations

import pytest

from zchat.commands import COMMANDS, Command, UsageError, help_text, parse


def usage_error(line: str) -> str:
    with pytest.raises(UsageError) as info:
        parse(line)
    return str(info.value)


# --- plain text and the escape ---------------------------------------------------------------


@pytest.mark.parametrize("line", ["hello", "hello world", "  leading spaces", "a /b c", " /msg bob hi", ""])
def test_plain_text_is_said_unchanged(line: str) -> None:
    assert parse(line) == Command("say", (line,))


@pytest.mark.parametrize("line, text", [
    ("//", "/"),
    ("//shrug", "/shrug"),
    ("//msg bob hi", "/msg bob hi"),
    ("///", "//"),
    ("// spaced ", "/ spaced "),
])
def test_double_slash_sends_a_leading_slash(line: str, text: str) -> None:
    assert parse(line) == Command("say", (text,))


# --- unknown commands ------------------------------------------------------------------------


@pytest.mark.parametrize("line, word", [
    ("/frobnicate", "/frobnicate"),
    ("/frob x y", "/frob"),
    ("/", "/"),
    ("/MSGX bob hi", "/MSGX"),
    ("/ msg", "/"),
])
def test_unknown_command(line: str, word: str) -> None:
    message = usage_error(line)
    assert message == f"unknown command {word}; type /help for the list"


# --- each command: good arguments ------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ("/msg bob hello", Command("msg", ("bob", "hello"))),
    ("/msg bob hello there", Command("msg", ("bob", "hello there"))),
    ("/msg   bob   hello  there  ", Command("msg", ("bob", "hello  there"))),
    ("/msg bob /not a command", Command("msg", ("bob", "/not a command"))),
    ("/me waves", Command("me", ("waves",))),
    ("/me  waves at  bob ", Command("me", ("waves at  bob",))),
    ("/nick alicia", Command("nick", ("alicia",))),
    ("/nick  alicia ", Command("nick", ("alicia",))),
    ("/who", Command("who", ())),
    ("/who rust", Command("who", ("rust",))),
    ("/who #rust", Command("who", ("#rust",))),
    ("/join rust", Command("join", ("rust",))),
    ("/join #Rust", Command("join", ("#Rust",))),
    ("/leave", Command("leave", ())),
    ("/leave rust", Command("leave", ("rust",))),
    ("/rooms", Command("rooms", ())),
    ("/rooms   ", Command("rooms", ())),
    ("/quit", Command("quit", ("",))),
    ("/quit bye all", Command("quit", ("bye all",))),
    ("/quit   see  you  ", Command("quit", ("see  you",))),
    ("/help", Command("help", ())),
    ("/help msg", Command("help", ("msg",))),
    ("/help /msg", Command("help", ("/msg",))),
])
def test_good_arguments(line: str, expected: Command) -> None:
    assert parse(line) == expected


@pytest.mark.parametrize("line, expected", [
    ("/MSG bob Hi", Command("msg", ("bob", "Hi"))),
    ("/Me Waves", Command("me", ("Waves",))),
    ("/NICK Alicia", Command("nick", ("Alicia",))),
    ("/Who", Command("who", ())),
    ("/JOIN Rust", Command("join", ("Rust",))),
    ("/Leave", Command("leave", ())),
    ("/ROOMS", Command("rooms", ())),
    ("/QUIT Bye", Command("quit", ("Bye",))),
    ("/HeLp", Command("help", ())),
])
def test_the_command_word_is_case_insensitive_and_arguments_keep_their_case(
        line: str, expected: Command) -> None:
    assert parse(line) == expected


# --- each command: bad arguments -------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ("/msg", "usage: /msg NAME TEXT"),
    ("/msg   ", "usage: /msg NAME TEXT"),
    ("/msg bob", "usage: /msg NAME TEXT"),
    ("/msg bob   ", "usage: /msg NAME TEXT"),
    ("/MSG bob", "usage: /msg NAME TEXT"),
    ("/me", "usage: /me ACTION"),
    ("/me    ", "usage: /me ACTION"),
    ("/nick", "usage: /nick NEW"),
    ("/nick two words", "usage: /nick NEW"),
    ("/who a b", "usage: /who [ROOM]"),
    ("/join", "usage: /join ROOM"),
    ("/join a b", "usage: /join ROOM"),
    ("/leave a b", "usage: /leave [ROOM]"),
    ("/rooms x", "usage: /rooms"),
    ("/help a b", "usage: /help [COMMAND]"),
])
def test_bad_arguments_give_the_usage(line: str, message: str) -> None:
    assert usage_error(line) == message


def test_every_command_has_a_usage_starting_with_its_name() -> None:
    for name, spec in COMMANDS.items():
        assert name.startswith("/")
        assert name == name.lower()
        assert spec.summary
        help_one = help_text(name)
        assert help_one.startswith(f"usage: {name}")


# --- help ------------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    text = help_text()
    for name in ("/msg", "/me", "/nick", "/who", "/join", "/leave", "/rooms", "/quit", "/help"):
        assert name in text
        assert name in COMMANDS
    lines = text.splitlines()
    for name, spec in COMMANDS.items():
        [line] = [line for line in lines if line.strip().startswith(f"{name} ")]
        assert spec.summary in line
        assert spec.usage in line
    assert "//" in text


def test_help_text_is_plain() -> None:
    for text in (help_text(), help_text("msg")):
        assert all(ch.isprintable() or ch == "\n" for ch in text)


@pytest.mark.parametrize("arg", ["msg", "/msg", "MSG", "/MSG"])
def test_help_on_one_command(arg: str) -> None:
    assert help_text(arg) == "usage: /msg NAME TEXT\n  send a private message only NAME can read"


@pytest.mark.parametrize("arg, usage_line", [
    ("me", "usage: /me ACTION"),
    ("nick", "usage: /nick NEW"),
    ("who", "usage: /who [ROOM]"),
    ("join", "usage: /join ROOM"),
    ("leave", "usage: /leave [ROOM]"),
    ("rooms", "usage: /rooms"),
    ("quit", "usage: /quit [MESSAGE]"),
    ("help", "usage: /help [COMMAND]"),
])
def test_help_on_each_command(arg: str, usage_line: str) -> None:
    first, second = help_text(arg).split("\n")
    assert first == usage_line
    assert second == "  " + COMMANDS["/" + arg].summary


@pytest.mark.parametrize("arg", ["nope", "/nope", "say"])
def test_help_on_an_unknown_command(arg: str) -> None:
    assert help_text(arg) == f"no command {arg}; type /help for the list"


def test_help_with_empty_argument_is_the_full_list() -> None:
    assert help_text("") == help_text() == help_text(None)
