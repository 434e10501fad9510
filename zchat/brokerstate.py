"""The running broker's state file: its pid, endpoints and public key, for `zchat` (the
one-command start) and `zchat broker --stop` to read without importing the broker."""

from __future__ import annotations

import json
import os
from pathlib import Path

from zchat import keys

STATE_FILE = "broker.json"
LOCK_FILE = "broker.lock"  # flock-ed by the running broker for its whole life


def state_path(config_dir: Path) -> Path:
    return keys.broker_dir(config_dir) / STATE_FILE


def read_state(config_dir: Path) -> dict | None:
    """The running broker's pid and endpoints, if its state file is current."""
    try:
        state = json.loads(state_path(config_dir).read_text())
        os.kill(int(state["pid"]), 0)
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None
