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

#: Seconds an open tunnel waits for its own relay to come back before it moves to another
#: relay of the fleet (and gets that relay's URL): ``forward(failover_after=)``.
FAILOVER_AFTER = 30.0


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
            host.encode("idna")  # (what the resolver will do: an empty or over-long label fails here, in one line)
        except UnicodeError:
            raise ConfigurationError(f"{source}={text!r} is not a valid DNS name; check its spelling") from None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return cls(host.lower().rstrip("."), port, source=source)
        raise ConfigurationError(
            f"{source}={text!r} is an IP address; name the relay by its domain (e.g. localhost:4443), "
            "which the relay routes by"
        )


def parse_relays(text: str, source: str = "BURROW_RELAY") -> tuple[RelayAddress, ...]:
    """One relay or several, comma-separated (``r1.example.com,r2.example.com:8443``)."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ConfigurationError(f"{source}={text!r} has an empty item; write e.g. r1.example.com,r2.example.com:443")
    relays = tuple(RelayAddress.parse(item, source) for item in items)
    if len(set(relays)) != len(relays):
        raise ConfigurationError(f"{source}={text!r} names a relay twice; list each once")
    return relays


@dataclass(frozen=True)
class AgentSettings:
    """Everything needed to reach a relay (or a fleet of them). ``relay=None`` and no fleet: embedded.

    ``relay`` is the one relay of a link; a fleet (several relays, or a relays
    file) leaves it None and :class:`~burrow.agent.fleet.Fleet` picks one,
    giving each link its own settings with ``relay`` set.
    """

    relay: RelayAddress | None
    token: str = field(default="", repr=False)
    token_source: str = ""  # where the token came from, for error messages (never the token)
    ca: Path | None = None
    window: int = DEFAULT_WINDOW
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    fleet: tuple[RelayAddress, ...] = ()  # several relays to choose from (BURROW_RELAY=a,b)
    relays_file: Path | None = None  # or a directory file of them (BURROW_RELAYS_FILE), re-read when it changes
    failover_after: float = FAILOVER_AFTER

    @classmethod
    def resolve(
        cls,
        relay: str | RelayAddress | tuple[RelayAddress, ...] | None = None,
        token: str | None = None,
        ca: str | os.PathLike[str] | None = None,
        failover_after: float | None = None,
    ) -> AgentSettings:
        """Arguments first, then ``BURROW_RELAY`` or ``BURROW_RELAYS_FILE``, ``BURROW_TOKEN``/``BURROW_TOKEN_FILE``,
        ``BURROW_CA``, ``BURROW_FAILOVER_AFTER``."""
        relays_file: Path | None = None
        if isinstance(relay, RelayAddress):  # (parsed already, by a caller that names its source)
            relays: tuple[RelayAddress, ...] = (relay,)
        elif isinstance(relay, tuple):
            relays = relay
        elif relay is not None:
            relays = parse_relays(relay, "relay") if relay.strip() else ()
        else:
            relays, relays_file = _relays_from_environment()
        if token is not None:
            found, source = token, "token="
        else:
            found, source = read_token()
        if failover_after is None:
            failover_after = _seconds("BURROW_FAILOVER_AFTER", FAILOVER_AFTER)
        elif (
            isinstance(failover_after, bool)
            or not isinstance(failover_after, int | float)
            or not 0 < failover_after < float("inf")
        ):
            raise ConfigurationError(f"failover_after {failover_after!r} is not a positive number of seconds")
        one = relays[0] if len(relays) == 1 and relays_file is None else None
        fleet = relays if one is None else ()
        return cls(
            one, found, source, _ca_path(ca), DEFAULT_WINDOW, _heartbeat(), fleet, relays_file, float(failover_after)
        )

    @property
    def is_fleet(self) -> bool:
        """True when a relay is to be chosen among several (or from a relays file)."""
        return bool(self.fleet) or self.relays_file is not None

    def key(self) -> tuple[object, ...]:
        """Sessions (and fleets) are shared by agents with equal keys (failover_after is each tunnel's)."""
        return (
            self.relay,
            self.fleet,
            self.relays_file,
            self.token,
            self.ca,
            self.window,
            self.heartbeat_timeout,
        )

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

    def trust_pem(self) -> bytes:
        """The PEM certificates :meth:`ssl_context` trusts, for the native engine (rustls)."""
        assert self.relay is not None
        dev_ca = dev_ca_path()
        loopback_dev = is_loopback(self.relay.host) and dev_ca.exists()
        files = [dev_ca] if loopback_dev else _system_bundle()
        if self.ca is not None:
            files.append(self.ca)
        try:
            return b"\n".join(path.read_bytes() for path in files)
        except OSError as exc:
            where = f"BURROW_CA {self.ca}" if self.ca is not None else f"the CA bundle {files[0]}"
            raise ConfigurationError(f"cannot load {where} ({(exc.strerror or str(exc)).lower()})") from None


def _system_bundle() -> list[Path]:
    """The system's CA bundle file, as OpenSSL would find it (none if there is only a directory)."""
    paths = ssl.get_default_verify_paths()
    for name in (paths.cafile, paths.openssl_cafile):
        if name and os.path.isfile(name):
            return [Path(name)]
    return []


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
    return _seconds("BURROW_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT)


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ConfigurationError(f"{name}={text!r} is not a positive number of seconds")
    return value


def _relays_from_environment() -> tuple[tuple[RelayAddress, ...], Path | None]:
    text = os.environ.get("BURROW_RELAY", "").strip()
    path = os.environ.get("BURROW_RELAYS_FILE", "").strip()
    if text and path:
        raise ConfigurationError("BURROW_RELAY and BURROW_RELAYS_FILE are both set; unset one of them")
    if path:
        if not Path(path).is_file():
            raise ConfigurationError(f"BURROW_RELAYS_FILE {path} is not a file; point it at a TOML or JSON relays file")
        return (), Path(path)  # (read by the fleet at each use: it may change)
    return (parse_relays(text) if text else ()), None


def _ca_path(ca: str | os.PathLike[str] | None) -> Path | None:
    source = "ca" if ca is not None else "BURROW_CA"
    value = ca if ca is not None else os.environ.get("BURROW_CA")
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigurationError(f"{source} {path} is not a file; point it at the relay's CA certificate (PEM)")
    return path
