"""Dify's images and files back to members, end to end over real HTTP: the bridge between the
Dify double (answers with signed /files/… links and message_file events) and the WeCom double
(media/upload with WeCom's limits, message/send with image/file messages)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import (
    AppSecrets,
    BridgeProcess,
    FakeClock,
    dify_state,
    plain_app,
    wait_for,
    wecom_state,
)
from test_aibot import BOT_ID, BOT_SECRET, Bridge, aibot_env

from wecom_bridge.channels.wecom_app import WeComAppOutbound
from wecom_bridge.config import load_config
from wecom_bridge.dify.client import DifyClient, DifySettings
from wecom_bridge.jobs.kinds import ChatJob, new_job
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import SqliteStore
from wecom_bridge.metrics import Metrics
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.aibot_double import AibotDouble
from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.dify_signed_files import tiny_png
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.wecom.api import MemoryTokenCache, WeComClient


def received(wecom_double: ServerThread, user: str) -> list[dict[str, Any]]:
    return [m for m in wecom_state(wecom_double).snapshot() if m.get("touser") == user]


def shown(message: dict[str, Any]) -> str:
    """What the member sees, in a word: the text, or image:/file: and the file's name."""
    if message["msgtype"] in ("image", "file"):
        return f"{message['msgtype']}:{message['media']['filename']}"
    return str(message[message["msgtype"]]["content"])


def answer_of(wecom_double: ServerThread, user: str, count: int) -> list[dict[str, Any]]:
    wait_for(lambda: len(received(wecom_double, user)) >= count, timeout=20)
    return received(wecom_double, user)


def done(bridge: ServerThread) -> None:
    store = bridge.app.extensions["wecom_bridge"].store
    wait_for(lambda: all(j.status in ("done", "failed") for j in store.jobs()), timeout=20)


def test_message_file_image_is_uploaded_and_sent_as_an_image(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    callbacks.send_text("u1", "画个图 #image")
    messages = answer_of(wecom_double, "u1", 2)
    assert [m["msgtype"] for m in messages] == ["text", "image"]
    assert "画个图" in messages[0]["text"]["content"]
    upload = wecom_state(wecom_double).uploads[messages[1]["image"]["media_id"]]
    assert upload["type"] == "image" and upload["data"] == tiny_png(1)
    assert len(dify_state(dify_double).answer_files.downloads) == 1


def test_markdown_image_with_relative_link_keeps_the_answer_order(
    callbacks: CallbackClient, wecom_double: ServerThread
) -> None:
    callbacks.send_text("u2", "报表 #md-image")
    messages = answer_of(wecom_double, "u2", 3)
    assert [m["msgtype"] for m in messages] == ["text", "image", "text"]
    assert "/files/" not in messages[0]["text"]["content"]
    assert messages[2]["text"]["content"] == "以上是图表。"
    assert wecom_state(wecom_double).uploads[messages[1]["image"]["media_id"]]["data"] == (
        tiny_png(2)
    )


def test_file_link_is_sent_as_a_file_with_its_name(
    callbacks: CallbackClient, wecom_double: ServerThread
) -> None:
    callbacks.send_text("u3", "发我报告 #file")
    messages = answer_of(wecom_double, "u3", 2)
    assert [shown(m) for m in messages][1] == "file:report.pdf"
    assert (
        wecom_state(wecom_double)
        .uploads[messages[1]["file"]["media_id"]]["data"]
        .startswith(b"%PDF")
    )


def test_image_over_10_mb_goes_as_a_file(
    callbacks: CallbackClient, wecom_double: ServerThread
) -> None:
    callbacks.send_text("u4", "大图 #big-image")
    messages = answer_of(wecom_double, "u4", 2)
    assert messages[1]["msgtype"] == "file"
    assert messages[1]["media"]["bytes"] > 10 * 1024 * 1024


def test_file_over_20_mb_becomes_the_too_large_text_with_a_working_link(
    callbacks: CallbackClient,
    wecom_double: ServerThread,
    dify_double: ServerThread,
    bridge: ServerThread,
) -> None:
    callbacks.send_text("u5", "大文件 #huge-file")
    messages = answer_of(wecom_double, "u5", 2)
    done(bridge)
    text = messages[1]["text"]["content"]
    assert text.startswith("文件过大，请在此查看：")
    link = text.removeprefix("文件过大，请在此查看：")
    assert link.startswith(dify_double.url + "/files/")  # absolute, through the files base
    assert wecom_state(wecom_double).upload_calls == 0
    data_dir = bridge.app.extensions["wecom_bridge"].config.data_dir
    assert list((data_dir / "media-out").iterdir()) == []  # nothing left behind


def test_bytes_that_are_not_the_image_they_claim_are_refused(
    callbacks: CallbackClient, wecom_double: ServerThread, bridge: ServerThread
) -> None:
    callbacks.send_text("u6", "假图 #not-image")
    messages = answer_of(wecom_double, "u6", 2)
    assert messages[1]["text"]["content"] == "此文件无法发送（fake）。"
    assert wecom_state(wecom_double).upload_calls == 0
    metrics = requests.get(f"{bridge.url}/metrics", timeout=5).text
    assert 'wecom_bridge_media_out_total{outcome="degraded",reason="not_an_image"} 1' in metrics


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/a.png",  # the cloud metadata address
        "http://10.20.30.40/a.png",  # a private address
        "WECOM",  # loopback, but not Dify: the WeCom double's own port
    ],
)
def test_links_to_internal_addresses_are_refused_not_fetched(
    callbacks: CallbackClient,
    wecom_double: ServerThread,
    dify_double: ServerThread,
    url: str,
) -> None:
    url = f"{wecom_double.url}/_double/uploads/x.png" if url == "WECOM" else url
    dify_state(dify_double).set_answer(f"看图：![secret]({url})")
    callbacks.send_text("u7", "内部地址")
    messages = answer_of(wecom_double, "u7", 2)
    assert [shown(m) for m in messages] == ["看图：", "此文件无法发送（secret）。"]
    assert wecom_state(wecom_double).upload_calls == 0


def test_a_non_http_image_link_stays_text(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    dify_state(dify_double).set_answer("看：![x](file:///etc/passwd)")
    callbacks.send_text("u10", "文件链接")
    messages = answer_of(wecom_double, "u10", 1)
    assert [shown(m) for m in messages] == ["看：![x](file:///etc/passwd)"]
    assert wecom_state(wecom_double).upload_calls == 0


def test_wecom_refusing_the_upload_degrades_to_the_link(
    callbacks: CallbackClient, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    wecom_state(wecom_double).fail_next("upload", 40004)
    callbacks.send_text("u8", "图 #image")
    messages = answer_of(wecom_double, "u8", 2)
    text = messages[1]["text"]["content"]
    assert text.startswith("") and f"{dify_double.url}/files/tools/" in text
    assert "sign=" in text  # the signed link, whole: it works for the member


def test_a_busy_wecom_upload_is_retried_and_the_image_still_arrives_once(
    callbacks: CallbackClient,
    wecom_double: ServerThread,
    dify_double: ServerThread,
    bridge: ServerThread,
) -> None:
    wecom_state(wecom_double).fail_next("upload", -1)
    callbacks.send_text("u9", "图 #image")
    answer_of(wecom_double, "u9", 2)
    done(bridge)
    assert [m["msgtype"] for m in received(wecom_double, "u9")] == ["text", "image"]
    assert wecom_state(wecom_double).upload_calls == 2
    # The retried job used the file it had downloaded: Dify was asked for it once.
    assert len(dify_state(dify_double).answer_files.downloads) == 1


# --- durability: the media stage is stored -----------------------------------------------------


def test_kill9_between_upload_and_send_resumes_without_a_second_upload_or_send(
    bridge_env: dict[str, str],
    secrets: AppSecrets,
    wecom_double: ServerThread,
    dify_double: ServerThread,
) -> None:
    """The bridge dies (kill -9) after WeCom accepted the upload and before the image message
    went out (WeCom is busy: the job waits to retry). The next bridge sends that media_id."""
    wecom = wecom_state(wecom_double)
    dify_state(dify_double).set_answer("")  # the answer is only the tool's image
    wecom.fail_next("send", *[-1] * 8)
    first = BridgeProcess(bridge_env).start()
    client = CallbackClient(f"{first.url}/wxcomapp", secrets.crypto(), secrets.agent_id)
    assert client.send_text("crash", "只要图 #image").status_code == 200
    wait_for(lambda: wecom.upload_calls == 1 and wecom.send_calls >= 1, timeout=20)
    first.kill9()
    assert received(wecom_double, "crash") == []
    with wecom.lock:
        wecom.faults.clear()
    second = BridgeProcess(bridge_env).start()
    try:
        messages = answer_of(wecom_double, "crash", 1)
        time.sleep(1.0)  # nothing more comes
    finally:
        log = second.stop()
    assert [m["msgtype"] for m in received(wecom_double, "crash")] == ["image"], log
    assert wecom.upload_calls == 1, log
    assert messages[0]["image"]["media_id"] in wecom.uploads


def resumed_media_job(
    tmp_path: Path,
    secrets: AppSecrets,
    wecom_double: ServerThread,
    dify_double: ServerThread,
    user: str,
) -> tuple[JobProcessor, SqliteStore, int, WeComClient, FakeClock]:
    """A job whose one part is an image of the Dify double, claimed as after a crash, and a
    processor on a clock the test moves, against the doubles."""
    store = SqliteStore(tmp_path)
    dify_settings = DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key)
    config = dataclasses.replace(plain_app(), corp_id=secrets.corp_id, dify=dify_settings)
    wecom = WeComClient(
        api_base=wecom_double.url,
        corp_id=secrets.corp_id,
        secret=secrets.secret,
        token_cache=MemoryTokenCache(),
    )
    clock = FakeClock(time.time())
    runtime = AppRuntime(config, DifyClient(dify_settings), WeComAppOutbound(config, wecom))
    processor = JobProcessor(
        store, {"default": runtime}, Metrics(), clock=clock, media_dir=tmp_path / "media"
    )
    files = dify_state(dify_double).answer_files
    file_id = files.add(tiny_png(7), ".png", "image/png")
    store.enqueue("default", new_job(user, ChatJob("旧图")))
    job = store.claim("worker", 15)
    assert job is not None
    refs = {"0": {"kind": "image", "url": dify_double.url + files.tool_url(file_id), "name": "p"}}
    store.save_parts(job.id, ["p：link"], {"media": refs})
    return processor, store, job.id, wecom, clock


def uploaded_progress(media_id: str, created_at: float) -> dict[str, object]:
    return {"stage": "uploaded", "media_id": media_id, "created_at": created_at, "kind": "image"}


def test_a_media_id_older_than_three_days_is_uploaded_again(
    tmp_path: Path, secrets: AppSecrets, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    """A job resumed more than 3 days after its upload (WeCom's media_id lifetime) does not
    send the stale media_id: it downloads and uploads again."""
    processor, store, job_id, wecom, clock = resumed_media_job(
        tmp_path, secrets, wecom_double, dify_double, "old"
    )
    stale = wecom.upload_media("image", tiny_png(7), "p.png", "image/png")
    store.note_result(job_id, "media_0", uploaded_progress(stale.media_id, stale.created_at))
    clock.now += 3 * 24 * 3600 + 60
    processor.process(store.get_job(job_id))
    sent = received(wecom_double, "old")
    assert [m["msgtype"] for m in sent] == ["image"]
    assert sent[0]["image"]["media_id"] != stale.media_id
    assert wecom_state(wecom_double).upload_calls == 2
    assert store.get_job(job_id).status == "done"
    assert list((tmp_path / "media").iterdir()) == []


def test_a_media_id_wecom_no_longer_knows_is_uploaded_once_more(
    tmp_path: Path, secrets: AppSecrets, wecom_double: ServerThread, dify_double: ServerThread
) -> None:
    """40007 for a stored media_id (WeCom dropped it early): upload again and send, once."""
    processor, store, job_id, _, clock = resumed_media_job(
        tmp_path, secrets, wecom_double, dify_double, "gone"
    )
    store.note_result(job_id, "media_0", uploaded_progress("unknown-media-id", clock.now))
    processor.process(store.get_job(job_id))
    sent = received(wecom_double, "gone")
    assert [m["msgtype"] for m in sent] == ["image"]
    assert wecom_state(wecom_double).upload_calls == 1
    assert store.get_job(job_id).result["media_0"]["media_id"] == sent[0]["image"]["media_id"]


# --- the AI bot ----------------------------------------------------------------------------------


@pytest.fixture
def aibot() -> Iterator[AibotDouble]:
    with AibotDouble(BOT_ID, BOT_SECRET) as double:
        yield double


@pytest.fixture
def aibot_bridge(tmp_path, aibot, dify_double, secrets) -> Iterator[Bridge]:
    bridge = Bridge(aibot_env(tmp_path, aibot.url, dify_double, secrets))
    aibot.wait_connected()
    yield bridge
    bridge.stop()


def test_ai_bot_long_connection_streams_the_text_then_uploads_and_sends_the_image(
    aibot_bridge: Bridge, aibot: AibotDouble, dify_double: ServerThread
) -> None:
    dify_state(dify_double).set_pace(chunk_chars=12, chunk_interval=0.05)  # seen while written
    msgid = aibot.deliver_text("lisi", "报表 #md-image")
    aibot.wait(lambda: len(aibot.messages_to("lisi")) >= 2)
    transcript = aibot.transcript(msgid)
    assert transcript.finished == "Dify double answer: 报表 #md-image"  # the text before
    partial = [u.content for u in transcript.updates if not u.finish and u.content != "…"]
    assert len(partial) >= 3  # the member saw it grow…
    assert not any("![" in text or "/files/" in text for text in partial)  # …without the image
    with aibot.lock:
        sent = [(m.msgtype, m.content) for m in aibot.sent if m.chat == "lisi"]
        media = next(m.media_id for m in aibot.sent if m.msgtype == "image")
        upload = aibot.media[media]
    assert sent == [("image", ""), ("markdown", "以上是图表。")]  # in the answer's order
    data = b"".join(upload.chunks[i] for i in range(upload.total_chunks))
    assert (upload.type, data) == ("image", tiny_png(2))
    # The chat page (and the control API) list it by name, in its place.
    assert aibot.answers(msgid)[1] == f"[图片] {upload.filename}"


def test_ai_bot_answer_that_starts_with_a_file_finishes_its_stream_with_the_caption(
    aibot_bridge: Bridge, aibot: AibotDouble, dify_double: ServerThread
) -> None:
    dify_state(dify_double).set_answer("")
    msgid = aibot.deliver_text("wangwu", "只要图 #image")
    aibot.wait(lambda: aibot.messages_to("wangwu"))
    assert aibot.transcript(msgid).finished is not None  # no stream left open behind the file
    with aibot.lock:
        assert [m.msgtype for m in aibot.sent if m.chat == "wangwu"] == ["image"]


def test_ai_bot_uploads_a_large_file_in_512_kb_chunks(
    aibot_bridge: Bridge, aibot: AibotDouble
) -> None:
    aibot.deliver_text("zhao", "大图 #big-image")
    aibot.wait(lambda: any(m.msgtype == "file" for m in aibot.sent), timeout=30)
    with aibot.lock:
        (upload,) = [u for u in aibot.media.values() if u.type == "file"]
    assert upload.total_chunks == -(-upload.total_size // (512 * 1024)) > 20


def test_links_under_dify_s_public_files_url_are_fetched_through_the_api_base(
    bridge_env: dict[str, str],
    secrets: AppSecrets,
    wecom_double: ServerThread,
    dify_double: ServerThread,
) -> None:
    """Dify with FILES_URL set writes absolute links under its public name (unreachable here:
    .invalid never resolves). With DIFY_FILES_URL naming it, the bridge downloads the same
    signed path from DIFY_API_BASE's origin, and a link a member gets keeps the public name."""
    public = "https://kb.example.invalid"
    dify_state(dify_double).answer_files.files_url = public
    app = create_app(load_config({**bridge_env, "DIFY_FILES_URL": public}))
    try:
        with ServerThread(app) as server:
            client = CallbackClient(f"{server.url}/wxcomapp", secrets.crypto(), secrets.agent_id)
            client.send_text("pub", "图 #image", msg_id="7001")
            assert [m["msgtype"] for m in answer_of(wecom_double, "pub", 2)] == ["text", "image"]
            client.send_text("pub", "大 #huge-file", msg_id="7002")
            too_large = answer_of(wecom_double, "pub", 4)[3]["text"]["content"]
            assert too_large.startswith(f"文件过大，请在此查看：{public}/files/")
    finally:
        app.extensions["wecom_bridge"].pool.stop()
