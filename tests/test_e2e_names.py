"""End to end: look-alike and reserved names (issue 13, item 10), refused by a real broker
process and reported by real clients over tcp with CURVE."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from conftest import CLOCK, Chat, Proc

pytestmark = pytest.mark.timeout(60)


def broker_key_hex(chat: Chat) -> str:
    match = re.search(r"--server-key ([0-9a-f]{64})", "\n".join(chat.broker.lines))  # type: ignore[union-attr]
    assert match is not None
    return match.group(1)


def test_a_lookalike_of_an_online_name_is_refused(chat: Chat, tmp_path: Path) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    # mallory, from another machine, tries a capital I for the l.
    mallory = chat.client("aIice", "--server-key", broker_key_hex(chat), config_dir=tmp_path / "elsewhere")
    mallory.wait_for(r"the name 'aIice' looks like 'alice', who is online", timeout=15)
    assert mallory.wait_exit(10) == 1
    alice.send("/who")
    alice.wait_for(rf"^{CLOCK} \* Online \(1\): alice$")


def test_reserved_name_is_refused_to_a_rename(chat: Chat) -> None:
    chat.start_broker()
    bob = chat.joined_client("bob")
    bob.send("/nick r00t")
    bob.wait_for(rf"^{CLOCK} ! the name 'r00t' is reserved \(it looks like 'root'\): only the operator's "
                 r"admin keys may use it$")
    bob.send("still bob")
    bob.wait_for(rf"^{CLOCK} bob: still bob$")


def test_closed_mode_file_with_a_reserved_name_for_a_user_is_refused(chat: Chat, tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text(f"alice {secrets.token_hex(32)} admin\nsystem {secrets.token_hex(32)}\n")
    broker = Proc(["broker.py", *chat.endpoint_args(), "--authorized-keys", str(path)], env=chat.env,
                  stdin=False)
    chat.procs.append(broker)
    assert broker.wait_exit(15) == 1
    assert re.search(r"authorized_keys:2: the name 'system' is reserved for keys with the role admin",
                     "\n".join(broker.lines)), broker.lines
