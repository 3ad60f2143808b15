"""Sending a message's parts in order, paced by the per-member rate limit.

Shared by the job workers (answers and queued `send` jobs) and the `send` CLI, so every path
to message/send obeys the same limit: WeCom drops the 31st message a minute to a member
silently, so the sender books a slot first and waits instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from wecom_bridge.jobs.pacing import SlidingWindowLimiter
from wecom_bridge.wecom.api import WeComClient
from wecom_bridge.wecom.messages import OutboundMessage, SendResult


def send_parts(
    client: WeComClient,
    limiter: SlidingWindowLimiter,
    limit_keys: Sequence[str],
    messages: Sequence[OutboundMessage],
    *,
    on_sent: Callable[[int, SendResult], None],
    start: int = 0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Send messages[start:] one by one; `on_sent(index, result)` after each accepted part.

    A WeComApiError stops at the failing part (the ones before it were reported as sent).
    """
    for index in range(start, len(messages)):
        wait = limiter.reserve_all(limit_keys)
        if wait > 0:
            sleep(wait)
        on_sent(index, client.send(messages[index]))
