"""Per-member send pacing (WeCom drops the excess silently, so we must wait instead)."""

from __future__ import annotations

import threading

import pytest

from wecom_bridge.jobs.pacing import SlidingWindowLimiter


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_first_thirty_go_now_the_31st_waits_for_the_first_to_leave_the_window() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(clock=clock)
    waits = []
    for _ in range(30):
        waits.append(limiter.reserve("alice"))
        clock.now += 1.0  # one per second
    assert waits == [0.0] * 30
    # now = 1030; the first send was at 1000, so the 31st may go at 1060
    assert limiter.reserve("alice") == pytest.approx(30.0)
    # the 32nd is booked after the second one leaves the window (1001 + 60)
    assert limiter.reserve("alice") == pytest.approx(31.0)


def test_members_are_independent() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(clock=clock)
    for _ in range(30):
        limiter.reserve("alice")
    assert limiter.reserve("alice") == pytest.approx(60.0)
    assert limiter.reserve("bob") == 0.0


def test_hourly_limit_applies_too() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limits=((3, 10.0), (5, 100.0)), clock=clock)
    booked = [clock.now + limiter.reserve("u") for _ in range(7)]
    assert booked == pytest.approx([1000, 1000, 1000, 1010, 1010, 1100, 1100])


def test_a_burst_is_spread_and_nothing_is_refused() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(clock=clock)
    booked = sorted(clock.now + limiter.reserve("u") for _ in range(100))
    for i in range(len(booked) - 30):
        assert booked[i + 30] - booked[i] >= 60.0
    assert booked[-1] - booked[0] == pytest.approx(180.0)


def test_waiting_the_returned_time_then_booking_again_is_free() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limits=((2, 10.0),), clock=clock)
    limiter.reserve("u")
    limiter.reserve("u")
    clock.now += limiter.reserve("u")  # the caller sleeps until its slot
    clock.now += 10.0
    assert limiter.reserve("u") == 0.0


def test_idle_members_are_forgotten() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limits=((2, 10.0),), clock=clock)
    limiter.reserve("gone")
    clock.now += 11.0
    limiter.reserve("other")
    assert "gone" not in limiter._booked


def test_thread_safe_booking() -> None:
    limiter = SlidingWindowLimiter(limits=((30, 60.0),), clock=lambda: 0.0)
    waits: list[float] = []
    lock = threading.Lock()

    def book() -> None:
        for _ in range(10):
            wait = limiter.reserve("u")
            with lock:
                waits.append(wait)

    threads = [threading.Thread(target=book) for _ in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(waits) == [0.0] * 30 + [60.0] * 30 + [120.0] * 30


@pytest.mark.parametrize("limits", [(), ((0, 60.0),), ((30, 0.0),)])
def test_bad_limits_are_refused(limits: tuple[tuple[int, float], ...]) -> None:
    with pytest.raises(ValueError, match="limits"):
        SlidingWindowLimiter(limits=limits)


def test_reserve_all_books_every_member_at_the_latest_slot() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(((2, 60.0),), clock=clock)
    limiter.reserve("alice")
    limiter.reserve("alice")
    # bob is free, alice's next slot is in 60 s: a message to both waits for alice ...
    assert limiter.reserve_all(["alice", "bob"]) == pytest.approx(60.0)
    # ... and counts for bob at that time too, so bob's bookings stay in order.
    assert limiter.reserve("bob") == pytest.approx(60.0)
    assert limiter.reserve("bob") == pytest.approx(120.0)
    assert limiter.reserve_all([]) == 0.0


def test_a_long_history_is_trimmed_without_changing_a_booking() -> None:
    """Only the latest bookings decide: the history kept per member is cut back to them."""
    clock = FakeClock()
    limiter = SlidingWindowLimiter(((2, 1.0), (3, 10.0)), clock=clock)
    waits = [limiter.reserve("alice") for _ in range(12)]
    # Two per second and three per 10 s: pairs can't help, every third waits out 10 s.
    assert waits == pytest.approx([0, 0, 1, 10, 10, 11, 20, 20, 21, 30, 30, 31])
    assert len(limiter._booked["alice"]) < 6  # trimmed, not the whole history
