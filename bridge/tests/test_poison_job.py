"""A job that keeps failing unexpectedly is given up after a bounded number of attempts: the
member hears the fallback and their later messages are answered (real store, pool, processor)."""

from __future__ import annotations

from pathlib import Path

from conftest import RecordingChannel, plain_app, wait_for

from wecom_bridge.channels.base import Target
from wecom_bridge.jobs.kinds import NoticeJob, new_job
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import SqliteStore
from wecom_bridge.jobs.workers import WorkerPool
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.messages import SendResult

FALLBACK = "抱歉，知识库暂时无法回答，请稍后再试。"


class BrokenChannel(RecordingChannel):
    """A channel whose sender breaks unexpectedly on one text (a bug, not a WeCom error)."""

    def __init__(self, breaks_on: str) -> None:
        super().__init__()
        self.breaks_on = breaks_on

    def send_part(self, target: Target, text: str) -> SendResult:
        if text == self.breaks_on:
            raise RuntimeError("a bug in the channel")
        return super().send_part(target, text)


def test_poison_job_is_given_up_and_the_member_is_answered_again(tmp_path: Path) -> None:
    app = plain_app(fallback_reply=FALLBACK)
    channel = BrokenChannel(breaks_on="poison")
    store = SqliteStore(tmp_path)
    processor = JobProcessor(
        store, {"default": AppRuntime(app, None, channel)}, Metrics(), sleep=lambda _: None
    )
    pool = WorkerPool(
        store, processor, size=2, poll_seconds=0.05, max_internal_errors=3, error_retry_base=0.05
    )
    poison = store.enqueue("default", new_job("zhao", NoticeJob("poison")))
    after = store.enqueue("default", new_job("zhao", NoticeJob("下一条")))
    pool.start()
    try:
        wait_for(lambda: store.get_job(after).status == "done", timeout=20)
    finally:
        pool.stop()
    job = store.get_job(poison)
    assert job.status == "failed"
    assert job.attempts == 3
    assert "given up after repeated errors (internal error: RuntimeError)" in job.error
    assert channel.sent == [("zhao", FALLBACK), ("zhao", "下一条")]
