"""Raw ZeroMQ peers for end-to-end tests: what a hostile or foreign client could do."""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from zchat import keys
from zchat.protocol import decode_publication


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

    def wait_for(self, predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        """The first decoded (topic, event) satisfying `predicate`, within `timeout`."""
        deadline = time.monotonic() + timeout
        for data in self.received:
            topic, event = decode_publication(data)
            if predicate(topic, event):
                return topic, event
        while (left := deadline - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000) + 1):
                data = self.sub.recv()
                self.received.append(data)
                topic, event = decode_publication(data)
                if predicate(topic, event):
                    return topic, event
        raise AssertionError(f"nothing matched within {timeout} s; got {self.received[-10:]}")

    def close(self) -> None:
        self.sub.close(0)
        self.push.close(0)
        self.ctx.term()


class RecordingProxy:
    """A TCP forwarder on loopback that keeps a copy of every byte it relays."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, source, sink) -> None:  # type: ignore[no-untyped-def]
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                break
            with self._lock:
                self.captured += data
            try:
                sink.sendall(data)
            except OSError:
                return
        try:
            sink.shutdown(1)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
