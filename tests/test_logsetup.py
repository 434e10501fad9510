"""The broker's log: client text escaped whatever the format, internal errors folded (issue 13,
item 7)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from zchat import logsetup

FORGED = "x\n2026-01-01 00:00:00,000 INFO zchat.broker: <forged line>\x1b]0;pwned\x07\u202e\x9b"


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger("zchat.test-logsetup")
    logger.handlers[:] = [logging.StreamHandler(stream)]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


@pytest.mark.parametrize("formatter", [logsetup.TextFormatter(logsetup.TEXT_FORMAT),
                                       logsetup.JsonFormatter()], ids=["text", "json"])
def test_a_logged_client_value_stays_on_its_line_and_drives_no_terminal(
        captured: tuple[logging.Logger, io.StringIO], formatter: logging.Formatter) -> None:
    logger, stream = captured
    logger.handlers[0].setFormatter(formatter)
    logger.info("refused input from %s: %s", "ab12", FORGED)
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")
    assert not any(ch in out for ch in "\x1b\x07\u202e\x9b")
    line = json.loads(out)["message"] if isinstance(formatter, logsetup.JsonFormatter) else out
    assert "<forged line>\\x1b]0;pwned\\x07\\u202e\\x9b" in line


def test_escape_keeps_printable_text_as_it_is() -> None:
    assert logsetup.escape("héllo wörld — ok") == "héllo wörld — ok"
    assert logsetup.escape("a\tb\r\nc") == "a\\tb\\r\\nc"


def test_internal_errors_are_folded_past_a_few_a_minute(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    fold = logsetup.Folded(logger, logging.ERROR, "internal errors", burst=3, interval=60.0)
    for i in range(1000):
        fold(100.0 + i * 0.01, "internal error %d", i)
    fold.flush(150.0)  # the minute is not over: nothing yet
    assert stream.getvalue().splitlines() == ["internal error 0", "internal error 1", "internal error 2"]
    fold.flush(160.5)
    assert stream.getvalue().splitlines()[3:] == ["... 997 more internal errors in 60 s"]
    fold(161.0, "internal error %d", 1000)  # a new minute: logged again
    assert stream.getvalue().splitlines()[4:] == ["internal error 1000"]
