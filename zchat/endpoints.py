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

    @property
    def input(self) -> str:
        return self._tcp(self.port)

    @property
    def publish(self) -> str:
        return self._tcp(self.publish_port)
