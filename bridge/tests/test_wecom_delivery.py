"""The WeCom delivery player and its tally, which the deployed-stack reliability tests rely on."""

from __future__ import annotations

import time

from conftest import AppSecrets

from wecom_bridge.testing.redelivery import (
    NETWORK_ERROR,
    Deliverer,
    Outcome,
    WeComRetry,
    make_messages,
    tally,
    wait_for_answers,
)
from wecom_bridge.testing.server import ServerThread

FAST = WeComRetry(attempts=3, interval=0.05, timeout=2.0)


def test_redeliveries_are_counted_and_answered_once(
    bridge: ServerThread, wecom_double: ServerThread, secrets: AppSecrets
) -> None:
    messages = make_messages(secrets.crypto(), secrets.agent_id, "storm", 6)
    deliverer = Deliverer(f"{bridge.url}/wxcomapp", retry=FAST, concurrency=8)
    outcomes = deliverer.deliver_all(messages, schedule=(0.0, 0.0, 0.2))
    records = wait_for_answers(wecom_double.url, outcomes, timeout=20, settle=0.5)
    counts = tally(outcomes, records)
    assert counts.line() == (
        "sent=6 acknowledged=6 answered=6 fallbacks=0 duplicates=0 lost=0 unacknowledged=0 "
        "deliveries=18 non_200=0"
    )
    assert deliverer.acknowledged == 18


def test_spread_delivers_the_messages_evenly_over_the_interval(
    bridge: ServerThread, secrets: AppSecrets
) -> None:
    messages = make_messages(secrets.crypto(), secrets.agent_id, "paced", 5)
    deliverer = Deliverer(f"{bridge.url}/wxcomapp", retry=FAST, concurrency=5)
    arrivals: list[float] = []
    post_once = deliverer.post_once

    def timed_post(message):  # the real POST, with the time it was made
        arrivals.append(time.monotonic())
        return post_once(message)

    deliverer.post_once = timed_post
    outcomes = deliverer.deliver_all(messages, spread=1.0)
    assert all(o.acknowledged for o in outcomes)
    # 0.2 s apart (all at once without spread); the span, not each gap, so that a busy
    # machine's thread start-up jitter cannot fail it.
    assert len(arrivals) == 5
    assert max(arrivals) - min(arrivals) >= 0.6, arrivals


def test_refused_deliveries_are_retried_then_given_up(
    bridge: ServerThread, secrets: AppSecrets
) -> None:
    other_app = AppSecrets(corp_id="wwsomeoneelse")  # signed with keys the bridge doesn't have
    [message] = make_messages(other_app.crypto(), other_app.agent_id, "forged", 1)
    outcome = Deliverer(f"{bridge.url}/wxcomapp", retry=FAST).deliver_all([message])[0]
    assert outcome.statuses == [403, 403, 403]
    assert not outcome.acknowledged
    unreachable = Deliverer("http://127.0.0.1:9/wxcomapp", retry=FAST).deliver(message)
    assert unreachable == [NETWORK_ERROR] * 3


def test_tally_counts_duplicates_fallbacks_and_losses(secrets: AppSecrets) -> None:
    a, b, c, d = make_messages(secrets.crypto(), secrets.agent_id, "t", 4)
    outcomes = [Outcome(a, [200]), Outcome(b, [503, 200]), Outcome(c, [200]), Outcome(d, [0, 0])]
    records = [
        {"touser": a.user, "msgtype": "text", "text": {"content": f"answer to {a.text}"}},
        {"touser": a.user, "msgtype": "text", "text": {"content": f"answer to {a.text}"}},
        {"touser": b.user, "msgtype": "text", "text": {"content": "sorry, try later"}},
        {"touser": "someone-else", "msgtype": "text", "text": {"content": c.text}},
    ]
    counts = tally(outcomes, records)
    assert (counts.sent, counts.acknowledged, counts.answered) == (4, 3, 2)
    assert (counts.fallbacks, counts.duplicates, counts.lost) == (1, 1, 1)
    assert (counts.unacknowledged, counts.deliveries, counts.non_200) == (1, 6, 3)
