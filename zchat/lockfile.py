"""Exclusive locks on what one broker owns: its config dir and its history database.

Two brokers on one config dir would number events from the same stored seqs and
overwrite each other's history. Each broker holds an `fcntl.flock` on a lock file
for as long as it runs (the kernel drops it when the process dies, kill -9 included),
and writes its pid and ports into that file so a refused second broker can say who
holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


class Locked(Exception):
    """Another process holds the lock; `holder` is what it wrote (pid, ports), if readable."""

    def __init__(self, path: Path, holder: dict) -> None:
        super().__init__(str(path))
        self.path = path
        self.holder = holder

    def describe(self) -> str:
        pid = self.holder.get("pid")
        who = f"pid {pid}" if pid else "another process"
        ports = [str(self.holder[key]) for key in ("port", "pub_port") if self.holder.get(key)]
        if ports:
            who += f", ports {'/'.join(ports)}"
        return f"another broker ({who}) holds {self.path}"


class LockFile:
    """Held from `acquire` until `release` or process exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, holder: dict) -> None:
        """Take the lock without waiting, or raise Locked naming who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Locked(self.path, _read_holder(self.path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
