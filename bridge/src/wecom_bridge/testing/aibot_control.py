"""The AI-bot double's HTTP side: a control API and the chat page, in front of either mode.

Long connection: the double is the WebSocket server the bridge subscribes to (AibotDouble).
Webhook: the double is WeCom calling the bridge's callback URL (AibotWebhookSender). Both give
the same view of a message, so the simulator (`simulate-aibot`), molecule and the chat page
drive either mode through the same calls:

- `POST /control/messages {userid, text, chatid}` → `{msgid}`: a member writes (in a group
  when `chatid` is given);
- `POST /control/enter {userid}` → `{msgid}`: the member opens the bot's chat;
- `POST /control/media {userid, kind: image|file, filename, content_base64, text?}` → `{msgid}`:
  the member sends media (an image with a text: a mixed message), served encrypted from here
  (`/aibot-media/<id>`) with the message's aeskey (long connection) or the bot's key (webhook);
- `GET /control/messages/<msgid>?after=N&wait=S`: what the member saw — stream updates, the
  finished text, further answers, the welcome, the finished stream's images (`images`: md5 and
  size; their bytes at `/control/messages/<msgid>/images/<n>`); waits up to S seconds for more
  than N of them;
- `GET /control/status`, `POST /control/kick` (long connection only);
- `GET /chat`: the chat page, playing the member; the answer grows as it streams in.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Protocol

from flask import Flask, Response, jsonify, request

from wecom_bridge.testing.aibot_double import AibotDouble, AibotWebhookSender
from wecom_bridge.testing.media_double import EncryptedMediaServer
from wecom_bridge.testing.wecom_double import chat_page

POLL_STEP = 0.05
MAX_WAIT = 30.0


class AibotDriver(Protocol):
    """One mode of the double, as the control API drives it."""

    def deliver_text(self, userid: str, text: str, *, chatid: str = "") -> str: ...

    def deliver_media(self, userid: str, msgtype: str, content: dict[str, Any]) -> str: ...

    @property
    def media_key(self) -> bytes | None: ...

    def enter_chat(self, userid: str) -> str: ...

    def view(self, msgid: str) -> dict[str, Any] | None: ...

    def image(self, msgid: str, index: int) -> bytes | None: ...

    def status(self) -> dict[str, Any]: ...


def seen_count(view: dict[str, Any]) -> int:
    """How much of a message the member has seen: updates, answers and the welcome."""
    updates, answers = view.get("updates") or [], view.get("answers") or []
    return len(updates) + len(answers) + (view.get("welcome") is not None)


def _wait_view(driver: AibotDriver, msgid: str, after: int, wait: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
    while True:
        view = driver.view(msgid)
        if view is None or seen_count(view) > after or time.monotonic() >= deadline:
            return view
        time.sleep(POLL_STEP)


def control_app(driver: AibotDriver) -> Flask:
    """The control API and the chat page for `driver` (see the module doc)."""
    app = Flask("aibot_double")

    def fields() -> dict[str, Any]:
        data = request.get_json(force=True, silent=True)
        return data if isinstance(data, dict) else {}

    @app.post("/control/messages")
    def push() -> tuple[Response, int]:
        data = fields()
        userid, text = str(data.get("userid") or ""), str(data.get("text") or "")
        if not userid or not text:
            return jsonify({"error": "userid and text are required"}), 400
        try:
            msgid = driver.deliver_text(userid, text, chatid=str(data.get("chatid") or ""))
        except ConnectionError as exc:  # long connection: the bridge is not subscribed
            return jsonify({"error": str(exc)}), 409
        return jsonify({"msgid": msgid}), 200

    media = EncryptedMediaServer()
    media.mount(app)

    @app.post("/control/media")
    def push_media() -> tuple[Response, int]:
        data = fields()
        userid, kind = str(data.get("userid") or ""), str(data.get("kind") or "image")
        try:
            content = base64.b64decode(str(data.get("content_base64") or ""), validate=True)
            media.base_url = request.host_url.rstrip("/")
            link = media.publish(
                kind, content, str(data.get("filename") or "media.bin"), key=driver.media_key
            )
        except ValueError as exc:  # bad base64, unknown kind, over WeCom's limit
            return jsonify({"error": str(exc)}), 400
        item = {"url": link.url} | ({} if driver.media_key else {"aeskey": link.aeskey})
        text = str(data.get("text") or "")
        try:
            if text and kind == "image":
                mixed = [
                    {"msgtype": "text", "text": {"content": text}},
                    {"msgtype": "image", "image": item},
                ]
                msgid = driver.deliver_media(userid, "mixed", {"msg_item": mixed})
            else:
                msgid = driver.deliver_media(userid, kind, item)
        except ConnectionError as exc:
            return jsonify({"error": str(exc)}), 409
        return jsonify({"msgid": msgid}), 200

    @app.post("/control/enter")
    def enter() -> tuple[Response, int]:
        userid = str(fields().get("userid") or "")
        if not userid:
            return jsonify({"error": "userid is required"}), 400
        try:
            return jsonify({"msgid": driver.enter_chat(userid)}), 200
        except ConnectionError as exc:
            return jsonify({"error": str(exc)}), 409

    @app.get("/control/messages/<msgid>")
    def show(msgid: str) -> Response:
        after = request.args.get("after", type=int, default=-1)
        wait = request.args.get("wait", type=float, default=0.0)
        return jsonify(_wait_view(driver, msgid, after, wait) or {})

    @app.get("/control/messages/<msgid>/images/<int:index>")
    def image(msgid: str, index: int) -> Response:
        data = driver.image(msgid, index)
        if data is None:
            return Response("no such image\n", status=404, mimetype="text/plain")
        kind = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
        return Response(data, mimetype=kind)

    @app.get("/control/status")
    def status() -> Response:
        return jsonify(driver.status())

    @app.post("/control/kick")
    def kick() -> tuple[Response, int]:
        if not isinstance(driver, AibotDouble):
            return jsonify({"error": "only a long connection can be taken over"}), 409
        driver.kick()
        return jsonify({"ok": True}), 200

    @app.get("/chat")
    def chat() -> Response:
        # The same page as the self-built app's, told to play the AI bot.
        page = chat_page().replace('data-state="idle"', 'data-state="idle" data-channel="aibot"', 1)
        return Response(page, mimetype="text/html")

    return app


def serve_aibot_double(bot_id: str, secret: str, listen: str, control: str) -> None:
    """Long connection: the WebSocket server on `listen`, the control API on `control`."""
    from wecom_bridge.testing.server import parse_listen, serve_forever

    host, port = parse_listen(listen)
    double = AibotDouble(bot_id, secret, host=host, port=port).start()
    print(json.dumps({"ws": double.url, "control": control}), flush=True)
    serve_forever(control_app(double), control)


def serve_aibot_webhook_double(
    callback_url: str, token: str, encoding_aes_key: str, control: str
) -> None:
    """Webhook: WeCom's side calling `callback_url`, the control API on `control`."""
    from wecom_bridge.testing.server import serve_forever

    sender = AibotWebhookSender(callback_url, token, encoding_aes_key)
    print(json.dumps({"webhook": callback_url, "control": control}), flush=True)
    serve_forever(control_app(sender), control)
