"""Relay settings, their defaults and their checks."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..connection import HEARTBEAT_TIMEOUT
from ..errors import ConfigurationError
from ..protocol.frames import MAX_FRAME_PAYLOAD, MAX_WINDOW, MIN_FRAME_PAYLOAD
from ..protocol.session import DEFAULT_WINDOW, MIN_WINDOW

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

#: Handshakes in progress at once, overall and from one source address: a
#: slowloris flood costs at most this many sockets, and one source cannot take
#: them all. Generous per source because offices and carrier NAT share addresses.
MAX_PENDING_HANDSHAKES = 4096
MAX_PENDING_PER_SOURCE = 128

#: Caps that keep one agent or token from exhausting the relay.
MAX_STREAMS_PER_SESSION = 20_000
MAX_STREAMS_PER_TUNNEL = 10_000
MAX_TUNNELS_PER_TOKEN = 20_000
#: Agent sessions at once for one token, and from one address: a process needs one session, a fleet
#: of containers sharing a token one each; a leaked token or a loop of reconnects cannot hold more.
#: Generous per source because offices and carrier NAT share addresses.
MAX_SESSIONS_PER_TOKEN = 1024
MAX_SESSIONS_PER_SOURCE = 256
#: New tunnels a token (or tenant) may open a minute: a web service opening one per request
#: stays far below; a runaway loop or a leaked token is stopped within a minute.
MAX_TUNNELS_PER_MINUTE = 600

#: The data plane: "native" (Rust, burrow._native) or "asyncio" (the pure-Python first implementation).
ENGINES = ("native", "asyncio")
DEFAULT_ENGINE = "native"

#: Every stream is granted this much credit whatever the budgets (the native relay's WELCOME
#: window); the rest of ``--window`` is lent from the budgets below when they have room.
BASE_WINDOW = 64 * 1024

#: Credit beyond the base windows that one session's streams, and all streams of the relay,
#: may hold at once: what the relay may have to hold for public clients that stop reading
#: (beyond BASE_WINDOW each). 64 MiB lets 32 streams of a session run at the full 2 MiB window.
SESSION_BUDGET = 64 * 1024 * 1024
RELAY_BUDGET = 512 * 1024 * 1024

#: On SIGTERM, open streams get this long to finish before they are cut.
SHUTDOWN_GRACE = 10.0


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
    session_budget: int = SESSION_BUDGET  # (native engine) see SESSION_BUDGET
    relay_budget: int = RELAY_BUDGET
    max_frame: int = MAX_FRAME_PAYLOAD  # largest DATA frame accepted from agents
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    data_dir: Path | None = None  # dev CA and ticket key; default: burrow's data directory
    ticket_key: Path | None = None  # resume-ticket key file; default: <data_dir>/ticket.key
    token_secret: Path | None = None  # signing secret of tenant tokens (burrow token create); None: none taken
    revoked: Path | None = None  # revoked tenant token ids, one a line, re-read when it changes
    metrics: tuple[str, int] | None = None  # where /metrics and /healthz answer (burrow relay --metrics)
    admin_token_file: Path | None = None  # the token /api/status and the admin page want (--admin-token-file)
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES
    max_pending_per_source: int = MAX_PENDING_PER_SOURCE
    max_streams_per_session: int = MAX_STREAMS_PER_SESSION
    max_streams_per_tunnel: int = MAX_STREAMS_PER_TUNNEL
    max_tunnels_per_token: int = MAX_TUNNELS_PER_TOKEN
    max_sessions_per_token: int = MAX_SESSIONS_PER_TOKEN
    max_sessions_per_source: int = MAX_SESSIONS_PER_SOURCE
    max_tunnels_per_minute: int = MAX_TUNNELS_PER_MINUTE
    shutdown_grace: float = SHUTDOWN_GRACE
    also_ipv6: bool = True  # dev: also listen on ::1 when host is 127.0.0.1
    #: give each tunnel a TLS port of its own on loopback, https://localhost:PORT (the embedded
    #: relay: clients that cannot resolve <id>.localhost reach it); native engine, dev CA only
    loopback_urls: bool = False
    raise_fd_limit: bool = True  # raise the soft descriptor limit at start (not inside a user's process)
    engine: str = field(default_factory=lambda: os.environ.get("BURROW_ENGINE", DEFAULT_ENGINE))
    threads: int | None = None  # the native engine's threads; default: the cores this process may use

    @property
    def dev(self) -> bool:
        """True when certificates come from the local dev CA."""
        return self.cert is None

    def _check_names(self, cert: Path) -> None:
        """The certificate must cover the domain (agents) and every ``<id>.<domain>`` (tunnels)."""
        try:
            problem = coverage_problem(cert.read_bytes(), self.domain)
        except OSError as exc:
            raise ConfigurationError(f"cannot read --cert {cert} ({exc.strerror}); check the path") from None
        if problem is not None:
            raise ConfigurationError(
                f"--cert {cert} {problem}; get one for {self.domain} and *.{self.domain}, "
                "or set --domain to the name it is for"
            )

    def check(self) -> None:
        """Raise :class:`ConfigurationError` for settings that cannot work or are unsafe."""
        self.domain = self.domain.lower().rstrip(".")
        if self.engine != "native" or not self.dev:
            self.loopback_urls = False  # (the native engine's, with dev CA leaves)
        if not self.domain or any(not label for label in self.domain.split(".")):
            raise ConfigurationError(f"--domain {self.domain!r} is not a DNS name")
        if (self.cert is None) != (self.key is None):
            raise ConfigurationError("give both --cert and --key, or neither for a dev CA certificate")
        for path in (self.cert, self.key):
            if path is not None and not path.is_file():
                raise ConfigurationError(f"cannot read {path}; check the --cert/--key paths")
        if self.cert is not None:
            self._check_names(self.cert)
        low, high = self.tcp_ports
        if low > high:
            raise ConfigurationError(
                f"TCP port range {low}-{high} starts above its end; write the lower port first, e.g. {high}-{low}"
            )
        if not 1 <= low <= high <= 65535:
            raise ConfigurationError(f"TCP port range {low}-{high} is not within 1-65535; use e.g. 20000-32767")
        for port in (self.port, self.public_port):
            if port is not None and not 0 <= port <= 65535:
                raise ConfigurationError(f"port {port} is outside 0-65535")
        if self.engine not in ENGINES:
            raise ConfigurationError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)} (BURROW_ENGINE)")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ConfigurationError(f"--threads {self.threads} is outside 1-1024")
        limits = {
            "handshake timeout": self.handshake_timeout,
            "heartbeat timeout": self.heartbeat_timeout,
            "max pending handshakes": self.max_pending_handshakes,
            "max pending handshakes per source": self.max_pending_per_source,
            "max streams per session": self.max_streams_per_session,
            "max streams per tunnel": self.max_streams_per_tunnel,
            "max tunnels per token": self.max_tunnels_per_token,
            "max sessions per token": self.max_sessions_per_token,
            "max sessions per source": self.max_sessions_per_source,
            "max tunnels per minute": self.max_tunnels_per_minute,
        }
        for name, value in limits.items():
            if value <= 0:
                raise ConfigurationError(f"{name} must be positive, not {value}")
        for name, value in (("session budget", self.session_budget), ("relay budget", self.relay_budget)):
            if value < 0:
                raise ConfigurationError(f"{name} must be 0 or more bytes, not {value}")
        if self.shutdown_grace < 0:
            raise ConfigurationError(f"shutdown grace must be 0 or more seconds, not {self.shutdown_grace}")
        if not MIN_WINDOW <= self.window <= MAX_WINDOW:
            raise ConfigurationError(f"window {self.window} is outside {MIN_WINDOW}-{MAX_WINDOW} bytes; e.g. 2m")
        if not MIN_FRAME_PAYLOAD <= self.max_frame <= MAX_FRAME_PAYLOAD:
            raise ConfigurationError(
                f"max frame {self.max_frame} is outside {MIN_FRAME_PAYLOAD}-{MAX_FRAME_PAYLOAD} bytes"
            )
        exposed = [h for h in (self.host, self.tcp_host or self.host) if not is_loopback(h)]
        if exposed and not self.tokens and self.token_secret is None:
            raise ConfigurationError(
                f"refusing to listen on {exposed[0]} without a token; set BURROW_TOKEN, --token-file or --token-secret"
            )


def coverage_problem(cert_pem: bytes, domain: str) -> str | None:
    """What the certificate lacks of ``domain`` and ``*.domain`` ("does not cover ..."), or None."""
    from ..certs import uncovered  # (cryptography: ~70 ms to import, for relays with --cert only)

    found = uncovered(cert_pem, domain)
    if found is None:
        return None
    missing, names = found
    return f"does not cover {' and '.join(missing)} (it names {', '.join(names) if names else 'no DNS name'})"
