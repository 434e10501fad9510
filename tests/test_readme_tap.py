"""Issue 14, item 23: the README's tap paragraph documents the marks the tap writes when
events are lost (gap, reset, epoch) and how to turn the broker's hex key into the z85 a
foreign SUB needs. Both are checked against what the code writes and accepts."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import zmq

from zchat import keys
from zchat.flow import Gap, Reset
from zchat.tap import TapLog

README = Path(__file__).resolve().parent.parent / "README.md"


def _tap_section() -> str:
    text = README.read_text()
    start = text.index("\n### The tap")
    return text[start:text.index("\n## ", start)]


def _written(fmt: str) -> list[str]:
    """What the tap writes for a gap, a reset and a broker restart, in `fmt`."""
    stream = io.StringIO()
    log = TapLog(logging.StreamHandler(stream), fmt)
    log.gap(Gap("r/lobby/", 8, 11), 1790000000.0)
    log.reset(Reset("r/lobby/", 42, 1), 1790000000.0)
    log.epoch("9f2c", "41ab", 1790000000.0)
    return stream.getvalue().splitlines()


def test_the_readme_shows_each_mark_with_the_fields_the_tap_writes() -> None:
    documented = {}
    for row in re.findall(r"^\| `(\{.*?\})` \|", _tap_section(), re.MULTILINE):
        record = json.loads(row.replace("...", "0").replace('"9f2c0"', '"9f2c"'))
        documented[record["type"]] = record
    written = {record["type"]: record for record in map(json.loads, _written("jsonl"))}
    assert sorted(documented) == sorted(written) == ["epoch", "gap", "reset"]
    for kind, record in written.items():
        assert sorted(documented[kind]) == sorted(record), kind  # the same fields
    assert {k: v for k, v in documented["gap"].items() if k != "ts"} == \
        {k: v for k, v in written["gap"].items() if k != "ts"}


def test_the_readme_shows_the_text_form_of_each_mark() -> None:
    section = _tap_section()
    for line in _written("text"):
        shown = line.split("] ", 1)[1].split(";")[0].replace("9f2c", "9f2c...").replace("41ab", "41ab...")
        assert f"`{shown}" in section, line


def test_the_readmes_hex_to_z85_one_liner_gives_the_key_libzmq_takes() -> None:
    command = re.search(r'^\s+(python3 -c ".*") HEX$', _tap_section(), re.MULTILINE)
    assert command is not None
    public, _ = zmq.curve_keypair()
    hex_key = zmq.utils.z85.decode(public).hex()
    program = re.match(r'python3 -c "(.*)"$', command.group(1)).group(1)  # type: ignore[union-attr]
    out = subprocess.run([sys.executable, "-c", program, hex_key], capture_output=True, text=True,
                         timeout=30, check=True).stdout.strip()
    assert out.encode() == public == keys.parse_public_key(hex_key)
    sock = zmq.Context.instance().socket(zmq.SUB)
    try:
        sock.curve_serverkey = out.encode()  # libzmq accepts it
    finally:
        sock.close(0)
