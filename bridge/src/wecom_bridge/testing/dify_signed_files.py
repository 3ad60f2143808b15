"""The Dify double's files in answers: tools' images and documents, signed as Dify signs them.

Dify (api/core/file/helpers.py, api/core/tools/signature.py) links an answer's files with signed,
time-limited URLs, relative unless FILES_URL is set: a tool's file `/files/tools/<id>.<ext>`, an
uploaded file `/files/<id>/file-preview` (images also `/image-preview`), each with `timestamp`,
`nonce` and `sign` = urlsafe-base64(HMAC-SHA256(SECRET_KEY, "<kind>|<id>|<timestamp>|<nonce>"))
where kind is `file-preview` (tools' files too) or `image-preview`. A wrong or expired signature
(FILES_ACCESS_TIMEOUT, 300 s) is 403, an unknown file 404. `message_file` events carry such a
URL for a tool's file (`id`, `type`, `belongs_to: assistant`, `url`).

Markers in a question make the double answer with files (for tests, the simulator and the demo):
  #image        a PNG as a `message_file` event (a tool's image)
  #md-image     text, a markdown image with a relative signed link, more text
  #file         a markdown link to a PDF (an uploaded file's file-preview)
  #big-image    a 11 MB PNG (over WeCom's 10 MB image limit: goes as a file)
  #huge-file    a 21 MB file (over WeCom's 20 MB file limit: goes as a link)
  #not-image    a "PNG" whose bytes are HTML
  #internal-image  a markdown image at 169.254.169.254 (an internal address)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request

FILES_ACCESS_TIMEOUT = 300
MB = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_png(seed: int = 0) -> bytes:
    """A valid 1×1 PNG (its colour varies with `seed`)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    pixel = zlib.compress(bytes([0, seed % 256, 128, 255 - seed % 256]))
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", pixel) + chunk(b"IEND", b"")


PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@dataclass
class _File:
    data: bytes
    padding: int  # bytes of zeros after `data` (large files without the memory)
    mimetype: str
    ext: str

    @property
    def size(self) -> int:
        return len(self.data) + self.padding


@dataclass
class DifyAnswerFiles:
    """The files the double's answers link to; all access under `lock`."""

    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    files_url: str = ""  # Dify's FILES_URL: "" = relative links
    access_timeout: int = FILES_ACCESS_TIMEOUT
    lock: threading.Lock = field(default_factory=threading.Lock)
    files: dict[str, _File] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)  # ids, in the order they were fetched

    def add(self, data: bytes, ext: str, mimetype: str, *, padding: int = 0) -> str:
        file_id = str(uuid.uuid4())
        with self.lock:
            self.files[file_id] = _File(data, padding, mimetype, ext)
        return file_id

    def sign(self, kind: str, file_id: str, timestamp: int | None = None) -> str:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        nonce = secrets.token_hex(16)
        message = f"{kind}|{file_id}|{stamp}|{nonce}".encode()
        digest = hmac.new(self.secret_key.encode(), message, hashlib.sha256).digest()
        sign = base64.urlsafe_b64encode(digest).decode()
        return f"timestamp={stamp}&nonce={nonce}&sign={sign}"

    def tool_url(self, file_id: str, timestamp: int | None = None) -> str:
        """A tool's file, as sign_tool_file links it."""
        ext = self.files[file_id].ext
        query = self.sign("file-preview", file_id, timestamp)
        return f"{self.files_url}/files/tools/{file_id}{ext}?{query}"

    def preview_url(self, file_id: str, kind: str = "file-preview") -> str:
        """An uploaded file (get_signed_file_url); kind file-preview or image-preview."""
        return f"{self.files_url}/files/{file_id}/{kind}?{self.sign(kind, file_id)}"

    def verify(self, kind: str, file_id: str, args: dict[str, str]) -> bool:
        stamp, nonce, sign = (args.get(k, "") for k in ("timestamp", "nonce", "sign"))
        if not stamp.isdigit():
            return False
        message = f"{kind}|{file_id}|{stamp}|{nonce}".encode()
        digest = hmac.new(self.secret_key.encode(), message, hashlib.sha256).digest()
        expected = base64.urlsafe_b64encode(digest).decode()
        fresh = int(time.time()) - int(stamp) <= self.access_timeout
        return secrets.compare_digest(expected, sign) and fresh

    # --- markers ------------------------------------------------------------------------------

    def answer_with_files(self, query: str, answer: str) -> tuple[str, list[dict[str, Any]]]:
        """The answer and its `message_file` events for the markers in `query`."""
        events: list[dict[str, Any]] = []
        if "#image" in query:
            file_id = self.add(tiny_png(1), ".png", "image/png")
            events.append(_event(file_id, "image", self.tool_url(file_id)))
        if "#md-image" in query:
            file_id = self.add(tiny_png(2), ".png", "image/png")
            answer = f"{answer}\n\n![chart]({self.tool_url(file_id)})\n\n以上是图表。"
        if "#file" in query:
            file_id = self.add(PDF, ".pdf", "application/pdf")
            answer = f"{answer}\n\n[report.pdf]({self.preview_url(file_id)})"
        if "#big-image" in query:
            file_id = self.add(tiny_png(3), ".png", "image/png", padding=11 * MB)
            answer = f"{answer}\n\n![big]({self.tool_url(file_id)})"
        if "#huge-file" in query:
            file_id = self.add(PDF, ".pdf", "application/pdf", padding=21 * MB)
            answer = f"{answer}\n\n[huge.pdf]({self.preview_url(file_id)})"
        if "#not-image" in query:
            file_id = self.add(b"<html>not an image</html>", ".png", "image/png")
            answer = f"{answer}\n\n![fake]({self.tool_url(file_id)})"
        if "#internal-image" in query:
            answer = f"{answer}\n\n![meta](http://169.254.169.254/latest/meta-data/a.png)"
        return answer, events

    # --- serving ------------------------------------------------------------------------------

    def serve(self, kind: str, file_id: str) -> Response:
        args = {k: request.args.get(k, "") for k in ("timestamp", "nonce", "sign")}
        with self.lock:
            stored = self.files.get(file_id)
        if stored is None:
            return _error(404, "not_found", "File not found")
        if not self.verify(kind, file_id, args):
            return _error(403, "forbidden", "Invalid request.")
        with self.lock:
            self.downloads.append(file_id)
        response = Response(_body(stored), mimetype=stored.mimetype)
        response.headers["Content-Length"] = str(stored.size)
        return response


def _event(file_id: str, kind: str, url: str) -> dict[str, Any]:
    return {
        "event": "message_file",
        "id": file_id,
        "type": kind,
        "belongs_to": "assistant",
        "url": url,
    }


def _error(status: int, code: str, message: str) -> Response:
    response = jsonify({"code": code, "message": message, "status": status})
    response.status_code = status
    return response


def _body(stored: _File) -> Iterator[bytes]:
    yield stored.data
    left = stored.padding
    block = bytes(min(left, MB))
    while left > 0:
        yield block[: min(left, MB)]
        left -= MB


def mount_answer_files(app: Flask, files: DifyAnswerFiles) -> None:
    """Dify's /files routes (signature-checked; no API key, as in Dify)."""

    @app.get("/files/tools/<name>")
    def tool_file(name: str) -> Response:
        return files.serve("file-preview", name.split(".", 1)[0])

    @app.get("/files/<file_id>/file-preview")
    def file_preview(file_id: str) -> Response:
        return files.serve("file-preview", file_id)

    @app.get("/files/<file_id>/image-preview")
    def image_preview(file_id: str) -> Response:
        return files.serve("image-preview", file_id)
