"""The broker's log: text or one JSON object per line, on stderr; level changeable live."""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def escape(text: str) -> str:
    """`text` with every unprintable character written as a Python escape (\\n, \\x1b,
    \\u202e...): a log line that quotes a client can neither end early nor drive a terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


class TextFormatter(logging.Formatter):
    """The text format, every message escaped (whatever a caller forgot to escape itself)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class Folded:
    """One kind of log line, at most `burst` of them per `interval` seconds; the rest are
    counted and told as one line ("... N more in T s") once the interval is over."""

    def __init__(self, logger: logging.Logger, level: int, what: str, burst: int = 5,
                 interval: float = 60.0) -> None:
        self.logger, self.level, self.what = logger, level, what
        self.burst, self.interval = burst, interval
        self.started = float("-inf")
        self.logged = self.folded = 0

    def __call__(self, now: float, msg: str, *args: object, **kwargs: object) -> None:
        self.flush(now)
        if self.logged < self.burst:
            self.logged += 1
            self.logger.log(self.level, msg, *args, **kwargs)  # type: ignore[arg-type]
        else:
            self.folded += 1

    def flush(self, now: float) -> None:
        """Start a new interval if this one is over, telling what it left out."""
        if now - self.started < self.interval:
            return
        if self.folded:
            self.logger.log(self.level, "... %d more %s in %.0f s", self.folded, self.what,
                            now - self.started)
        self.started, self.logged, self.folded = now, 0, 0


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and a traceback if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}" + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _Handler(logging.StreamHandler):
    """Ours, so configuring again (SIGHUP) replaces its format instead of adding a handler."""


def configure(level: str = "INFO", json_lines: bool = False) -> None:
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler(sys.stderr)
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    root.setLevel(level.upper())
