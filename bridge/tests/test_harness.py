"""The test process itself: what conftest does so that threaded tests are not flaky."""

from __future__ import annotations

import ast
import gc
import threading

SOURCE = "\n".join(f"def f{i}(x):\n    return [x + {i} for _ in range(3)]" for i in range(300))


class _LetTheOtherThreadParse:
    """Collected by a GC pass inside the main thread's ast.parse: lets the other thread parse
    then, as a thread switch there would (waits half a second at most: with the lock, the other
    thread can only parse after this one)."""

    def __init__(self, go: threading.Event, done: threading.Event) -> None:
        self.go, self.done, self.cycle = go, done, self

    def __del__(self) -> None:
        self.go.set()
        self.done.wait(timeout=0.5)


def _parse_deeper(depth: int) -> None:
    """ast.parse from a different stack depth than the main thread's: a shared counter shows."""
    if depth:
        return _parse_deeper(depth - 1)
    ast.parse("x = 1")
    return None


def test_a_parse_in_another_thread_does_not_break_a_parse_in_progress() -> None:
    go, done = threading.Event(), threading.Event()

    def other() -> None:
        go.wait(timeout=5)
        _parse_deeper(30)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    gc.collect()  # the next automatic pass then comes inside the parse below, not before it
    _LetTheOtherThreadParse(go, done)
    try:
        ast.parse(SOURCE)
    finally:
        go.set()
        thread.join(timeout=5)
    assert done.is_set()  # the other thread did parse too (after this one, with the lock)
