"""Which TCP connections belong to which identity, so the broker can cut them.

ZeroMQ has no call to drop one peer of a socket. The broker learns each
connection's file descriptor from the frames it receives (ZMQ_SRCFD) and
forgets it on the monitor's DISCONNECTED event; to cut an identity off
(kicked, banned, key revoked) it shuts those sockets down. shutdown(2)
leaves the descriptor to libzmq, which sees the connection end and cleans up
as for any peer that went away.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCOUTQ = 0x5411  # Linux: bytes in a TCP socket's send queue, not yet acknowledged by the peer


def send_queue(fd: int) -> tuple[int, int] | None:
    """(bytes waiting in the kernel's send queue of `fd`, its send buffer size), or None
    where the kernel does not tell (not Linux; the descriptor is gone)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        queued = struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQ, b"\0\0\0\0"))[0]
        return queued, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor stays libzmq's


def bytes_received(fd: int) -> int | None:
    """Bytes the kernel has received on TCP connection `fd` since it opened (tcpi_bytes_received,
    Linux 4.1+), or None where it does not tell."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    finally:
        sock.detach()  # the descriptor stays libzmq's
    return struct.unpack_from("Q", info, 128)[0] if len(info) >= 136 else None


def shut(fd: int) -> bool:
    """Shut connection `fd` down (libzmq sees it end and cleans up); whether it worked."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.detach()  # the descriptor stays libzmq's


def drained(fd: int) -> bool:
    """Whether the kernel takes more for `fd` at once: libzmq queues nothing for it in the
    broker then (it only does while the socket's send buffer is full, as it stays while the
    peer does not read). Where the kernel does not tell, assume so."""
    queue = send_queue(fd)
    return queue is None or queue[0] < queue[1] // 8


class Connections:
    def __init__(self) -> None:
        self._identity_by_fd: dict[int, str] = {}
        self._fds_by_identity: dict[str, set[int]] = {}

    def knows(self, identity: str) -> bool:
        return identity in self._fds_by_identity

    def owner(self, fd: int) -> str | None:
        return self._identity_by_fd.get(fd)

    def fds(self, identity: str) -> set[int]:
        return self._fds_by_identity.get(identity, set())

    def seen(self, identity: str, fd: int) -> None:
        previous = self._identity_by_fd.get(fd)
        if previous is not None and previous != identity:
            self.closed(fd)  # the descriptor was reused before we heard it close
        self._identity_by_fd[fd] = identity
        self._fds_by_identity.setdefault(identity, set()).add(fd)

    def closed(self, fd: int) -> str | None:
        """Forget `fd`; return its identity if we knew it."""
        identity = self._identity_by_fd.pop(fd, None)
        if identity is not None:
            fds = self._fds_by_identity.get(identity)
            if fds is not None:
                fds.discard(fd)
                if not fds:
                    del self._fds_by_identity[identity]
        return identity

    def all(self) -> list[int]:
        return list(self._identity_by_fd)

    def cut(self, identity: str) -> int:
        """Shut down every connection of `identity`; returns how many."""
        return sum(shut(fd) for fd in list(self._fds_by_identity.get(identity, ())))
