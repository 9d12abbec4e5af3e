"""What a tunnel forwards to: a loopback port, ``HOST:PORT``, or ``unix:/path/to.sock``.

The agent dials only this, for every stream of the tunnel; the relay names a
tunnel, never an address.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigurationError

#: A bare port is a service on this machine: IPv4 or IPv6 loopback, whichever it listens on.
LOOPBACK = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """Where a tunnel's connections go (see the module docstring)."""

    port: int = 0  # the TCP port; 0 for a unix socket
    host: str | None = None  # None: loopback
    path: str | None = None  # a unix socket

    @classmethod
    def parse(cls, value: object) -> LocalTarget:
        """``8000``, ``"127.0.0.2:8000"``, ``"[::1]:8000"``, ``"db:5432"`` or ``"unix:/run/app.sock"``."""
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(_port(value, value))
        if not isinstance(value, str):
            raise ConfigurationError(f"port {value!r} is not a TCP port; give a number from 1 to 65535")
        text = value.strip()
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path:
                raise ConfigurationError(f"{value!r} names no socket; write unix:/path/to.sock")
            return cls(path=path)
        if text.isdigit():
            return cls(_port(int(text), int(text)))
        host, sep, port = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit():
            raise ConfigurationError(
                f"{value!r} is not a port, HOST:PORT or unix:PATH; e.g. 8000, 127.0.0.2:8000 or unix:/run/app.sock"
            )
        return cls(_port(int(port), value), host)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is None:
            return f"local port {self.port}"
        return f"{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"

    async def dial(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        """Connect once (each loopback address in turn); OSError if nobody accepts."""
        loop = asyncio.get_running_loop()
        if self.path is not None:
            await loop.create_unix_connection(factory, self.path)
            return
        error: OSError | None = None
        for host in LOOPBACK if self.host is None else (self.host,):
            try:
                await loop.create_connection(factory, host, self.port)
                return
            except OSError as exc:
                error = exc
        assert error is not None
        raise error

    def accepting(self) -> bool:
        """Whether something accepts there now (blocking, up to a second)."""
        try:
            if self.path is not None:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(1)
                    sock.connect(self.path)
                return True
            for host in LOOPBACK if self.host is None else (self.host,):
                try:
                    socket.create_connection((host, self.port), timeout=1).close()
                    return True
                except OSError:
                    continue
        except OSError:
            pass
        return False


def _port(port: int, given: object) -> int:
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"port {given!r} is not a TCP port; give a number from 1 to 65535")
    return port
