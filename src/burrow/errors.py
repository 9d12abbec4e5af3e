"""Every error a burrow user can meet, each saying what happened and what to do.

::

    BurrowError
     ├── ConfigurationError        bad argument or setting (also a ValueError)
     ├── RelayUnavailable          cannot reach, or cannot trust, the relay
     ├── AuthenticationFailed      the relay rejected the token
     ├── TunnelRefused             the relay would not open the tunnel
     ├── PortAlreadyForwarded      this process already forwards that port
     ├── TunnelClosed              the tunnel is closed; it has no address any more
     ├── ProtocolError             the burrow protocol was broken; ``code`` says how
     │    ├── RemoteProtocolError  by the other side (its fault: the session is closed)
     │    └── LocalProtocolError   by this side (a bug here)
     └── SessionClosed             the session to the relay ended

The messages are one line and never contain a secret (tokens stay out of them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocol.messages import BindFailure


class BurrowError(Exception):
    """Base class of every error burrow raises on purpose."""


class ConfigurationError(BurrowError, ValueError):
    """An argument or setting makes no sense; the message says which and why."""


class RelayUnavailable(BurrowError):
    """The relay cannot be reached, or its certificate cannot be trusted.

    ``transient`` is True when trying again later may work (nothing listens
    there yet, no route, no answer), False when the settings must change (a
    certificate not trusted, another service on that port).
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class AuthenticationFailed(BurrowError):
    """The relay rejected this agent's token."""


class TunnelRefused(BurrowError):
    """The relay would not open the tunnel (limit reached, no free TCP port, ...).

    ``code`` is the relay's reason, a :class:`burrow.protocol.messages.BindFailure`.
    """

    def __init__(self, message: str, code: BindFailure) -> None:
        super().__init__(message)
        self.code = code


class PortAlreadyForwarded(BurrowError):
    """This process already forwards the port; close that tunnel or reuse it."""


class TunnelClosed(BurrowError):
    """The tunnel has been closed."""


class SessionClosed(BurrowError):
    """The session to the relay ended (the relay went away or the link died)."""


class ProtocolError(BurrowError):
    """The burrow protocol was broken, by the peer or by this side (see the two subclasses).

    ``code`` is one of :class:`burrow.protocol.frames.ErrorCode`; it is what the
    session sends in its GOAWAY frame before closing.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer sent something the burrow protocol forbids (its fault)."""


class LocalProtocolError(ProtocolError):
    """This side asked the protocol for something it forbids (a bug on our side)."""


__all__ = [
    "AuthenticationFailed",
    "BurrowError",
    "ConfigurationError",
    "LocalProtocolError",
    "PortAlreadyForwarded",
    "ProtocolError",
    "RelayUnavailable",
    "RemoteProtocolError",
    "SessionClosed",
    "TunnelClosed",
    "TunnelRefused",
]
