"""The operator's certificate, reloaded from disk: when ``--cert``/``--key`` change, or on SIGHUP.

An ACME client (certbot, lego) renews a relay's certificate every couple of
months by writing new files, often through symlinks it swaps. The relay looks
at both files every :data:`POLL` seconds (size, mtime, inode: a stat, nothing
read while they stay the same) and on SIGHUP. A new pair is checked as at
start (a PEM chain that covers ``<domain>`` and ``*.<domain>``, and its key)
before the data plane serves it, from the next TLS handshake on: connections
and agent sessions already up keep theirs, nothing is dropped. A pair that
fails (a renewal caught half-written, a wrong key) is refused with one log
line and the certificate in use stays; the next change of either file is
tried again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from .config import RelayConfig, coverage_problem
from .plane import DataPlane

logger = logging.getLogger("burrow.relay")

#: How often the files are looked at (a stat each): a renewal is served within this.
POLL = 2.0

Signature = tuple[tuple[int, int, int, int] | None, ...]


class CertificateWatch:
    """Reloads the operator's certificate into a data plane (see the module docstring)."""

    def __init__(self, config: RelayConfig, plane: DataPlane) -> None:
        assert config.cert is not None and config.key is not None
        self.cert, self.key = config.cert, config.key
        self.domain = config.domain
        self.plane = plane
        self.reloads = 0  # pairs taken since start
        self.refused = 0  # pairs refused since start
        self._seen = self._signature()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _signature(self) -> Signature:
        def one(path: Path) -> tuple[int, int, int, int] | None:
            try:
                st = os.stat(path)  # (follows symlinks: certbot's live/ names point into archive/)
            except OSError:
                return None
            return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

        return (one(self.cert), one(self.key))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            seen = self._signature()
            if seen != self._seen:
                self._seen = seen
                self.reload("the files changed")

    def reload(self, why: str) -> bool:
        """Read the pair again and serve it if it is good; False (old pair kept) if not."""
        self._seen = self._signature()
        try:
            chain, key = self.cert.read_bytes(), self.key.read_bytes()
            problem = coverage_problem(chain, self.domain)
            if problem is not None:
                raise ValueError(problem)
            self.plane.reload_certificate(chain, key)
        except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            self.refused += 1
            logger.warning(
                "relay: refused the new --cert %s / --key %s (%s: %s); still serving the previous certificate",
                self.cert,
                self.key,
                why,
                reason,
            )
            return False
        self.reloads += 1
        logger.info("relay: serving the certificate in --cert %s (%s)%s", self.cert, why, _expiry(chain))
        return True


def _expiry(chain: bytes) -> str:
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificate(chain)
    except ValueError:
        return ""
    return f", valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
