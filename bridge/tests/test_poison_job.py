"""A job that keeps failing unexpectedly is given up after a bounded number of attempts: the
member hears the fallback and their later messages are answered (real store, pool, processor)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from conftest import wait_for

from wecom_bridge.channels.base import Reply, Target
from wecom_bridge.config import AppConfig, Replies
from wecom_bridge.jobs.kinds import NoticeJob, new_job
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import Store
from wecom_bridge.jobs.workers import WorkerPool
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.messages import SendResult

FALLBACK = "抱歉，知识库暂时无法回答，请稍后再试。"


@dataclass
class BrokenChannel:
    """A channel whose sender breaks unexpectedly on one text (a bug, not a WeCom error)."""

    breaks_on: str
    sent: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    part_limit_bytes: int = 2048

    def pacing_keys(self, target: Target) -> list[str]:
        return []

    def send_part(self, target: Target, text: str) -> SendResult:
        if text == self.breaks_on:
            raise RuntimeError("a bug in the channel")
        assert isinstance(target, Reply)
        with self.lock:
            self.sent.append((target.user, text))
        return SendResult(msgid=f"m{len(self.sent)}")


def test_poison_job_is_given_up_and_the_member_is_answered_again(tmp_path: Path) -> None:
    app = AppConfig(
        name="default",
        corp_id="ww1",
        agent_id="1000002",
        secret="s",
        token="t",
        encoding_aes_key="k",
        callback_path="/wxcomapp",
        dify=None,
        replies=Replies(fallback_reply=FALLBACK),
    )
    channel = BrokenChannel(breaks_on="poison")
    store = Store(tmp_path)
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
