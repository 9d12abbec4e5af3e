"""burrow: expose a live TCP port to the Internet through a relay, in one line.

::

    import burrow

    with burrow.forward(8000) as tunnel:
        print(tunnel.url)
"""

from __future__ import annotations

from .agent.forward import Forward as Forward
from .agent.forward import forward as forward
from .connection import TrafficStats as TrafficStats
from .errors import AuthenticationFailed as AuthenticationFailed
from .errors import BurrowError as BurrowError
from .errors import ConfigurationError as ConfigurationError
from .errors import PortAlreadyForwarded as PortAlreadyForwarded
from .errors import ProtocolError as ProtocolError
from .errors import RelayUnavailable as RelayUnavailable
from .errors import RemoteProtocolError as RemoteProtocolError
from .errors import SessionClosed as SessionClosed
from .errors import TunnelClosed as TunnelClosed
from .errors import TunnelRefused as TunnelRefused
from .tunnel import Tunnel as Tunnel
from .tunnel import TunnelState as TunnelState

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "BurrowError",
    "ConfigurationError",
    "Forward",
    "PortAlreadyForwarded",
    "ProtocolError",
    "RelayUnavailable",
    "RemoteProtocolError",
    "SessionClosed",
    "TrafficStats",
    "Tunnel",
    "TunnelClosed",
    "TunnelRefused",
    "TunnelState",
    "forward",
]
