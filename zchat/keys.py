"""CURVE key pairs on disk and the directories zchat keeps them in.

Keys use pyzmq's certificate format (`NAME.key` public, `NAME.key_secret`
secret), created on first use with 0600 permissions. A client keeps one key
pair per chat name by default, so several people on one machine (or one
person in several terminals) are distinct identities.
"""

from __future__ import annotations

import binascii
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

BROKER_KEY_NAME = "broker"


def default_config_dir() -> Path:
    explicit = os.environ.get("ZCHAT_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "zchat"


def broker_dir(config_dir: Path) -> Path:
    return config_dir / "broker"


def client_keys_dir(config_dir: Path) -> Path:
    return config_dir / "keys"


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes  # z85, 40 bytes

    @property
    def identity(self) -> str:
        """Hex of the public key: the ZAP User-Id and the private topic id."""
        return identity_of(self.public)


def identity_of(public_z85: bytes) -> str:
    return z85.decode(public_z85).hex()


def parse_public_key(text: str) -> bytes:
    """Accept a public key as z85 (40 chars) or hex (64 chars); return z85."""
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return z85.encode(binascii.unhexlify(text))
    if len(text) == 40:
        try:
            z85.decode(text.encode())
            return text.encode()
        except (ValueError, KeyError, struct.error):  # a character outside z85, a value too big
            pass
    raise ValueError("a public key is 40 z85 characters or 64 hex digits")


def load_or_create(directory: Path, name: str) -> KeyPair:
    """Load `directory/name.key_secret`, creating the pair (0600) if missing."""
    secret_path = directory / f"{name}.key_secret"
    if not secret_path.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        old_umask = os.umask(0o077)  # never a moment with a readable secret
        try:
            zmq.auth.create_certificates(str(directory), name)
        finally:
            os.umask(old_umask)
        os.chmod(secret_path, 0o600)
    return load(secret_path)


class BadKeyFile(ValueError):
    """A key file that cannot be used; the message is one line naming the file and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read key file {path}: {reason}")


def load(secret_path: Path) -> KeyPair:
    """Read a secret key file (pyzmq's certificate format, with both keys in it)."""
    path = Path(secret_path).expanduser()
    if not path.is_file():
        reason = "it is a directory" if path.is_dir() else "no such file"
        raise BadKeyFile(path, reason)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except OSError as exc:
        raise BadKeyFile(path, exc.strerror or str(exc)) from None
    except ValueError:
        raise BadKeyFile(path, "not a key file (no public-key line)") from None
    if secret is None:
        raise BadKeyFile(path, "it holds only a public key; pass the secret key file")
    try:
        matches = zmq.curve_public(secret) == public
    except (ValueError, zmq.ZMQError):
        matches = False
    if not matches:
        raise BadKeyFile(path, "its keys are damaged (the secret key is not 40 z85 characters, or "
                         "does not match the public key)")
    return KeyPair(public=public, secret=secret)


_CERTIFICATE = """#   ****  Generated on {date} by zchat  ****
#   ZeroMQ CURVE {kind} Certificate
#   {advice}

metadata
curve
    public-key = "{public}"
{secret_line}"""


def create(secret_path: Path, public_path: Path) -> KeyPair:
    """A new key pair: the secret key file (which holds the public key too) at exactly
    `secret_path`, mode 0600, and the public key alone at `public_path`. Neither may exist."""
    public, secret = zmq.curve_keypair()
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    # O_EXCL: never overwrite a key; 0600 from the start: never a moment with a readable secret.
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(_CERTIFICATE.format(date=date, kind="**Secret**", public=public.decode(),
                                      advice="DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its "
                                      "permissions.", secret_line=f'    secret-key = "{secret.decode()}"\n'))
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as out:
        out.write(_CERTIFICATE.format(date=date, kind="Public", public=public.decode(),
                                      advice="Give this file (or the hex key zchat keygen prints) to "
                                      "the broker's operator.", secret_line=""))
    return KeyPair(public=public, secret=secret)


def load_public(path: Path) -> bytes:
    public, _ = zmq.auth.load_certificate(str(path))
    return public


def client_key_file_name(name: str) -> str:
    """File stem for a chat name's key; safe for any valid name."""
    return "client-" + name.casefold()


def broker_public_key_path(config_dir: Path) -> Path:
    return broker_dir(config_dir) / f"{BROKER_KEY_NAME}.key"
