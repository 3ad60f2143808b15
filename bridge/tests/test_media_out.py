"""Dify's images and files back to members, end to end over real HTTP: the bridge between the
Dify double (answers with signed /files/… links and message_file events) and the WeCom double
(media/upload with WeCom's limits, message/send with image/file messages)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import dify_state, wait_for, wecom_state

from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.dify_files import tiny_png
from wecom_bridge.testing.server import ServerThread


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
    assert wecom_state(wecom_double).uploads[messages[1]["file"]["media_id"]]["data"].startswith(
        b"%PDF"
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
    callbacks: CallbackClient, wecom_double: ServerThread
) -> None:
    callbacks.send_text("u6", "假图 #not-image")
    messages = answer_of(wecom_double, "u6", 2)
    assert messages[1]["text"]["content"] == "此文件无法发送（fake）。"
    assert wecom_state(wecom_double).upload_calls == 0


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
