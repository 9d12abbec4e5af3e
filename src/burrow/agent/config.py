"""Agent settings: arguments first, then the environment, then defaults."""

from __future__ import annotations

import functools
import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from ..connection import HEARTBEAT_TIMEOUT
from ..errors import ConfigurationError
from ..paths import dev_ca_path
from ..protocol.session import DEFAULT_WINDOW
from ..relay.config import is_loopback
from ..relay.tls import AGENT_ALPNS

DEFAULT_RELAY_PORT = 443


@dataclass(frozen=True)
class RelayAddress:
    """Where an agent finds its relay: the relay's domain name and TLS port."""

    host: str
    port: int = DEFAULT_RELAY_PORT
    connect_host: str | None = None  # dial this address instead of resolving host (embedded relay)
    source: str = field(default="BURROW_RELAY", compare=False)  # the setting it came from, for messages

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def setting(self) -> str:
        """The setting to check when this relay cannot be reached, as its user wrote it."""
        return "forward(relay=...)" if self.source == "relay" else self.source

    @classmethod
    def parse(cls, text: str, source: str = "BURROW_RELAY") -> RelayAddress:
        """Parse ``host``, ``host:port``, ``https://host[:port]`` or ``[v6]:port``."""
        value = text.strip()
        for scheme in ("https://", "burrow://"):
            if value.startswith(scheme):
                value = value[len(scheme) :]
        value = value.rstrip("/")
        host, port_text = value, ""
        if value.startswith("["):
            host, _, rest = value[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        elif value.count(":") == 1:
            host, port_text = value.split(":")
        port = DEFAULT_RELAY_PORT
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ConfigurationError(f"{source}={text!r} has a bad port; write host:port, e.g. r1.example.com:443")
            port = int(port_text)
        if not host or "/" in host or " " in host:
            raise ConfigurationError(f"{source}={text!r} is not host:port; write e.g. r1.example.com:443")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return cls(host.lower().rstrip("."), port, source=source)
        raise ConfigurationError(
            f"{source}={text!r} is an IP address; name the relay by its domain (e.g. localhost:4443), "
            "which the relay routes by"
        )


@dataclass(frozen=True)
class AgentSettings:
    """Everything needed to reach one relay. ``relay=None`` means the embedded relay."""

    relay: RelayAddress | None
    token: str = field(default="", repr=False)
    token_source: str = ""  # where the token came from, for error messages (never the token)
    ca: Path | None = None
    window: int = DEFAULT_WINDOW
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT

    @classmethod
    def resolve(
        cls,
        relay: str | RelayAddress | None = None,
        token: str | None = None,
        ca: str | os.PathLike[str] | None = None,
    ) -> AgentSettings:
        """Arguments first, then ``BURROW_RELAY``, ``BURROW_TOKEN``/``BURROW_TOKEN_FILE``, ``BURROW_CA``."""
        if isinstance(relay, RelayAddress):  # (parsed already, by a caller that names its source)
            address: RelayAddress | None = relay
        else:
            relay_text = (relay if relay is not None else os.environ.get("BURROW_RELAY", "")).strip()
            address = (
                RelayAddress.parse(relay_text, "relay" if relay is not None else "BURROW_RELAY") if relay_text else None
            )
        if token is not None:
            found, source = token, "token="
        else:
            found, source = read_token()
        return cls(address, found, source, _ca_path(ca), DEFAULT_WINDOW, _heartbeat())

    def key(self) -> tuple[object, ...]:
        """Sessions are shared by agents with equal keys."""
        return (self.relay, self.token, self.ca, self.window, self.heartbeat_timeout)

    def token_problem(self, reason: str = "") -> str:
        """What to say when the relay refuses this agent's token (``reason``: the relay's word for why)."""
        if not self.token:
            return "requires a token; set BURROW_TOKEN or BURROW_TOKEN_FILE"
        why = f": {reason}" if reason and reason != "the relay rejected the token" else ""
        return f"rejected the token from {self.token_source or 'the settings'}{why}; check it"

    def ssl_context(self) -> ssl.SSLContext:
        """The client context: ``BURROW_CA``, plus the system CAs, or for a loopback relay the dev CA."""
        assert self.relay is not None
        dev_ca = dev_ca_path()
        loopback_dev = is_loopback(self.relay.host) and dev_ca.exists()
        try:
            return _client_context(self.ca, dev_ca if loopback_dev else None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            where = f"BURROW_CA {self.ca}" if self.ca is not None else f"the dev CA {dev_ca}"
            raise ConfigurationError(f"cannot load {where} ({reason}); it must hold PEM certificates") from None


class ClientContext(ssl.SSLContext):
    """A client context that hands an ASCII ``server_hostname`` to OpenSSL as bytes.

    ``ssl`` IDNA-encodes a str host name, and the first time it does so it
    imports ``encodings.idna``: 2.5 ms in a new process, up to 5 ms in a forked
    one, a sixth of a cold ``forward()``. An ASCII name is already in its IDNA
    form, and bytes skip the codec; uvloop and asyncio take only str and pass it
    on through ``wrap_bio``. Non-ASCII names still go through the codec.
    """

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if isinstance(server_hostname, str) and server_hostname.isascii():
            server_hostname = server_hostname.encode("ascii")
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


@functools.lru_cache(maxsize=16)
def _client_context(ca: Path | None, dev_ca: Path | None) -> ssl.SSLContext:
    """One context per trust set, shared by every session and reconnect.

    A loopback relay is trusted through the dev CA (and ``BURROW_CA``) only:
    loading the system store costs tens of milliseconds at every cold start,
    and a relay on this machine is not vouched for by a public CA anyway.
    """
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(AGENT_ALPNS)
    if dev_ca is None:
        context.load_default_certs()
    else:
        context.load_verify_locations(cafile=str(dev_ca))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    return context


def read_token() -> tuple[str, str]:
    """``BURROW_TOKEN``, else the contents of ``BURROW_TOKEN_FILE``, else empty; and where it came from."""
    token = os.environ.get("BURROW_TOKEN")
    path = os.environ.get("BURROW_TOKEN_FILE")
    if token and path:
        raise ConfigurationError("BURROW_TOKEN and BURROW_TOKEN_FILE are both set; unset one of them")
    if token:
        return token.strip(), "BURROW_TOKEN"
    if path:
        return read_token_file(Path(path), "BURROW_TOKEN_FILE"), f"BURROW_TOKEN_FILE ({path})"
    return "", ""


def read_token_file(path: Path, source: str) -> str:
    """The first word of a token file (tokens hold no whitespace; a trailing newline is ignored)."""
    try:
        lines = path.read_text().split()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {source} {path} ({exc.strerror or exc}); check the path") from None
    if not lines:
        raise ConfigurationError(f"{source} {path} is empty; put the token in it")
    return lines[0]


def _heartbeat() -> float:
    text = os.environ.get("BURROW_HEARTBEAT_TIMEOUT", "").strip()
    if not text:
        return HEARTBEAT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ConfigurationError(f"BURROW_HEARTBEAT_TIMEOUT={text!r} is not a positive number of seconds")
    return value


def _ca_path(ca: str | os.PathLike[str] | None) -> Path | None:
    source = "ca" if ca is not None else "BURROW_CA"
    value = ca if ca is not None else os.environ.get("BURROW_CA")
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigurationError(f"{source} {path} is not a file; point it at the relay's CA certificate (PEM)")
    return path
