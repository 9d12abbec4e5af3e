"""Admission limits of the relay."""

from __future__ import annotations

from collections import Counter


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
