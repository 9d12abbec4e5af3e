"""The relay: ``burrow relay`` and the embedded default both run :class:`Relay`.

:class:`Relay` is imported on first use (PEP 562): agents import this package
for its small helpers, and the relay's server modules cost ~20 ms to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import RelayConfig as RelayConfig

if TYPE_CHECKING:
    from .server import Relay as Relay


def __getattr__(name: str) -> Any:
    if name == "Relay":
        from .server import Relay

        return Relay
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
