"""Slow down repeated failed logins from one client address."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailfeed.pop3server.settings import Pop3Settings


class _LoginThrottle:
    """Failed logins per client address, and the delay the next failure costs."""

    MAX_TRACKED = 10_000

    def __init__(self, settings: Pop3Settings) -> None:
        self._settings = settings
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, address: str) -> float:
        """Record a failure; return the seconds to wait before replying."""
        now = time.monotonic()
        count, last = self._failures.get(address, (0, now))
        if now - last > self._settings.auth_failure_window:
            count = 0
        count += 1
        if len(self._failures) >= self.MAX_TRACKED:
            self._prune(now)
        self._failures[address] = (count, now)
        delay = self._settings.auth_failure_delay * 2 ** min(count - 1, 30)
        return float(min(delay, self._settings.auth_failure_max_delay))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _prune(self, now: float) -> None:
        window = self._settings.auth_failure_window
        for address, (_count, last) in list(self._failures.items()):
            if now - last > window:
                del self._failures[address]
        if len(self._failures) >= self.MAX_TRACKED:
            self._failures.clear()
