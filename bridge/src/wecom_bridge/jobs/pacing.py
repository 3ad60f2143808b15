"""Per-member send pacing, and sending a message's parts in order within it.

WeCom accepts at most 30 messages a minute and 1000 an hour from one app to one member and drops
the excess *silently*, so every path to a channel (the job workers and the `send` CLI) books each
part in advance and waits instead of losing it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from wecom_bridge.channels.base import Outbound, Target
from wecom_bridge.wecom.messages import SendResult

DEFAULT_LIMITS: tuple[tuple[int, float], ...] = ((30, 60.0), (1000, 3600.0))


class Pacer(Protocol):
    def reserve_all(self, keys: Iterable[str]) -> float:
        """Book one send that counts for every key; return the seconds to wait before it."""
        ...


class SlidingWindowLimiter:
    """At most `count` bookings per key in any `window` seconds, for every (count, window), in
    this process (one bridge; several share jobs.postgres_store.SharedSendPacing)."""

    def __init__(
        self,
        limits: tuple[tuple[int, float], ...] = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not limits or any(count < 1 or window <= 0 for count, window in limits):
            raise ValueError("limits must be non-empty (count >= 1, window > 0) pairs")
        self._limits = limits
        self._clock = clock
        self._keep = max(count for count, _ in limits)
        self._horizon = max(window for _, window in limits)
        self._lock = threading.Lock()
        # A list per member, not a deque (which allocates a 64-slot block at once): every
        # member sent to within the last hour is kept, ~195 bytes each instead of ~870.
        self._booked: dict[str, list[float]] = {}
        self._last_sweep = clock()

    def reserve(self, key: str) -> float:
        """Book one send for `key` at the earliest allowed time; return the seconds to wait."""
        return self.reserve_all((key,))

    def reserve_all(self, keys: Iterable[str]) -> float:
        """Book one send that counts for every key (a message to several members) at the
        earliest time all of them allow; return the seconds to wait."""
        with self._lock:
            now = self._clock()
            self._sweep(now)
            queues = [self._booked.setdefault(k, []) for k in set(keys)]
            at = now
            for booked in queues:
                if booked:
                    # Keeps every key's bookings non-decreasing, even when another key of a
                    # multi-member send pushed this key's last booking into the future.
                    at = max(at, booked[-1])
                for count, window in self._limits:
                    if len(booked) >= count:
                        # Bookings are non-decreasing, so the count-th latest one decides.
                        at = max(at, booked[-count] + window)
            for booked in queues:
                booked.append(at)
                if len(booked) >= 2 * self._keep:  # only the latest `keep` decide
                    del booked[: -self._keep]
            return at - now

    def _sweep(self, now: float) -> None:
        """Forget members idle for longer than the longest window (bounded memory)."""
        if now - self._last_sweep < self._horizon:
            return
        self._last_sweep = now
        idle = [key for key, booked in self._booked.items() if booked[-1] <= now - self._horizon]
        for key in idle:
            del self._booked[key]


def send_paced(
    outbound: Outbound,
    limiter: Pacer,
    target: Target,
    parts: Sequence[str],
    *,
    on_sent: Callable[[int, SendResult], None],
    start: int = 0,
    sleep: Callable[[float], None] = time.sleep,
    send: Callable[[int, Target, str], SendResult] | None = None,
) -> None:
    """Send parts[start:] one by one; `on_sent(index, result)` after each accepted part.
    `send(index, target, text)` replaces `outbound.send_part` (a part that is an image).

    A WeComApiError stops at the failing part (the ones before it were reported as sent).
    """
    keys = outbound.pacing_keys(target)
    for index in range(start, len(parts)):
        wait = limiter.reserve_all(keys)
        if wait > 0:
            sleep(wait)
        if send is not None:
            on_sent(index, send(index, target, parts[index]))
        else:
            on_sent(index, outbound.send_part(target, parts[index]))
