"""Relays in end-to-end tests: a broker that trusts some relay keys, relays in front of it,
and clients that connect to a relay exactly as to a broker."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from conftest import CLOCK, Chat, Proc, free_port
from peers import broker_key

from zchat import keys
from zchat.relay import RELAY_KEY_NAME, relay_dir


@dataclass
class RelayProc:
    proc: Proc
    port: int
    pub_port: int
    key: keys.KeyPair
    config_dir: Path

    @property
    def identity(self) -> str:
        return self.key.identity


def relay_key(config_dir: Path) -> keys.KeyPair:
    """The key pair the relay with this config dir uses (made now if new)."""
    return keys.load_or_create(relay_dir(config_dir), RELAY_KEY_NAME)


def trust_relays(chat: Chat, *config_dirs: Path) -> Path:
    """A relay-keys file naming the relays of these config dirs, for the broker's --relay-keys."""
    path = chat.config_dir.parent / "relay-keys"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{relay_key(d).identity}  # relay {d.name}\n" for d in config_dirs))
    return path


def start_relay(chat: Chat, config_dir: Path, upstream_port: int | None = None,
                upstream_pub_port: int | None = None, server_key: str | None = None,
                *extra: str) -> RelayProc:
    """A relay in front of the chat's broker (or of `upstream_port`, e.g. another relay)."""
    key = relay_key(config_dir)
    up = upstream_port or chat.port
    up_pub = upstream_pub_port or chat.pub_port
    server = server_key or keys.identity_of(broker_key(chat.config_dir))
    for _ in range(2):  # someone may take a port between our check and the bind: once more
        port, pub_port = free_port(), free_port()
        proc = Proc(["-m", "zchat", "relay", "--upstream", f"127.0.0.1:{up}", "--upstream-pub-port",
                     str(up_pub), "--server-key", server, "--port", str(port), "--pub-port", str(pub_port),
                     "--config-dir", str(config_dir), *extra], env=chat.env, stdin=False)
        chat.procs.append(proc)
        line = proc.wait_for("Relay started|cannot bind", timeout=15)
        if "Relay started" in line:
            proc.wait_for("clients: zchat client", timeout=5)
            return RelayProc(proc, port, pub_port, key, config_dir)
    raise AssertionError("the relay could not bind")


def relay_client(chat: Chat, relay: RelayProc, name: str, *extra: str) -> Proc:
    """A zchat client connected to `relay` as to a broker (the relay's key as server key)."""
    return chat.client(name, "--port", str(relay.port), "--pub-port", str(relay.pub_port),
                       "--server-key", relay.identity, "--broker-key",
                       keys.identity_of(broker_key(chat.config_dir)), *extra)


def joined_relay_client(chat: Chat, relay: RelayProc, name: str, *extra: str) -> Proc:
    proc = relay_client(chat, relay, name, *extra)
    proc.wait_for(rf"{CLOCK} \* Welcome, {re.escape(name)}!", timeout=15)
    return proc
