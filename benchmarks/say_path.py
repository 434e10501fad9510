"""Micro-benchmark of text cleaning on the say path: `protocol.clean_text` alone, and a whole
`say` through the pure core (decode, checks, clean, publish record). No sockets; a few
seconds. Run before and after touching clean_text or BrokerCore._say:

    python benchmarks/say_path.py
"""

from __future__ import annotations

import json
import timeit

from zchat.core import BrokerCore, Limits
from zchat.protocol import clean_text

TEXTS = {
    "ascii 40": "hello there, how is the build going now?",
    "ascii 1000": "x" * 1000,
    "latin-1 40": "déjà vu: the café's crème brûlée is back!",
    "emoji zwj 40": "family 👨\u200d👩\u200d👧 at the 🏳️\u200d🌈 parade today",
    "cjk 40": "今日は良い天気ですね。明日も晴れるといいですね、本当に。",
    "zero-width 40": "pay\u200bpal.example is totally legit, trust me",
}


def per_call(stmt, number: int) -> float:  # type: ignore[no-untyped-def]
    """Best of 25 short runs, in microseconds per call (the best resists a busy machine)."""
    return min(timeit.repeat(stmt, number=number, repeat=25)) / number * 1e6


def main() -> None:
    print("clean_text, us per call")
    for label, text in TEXTS.items():
        print(f"  {label:14} {per_call(lambda text=text: clean_text(text), 20_000):6.3f}")
    core = BrokerCore("bench", 0.0, Limits(rate_burst=10**9, rate_per_second=10**9))
    me = "a" * 64
    for topic in (f"u/{me}/", "r/lobby/"):
        core.on_subscribe(me, topic, 0.0)
    core.on_message(me, json.dumps({"type": "join", "name": "alice", "history": 0}).encode(), 1, 0.0)
    print("a say through the core (decode + handle), us per call")
    for label, text in TEXTS.items():
        body = json.dumps({"type": "say", "room": "lobby", "text": text}).encode()
        print(f"  {label:14} {per_call(lambda body=body: core.on_message(me, body, 1, 1.0), 10_000):6.3f}")


if __name__ == "__main__":
    main()
