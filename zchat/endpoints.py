"""Where the broker listens: host and ports to ZeroMQ endpoint strings."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1234  # input (PULL); publish (XPUB) is port + 1 unless given


@dataclass(frozen=True)
class Endpoints:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    pub_port: int | None = None

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    @property
    def publish_port(self) -> int:
        return self.pub_port if self.pub_port is not None else self.port + 1

    def _tcp(self, port: int) -> str:
        host = f"[{self.host}]" if self.ipv6 else self.host
        return f"tcp://{host}:{port}"

    def flags(self) -> str:
        """The connection flags that reach this broker, for a hint the user can paste
        (" --port 5555"): only those that differ from the defaults."""
        words = []
        if self.host != DEFAULT_HOST:
            words.append(f"--host {self.host}")
        if self.port != DEFAULT_PORT:
            words.append(f"--port {self.port}")
        if self.pub_port is not None and self.pub_port != self.port + 1:
            words.append(f"--pub-port {self.pub_port}")
        return "".join(" " + word for word in words)

    @property
    def input(self) -> str:
        return self._tcp(self.port)

    @property
    def publish(self) -> str:
        return self._tcp(self.publish_port)
