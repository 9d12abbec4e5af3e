"""Log lines that cannot flood the log: what a peer can make us say, it can make us say often."""

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
        #: every event by kind, logged or not (the kinds are names in our code: a bounded set), for metrics
        self.counts: Counter[str] = Counter()

    def log(self, kind: str, level: int, message: str, *args: object) -> None:
        self.counts[kind] += 1
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
