"""Media from members to Dify, end to end over real HTTP: the bridge in-process, WeCom's
media/get and the AI bot's encrypted URLs played by the doubles, Dify's files/upload and
audio-to-text by the Dify double, SoX converting voice notes."""

from __future__ import annotations

import dataclasses
import io
import shutil
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import AppSecrets, dify_state, wait_for, wecom_state

from wecom_bridge.channels.base import MediaRef
from wecom_bridge.config import MediaSettings, load_config
from wecom_bridge.dify.client import DifyClient, DifySettings
from wecom_bridge.jobs.kinds import MediaJob, decode, encode, new_job
from wecom_bridge.jobs.media import (
    FILES_KEY,
    AibotMediaFetcher,
    MediaStage,
    WeComMediaFetcher,
)
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import SqliteStore
from wecom_bridge.metrics import Metrics
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.media_double import EncryptedMediaServer, MediaLimitError
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.wecom.aibot_frames import parse_message
from wecom_bridge.wecom.api import MemoryTokenCache, WeComClient
from wecom_bridge.wecom.crypto import parse_encoding_aes_key

MB = 1024 * 1024


def png() -> bytes:
    """A real 1×1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def amr(seconds: float = 1.0) -> bytes:
    """An AMR-NB file (RFC 4867 storage format): the magic, then 12.2 kbit/s frames of 20 ms
    (a header byte 0x3c and 31 bytes of speech bits; any bits decode to some sound)."""
    frames = int(seconds * 50)
    return b"#!AMR\n" + b"".join(
        b"\x3c" + bytes((i * 7 + j) % 256 for j in range(31)) for i in range(frames)
    )


def pdf(size: int = 2000) -> bytes:
    return b"%PDF-1.4\n" + b"%" + b"x" * max(0, size - 10) + b"\n"


def docx_bomb() -> bytes:
    """A .docx (a zip) that unpacks to 1000 times its size."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", b"\x00" * (40 * MB))
    return buffer.getvalue()


def sent_texts(wecom_double: ServerThread, user: str) -> list[str]:
    return [
        m["text"]["content"] for m in wecom_state(wecom_double).snapshot() if m["touser"] == user
    ]


def shelf(wecom_double: ServerThread):
    return wecom_double.app.extensions["wecom_media"]


def chat_requests(dify_double: ServerThread) -> list[dict]:
    return [r for r in dify_state(dify_double).snapshot() if r["path"] == "/v1/chat-messages"]


@pytest.fixture
def start(bridge_env: dict[str, str]) -> Iterator:
    started: list = []

    def run(**extra: str) -> ServerThread:
        app = create_app(load_config({**bridge_env, "BRIDGE_MEDIA_CAPTION_SECONDS": "0", **extra}))
        server = ServerThread(app).start()
        started.append((app, server))
        run.last = server  # type: ignore[attr-defined]
        return server

    yield run
    for app, server in started:
        server.stop()
        app.extensions["wecom_bridge"].pool.stop()


def client(bridge: ServerThread, secrets: AppSecrets) -> CallbackClient:
    return CallbackClient(f"{bridge.url}/wxcomapp", secrets.crypto(), secrets.agent_id)


def answer(wecom_double: ServerThread, user: str) -> str:
    texts = wait_for(lambda: sent_texts(wecom_double, user))
    assert isinstance(texts, list)
    return texts[0]


# --- accepted ------------------------------------------------------------------------------------


def test_an_image_is_uploaded_as_the_member_and_asked_with(
    start, secrets, wecom_double, dify_double
):
    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    bridge = start()
    media_id = shelf(wecom_double).add("image", png(), "photo.png")
    assert client(bridge, secrets).send_media("zhangsan", "image", media_id).status_code == 200
    text = answer(wecom_double, "zhangsan")
    assert text == "Dify double answer: 请看我发的图片。 [files: image:photo.png]"
    files = dify_state(dify_double).files
    assert files.upload_calls == 1
    upload = next(iter(files.uploads.values()))
    assert upload["_user"] == "zhangsan" and upload["mime_type"] == "image/png"
    (asked,) = chat_requests(dify_double)
    assert asked["json"]["files"] == [
        {"type": "image", "transfer_method": "local_file", "upload_file_id": upload["id"]}
    ]
    assert shelf(wecom_double).downloads == [media_id]


def test_a_pdf_file_goes_as_a_document(start, secrets, wecom_double, dify_double):
    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["document"])
    bridge = start()
    media_id = shelf(wecom_double).add("file", pdf(), "年假制度.pdf")
    client(bridge, secrets).send_media("lisi", "file", media_id)
    assert answer(wecom_double, "lisi").endswith("[files: document:年假制度.pdf]")


def test_a_voice_note_is_converted_transcribed_and_asked(start, secrets, wecom_double, dify_double):
    assert shutil.which("sox"), "SoX is required (scripts/host-prerequisites installs it)"
    dify_state(dify_double).files.configure(speech_to_text=True, transcript="年假怎么请")
    bridge = start(BRIDGE_VOICE_ECHO="识别为：{text}")
    media_id = shelf(wecom_double).add("voice", amr(2.0), "voice.amr")
    client(bridge, secrets).send_media("wangwu", "voice", media_id)
    assert answer(wecom_double, "wangwu") == "识别为：年假怎么请\n\nDify double answer: 年假怎么请"
    files = dify_state(dify_double).files
    # The double transcribes only real MP3/WAV bytes: SoX converted the AMR.
    assert len(files.transcriptions) == 1 and files.transcriptions[0]["user"] == "wangwu"
    assert files.upload_calls == 0


def test_an_image_and_the_text_right_after_it_are_one_question(
    start, secrets, wecom_double, dify_double
):
    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    bridge = start(BRIDGE_MEDIA_CAPTION_SECONDS="3")
    callbacks = client(bridge, secrets)
    callbacks.send_media("zhaoliu", "image", shelf(wecom_double).add("image", png(), "a.png"))
    time.sleep(0.3)
    callbacks.send_text("zhaoliu", "这张图里是什么？")
    assert (
        answer(wecom_double, "zhaoliu")
        == "Dify double answer: 这张图里是什么？ [files: image:a.png]"
    )
    time.sleep(0.5)
    assert len(sent_texts(wecom_double, "zhaoliu")) == 1
    assert len(chat_requests(dify_double)) == 1
    jobs = bridge.app.extensions["wecom_bridge"].store.jobs()
    assert [j.status for j in jobs] == ["done", "done"] and jobs[1].parts is None
    assert jobs[0].result["caption"] == {"job_id": jobs[1].id, "text": "这张图里是什么？"}


def test_without_a_text_in_the_window_the_image_is_asked_alone_after_it(
    start, secrets, wecom_double, dify_double
):
    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    bridge = start(BRIDGE_MEDIA_CAPTION_SECONDS="1")
    sent = time.monotonic()
    client(bridge, secrets).send_media(
        "qianqi", "image", shelf(wecom_double).add("image", png(), "b.png")
    )
    assert answer(wecom_double, "qianqi").endswith("[files: image:b.png]")
    assert time.monotonic() - sent >= 1.0


# --- refused ---------------------------------------------------------------------------


def refusal_case(start, secrets, wecom_double, dify_double, kind, content, name, **settings):
    if settings:
        dify_state(dify_double).files.configure(**settings)
    bridge = start()
    media_id = shelf(wecom_double).add(kind, content, name) if content is not None else name
    client(bridge, secrets).send_media("member", kind, media_id)
    return answer(wecom_double, "member")


def test_an_app_that_takes_no_images_says_so(start, secrets, wecom_double, dify_double):
    text = refusal_case(start, secrets, wecom_double, dify_double, "image", png(), "c.png")
    assert text == "这个知识库暂不接收图片，请用文字描述您的问题。"
    assert shelf(wecom_double).downloads == []  # refused before downloading
    metrics = requests.get(f"{start.last.url}/metrics", timeout=5).text
    assert 'wecom_bridge_media_refused_total{reason="type"} 1' in metrics
    assert dify_state(dify_double).files.upload_calls == 0 and not chat_requests(dify_double)


def test_a_document_type_the_app_does_not_take(start, secrets, wecom_double, dify_double):
    text = refusal_case(
        start,
        secrets,
        wecom_double,
        dify_double,
        "file",
        pdf(),
        "d.pdf",
        enabled=True,
        allowed_file_types=["image"],
    )
    assert text == "这个知识库暂不接收文件，请用文字描述您的问题。"


def test_a_file_over_difys_limit_is_refused_with_the_limit(
    start, secrets, wecom_double, dify_double
):
    text = refusal_case(
        start,
        secrets,
        wecom_double,
        dify_double,
        "file",
        pdf(2 * MB),
        "big.pdf",
        enabled=True,
        allowed_file_types=["document"],
        limits={"image": 10, "video": 100, "audio": 50, "file": 1},
    )
    assert text == "文件太大（上限 1 MB），请压缩后再发，或用文字提问。"
    assert dify_state(dify_double).files.upload_calls == 0


def test_an_image_whose_bytes_are_not_an_image_is_refused(
    start, secrets, wecom_double, dify_double
):
    text = refusal_case(
        start,
        secrets,
        wecom_double,
        dify_double,
        "image",
        pdf(),
        "fake.jpg",
        enabled=True,
        allowed_file_types=["image"],
    )
    assert text == "无法识别这个图片（内容损坏或与类型不符），请重新发送。"


def test_a_zip_bomb_docx_is_refused(start, secrets, wecom_double, dify_double):
    text = refusal_case(
        start,
        secrets,
        wecom_double,
        dify_double,
        "file",
        docx_bomb(),
        "bomb.docx",
        enabled=True,
        allowed_file_types=["document"],
    )
    assert text.startswith("无法识别这个文件")
    assert dify_state(dify_double).files.upload_calls == 0


def test_media_older_than_three_days_is_expired(start, secrets, wecom_double, dify_double):
    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    bridge = start()
    media_id = shelf(wecom_double).add("image", png(), "old.png", age=3 * 86400 + 60)
    client(bridge, secrets).send_media("member", "image", media_id)
    assert answer(wecom_double, "member") == "这个图片已过期，请重新发送。"
    client(bridge, secrets).send_media("other", "image", "Mnosuchmedia")
    assert answer(wecom_double, "other") == "这个图片已过期，请重新发送。"


def test_a_voice_note_without_speech_to_text_gets_the_configured_text(
    start, secrets, wecom_double, dify_double
):
    text = refusal_case(start, secrets, wecom_double, dify_double, "voice", amr(), "v.amr")
    assert text == "暂时不能识别语音，请用文字提问。"


def test_refusal_texts_are_configurable(start, secrets, wecom_double, dify_double, bridge_env):
    bridge = start(BRIDGE_MEDIA_TYPE_REPLY="不收{kind}")
    client(bridge, secrets).send_media(
        "m", "image", shelf(wecom_double).add("image", png(), "x.png")
    )
    assert answer(wecom_double, "m") == "不收图片"


def test_the_wecom_double_keeps_wecoms_limits(wecom_double):
    with pytest.raises(MediaLimitError):
        shelf(wecom_double).add("voice", b"#!AMR\n" + b"\0" * (2 * MB), "long.amr")


# --- crash between upload and ask -----------------------------------------------------------------


class KilledError(BaseException):
    """Stands for kill -9: nothing after it runs, nothing catches it."""


class DyingStore(SqliteStore):
    """Dies right after the upload's id was stored, once."""

    died = False

    def note_result(self, job_id: int, key: str, value: object) -> None:
        super().note_result(job_id, key, value)
        if key == FILES_KEY and not DyingStore.died:
            DyingStore.died = True
            raise KilledError


def test_a_crash_after_the_upload_resumes_without_uploading_again(
    tmp_path: Path, secrets, wecom_double, dify_double
):
    from conftest import RecordingChannel, plain_app

    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    store = DyingStore(tmp_path / "bridge.db")
    wecom = WeComClient(
        api_base=wecom_double.url,
        corp_id=secrets.corp_id,
        secret=secrets.secret,
        token_cache=MemoryTokenCache(),
    )
    dify = DifyClient(DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key))
    channel = RecordingChannel()
    app = dataclasses.replace(plain_app(), media=MediaSettings(caption_seconds=0))
    media = MediaStage(store, tmp_path, {"default": WeComMediaFetcher(wecom)})
    processor = JobProcessor(
        store, {"default": AppRuntime(app, dify, channel)}, Metrics(), media=media
    )
    media_id = shelf(wecom_double).add("image", png(), "p.png")
    spec = MediaJob(media=(MediaRef("image", media_id=media_id),))
    store.accept("default", "msg:1", new_job("member", spec))
    job = store.claim("w1", 30)
    with pytest.raises(KilledError):
        processor.process(job)
    assert not channel.sent and not chat_requests(dify_double)
    assert list((tmp_path / "media-tmp").iterdir()) == []  # the temporary file went anyway
    resumed = store.get_job(job.id)
    processor.process(resumed)
    assert channel.sent == [("member", "Dify double answer: 请看我发的图片。 [files: image:p.png]")]
    assert dify_state(dify_double).files.upload_calls == 1
    assert shelf(wecom_double).downloads == [media_id]


def test_stale_temporary_files_are_removed_at_start(tmp_path: Path):
    stale = tmp_path / "media-tmp"
    stale.mkdir()
    (stale / "job7-abc").write_bytes(b"left by a killed worker")
    assert MediaStage(SqliteStore(tmp_path / "b.db"), tmp_path, {}).clean() == 1
    assert list(stale.iterdir()) == []


# --- the AI bot ------------------------------------------------------------------------


@pytest.fixture
def aibot_media() -> Iterator[EncryptedMediaServer]:
    server = EncryptedMediaServer()
    with ServerThread(server.app) as thread:
        server.base_url = thread.url
        yield server


def test_the_ai_bots_encrypted_media_is_decrypted_with_its_key(aibot_media, tmp_path):
    import requests

    bot_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
    fetcher = AibotMediaFetcher(bot_key, requests.Session())
    link = aibot_media.publish("image", png(), "x.png")  # long connection: the URL's own key
    out = io.BytesIO()
    fetcher.fetch(MediaRef("image", url=link.url, aeskey=link.aeskey), out, 10 * MB)
    assert out.getvalue() == png()
    webhook = aibot_media.publish("file", pdf(70_000), "y.pdf", key=parse_encoding_aes_key(bot_key))
    out = io.BytesIO()
    fetched = fetcher.fetch(MediaRef("file", url=webhook.url), out, 10 * MB)
    assert out.getvalue() == pdf(70_000) and fetched.filename == "y.pdf"
    from wecom_bridge.errors import MediaRefusedError

    wrong = aibot_media.publish("image", png(), "z.png")
    with pytest.raises(MediaRefusedError) as refused:
        fetcher.fetch(MediaRef("image", url=wrong.url), io.BytesIO(), 10 * MB)
    assert refused.value.reason == "corrupt"


def test_ai_bot_image_file_and_mixed_messages_parse_into_media():
    image = parse_message(
        {
            "msgid": "1",
            "msgtype": "image",
            "from": {"userid": "u"},
            "image": {"url": "U", "aeskey": "K"},
        }
    )
    assert image.media[0].url == "U" and image.media[0].aeskey == "K"
    mixed = parse_message(
        {
            "msgid": "2",
            "msgtype": "mixed",
            "from": {"userid": "u"},
            "mixed": {
                "msg_item": [
                    {"msgtype": "text", "text": {"content": "看这两张"}},
                    {"msgtype": "image", "image": {"url": "A"}},
                    {"msgtype": "image", "image": {"url": "B"}},
                ]
            },
        }
    )
    assert mixed.text == "看这两张" and [m.url for m in mixed.media] == ["A", "B"]


def test_a_media_job_payload_round_trips_and_bad_ones_are_refused():
    spec = MediaJob(media=(MediaRef("voice", media_id="M1", format="amr"),), text="hi", msg_id="7")
    kind, payload = encode(spec)
    assert decode(kind, payload) == spec
    from wecom_bridge.errors import JobPayloadError

    with pytest.raises(JobPayloadError):
        decode("media", {"v": 1, "media": [{"kind": "video", "media_id": "M"}]})
    with pytest.raises(JobPayloadError):
        decode("media", {"v": 1, "media": []})


def test_an_ai_bot_image_over_the_long_connection_reaches_dify(
    tmp_path, aibot_media, dify_double, secrets
):
    from test_aibot import BOT_ID, BOT_SECRET, Bridge, aibot_env, finished

    from wecom_bridge.testing.aibot_double import AibotDouble

    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    with AibotDouble(BOT_ID, BOT_SECRET) as aibot:
        bridge = Bridge(aibot_env(tmp_path, aibot.url, dify_double, secrets))
        try:
            aibot.wait_connected()
            link = aibot_media.publish("image", png(), "shot.png")
            mixed = {
                "msg_item": [
                    {"msgtype": "text", "text": {"content": "这是报错截图"}},
                    {"msgtype": "image", "image": {"url": link.url, "aeskey": link.aeskey}},
                ]
            }
            msgid = aibot.deliver("zhangsan", "mixed", mixed)
            text = finished(aibot, msgid)
        finally:
            bridge.stop()
    assert text is not None and text.startswith("Dify double answer: 这是报错截图 [files: image:")
    assert dify_state(dify_double).files.upload_calls == 1


def test_a_busy_wecom_defers_the_job_and_it_is_answered_once_later(
    start, secrets, wecom_double, dify_double
):
    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    bridge = start()
    shelf(wecom_double).fail_next(1)  # -1, system busy: the job is deferred (5 s), not refused
    media_id = shelf(wecom_double).add("image", png(), "later.png")
    client(bridge, secrets).send_media("member", "image", media_id)
    store = bridge.app.extensions["wecom_bridge"].store
    wait_for(lambda: any(j.error and "media" in j.error for j in store.jobs()), timeout=20)
    text = wait_for(lambda: sent_texts(wecom_double, "member"), timeout=30)
    assert text == ["Dify double answer: 请看我发的图片。 [files: image:later.png]"]
    assert dify_state(dify_double).files.upload_calls == 1


def test_an_ai_bot_webhook_image_is_decrypted_with_the_bots_key(
    tmp_path, aibot_media, dify_double, secrets
):
    from test_aibot_webhook import AES_KEY, TOKEN

    from wecom_bridge.testing.aibot_double import AibotWebhookSender

    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    env = {
        "WECOM_AIBOT_MODE": "webhook",
        "WECOM_AIBOT_TOKEN": TOKEN,
        "WECOM_AIBOT_ENCODING_AES_KEY": AES_KEY,
        "WECOM_AIBOT_STREAM_INTERVAL": "0.2",
        "DIFY_API_BASE": f"{dify_double.url}/v1",
        "DIFY_API_KEY": secrets.dify_key,
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
    }
    app = create_app(load_config(env))
    link = aibot_media.publish("image", png(), "w.png", key=parse_encoding_aes_key(AES_KEY))
    with ServerThread(app) as bridge:
        url = f"{bridge.url}/wxcomaibot"
        with AibotWebhookSender(url, TOKEN, AES_KEY, refresh_interval=0.1) as wecom:
            exchange = wecom.ask("zhangsan", "", media=("image", {"url": link.url}))
    app.extensions["wecom_bridge"].pool.stop()
    assert exchange.finished == "Dify double answer: 请看我发的图片。 [files: image:w.png]"


# --- the doubles, as the real systems behave ------------------------------------------


def test_dify_double_upload_errors_as_difys_file_controller(dify_double, secrets):
    """langgenius/dify api/controllers/service_api/app/file.py, controllers/common/errors.py,
    services/file_service.py (size limit by the extension's kind)."""
    url = f"{dify_double.url}/v1/files/upload"
    auth = {"Authorization": f"Bearer {secrets.dify_key}"}
    none = requests.post(url, headers=auth, data={"user": "u"}, timeout=5)
    assert (none.status_code, none.json()["code"]) == (400, "no_file_uploaded")
    two = requests.post(
        url, headers=auth, data={"user": "u"}, timeout=5,
        files=[("file", ("a.png", png(), "image/png")), ("other", ("b.png", png(), "image/png"))],
    )  # fmt: skip
    assert (two.status_code, two.json()["code"]) == (400, "too_many_files")
    dify_state(dify_double).files.configure(limits={"image": 1, "video": 1, "audio": 1, "file": 1})
    big = requests.post(
        url, headers=auth, data={"user": "u"}, files={"file": ("x.pdf", pdf(2 * MB))}, timeout=5
    )
    assert (big.status_code, big.json()["code"]) == (413, "file_too_large")
    ok = requests.post(
        url,
        headers=auth,
        data={"user": "u"},
        files={"file": ("x.png", png(), "image/png")},
        timeout=5,
    )
    assert (
        ok.status_code == 201
        and {"id", "name", "size", "extension", "mime_type"} <= ok.json().keys()
    )


def test_dify_double_drops_files_when_upload_is_off_and_validates_when_on(dify_double, secrets):
    """core/app/apps/*_app_generator.py: no file_upload config, no files; factories/file_factory:
    a file the config does not allow fails the message."""
    dify = DifyClient(DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key))
    uploaded = dify.upload_file("u", "a.png", io.BytesIO(png()), "image/png")
    files = [{"type": "image", "transfer_method": "local_file", "upload_file_id": uploaded["id"]}]
    assert dify.ask("看图", "u", files=files).text == "Dify double answer: 看图"  # dropped
    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["document"])
    from wecom_bridge.errors import DifyError

    with pytest.raises(DifyError) as refused:
        dify.ask("看图", "u", files=files)
    assert refused.value.code == "invalid_param"


def test_dify_double_audio_to_text_as_difys_audio_service(dify_double, secrets):
    """services/audio_service.py: speech to text off → refused; audio/<ext> mimetypes only."""
    dify = DifyClient(DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key))
    from wecom_bridge.errors import DifyError

    with pytest.raises(DifyError, match="Speech to text is not enabled"):
        dify.audio_to_text("u", "v.mp3", io.BytesIO(b"ID3" + b"\0" * 100), "audio/mp3")
    dify_state(dify_double).files.configure(speech_to_text=True)
    with pytest.raises(DifyError) as wrong_type:
        dify.audio_to_text("u", "v.mp3", io.BytesIO(b"ID3" + b"\0" * 100), "audio/x-mp3")
    assert wrong_type.value.code == "unsupported_audio_type"
    assert dify.audio_to_text("u", "v.mp3", io.BytesIO(b"ID3" + b"\0" * 100), "audio/mp3")


def test_doctor_reports_what_media_meets_and_a_missing_sox(bridge_env, dify_double):
    from wecom_bridge.tools.doctor import Doctor, DoctorOptions, Status, check_dify_media
    from wecom_bridge.tools.probe import Prober

    doctor = Doctor(DoctorOptions(env=bridge_env), Prober())
    dify_state(dify_double).files.configure(
        enabled=True, allowed_file_types=["image", "document"], speech_to_text=True
    )
    found = check_dify_media(doctor)
    assert found.status is Status.PASS
    assert found.detail == "files: document, image; speech to text: on"
    missing = check_dify_media(doctor, which=lambda name: None)
    assert missing.status is Status.FAIL and "sox not found" in missing.detail


def test_without_sox_a_voice_note_gets_the_voice_off_text(
    start, secrets, wecom_double, dify_double, monkeypatch
):
    """A host without SoX: voice notes are refused, not failed."""
    dify_state(dify_double).files.configure(speech_to_text=True)
    bridge = start()
    monkeypatch.setenv("PATH", "/nonexistent")
    client(bridge, secrets).send_media(
        "m", "voice", shelf(wecom_double).add("voice", amr(), "v.amr")
    )
    assert answer(wecom_double, "m") == "暂时不能识别语音，请用文字提问。"
    assert dify_state(dify_double).files.transcriptions == []


def test_a_voice_note_dify_hears_nothing_in_gets_the_unheard_text(
    start, secrets, wecom_double, dify_double
):
    text = refusal_case(
        start, secrets, wecom_double, dify_double, "voice", amr(), "v.amr",
        speech_to_text=True, transcript="",
    )  # fmt: skip
    assert text == "没有听清您的语音，请再说一遍或用文字提问。"


def test_media_still_failing_after_ten_minutes_gets_the_failed_text(
    tmp_path: Path, secrets, wecom_double, dify_double
):
    from conftest import RecordingChannel, plain_app

    from wecom_bridge.jobs.processor import MEDIA_RETRY_SECONDS

    dify_state(dify_double).files.configure(enabled=True, allowed_file_types=["image"])
    store = SqliteStore(tmp_path / "bridge.db")
    wecom = WeComClient(
        api_base=wecom_double.url,
        corp_id=secrets.corp_id,
        secret=secrets.secret,
        token_cache=MemoryTokenCache(),
    )
    dify = DifyClient(DifySettings(api_base=f"{dify_double.url}/v1", api_key=secrets.dify_key))
    channel = RecordingChannel()
    app = dataclasses.replace(plain_app(), media=MediaSettings(caption_seconds=0))
    later = time.time() + MEDIA_RETRY_SECONDS + 1
    processor = JobProcessor(
        store,
        {"default": AppRuntime(app, dify, channel)},
        Metrics(),
        media=MediaStage(store, tmp_path, {"default": WeComMediaFetcher(wecom)}),
        clock=lambda: later,
    )
    shelf(wecom_double).fail_next(100)
    spec = MediaJob(
        media=(MediaRef("image", media_id=shelf(wecom_double).add("image", png(), "f.png")),)
    )
    store.accept("default", "msg:9", new_job("member", spec))
    processor.process(store.claim("w1", 30))
    assert channel.sent == [("member", "图片接收失败，请稍后重新发送。")]
    assert store.jobs()[0].status == "done" and store.jobs()[0].result["media_refused"] == "failed"
