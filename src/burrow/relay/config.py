"""Relay settings, their defaults and their checks."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigurationError
from ..protocol.session import DEFAULT_WINDOW

#: The dev relay's port: unprivileged, and one ``BURROW_RELAY=localhost:4443`` away.
DEV_PORT = 4443
DEV_DOMAIN = "localhost"

#: Raw TCP tunnels take random ports from here: above the registered services
#: most machines run, below Linux's ephemeral range (32768-60999) so outgoing
#: connections never hold the port a tunnel wants.
DEFAULT_TCP_PORTS = (20000, 32767)

#: A client that has not finished its TLS handshake by then is dropped (slowloris).
HANDSHAKE_TIMEOUT = 10.0

#: How long an agent has to say HELLO after its TLS handshake.
HELLO_TIMEOUT = 10.0

#: A random port is tried this many times before the bind is refused.
TCP_PORT_ATTEMPTS = 64


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RelayConfig:
    """Everything a relay needs; the defaults are the dev relay on loopback."""

    domain: str = DEV_DOMAIN
    host: str = "127.0.0.1"  # where the TLS listener binds (agents and public clients)
    port: int = DEV_PORT  # 0: any free port
    public_port: int | None = None  # the TLS port clients see (behind NAT/LB); default: the bound port
    cert: Path | None = None  # operator certificate (wildcard for *.<domain>, plus <domain>)
    key: Path | None = None
    tcp_host: str | None = None  # where raw TCP tunnels bind; default: same as host
    tcp_public_host: str | None = None  # the host name given for raw TCP tunnels; default: domain
    tcp_ports: tuple[int, int] = DEFAULT_TCP_PORTS
    tokens: frozenset[str] = field(default_factory=frozenset, repr=False)
    window: int = DEFAULT_WINDOW
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    data_dir: Path | None = None  # where the dev CA lives; default: burrow's data directory
    also_ipv6: bool = True  # dev: also listen on ::1 when host is 127.0.0.1

    @property
    def dev(self) -> bool:
        """True when certificates come from the local dev CA."""
        return self.cert is None

    def check(self) -> None:
        """Raise :class:`ConfigurationError` for settings that cannot work or are unsafe."""
        self.domain = self.domain.lower().rstrip(".")
        if not self.domain or any(not label for label in self.domain.split(".")):
            raise ConfigurationError(f"--domain {self.domain!r} is not a DNS name")
        if (self.cert is None) != (self.key is None):
            raise ConfigurationError("give both --cert and --key, or neither for a dev CA certificate")
        for path in (self.cert, self.key):
            if path is not None and not path.is_file():
                raise ConfigurationError(f"cannot read {path}; check the --cert/--key paths")
        low, high = self.tcp_ports
        if not 1 <= low <= high <= 65535:
            raise ConfigurationError(f"TCP port range {low}-{high} is not within 1-65535; use e.g. 20000-32767")
        for port in (self.port, self.public_port):
            if port is not None and not 0 <= port <= 65535:
                raise ConfigurationError(f"port {port} is outside 0-65535")
        exposed = [h for h in (self.host, self.tcp_host or self.host) if not is_loopback(h)]
        if exposed and not self.tokens:
            raise ConfigurationError(
                f"refusing to listen on {exposed[0]} without a token; set BURROW_TOKEN or --token-file"
            )
