"""The JobProcessor alone, deterministically (issue 18 point 10): one job from claimed to done
or failed, on a real store, with a recording channel and, where Dify matters, the Dify double."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AppSecrets, RecordingChannel, dify_state, plain_app

from wecom_bridge.channels.base import Target
from wecom_bridge.dify.client import DifyClient, DifySettings
from wecom_bridge.errors import WeComApiError
from wecom_bridge.jobs.kinds import ChatJob, NoticeJob, new_job
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import Job, SentPart, SqliteStore, Store
from wecom_bridge.metrics import Metrics
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.wecom.messages import SendResult

FALLBACK = "抱歉，知识库暂时无法回答，请稍后再试。"


def claimed(store: Store, user: str, spec) -> Job:
    store.enqueue("default", new_job(user, spec))
    job = store.claim("worker", 15)
    assert job is not None
    return job


def test_resume_with_stored_parts_does_not_ask_dify_again(
    tmp_path: Path, dify_double: ServerThread, secrets: AppSecrets
) -> None:
    store = SqliteStore(tmp_path)
    dify = DifyClient(DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key))
    channel = RecordingChannel()
    processor = JobProcessor(store, {"default": AppRuntime(plain_app(), dify, channel)}, Metrics())
    job = claimed(store, "zhang", ChatJob("年假怎么请？"))
    store.save_parts(job.id, ["上次存下的回答"], {"message_id": "m-1"})  # then the worker died
    processor.process(store.get_job(job.id))
    assert channel.sent == [("zhang", "上次存下的回答")]
    assert dify_state(dify_double).snapshot() == []  # Dify was not asked
    assert store.get_job(job.id).status == "done"


def test_resume_with_some_parts_sent_sends_only_the_rest(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    channel = RecordingChannel()
    processor = JobProcessor(store, {"default": AppRuntime(plain_app(), None, channel)}, Metrics())
    job = claimed(store, "li", NoticeJob("一二三"))
    store.save_parts(job.id, ["一", "二", "三"], {})
    store.mark_part_sent(job.id, SentPart(1, "msg-1"))  # part 1 went out before the crash
    processor.process(store.get_job(job.id))
    assert channel.sent == [("li", "二"), ("li", "三")]
    done = store.get_job(job.id)
    assert (done.status, done.parts_sent) == ("done", 3)
    assert done.result["msgids"] == ["msg-1", "m1", "m2"]


class FailingChannel(RecordingChannel):
    def send_part(self, target: Target, text: str) -> SendResult:
        raise WeComApiError(-1, "system busy", retryable=True)


@pytest.mark.parametrize(("age", "status"), [(60.0, "queued"), (3601.0, "failed")])
def test_send_failures_retry_until_the_max_age(tmp_path: Path, age: float, status: str) -> None:
    """BRIDGE_SEND_MAX_AGE_MINUTES (send_max_age): a job that could not be sent is retried
    with backoff while it is younger, and failed once it is older."""
    store = SqliteStore(tmp_path)
    job = claimed(store, "wang", NoticeJob("通知"))
    processor = JobProcessor(
        store,
        {"default": AppRuntime(plain_app(), None, FailingChannel())},
        Metrics(),
        send_max_age=3600.0,
        clock=lambda: job.received_at + age,
    )
    processor.process(job)
    after = store.get_job(job.id)
    assert after.status == status
    assert after.errcode == -1


def test_poison_job_is_given_up_with_the_fallback(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    channel = RecordingChannel()
    processor = JobProcessor(
        store,
        {"default": AppRuntime(plain_app(fallback_reply=FALLBACK), None, channel)},
        Metrics(),
    )
    job = claimed(store, "zhao", NoticeJob("永远失败"))
    processor.give_up(job, "internal error: RuntimeError")
    assert channel.sent == [("zhao", FALLBACK)]
    failed = store.get_job(job.id)
    assert failed.status == "failed" and "given up after repeated errors" in failed.error


def test_job_of_an_app_removed_from_the_configuration_fails_alone(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    channel = RecordingChannel()
    metrics = Metrics()
    processor = JobProcessor(store, {"default": AppRuntime(plain_app(), None, channel)}, metrics)
    store.enqueue("gone", new_job("sun", NoticeJob("旧应用的消息")))
    orphan = store.claim("worker", 15)
    processor.process(orphan)
    failed = store.get_job(orphan.id)
    assert failed.status == "failed" and "no such app configured" in failed.error
    assert channel.sent == []
    job = claimed(store, "sun", NoticeJob("新应用的消息"))
    processor.process(job)
    assert channel.sent == [("sun", "新应用的消息")]
    assert metrics.value("wecom_bridge_jobs_total", {"status": "failed"}) == 1


def test_job_resumed_after_dify_accepted_fetches_the_answer_instead_of_asking(
    tmp_path: Path, dify_double: ServerThread, secrets: AppSecrets
) -> None:
    """The worker died while Dify was answering: the ids of the accepted message were kept on
    the job, so the resumed job reads the answer back and the question is not POSTed again."""
    store = SqliteStore(tmp_path)
    dify = DifyClient(DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key))
    channel = RecordingChannel()
    processor = JobProcessor(store, {"default": AppRuntime(plain_app(), dify, channel)}, Metrics())
    noted: list[dict[str, str]] = []
    first = dify.ask("报销流程？", "qian", on_accepted=noted.append)  # the attempt that died
    assert noted and noted[0]["message_id"] == first.message_id
    job = claimed(store, "qian", ChatJob("报销流程？"))
    store.note_result(job.id, "dify_accepted", noted[0])
    dify_state(dify_double).clear_requests()
    processor.process(store.get_job(job.id))
    assert channel.sent == [("qian", "Dify double answer: 报销流程？")]
    assert [r["method"] for r in dify_state(dify_double).snapshot()] == ["GET"]  # /v1/messages


def test_chat_job_keeps_the_ids_of_the_message_dify_accepted(
    tmp_path: Path, dify_double: ServerThread, secrets: AppSecrets
) -> None:
    store = SqliteStore(tmp_path)
    dify = DifyClient(DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key))
    processor = JobProcessor(
        store, {"default": AppRuntime(plain_app(), dify, RecordingChannel())}, Metrics()
    )
    job = claimed(store, "sun", ChatJob("你好"))
    processor.process(job)
    kept = store.get_job(job.id).result["dify_accepted"]
    (message,) = dify_state(dify_double).messages
    assert kept["message_id"] == message["id"]
    assert kept["conversation_id"] == message["conversation_id"]


class CommitCountingStore(SqliteStore):
    """Counts the write transactions (each one a commit the callbacks' commits queue behind)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.commits = 0

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.commits += 1
        with super()._tx() as conn:
            yield conn


def test_an_answer_costs_three_writes_after_its_claim(
    tmp_path: Path, dify_double: ServerThread, secrets: AppSecrets
) -> None:
    """Dify's accepted ids, the parts with the member's new conversation, and the finish with
    the last part's mark: a separate commit for the conversation or the mark is a regression."""
    store = CommitCountingStore(tmp_path)
    dify = DifyClient(DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key))
    channel = RecordingChannel()
    app = plain_app()
    processor = JobProcessor(store, {"default": AppRuntime(app, dify, channel)}, Metrics())
    job = claimed(store, "zhao", ChatJob("年假怎么请？"))
    store.commits = 0
    processor.process(job)
    done = store.get_job(job.id)
    assert (done.status, done.parts_sent, len(channel.sent)) == ("done", 1, 1)
    assert done.result["msgids"] == ["m1"] and "dify_accepted" in done.result
    assert (
        store.get_conversation(app.corp_id, app.agent_id, "zhao")
        == (done.result["conversation_id"])
    )
    assert store.commits == 3
