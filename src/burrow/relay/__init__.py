"""The relay: ``burrow relay`` and the embedded default both run :class:`Relay`."""

from __future__ import annotations

from .config import RelayConfig as RelayConfig
from .server import Relay as Relay
