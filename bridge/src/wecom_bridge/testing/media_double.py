"""What members send, as WeCom serves it: media/get for the self-built app and the AI bot's
encrypted download URLs. Part of the WeCom doubles (one implementation, mounted by them).

media/get (doc 90254): GET /cgi-bin/media/get?access_token&media_id → the bytes with
Content-Type and `Content-disposition: attachment; filename="…"`; an unknown or expired MediaId
(older than 3 days) → JSON {"errcode": 40007, "errmsg": "invalid media_id"}. WeCom takes from
members at most: image 10 MB, voice 2 MB (AMR, 60 s), file 20 MB — a test cannot hand the
double more (it would never reach a bridge).

The AI bot (doc 100719 and its Node SDK): an image or file is a URL valid five minutes whose
content is AES-256-CBC encrypted (IV = key[:16], PKCS#7 to 32 bytes) with the message's aeskey
(long connection) or the bot's EncodingAESKey (webhook).
"""

from __future__ import annotations

import base64
import mimetypes
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Flask, Response, jsonify, request

from wecom_bridge.wecom.aibot_media import encrypt_media

MB = 1024 * 1024
MEDIA_LIMITS = {"image": 10 * MB, "voice": 2 * MB, "file": 20 * MB}
MEDIA_LIFETIME = 3 * 86400.0  # a MediaId, in seconds
URL_LIFETIME = 300.0  # an AI bot media URL
ERR_INVALID_MEDIA = 40007


class MediaLimitError(ValueError):
    """More than WeCom lets a member send."""


@dataclass(frozen=True)
class StoredMedia:
    content: bytes
    content_type: str
    filename: str
    created_at: float


@dataclass
class MediaShelf:
    """Media members sent, by MediaId (or AI bot URL id); all access under `lock`."""

    clock: Callable[[], float] = time.time
    lock: threading.Lock = field(default_factory=threading.Lock)
    items: dict[str, StoredMedia] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)  # media ids fetched, in order
    busy: int = 0  # the next media/get calls answer -1 (system busy, try again)

    def add(self, kind: str, content: bytes, filename: str, *, age: float = 0.0) -> str:
        """A member sent this (`age`: that many seconds ago); its new MediaId."""
        if kind not in MEDIA_LIMITS:
            raise ValueError(f"kind must be one of {sorted(MEDIA_LIMITS)}")
        if len(content) > MEDIA_LIMITS[kind]:
            raise MediaLimitError(f"WeCom takes a {kind} of at most {MEDIA_LIMITS[kind]} bytes")
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if filename.endswith(".amr"):
            content_type = "audio/amr"
        media_id = "M" + secrets.token_hex(16)
        with self.lock:
            self.items[media_id] = StoredMedia(content, content_type, filename, self.clock() - age)
        return media_id

    def take(self, media_id: str, lifetime: float) -> StoredMedia | None:
        with self.lock:
            item = self.items.get(media_id)
            if item is None or self.clock() - item.created_at > lifetime:
                return None
            self.downloads.append(media_id)
            return item

    def fail_next(self, times: int) -> None:
        with self.lock:
            self.busy += times

    def take_busy(self) -> bool:
        with self.lock:
            busy, self.busy = self.busy > 0, max(0, self.busy - 1)
            return busy

    def reset(self) -> None:
        with self.lock:
            self.items.clear()
            self.downloads.clear()
            self.busy = 0


def _attachment(item: StoredMedia, body: bytes) -> Response:
    response = Response(body, mimetype=item.content_type)
    # The name's UTF-8 bytes as they are (the header goes out as latin-1 byte for byte).
    raw_name = item.filename.encode("utf-8").decode("latin-1")
    response.headers["Content-Disposition"] = f'attachment; filename="{raw_name}"'
    return response


def mount_media_get(
    app: Flask, shelf: MediaShelf, token_error: Callable[[str], int | None]
) -> None:
    """media/get and the control route that plays a member sending media, on the WeCom double.
    `token_error(token)`: the double's access-token check (an errcode, None when valid)."""

    @app.get("/cgi-bin/media/get")
    def media_get() -> Response:
        problem = token_error(request.args.get("access_token", ""))
        if problem is not None:
            return jsonify({"errcode": problem, "errmsg": "invalid access_token"})
        if shelf.take_busy():
            return jsonify({"errcode": -1, "errmsg": "system busy"})
        item = shelf.take(request.args.get("media_id", ""), MEDIA_LIFETIME)
        if item is None:
            return jsonify({"errcode": ERR_INVALID_MEDIA, "errmsg": "invalid media_id"})
        return _attachment(item, item.content)

    @app.post("/_double/media")
    def add_media() -> tuple[Response, int]:
        """JSON {"kind", "filename", "content_base64", "age_seconds"?} → {"media_id"}."""
        body = request.get_json(force=True, silent=True) or {}
        try:
            content = base64.b64decode(str(body.get("content_base64", "")), validate=True)
            media_id = shelf.add(
                str(body.get("kind", "")),
                content,
                os.path.basename(str(body.get("filename", "") or "media.bin")),
                age=float(body.get("age_seconds") or 0.0),
            )
        except (ValueError, TypeError) as exc:
            return jsonify({"error": str(exc)}), 400
        return jsonify({"media_id": media_id}), 200


@dataclass(frozen=True)
class EncryptedLink:
    """One AI-bot media download: its URL and the key it is encrypted with."""

    url: str
    aeskey: str  # base64, as the long connection carries it


class EncryptedMediaServer:
    """The AI bot's media downloads: GET /aibot-media/<id> → the encrypted bytes (5 minutes),
    served by its own app (`app`) or mounted on another (`mount`, the AI-bot double's control)."""

    def __init__(self, shelf: MediaShelf | None = None) -> None:
        self.shelf = shelf or MediaShelf()
        self.keys: dict[str, bytes] = {}
        self.app = Flask("aibot_media_double")
        self.base_url = ""  # where it is served (ServerThread.url)
        self.mount(self.app)

    def mount(self, app: Flask) -> None:
        def download(media_id: str) -> Response | tuple[str, int]:
            item = self.shelf.take(media_id, URL_LIFETIME)
            key = self.keys.get(media_id)
            if item is None or key is None:
                return "expired", 404
            return _attachment(item, encrypt_media(item.content, key))

        app.add_url_rule("/aibot-media/<media_id>", "aibot_media", download, methods=["GET"])

    def publish(
        self, kind: str, content: bytes, filename: str, *, key: bytes | None = None
    ) -> EncryptedLink:
        """Media a member sends the bot: encrypted with `key` (the bot's, in webhook mode) or
        a fresh one (the long connection's per-URL aeskey)."""
        media_id = self.shelf.add(kind, content, filename)
        self.keys[media_id] = key or os.urandom(32)
        aeskey = base64.b64encode(self.keys[media_id]).decode("ascii")
        return EncryptedLink(f"{self.base_url}/aibot-media/{media_id}", aeskey)
