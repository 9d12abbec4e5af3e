"""The typed payloads of the control frames, checked where they are decoded.

The rare control frames (HELLO, WELCOME, BIND, BOUND, BIND_FAILED, ...) carry
small JSON objects. Each field is read here, once, with its type and bounds:
what a peer sends is hostile until checked, so a malformed payload is a
:class:`~burrow.errors.RemoteProtocolError`, never a ``KeyError`` later in
someone else's code. These types are also what crosses the seam between the
control plane and the data plane (``burrow.relay.plane``).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import RemoteProtocolError
from .frames import ErrorCode, FrameType

#: A tunnel id is one DNS label.
MAX_ID_LENGTH = 63
#: A DNS name.
MAX_HOST_LENGTH = 253
#: A resume ticket is ~200 bytes; this leaves room for longer claims, not for a flood.
MAX_TICKET_LENGTH = 2048
#: A token: a shared secret or a signed tenant token (~200 characters); longer is not one.
MAX_TOKEN_LENGTH = 4096
#: Free text a peer sends (reasons, messages, the agent's name) is cut here.
MAX_TEXT_LENGTH = 200
#: Networks in one tunnel's allowlist: offices and VPNs are a handful; each connection is checked
#: against every entry, so the list stays short.
MAX_ALLOWED_NETWORKS = 64
#: A tunnel's client-certificate CAs, as PEM: a few certificates (~1.5 KiB each), within a control
#: frame's 16 KiB with room for BIND's (and BOUND's echo's) other fields.
MAX_CLIENT_CA_LENGTH = 12 * 1024
PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
#: PROXY protocol versions a relay can put in front of a connection's bytes.
PROXY_PROTOCOL_VERSIONS = (1, 2)


class BindFailure(enum.Enum):
    """Why a relay refused a BIND (BIND_FAILED's ``code``)."""

    SHUTTING_DOWN = "shutting-down"  # the relay is draining: try again (elsewhere) shortly
    BAD_PORT = "bad-port"  # the local port is not 1-65535
    BAD_TICKET = "bad-ticket"  # the resume ticket is invalid, expired, or for another tunnel
    IN_USE = "in-use"  # the tunnel id is held (by this session, or a rival resumed first)
    LIMIT = "limit"  # a per-token limit is reached
    NO_TCP_PORT = "no-tcp-port"  # no free port in the relay's raw TCP range
    NO_RESOURCES = "no-resources"  # the relay is short of file descriptors
    UNSUPPORTED = "unsupported"  # the relay cannot do what the BIND asks (e.g. its engine lacks an option)
    OTHER = "other"  # a code this version does not know (a newer relay)

    @classmethod
    def parse(cls, code: str) -> BindFailure:
        """The member for ``code``; OTHER for a code from a newer relay."""
        try:
            return cls(code)
        except ValueError:
            return cls.OTHER


def field_of(message: dict[str, Any], name: str, kind: type, frame: FrameType) -> Any:
    """``message[name]``, which must be a ``kind`` (a bool is never taken for an int)."""
    value = message.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RemoteProtocolError(
            ErrorCode.PROTOCOL_ERROR, f"{frame.name} field {name!r} is missing or not {kind.__name__}"
        )
    return value


def optional_of(message: dict[str, Any], name: str, kind: type, frame: FrameType) -> Any:
    """Like :func:`field_of`, but an absent or null field is None."""
    if message.get(name) is None:
        return None
    return field_of(message, name, kind, frame)


def text_of(message: dict[str, Any], name: str, frame: FrameType, limit: int) -> str:
    """A string field no longer than ``limit``."""
    value: str = field_of(message, name, str, frame)
    if len(value) > limit:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{frame.name} field {name!r} is over {limit} characters")
    return value


def port_of(message: dict[str, Any], name: str, frame: FrameType) -> int:
    """A TCP port, 1-65535."""
    value: int = field_of(message, name, int, frame)
    if not 1 <= value <= 65535:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{frame.name} field {name!r} is not a TCP port")
    return value


def _host_ok(host: str) -> bool:
    return 0 < len(host) <= MAX_HOST_LENGTH and host.isascii() and all(c.isalnum() or c in ".-_:" for c in host)


def networks(texts: Iterable[str]) -> tuple[str, ...]:
    """Normalised CIDR networks (``"203.0.113.7"`` becomes ``"203.0.113.7/32"``, an IPv4-mapped IPv6 network
    its IPv4 one); ValueError names a bad one."""
    found = []
    for text in texts:
        try:
            if "%" in text:  # a scoped address (fe80::1%eth0) names a link of the agent's, not a network
                raise ValueError(text)
            network = ipaddress.ip_network(text.strip(), strict=False)
        except (ValueError, TypeError, AttributeError):
            shown = repr(text)[:MAX_TEXT_LENGTH]
            raise ValueError(
                f"{shown} is not an IP network (e.g. 203.0.113.0/24, 2001:db8::/32 or 198.51.100.7)"
            ) from None
        if (
            isinstance(network, ipaddress.IPv6Network)
            and network.prefixlen >= 96
            and network.network_address.ipv4_mapped
        ):
            mapped = network.network_address.ipv4_mapped
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
        found.append(str(network))
    if len(found) > MAX_ALLOWED_NETWORKS:
        raise ValueError(f"{len(found)} networks; at most {MAX_ALLOWED_NETWORKS} (use wider prefixes)")
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True, slots=True)
class Access:
    """What a tunnel's owner says about its public connections (BIND's ``allow`` and ``proxy``).

    ``allow``: the networks clients may come from (empty: anyone); the relay
    refuses others before any TLS work. ``proxy_protocol``: 1 or 2 puts a PROXY
    protocol header of that version before a connection's bytes, so the
    service learns the client's address; 0, none. ``client_ca``: PEM CA
    certificates; the tunnel's TLS addresses then require a client certificate
    issued by one of them (mutual TLS).
    """

    allow: tuple[str, ...] = ()
    proxy_protocol: int = 0
    client_ca: str | None = None

    def to_message(self) -> dict[str, Any]:
        """BIND's fields for it (none when it asks for nothing)."""
        message: dict[str, Any] = {}
        if self.allow:
            message["allow"] = list(self.allow)
        if self.proxy_protocol:
            message["proxy"] = self.proxy_protocol
        if self.client_ca is not None:
            message["client_ca"] = self.client_ca
        return message

    @classmethod
    def from_message(cls, message: dict[str, Any], frame: FrameType = FrameType.BIND) -> Access:
        """Read BIND's fields (or BOUND's echo of them); bad ones are a protocol error."""
        allow = optional_of(message, "allow", list, frame) or []
        proxy = optional_of(message, "proxy", int, frame) or 0
        if proxy and proxy not in PROXY_PROTOCOL_VERSIONS:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{frame.name} field 'proxy' is not one of {PROXY_PROTOCOL_VERSIONS}"
            )
        if len(allow) > MAX_ALLOWED_NETWORKS or not all(isinstance(text, str) for text in allow):
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{frame.name} field 'allow' is not a short list of networks"
            )
        client_ca = optional_of(message, "client_ca", str, frame)
        if client_ca is not None and (len(client_ca) > MAX_CLIENT_CA_LENGTH or PEM_CERTIFICATE not in client_ca):
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{frame.name} field 'client_ca' is not PEM certificates of at most 12 KiB"
            )
        try:
            return cls(networks(allow), proxy, client_ca)
        except ValueError as exc:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{frame.name} field 'allow': {exc}") from None


#: The default: anyone may connect, and the service gets the bytes alone.
ANYONE = Access()


@dataclass(frozen=True, slots=True)
class TunnelAddress:
    """BOUND's payload: where the public Internet reaches a tunnel, and its resume ticket."""

    id: str
    host: str  # <id>.<domain>: the TLS address
    port: int  # the TLS port clients use
    ticket: str | None = None
    unencrypted_host: str | None = None  # the raw TCP address, for unencrypted tunnels
    unencrypted_port: int | None = None
    access: Access = ANYONE  # the access rules the relay enforces (an older relay echoes none)

    def to_message(self) -> dict[str, Any]:
        """The JSON object BOUND carries (without ``request``)."""
        message: dict[str, Any] = {"id": self.id, "host": self.host, "port": self.port}
        if self.ticket is not None:
            message["ticket"] = self.ticket
        if self.unencrypted_port is not None:
            message["unencrypted_host"] = self.unencrypted_host
            message["unencrypted_port"] = self.unencrypted_port
        message.update(self.access.to_message())
        return message

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> TunnelAddress:
        """Read a BOUND payload; a missing or malformed field is a protocol error."""
        frame = FrameType.BOUND
        tunnel_id = text_of(message, "id", frame, MAX_ID_LENGTH)
        if not tunnel_id or not (tunnel_id.isascii() and tunnel_id.isalnum()):
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "BOUND field 'id' is not a DNS label")
        host = text_of(message, "host", frame, MAX_HOST_LENGTH)
        unencrypted_host = optional_of(message, "unencrypted_host", str, frame)
        for name, value in (("host", host), ("unencrypted_host", unencrypted_host)):
            if value is not None and not _host_ok(value):
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"BOUND field {name!r} is not a host name")
        unencrypted_port = port_of(message, "unencrypted_port", frame) if "unencrypted_port" in message else None
        if (unencrypted_host is None) != (unencrypted_port is None):
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR, "BOUND gives only one of 'unencrypted_host' and 'unencrypted_port'"
            )
        ticket = optional_of(message, "ticket", str, frame)
        if ticket is not None and len(ticket) > MAX_TICKET_LENGTH:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"BOUND ticket is over {MAX_TICKET_LENGTH} characters")
        access = Access.from_message(message, frame)
        return cls(tunnel_id, host, port_of(message, "port", frame), ticket, unencrypted_host, unencrypted_port, access)
