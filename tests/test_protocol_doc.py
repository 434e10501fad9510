"""docs/PROTOCOL.md against the code: every limit the document states is the one in force.

Four kinds of statements are checked:
- each row of the tables in §13 (Limits) that names constants: `NAME` (or `A` / `B`) and
  its value, with a unit where it has one (bytes, KiB, MiB, characters, ms, s, days, ...),
  also where the constants stand in parentheses after words ("one multipart message
  (`MAX_MESSAGE_PARTS`, `MAX_MESSAGE_BYTES`) | 16 parts, 256 KiB");
- each row of the broker settings table (§13.6): a flag's default, as zchat.config has it;
- anywhere in the text, a number written right before a constant, as in
  "5000 ms (`HANDSHAKE_IVL_MS`)", "at most 200 (`MEMBERS_IN_WELCOME`)" or
  "(20, `RATE_BURST`)", or right after one: "(`MAX_BACKLOG_BYTES`, 8 MiB)",
  "`FD_RESERVE` (128)";
- the 2^53 bound of the integers a client may send.
And every constant of `zchat/limits.py` that the document mentions has its row in §13.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import zchat
from zchat import limits

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
NUMBER = r"\d[\d,]*(?:\.\d+)?"
CONSTANT = r"[A-Z][A-Z0-9_]{2,}"
UNIT = r"(?:KiB|MiB|GiB|[a-z]+)"
TIME_UNITS = {"ms": 0.001, "s": 1.0, "seconds": 1.0, "days": 86400.0}
BYTE_UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _text() -> str:
    return DOC.read_text()


def _limits_section(text: str) -> str:
    start = text.index("\n## 13. Limits")
    return text[start:text.index("\n## 14.", start)]


def _modules() -> list[object]:
    names = [f"zchat.{info.name}" for info in pkgutil.iter_modules(zchat.__path__)]
    return [importlib.import_module(name) for name in sorted(names) if not name.endswith("__main__")]


def constant(name: str) -> float:
    """The value of `name` in zchat.limits, else in the one zchat module that defines it."""
    if hasattr(limits, name):
        return getattr(limits, name)
    values = {getattr(module, name) for module in _modules() if isinstance(getattr(module, name, None),
                                                                        (int, float))}
    assert len(values) == 1, f"{name}: defined {len(values)} times with different values: {values}"
    return values.pop()


def as_stated(name: str, value: float, unit: str | None) -> float:
    """The constant's value in the unit the document wrote it in."""
    if unit in BYTE_UNITS:
        return value / BYTE_UNITS[unit]
    if unit in TIME_UNITS:
        seconds = value / 1000 if name.endswith("_MS") else value * 86400 if name.endswith("_DAYS") else value
        return seconds / TIME_UNITS[unit]
    return value


def number(text: str) -> float:
    return float(text.replace(",", ""))


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows(text: str | None = None) -> list[tuple[str, str, str | None]]:
    """(constant, number as written, unit) for every §13 row that names constants."""
    rows = []
    for line in _limits_section(text or _text()).splitlines():
        cells = _cells(line)
        if len(cells) < 2:
            continue
        if re.match(rf"`{CONSTANT}`", cells[0]):
            names = re.findall(rf"`({CONSTANT})`", cells[0].split("(")[0])
        else:  # "unread on your private stream (`MAX_BACKLOG_BYTES`) | 8 MiB"
            inside = re.search(rf"\((`{CONSTANT}`(?:,\s*`{CONSTANT}`)*)\)", cells[0])
            if inside is None:
                continue
            names = re.findall(rf"`({CONSTANT})`", inside.group(1))
        values = re.findall(rf"({NUMBER})\s*({UNIT})?", cells[1].split("(")[0])
        assert len(values) == len(names), f"§13 row {line!r}: {len(names)} names, {len(values)} values"
        unit = next((u for _, u in reversed(values) if u), None)  # "1000 / 3000 ms": ms for both
        rows += [(name, value, given or unit) for name, (value, given) in zip(names, values, strict=True)]
    return rows


def inline_statements(text: str | None = None) -> list[tuple[str, str, str | None]]:
    """(constant, number, unit) for "N [unit] [up to 4 words] (`NAME`", "(N [unit], `NAME`",
    "(`NAME`, N [unit])" and "`NAME` (N [unit])"."""
    text = text or _text()
    found = []
    words = r"(?:[A-Za-z'][\w'-]*\s+){0,4}?"  # words, not numbers: "10.2 Retention Every 60 s (" is 60
    for match in re.finditer(rf"({NUMBER})\s*({UNIT}\s+)?{words}\(`({CONSTANT})`", text):
        value, unit, name = match.group(1), match.group(2), match.group(3)
        found.append((name, value, unit.strip() if unit else None))
    for match in re.finditer(rf"({NUMBER})\s*({UNIT})?,\s*`({CONSTANT})`", text):
        found.append((match.group(3), match.group(1), match.group(2)))
    for match in re.finditer(rf"\(`({CONSTANT})`,\s*({NUMBER})\s*({UNIT})?[),]", text):
        found.append((match.group(1), match.group(2), match.group(3)))
    for match in re.finditer(rf"`({CONSTANT})`\s*\(({NUMBER})\s*({UNIT})?\)", text):
        found.append((match.group(1), match.group(2), match.group(3)))
    return found


def settings_rows(text: str | None = None) -> list[tuple[str, str, str | None]]:
    """(option key, number as written, unit) for each number of the §13.6 settings table."""
    from zchat import config

    section = _limits_section(text or _text())
    start = section.index("### 13.6")
    rows = []
    for line in section[start:section.index("\n### ", start + 1)].splitlines():
        cells = _cells(line)
        flags = re.findall(r"`--([a-z-]+)`", cells[0])
        if len(cells) < 2 or not flags:
            continue
        values = re.findall(rf"({NUMBER})\s*({UNIT})?", re.sub(r"`[^`]*`", "", cells[1].split("(")[0]))
        keys = [flag.replace("-", "_") for flag in flags]
        if values:
            assert len(values) == len(keys), f"§13.6 row {line!r}: {len(keys)} flags, {len(values)} values"
            assert all(key in config.OPTIONS for key in keys), line
            rows += [(key, value, unit or None) for key, (value, unit) in zip(keys, values, strict=True)]
    return rows


def wrong_statements(text: str) -> list[str]:
    """Every statement of `text` whose number is not the code's."""
    from zchat import config

    wrong = [f"{written} {unit or ''} ({name}): the code says {constant(name)}"
             for name, written, unit in [*table_rows(text), *inline_statements(text)]
             if _known(name) and number(written) != pytest.approx(as_stated(name, constant(name), unit))]
    wrong += [f"--{key}: {written} {unit or ''}; the default is {config.OPTIONS[key].default}"
              for key, written, unit in settings_rows(text)
              if number(written) != pytest.approx(as_stated(key, config.OPTIONS[key].default, unit))]
    return wrong


def _known(name: str) -> bool:
    return any(hasattr(module, name) for module in [limits, *_modules()])


def test_the_limits_section_states_every_limits_constant_it_names() -> None:
    in_table = {name for name, _, _ in table_rows()}
    mentioned = set(re.findall(rf"`({CONSTANT})`", _text()))
    missing = sorted(name for name in mentioned if hasattr(limits, name) and name not in in_table)
    assert missing == [], f"constants of zchat/limits.py mentioned but without a row in §13: {missing}"
    assert len(in_table) >= 30  # the parser found the tables


@pytest.mark.parametrize("name, written, unit", table_rows(), ids=lambda v: str(v))
def test_each_limits_table_row_matches_the_code(name: str, written: str, unit: str | None) -> None:
    assert _known(name), f"§13 names {name}, which no zchat module defines"
    assert number(written) == pytest.approx(as_stated(name, constant(name), unit)), \
        f"§13 says {name} is {written} {unit or ''}; the code says {constant(name)}"


def test_every_number_stated_next_to_a_constant_matches_the_code() -> None:
    statements = [(name, written, unit) for name, written, unit in inline_statements() if _known(name)]
    assert len(statements) >= 40  # the patterns still find the statements
    assert wrong_statements(_text()) == []


def test_the_statements_with_units_and_after_their_constant_are_found() -> None:
    """KiB/MiB, a constant before its number, §13.8's rows and the settings table: each kind
    is read (so a wrong number there cannot slip through)."""
    found = {(name, written, unit) for name, written, unit in [*table_rows(), *inline_statements()]}
    assert ("MAX_BACKLOG_BYTES", "8", "MiB") in found
    assert ("HISTORY_BYTES_PER_SECOND", "512", "KiB") in found
    assert ("MAX_MESSAGE_BYTES", "256", "KiB") in found and ("MAX_MESSAGE_PARTS", "16", "parts") in found
    assert ("FD_RESERVE", "128", None) in found
    assert ("MAX_PUBLISHED_FRAME_BYTES", "257", "KiB") in found
    settings = {key for key, _, _ in settings_rows()}
    assert {"rate_burst", "rate_per_second", "client_timeout", "history_keep", "max_peers"} <= settings


@pytest.mark.parametrize("right, wrong", [
    ("(`MAX_BACKLOG_BYTES`, 8 MiB)", "(`MAX_BACKLOG_BYTES`, 9 MiB)"),
    ("| `MAX_HISTORY_PAGE_BYTES` | 262144 bytes |", "| `MAX_HISTORY_PAGE_BYTES` | 262145 bytes |"),
    ("| 16 parts, 256 KiB |", "| 16 parts, 255 KiB |"),
    ("`FD_RESERVE` (128)", "`FD_RESERVE` (127)"),
    ("| `--max-peers` | 20000 |", "| `--max-peers` | 2000 |"),
    ("5000 ms (`HANDSHAKE_IVL_MS`)", "500 ms (`HANDSHAKE_IVL_MS`)"),
    ("`seen` values | 0 … 2^53 |", "`seen` values | 0 … 2^52 |"),
])
def test_a_wrong_number_in_the_document_is_caught(right: str, wrong: str) -> None:
    text = _text()
    assert right in text
    broken = text.replace(right, wrong, 1)
    assert wrong_statements(broken) or not _client_integers_bounded_as_stated(broken)


def _client_integers_bounded_as_stated(text: str) -> bool:
    """§13.2's "0 … 2^N" is the bound of the protocol's Ref and Seq integers."""
    from typing import get_args

    from zchat.protocol import Ref, Seq

    match = re.search(r"\| `ref`, `after`, `before`, `seen` values \| 0 … 2\^(\d+) \|", text)
    bounds = {(meta.ge, meta.le) for alias in (Ref, Seq) for meta in get_args(alias)[1:]}
    return match is not None and bounds == {(0, 2 ** int(match.group(1)))}


def test_the_integers_a_client_may_send_are_bounded_as_stated() -> None:
    assert _client_integers_bounded_as_stated(_text())


def test_shared_constants_are_defined_once() -> None:
    """The stats interval, the mute default and the default room: one definition each, which
    the protocol, the broker, the settings, the client and the help text all use."""
    from zchat.commands import COMMANDS
    from zchat.protocol import DEFAULT_ROOM, Mute

    sources = {path.name: path.read_text() for path in (DOC.parent.parent / "zchat").glob("*.py")}

    def where(pattern: str) -> list[str]:
        return sorted(name for name, text in sources.items() if re.search(pattern, text, re.MULTILINE))

    assert where(r"^STATS_INTERVAL\s*=") == ["limits.py"]
    assert where(r"\b300\b") == ["limits.py"]
    assert where(r"['\"]lobby['\"]") == ["protocol.py"] and DEFAULT_ROOM == "lobby"
    assert Mute(name="bob").seconds == limits.MUTE_DEFAULT_SECONDS
    assert f"default {limits.MUTE_DEFAULT_SECONDS};" in COMMANDS["/mute"].summary
