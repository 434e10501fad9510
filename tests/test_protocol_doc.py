"""docs/PROTOCOL.md against the code: every limit the document states is the one in force.

Two kinds of statements are checked:
- each row of the tables in §13 (Limits) that names constants: `NAME` (or `A` / `B`) and
  its value, with a unit where it has one (bytes, characters, ms, s, days, ...);
- anywhere in the text, a number written right before a constant, as in
  "5000 ms (`HANDSHAKE_IVL_MS`)", "at most 200 (`MEMBERS_IN_WELCOME`)" or
  "(20, `RATE_BURST`)".
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
TIME_UNITS = {"ms": 0.001, "s": 1.0, "seconds": 1.0, "days": 86400.0}


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
    if unit in TIME_UNITS:
        seconds = value / 1000 if name.endswith("_MS") else value * 86400 if name.endswith("_DAYS") else value
        return seconds / TIME_UNITS[unit]
    return value


def number(text: str) -> float:
    return float(text.replace(",", ""))


def table_rows() -> list[tuple[str, str, str | None]]:
    """(constant, number as written, unit) for every §13 row that names constants."""
    rows = []
    for line in _limits_section(_text()).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.match(rf"`{CONSTANT}`", cells[0]):
            continue
        names = re.findall(rf"`({CONSTANT})`", cells[0].split("(")[0])
        values = re.findall(rf"({NUMBER})\s*([a-z]+)?", cells[1].split("(")[0])
        assert len(values) == len(names), f"§13 row {line!r}: {len(names)} names, {len(values)} values"
        unit = next((u for _, u in reversed(values) if u), None)  # "1000 / 3000 ms": ms for both
        rows += [(name, value, given or unit) for name, (value, given) in zip(names, values, strict=True)]
    return rows


def inline_statements() -> list[tuple[str, str, str | None]]:
    """(constant, number, unit) for "N [unit] [up to 4 words] (`NAME`" and "(N [unit], `NAME`"."""
    text = _text()
    found = []
    words = r"(?:[A-Za-z'][\w'-]*\s+){0,4}?"  # words, not numbers: "10.2 Retention Every 60 s (" is 60
    for match in re.finditer(rf"({NUMBER})\s*([a-z]+\s+)?{words}\(`({CONSTANT})`", text):
        value, unit, name = match.group(1), match.group(2), match.group(3)
        found.append((name, value, unit.strip() if unit else None))
    for match in re.finditer(rf"({NUMBER})\s*([a-z]+)?,\s*`({CONSTANT})`", text):
        found.append((match.group(3), match.group(1), match.group(2)))
    return found


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
    assert len(statements) >= 25  # the patterns still find the statements
    wrong = [f"{written} {unit or ''} ({name}): the code says {constant(name)}"
             for name, written, unit in statements
             if number(written) != pytest.approx(as_stated(name, constant(name), unit))]
    assert wrong == []


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
