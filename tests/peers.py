"""Raw ZeroMQ peers for end-to-end tests: what a hostile or foreign client could do."""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from zchat import keys
from zchat.protocol import EventType, decode_publication
from zchat.sealing import SealError, box_for, open_publication


def broker_key(config_dir: Path) -> bytes:
    return keys.load_public(keys.broker_public_key_path(config_dir))


class RawPeer:
    """A CURVE (or plaintext) PUSH + SUB pair with its own key, driven by hand."""

    @staticmethod
    def keypair() -> keys.KeyPair:
        public, secret = zmq.curve_keypair()
        return keys.KeyPair(public, secret)

    def __init__(self, port: int, pub_port: int, server_key: bytes | None, topics: list[bytes],
                 keypair: keys.KeyPair | None = None) -> None:
        self.ctx = zmq.Context()
        self.keypair = keypair or RawPeer.keypair()
        public, secret = self.keypair.public, self.keypair.secret
        self.identity = self.keypair.identity
        # Opens what the broker seals to this key on u/<id>/ (a plaintext peer never gets any).
        self.box = box_for(secret, server_key) if server_key is not None else None
        self.sub = self.ctx.socket(zmq.SUB)
        self.push = self.ctx.socket(zmq.PUSH)
        for sock in (self.sub, self.push):
            sock.linger = 0
            if server_key is not None:
                sock.curve_serverkey = server_key
                sock.curve_publickey = public
                sock.curve_secretkey = secret
        for topic in topics:
            self.sub.subscribe(topic)
        self.sub.connect(f"tcp://127.0.0.1:{pub_port}")
        self.push.connect(f"tcp://127.0.0.1:{port}")
        self.received: list[bytes] = []

    def send(self, *frames: bytes) -> None:
        self.push.send_multipart(list(frames))

    def poll(self, timeout: float) -> list[bytes]:
        """Collect whatever arrives within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000) + 1):
                self.received.append(self.sub.recv())
        return self.received

    def opened(self, data: bytes) -> bytes | None:
        """`data` readable: a u/ publication opened with our key (None when it does not open)."""
        if self.box is None:
            return data
        try:
            return open_publication(self.box, data)
        except SealError:
            return None

    def decoded(self) -> list[tuple[str, EventType]]:
        """Every publication received so far that opens, decoded."""
        return [decode_publication(data) for data in map(self.opened, self.received) if data is not None]

    def wait_for(self, predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        """The first decoded (topic, event) satisfying `predicate`, within `timeout` (frames
        that do not open with our key are skipped)."""
        deadline = time.monotonic() + timeout
        for data in self.received:
            readable = self.opened(data)
            if readable is not None and predicate(*(found := decode_publication(readable))):
                return found
        while (left := deadline - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000) + 1):
                data = self.sub.recv()
                self.received.append(data)
                readable = self.opened(data)
                if readable is not None and predicate(*(found := decode_publication(readable))):
                    return found
        raise AssertionError(f"nothing matched within {timeout} s; got {self.received[-10:]}")

    def close(self) -> None:
        if not self.sub.closed:
            self.sub.close(0)
            self.push.close()  # its own linger: 0 unless a test set one
            self.ctx.term()


class FaultyProxy:
    """A TCP forwarder on loopback whose link can be slowed, stalled and cut.

    - `delay`: seconds each chunk waits before it is passed on (both directions, order kept);
    - `stall()` / `resume()`: hold every byte in the proxy (a link that loses all packets:
      nothing arrives, nothing is reset; TCP-level buffering keeps what was sent) and then let
      it through;
    - `cut()` / `restore()`: reset every connection and refuse new ones (each accepted
      connection is closed at once) until restored.

    Every thread and socket is closed by `close()`. With `record`, every byte relayed (both
    directions) is also kept in `captured`.
    """

    def __init__(self, target_port: int, delay: float = 0.0, record: bool = False) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.delay = delay
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)  # so the accept loop notices close()
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._down = False
        self._closed = False
        self._links: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self.accepted = 0  # connections accepted (refused ones included)
        self.record = record
        self.captured = bytearray()
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        import threading

        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        with self._lock:
            self._threads.append(thread)

    def _accept(self) -> None:
        import socket

        while not self._closed:
            try:
                downstream, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            downstream.settimeout(None)
            self.accepted += 1
            if self._down or self._closed:
                _reset(downstream)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                _reset(downstream)
                continue
            with self._lock:
                self._links.append((downstream, upstream))
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                self._spawn(self._pump, source, sink)

    def _pump(self, source, sink) -> None:  # type: ignore[no-untyped-def]
        """Read chunks from `source`; a writer passes them on after `delay`, unless stalled."""
        import queue
        import time

        chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

        def write() -> None:
            while True:
                item = chunks.get()
                if item is None:
                    break
                due, data = item
                while (wait := due - time.monotonic()) > 0 and not self._closed:
                    time.sleep(min(wait, 0.05))
                while not self._flowing.wait(0.05):
                    if self._closed:
                        return
                try:
                    sink.sendall(data)
                except OSError:
                    return
            try:
                sink.shutdown(1)
            except OSError:
                pass

        self._spawn(write)
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                chunks.put(None)
                return
            if self.record:
                with self._lock:
                    self.captured += data
            chunks.put((time.monotonic() + self.delay, data))

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Reset every open connection; refuse new ones until `restore()`."""
        self._down = True
        with self._lock:
            links, self._links = self._links, []
        for pair in links:
            for sock in pair:
                _reset(sock)

    def restore(self) -> None:
        self._down = False

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        try:
            self.listener.close()
        except OSError:
            pass
        self.cut()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(2)


def _reset(sock) -> None:  # type: ignore[no-untyped-def]
    """Wake whoever reads `sock`, then close it with an RST (SO_LINGER 0): a link that went away."""
    import socket
    import struct

    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class WirePush:
    """A PUSH peer written by hand on a TCP socket: ZMTP 3.0 and the CurveZMQ handshake (RFC 26)
    with PyNaCl, so it can send what libzmq would not, e.g. the parts of a multipart message
    that never ends (libzmq sends nothing of a message before its last part)."""

    def __init__(self, port: int, server_key: bytes, keypair: keys.KeyPair) -> None:
        import socket

        from nacl.public import Box, PrivateKey, PublicKey
        from zmq.utils import z85

        self._nonce = 0
        server = PublicKey(z85.decode(server_key))
        permanent = PrivateKey(z85.decode(keypair.secret))
        transient = PrivateKey.generate()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\0") + b"\0" * 32)
        greeting = self._exactly(64)
        assert greeting[10] == 3 and greeting[12:17] == b"CURVE", greeting
        hello_box = Box(transient, server).encrypt(b"\0" * 64, self._short(b"CurveZMQHELLO---")).ciphertext
        self._command(b"\x05HELLO" + b"\x01\x00" + b"\0" * 72 + bytes(transient.public_key)
                      + self._nonce.to_bytes(8, "big") + hello_box)
        welcome = self._read_command()
        assert welcome.startswith(b"\x07WELCOME"), welcome[:20]
        opened = Box(transient, server).decrypt(welcome[24:], b"WELCOME-" + welcome[8:24])
        server_transient, cookie = PublicKey(opened[:32]), opened[32:]
        vouch_nonce = secrets_token(16)
        vouch = Box(permanent, server_transient).encrypt(
            bytes(transient.public_key) + bytes(server), b"VOUCH---" + vouch_nonce).ciphertext
        metadata = b"\x0bSocket-Type" + (4).to_bytes(4, "big") + b"PUSH"
        self.box = Box(transient, server_transient)
        initiate = self.box.encrypt(bytes(permanent.public_key) + vouch_nonce + vouch + metadata,
                                    self._short(b"CurveZMQINITIATE")).ciphertext
        self._command(b"\x08INITIATE" + cookie + self._nonce.to_bytes(8, "big") + initiate)
        ready = self._read_command()
        assert ready.startswith(b"\x05READY"), ready[:20]

    def send_part(self, data: bytes, more: bool = True) -> None:
        """One part of a message (`more`: another part follows), encrypted as libzmq would."""
        box = self.box.encrypt(bytes([1 if more else 0]) + data, self._short(b"CurveZMQMESSAGEC")).ciphertext
        body = b"\x07MESSAGE" + self._nonce.to_bytes(8, "big") + box
        self.sock.sendall(b"\x02" + len(body).to_bytes(8, "big") + body)

    def close(self) -> None:
        self.sock.close()

    def _short(self, prefix: bytes) -> bytes:
        self._nonce += 1
        return prefix + self._nonce.to_bytes(8, "big")

    def _command(self, body: bytes) -> None:
        header = b"\x04" + bytes([len(body)]) if len(body) < 256 else b"\x06" + len(body).to_bytes(8, "big")
        self.sock.sendall(header + body)

    def _read_command(self) -> bytes:
        flags = self._exactly(1)[0]
        size = int.from_bytes(self._exactly(8 if flags & 0x02 else 1), "big")
        return self._exactly(size)

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data


def secrets_token(count: int) -> bytes:
    import secrets

    return secrets.token_bytes(count)
