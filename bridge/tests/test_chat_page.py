"""The simulator's chat page (served by the WeCom double) in headless Chromium: a message typed as
a member goes to the bridge as a real signed callback, and the bridge's reply shows up.

Chromium is required (Debian package `chromium`): missing, these tests fail rather than skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
from conftest import AppSecrets, dify_state, wecom_state

from wecom_bridge.config import load_config
from wecom_bridge.service.app import create_app
from wecom_bridge.testing.aibot_control import control_app
from wecom_bridge.testing.aibot_double import AibotDouble, AibotWebhookSender
from wecom_bridge.testing.dify_signed_files import tiny_png
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.testing.wecom_double import ChatCallback

REPLY_RGB = (0xDB, 0xEA, 0xFE)  # .reply .bubble background in static/chat.html
WINDOW = (640, 480)


@pytest.fixture
def chat(bridge: ServerThread, wecom_double: ServerThread, secrets: AppSecrets) -> ServerThread:
    wecom_state(wecom_double).chat_callback = ChatCallback(
        f"{bridge.url}/wxcomapp", secrets.token, secrets.aes_key
    )
    return wecom_double


def chromium(tmp_path: Path, url: str, *mode: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    args = [
        binary,
        *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
        *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--virtual-time-budget=30000",
        *mode,
        url,
    ]
    # Its own process group: on a timeout the renderer and helpers go too, not only the parent.
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("chromium did not finish within 120 s (no reply, so the page kept polling?)")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def page_url(double: ServerThread, user: str, text: str) -> str:
    # once=1: stop polling when the answer is in, so the headless browser can finish.
    query = urlencode({"user": user, "text": text, "once": "1", "wait": "2"})
    return f"{double.url}/_double/chat?{query}"


def test_reply_appears_in_the_page(chat: ServerThread, tmp_path: Path) -> None:
    result = chromium(tmp_path, page_url(chat, "zhaoliu", "报销流程是什么？"), "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert '<body data-state="done">' in dom
    assert '<div class="row mine"><div class="bubble">报销流程是什么？</div></div>' in dom
    assert '<div class="bubble">Dify double answer: 报销流程是什么？</div>' in dom
    (message,) = wecom_state(chat).snapshot()  # through the real path: callback → bridge → send
    assert message["touser"] == "zhaoliu"
    assert f'data-msgid="{message["msgid"]}"' in dom


def test_an_image_the_member_received_is_shown_and_a_file_is_a_link(
    chat: ServerThread, tmp_path: Path
) -> None:
    url = page_url(chat, "qianba", "图和文件 #image #file")
    result = chromium(tmp_path, url, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    messages = wecom_state(chat).snapshot()
    image = next(m for m in messages if m["msgtype"] == "image")
    report = next(m for m in messages if m["msgtype"] == "file")
    assert f'<img src="/_double/uploads/{image["image"]["media_id"]}"' in dom
    assert f'href="/_double/uploads/{report["file"]["media_id"]}" download="report.pdf"' in dom


def test_screenshot_shows_the_reply(chat: ServerThread, tmp_path: Path) -> None:
    shot = tmp_path / "chat.png"
    result = chromium(tmp_path, page_url(chat, "sunqi", "你好"), f"--screenshot={shot}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert wecom_state(chat).snapshot(), "the bridge did not answer"
    data = shot.read_bytes()
    width, height, pixels = decode_png(data)
    assert (width, height) == WINDOW
    assert len(data) > 3000  # not a blank page
    reply_pixels = sum(1 for rgb in pixels if rgb == REPLY_RGB)
    assert reply_pixels > 2000, f"no reply bubble in the screenshot ({reply_pixels} pixels)"
    distinct = len(set(pixels[::97]))
    assert distinct > 5  # header, background, bubbles, text


def test_chat_send_api(
    wecom_double: ServerThread, bridge: ServerThread, secrets: AppSecrets
) -> None:
    url = f"{wecom_double.url}/_double/chat/send"
    assert requests.post(url, json={"user": "u", "text": "hi"}, timeout=5).status_code == 409
    assert "<title>" in requests.get(f"{wecom_double.url}/_double/chat", timeout=5).text
    wecom_state(wecom_double).chat_callback = ChatCallback(
        f"{bridge.url}/wxcomapp", "WrongToken1", secrets.aes_key
    )
    assert requests.post(url, json={"user": "u"}, timeout=5).status_code == 400
    refused = requests.post(url, json={"user": "u", "text": "hi"}, timeout=5).json()
    assert refused["status"] == 403
    wecom_state(wecom_double).chat_callback = ChatCallback(
        f"{bridge.url}/wxcomapp", secrets.token, secrets.aes_key
    )
    sent = requests.post(url, json={"user": "u", "event": "enter_agent"}, timeout=5).json()
    assert sent["status"] == 200
    welcome = requests.get(
        f"{wecom_double.url}/_double/messages",
        params={"user": "u", "after": sent["sent_at"] - 1, "wait": 10},
        timeout=15,
    ).json()["messages"]
    assert [m["text"]["content"] for m in welcome] == ["欢迎使用知识库助手"]


# --- a minimal PNG decoder (8-bit RGB/RGBA, not interlaced: what Chromium writes) --------------


def decode_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    previous = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for row in range(height):
        start = row * (stride + 1)
        line = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, bpp)
        pixels.extend(zip(line[0::bpp], line[1::bpp], line[2::bpp], strict=True))
        previous = line
    return width, height, pixels


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> bytearray:
    if kind == 0:
        return line
    if kind == 2:
        return bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up, corner = prev[i], (prev[i - bpp] if i >= bpp else 0)
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
        else:
            estimate = left + up - corner
            pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
            best = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
            line[i] = (line[i] + best) & 0xFF
    return line


# --- the AI bot (the page served by the AI-bot double) ------------------------------------------

AIBOT_ANSWER = "第一句。第二句。第三句。" * 8


def aibot_page_url(control: ServerThread, user: str, text: str, group: str = "") -> str:
    query = {
        "user": user,
        "text": text,
        "once": "1",
        "wait": "2",
        **({"group": group} if group else {}),
    }
    return f"{control.url}/chat?{urlencode(query)}"


def assert_streamed_answer(dom: str) -> None:
    assert 'data-channel="aibot"' in dom and '<body data-state="done"' in dom
    assert f'<div class="bubble">{AIBOT_ANSWER}</div>' in dom
    shown = re.search(r'class="row reply"[^>]*data-shown="(\d+)"|data-shown="(\d+)"', dom)
    assert shown, dom[-2000:]
    # The bubble was rewritten as the stream grew, not filled once at the end.
    assert int(shown.group(1) or shown.group(2)) >= 2
    assert 'class="row reply streaming"' not in dom  # finished


def test_the_page_plays_the_ai_bot_over_the_long_connection(
    tmp_path: Path, dify_double: ServerThread, secrets: AppSecrets
) -> None:
    state = dify_state(dify_double)
    state.set_answer(AIBOT_ANSWER)
    state.set_pace(chunk_chars=6, chunk_interval=0.08)
    with AibotDouble("bot-page", "page-secret") as double:
        env = {
            "WECOM_AIBOT_MODE": "ws",
            "WECOM_AIBOT_BOT_ID": "bot-page",
            "WECOM_AIBOT_SECRET": "page-secret",
            "WECOM_AIBOT_WS_URL": double.url,
            "WECOM_AIBOT_STREAM_INTERVAL": "0.2",
            "DIFY_API_BASE": f"{dify_double.url}/v1",
            "DIFY_API_KEY": secrets.dify_key,
            "BRIDGE_DATA_DIR": str(tmp_path / "data"),
        }
        app = create_app(load_config(env))
        runtime = app.extensions["wecom_bridge"]
        try:
            double.wait_connected()
            with ServerThread(control_app(double)) as control:
                url = aibot_page_url(control, "zhaoliu", "年假？", group="grp-page")
                result = chromium(tmp_path, url, "--dump-dom")
            assert result.returncode == 0, result.stderr[-2000:]
            assert_streamed_answer(result.stdout)
            assert '<div class="bubble">@bot 年假？</div>' in result.stdout
            (delivery,) = double.deliveries.values()  # through the real long connection
            assert delivery.chat == "grp-page" and delivery.finished == AIBOT_ANSWER
        finally:
            for link in runtime.links:
                link.stop()
            runtime.pool.stop()


@contextlib.contextmanager
def webhook_page(
    tmp_path: Path, dify_double: ServerThread, secrets: AppSecrets
) -> Iterator[tuple[AibotWebhookSender, ServerThread]]:
    """A webhook bot on a real server, WeCom's side played by the double, and its page."""
    env = {
        "WECOM_AIBOT_MODE": "webhook",
        "WECOM_AIBOT_TOKEN": "PageToken42",
        "WECOM_AIBOT_ENCODING_AES_KEY": secrets.aes_key,
        "WECOM_AIBOT_STREAM_INTERVAL": "0.2",
        "DIFY_API_BASE": f"{dify_double.url}/v1",
        "DIFY_API_KEY": secrets.dify_key,
        "BRIDGE_DATA_DIR": str(tmp_path / "data"),
    }
    app = create_app(load_config(env))
    try:
        with ServerThread(app) as bridge:
            sender = AibotWebhookSender(
                f"{bridge.url}/wxcomaibot", "PageToken42", secrets.aes_key, refresh_interval=0.2
            )
            with sender, ServerThread(control_app(sender)) as control:
                yield sender, control
    finally:
        app.extensions["wecom_bridge"].pool.stop()


def test_the_page_plays_the_ai_bot_through_its_webhook(
    tmp_path: Path, dify_double: ServerThread, secrets: AppSecrets
) -> None:
    state = dify_state(dify_double)
    state.set_answer(AIBOT_ANSWER)
    state.set_pace(chunk_chars=6, chunk_interval=0.08)
    with webhook_page(tmp_path, dify_double, secrets) as (sender, control):
        result = chromium(tmp_path, aibot_page_url(control, "sunqi", "报销？"), "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_streamed_answer(result.stdout)
    (exchange,) = sender.exchanges.values()  # through real encrypted callbacks
    assert exchange.finished == AIBOT_ANSWER and len(exchange.updates) > 2


def test_the_page_shows_the_image_a_webhook_bots_finish_carries(
    tmp_path: Path, dify_double: ServerThread, secrets: AppSecrets
) -> None:
    with webhook_page(tmp_path, dify_double, secrets) as (sender, control):
        result = chromium(tmp_path, aibot_page_url(control, "sunqi", "图 #md-image"), "--dump-dom")
        assert result.returncode == 0, result.stderr[-2000:]
        (msgid,) = sender.exchanges
        source = f"/control/messages/{msgid}/images/0"
        assert f'<img src="{source}"' in result.stdout, result.stdout[-2000:]
        served = requests.get(control.url + source, timeout=5)
        assert served.headers["Content-Type"] == "image/png" and served.content == tiny_png(2)
