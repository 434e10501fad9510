"""Which TCP connections belong to which identity, so the broker can cut them.

ZeroMQ has no call to drop one peer of a socket. The broker learns each
connection's file descriptor from the frames it receives (ZMQ_SRCFD) and
forgets it on the monitor's DISCONNECTED event; to cut an identity off
(kicked, banned, key revoked) it shuts those sockets down. shutdown(2)
leaves the descriptor to libzmq, which sees the connection end and cleans up
as for any peer that went away.

It also counts connections for admission at the handshake. ZAP requests carry
neither the descriptor nor a port, so a connection is known three ways: by
its descriptor from the monitor's ACCEPTED event (not yet attributed), by a
ZAP admission of its key (pending), and by its key once a first frame names
both. An identity's count is its attributed descriptors plus the admissions
not yet matched to one; an admission nothing ever matched expires after the
silence deadline, by which time the broker has cut the connection it stood
for (a connection that sends nothing is cut then).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable

import zmq

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


def _libc_getsockopt() -> Callable[..., int] | None:
    """libc's getsockopt(2), to read an option of a descriptor in one system call: a Python
    socket object made around it costs three more (family, type, protocol) and the object."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.getsockopt
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                     ctypes.POINTER(ctypes.c_uint32)]
    call.restype = ctypes.c_int
    return call


_GETSOCKOPT = _libc_getsockopt() if sys.platform.startswith("linux") else None
_TCP_INFO_SIZE = 256
_TCP_INFO = ctypes.create_string_buffer(_TCP_INFO_SIZE)  # one buffer: the broker's loop is one thread


def bytes_received(fd: int) -> int | None:
    """Bytes the kernel has received on TCP connection `fd` since it opened (tcpi_bytes_received,
    Linux 4.1+), or None where it does not tell. The broker asks this of every input connection
    every second: one system call each."""
    if _GETSOCKOPT is not None:
        size = ctypes.c_uint32(_TCP_INFO_SIZE)
        if _GETSOCKOPT(fd, socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO, ctypes.byref(size)) != 0:
            return None  # gone, or not a TCP socket any more
        return struct.unpack_from("Q", _TCP_INFO, 128)[0] if size.value >= 136 else None
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


def shutdown_fd(fd: int, local_ports: frozenset[int] = frozenset()) -> bool:
    """Shut down the TCP connection on `fd` without closing the descriptor (libzmq's).
    With `local_ports`, only if the socket is bound to one of them: a descriptor we
    were told about may have been closed and reused for something else."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if local_ports and sock.getsockname()[1] not in local_ports:
            return False
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except (OSError, IndexError, TypeError):  # not a socket, not connected, not TCP
        return False
    finally:
        sock.detach()  # the descriptor stays libzmq's


def drained(fd: int) -> bool:
    """Whether the kernel takes more for `fd` at once: libzmq queues nothing for it in the
    broker then (it only does while the socket's send buffer is full, as it stays while the
    peer does not read). Where the kernel does not tell, assume so."""
    queue = send_queue(fd)
    return queue is None or queue[0] < queue[1] // 8


def remember_fd(connections: Connections, frame: zmq.Frame, identity: str) -> None:
    """Attribute the connection `frame` came on (its SRCFD) to `identity`, if it is one
    accepted and not attributed yet."""
    try:
        connections.attribute(identity, frame.get(zmq.SRCFD))
    except zmq.ZMQError:
        pass


class Connections:
    def __init__(self) -> None:
        self._identity_by_fd: dict[int, str] = {}
        self._fds_by_identity: dict[str, set[int]] = {}
        # Accepted, no frame yet: fd -> when (monotonic), oldest first.
        self.unattributed: dict[int, float] = {}
        # Handshakes admitted and not yet matched to a descriptor: identity -> when, oldest first.
        self._pending: dict[str, deque[float]] = {}

    def knows(self, identity: str) -> bool:
        return identity in self._fds_by_identity

    def expects(self, identity: str) -> bool:
        """Whether a handshake of `identity` was admitted that no descriptor has claimed yet:
        its next frame may come on a new connection."""
        return identity in self._pending

    def owner(self, fd: int) -> str | None:
        return self._identity_by_fd.get(fd)

    def fds(self, identity: str) -> set[int]:
        return self._fds_by_identity.get(identity, set())

    def seen(self, identity: str, fd: int) -> None:
        previous = self._identity_by_fd.get(fd)
        if previous is not None and previous != identity:
            self.closed(fd)  # the descriptor was reused before we heard it close
        self.unattributed.pop(fd, None)
        self._identity_by_fd[fd] = identity
        self._fds_by_identity.setdefault(identity, set()).add(fd)

    def attribute(self, identity: str, fd: int) -> bool:
        """A frame of `identity` came on `fd`: if that is a connection accepted and not yet
        attributed, it is now `identity`'s (and stands for one of its admissions). A
        descriptor the monitor did not report as open (closed already) is ignored."""
        if self.unattributed.pop(fd, None) is None:
            return False
        self._match_pending(identity)
        self.seen(identity, fd)
        return True

    def closed(self, fd: int) -> str | None:
        """Forget `fd`; return its identity if we knew it."""
        self.unattributed.pop(fd, None)
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
        return sum(shutdown_fd(fd) for fd in list(self._fds_by_identity.get(identity, ())))

    # --- admission counting ------------------------------------------------------

    def accepted(self, fd: int, now: float) -> None:
        """The monitor saw a new connection on `fd` (no key known yet)."""
        if fd in self._identity_by_fd:
            self.closed(fd)  # reused before we heard it close
        self.unattributed.pop(fd, None)  # keep the dict ordered by time
        self.unattributed[fd] = now

    def admitted(self, identity: str, now: float) -> None:
        """ZAP admitted a handshake of `identity` on this socket."""
        self._pending.setdefault(identity, deque()).append(now)

    def count(self, identity: str, since: float) -> int:
        """Live connections of `identity`: attributed ones, and admissions since `since` that
        no descriptor has claimed yet (older ones are forgotten)."""
        pending = self._pending.get(identity)
        if pending is not None:
            while pending and pending[0] < since:
                pending.popleft()
            if not pending:
                del self._pending[identity]
        return len(self._fds_by_identity.get(identity, ())) + (len(pending) if pending else 0)

    def holds(self, identity: str) -> bool:
        """Whether `identity` has a connection here or a handshake admitted for one."""
        return identity in self._fds_by_identity or identity in self._pending

    @property
    def live(self) -> int:
        """Connections open on this socket as far as the monitor told us."""
        return len(self.unattributed) + len(self._identity_by_fd)

    def silent(self, before: float, limit: int | None = None) -> list[int]:
        """Descriptors accepted before `before` that never delivered a frame, oldest first."""
        fds = []
        for fd, at in self.unattributed.items():
            if at >= before or (limit is not None and len(fds) >= limit):
                break
            fds.append(fd)
        return fds

    def identities(self) -> list[str]:
        return list(self._fds_by_identity)

    def expire_pending(self, since: float) -> None:
        """Forget admissions older than `since` that no descriptor claimed (bounded memory)."""
        for identity in [i for i, pending in self._pending.items() if pending[0] < since]:
            self.count(identity, since)

    def _match_pending(self, identity: str) -> None:
        pending = self._pending.get(identity)
        if pending:
            pending.popleft()
            if not pending:
                del self._pending[identity]
