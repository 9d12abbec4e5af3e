"""Admission limits of the relay, and log lines that cannot flood the log."""

from __future__ import annotations

import logging
import time
from collections import Counter

#: Refusal log lines per second, per kind, before they are summed up instead.
LOG_LINES_PER_SECOND = 20


class LogLimiter:
    """Logs each event, up to a rate per kind; then one line saying how many were left out."""

    def __init__(self, logger: logging.Logger, rate: int = LOG_LINES_PER_SECOND) -> None:
        self.logger = logger
        self.rate = rate
        self._window: dict[str, float] = {}
        self._count: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()

    def log(self, kind: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window.get(kind, 0.0) >= 1.0:
            if self._suppressed[kind]:
                self.logger.log(level, "%d more like the next line in the last second", self._suppressed[kind])
            self._window[kind] = now
            self._count[kind] = 0
            self._suppressed[kind] = 0
        if self._count[kind] < self.rate:
            self._count[kind] += 1
            self.logger.log(level, message, *args)
        else:
            self._suppressed[kind] += 1


class PendingHandshakes:
    """Counts TLS handshakes in progress, overall and per source address."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total_limit = total
        self.per_source_limit = per_source
        self.total = 0
        self.by_source: Counter[str] = Counter()

    def admit(self, source: str) -> str | None:
        """Count a new handshake from ``source``; or say why it must be refused."""
        if self.total >= self.total_limit:
            return f"{self.total} TLS handshakes already pending (limit {self.total_limit})"
        if self.by_source[source] >= self.per_source_limit:
            return f"{self.by_source[source]} TLS handshakes already pending from it (limit {self.per_source_limit})"
        self.total += 1
        self.by_source[source] += 1
        return None

    def done(self, source: str) -> None:
        """A handshake admitted by :meth:`admit` ended, one way or the other."""
        self.total -= 1
        self.by_source[source] -= 1
        if not self.by_source[source]:
            del self.by_source[source]
