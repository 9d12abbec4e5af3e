"""File descriptors: the relay raises its soft limit and stops taking work before the last are gone.

A relay out of descriptors fails in ways that are hard to see (a listener
that asyncio silently skips, a TLS handshake that cannot finish, an agent's
dial that fails). So it keeps a reserve: public connections are refused
while fewer than :data:`CONNECTION_RESERVE` descriptors are free, new tunnels
while fewer than :data:`TUNNEL_RESERVE` are, each with a one-line reason,
and what is open keeps working.

The kernel hands out the lowest free descriptor, so a new descriptor's number
is a lower bound on how many are in use: checking it costs nothing.
"""

from __future__ import annotations

import logging
import os

try:
    import resource
except ImportError:  # pragma: no cover (Windows)
    resource = None  # type: ignore[assignment]

logger = logging.getLogger("burrow.relay")

#: Free descriptors kept back from public connections: enough for the agents'
#: sessions, the listeners and the files a relay opens (certificates, logs).
CONNECTION_RESERVE = 32

#: Free descriptors kept back from new tunnels: a tunnel is worth little if no
#: connection can reach it, so tunnels stop well before connections do.
TUNNEL_RESERVE = 2 * CONNECTION_RESERVE

#: The soft limit is raised up to the hard one, but no further than this.
WANTED_LIMIT = 1 << 20


class Descriptors:
    """The process's descriptor limit and the checks against it."""

    def __init__(self) -> None:
        self.limit = _soft_limit()

    def raise_limit(self) -> int:
        """Raise the soft limit to the hard one (capped at WANTED_LIMIT); returns the limit in force."""
        if resource is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            wanted = WANTED_LIMIT if hard == resource.RLIM_INFINITY else min(hard, WANTED_LIMIT)
            if soft != resource.RLIM_INFINITY and soft < wanted:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                except (ValueError, OSError) as exc:
                    logger.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, wanted, exc)
        self.limit = _soft_limit()
        return self.limit

    def refuse_connection(self, fileno: int) -> str | None:
        """Why a connection that got descriptor ``fileno`` must be refused, or None."""
        if fileno >= self.limit - CONNECTION_RESERVE:
            return f"only {max(self.limit - fileno, 0)} of {self.limit} file descriptors left (raise ulimit -n)"
        return None

    def refuse_tunnel(self) -> str | None:
        """Why a new tunnel must be refused for want of descriptors, or None."""
        try:
            probe = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return f"no file descriptor left of {self.limit}; raise the relay's ulimit -n"
        os.close(probe)
        if probe >= self.limit - TUNNEL_RESERVE:
            return f"only {max(self.limit - probe, 0)} of {self.limit} file descriptors left; try again later"
        return None


def _soft_limit() -> int:
    if resource is None:  # pragma: no cover
        return WANTED_LIMIT
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return WANTED_LIMIT if soft == resource.RLIM_INFINITY else int(soft)
