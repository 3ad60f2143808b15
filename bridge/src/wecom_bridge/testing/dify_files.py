"""The Dify double's files: /v1/files/upload, /v1/audio-to-text and the app's file_upload
settings, as Dify's server (langgenius/dify, 2026) behaves — part of the one Dify double.

- files/upload (controllers/service_api/app/file.py, services/file_service.py): multipart `file`
  and `user`; no file → 400 no_file_uploaded, more than one → 400 too_many_files, over the size
  limit of the extension's kind (UPLOAD_IMAGE/VIDEO/AUDIO/FILE_SIZE_LIMIT: 10/100/50/15 MB) →
  413 file_too_large; else 201 {id, name, size, extension, mime_type, created_by, created_at}.
  It does NOT check the app's file_upload settings: that happens when a message uses the file.
- chat-messages `files` (core/app/apps/*_app_generator.py, factories/file_factory.py): with the
  app's file upload off the files are dropped silently; on, each must pass the config (allowed
  types — custom by extension — and the transfer method) or the request fails
  (400 invalid_param "File validation failed for file: …").
- audio-to-text (services/audio_service.py): speech to text off → ValueError "Speech to text is
  not enabled" (400 invalid_param); the part's mimetype must be audio/<mp3|mp4|mpeg|mpga|m4a|
  wav|webm|amr> (415 unsupported_audio_type); over 30 MB → 413 audio_too_large. The double's
  transcript is deterministic (configurable), and only for bytes that really are MP3 or WAV.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request

MB = 1024 * 1024
IMAGE = frozenset({"jpg", "jpeg", "png", "webp", "gif", "svg"})
VIDEO = frozenset({"mp4", "mov", "mpeg", "webm"})
AUDIO = frozenset({"mp3", "m4a", "wav", "amr", "mpga"})
DOCUMENT = frozenset(
    {"txt", "markdown", "md", "mdx", "pdf", "html", "htm", "xlsx", "xls", "docx", "csv", "vtt"}
    | {"properties"}
)
AUDIO_TYPES = tuple(
    f"audio/{e}" for e in ("mp3", "mp4", "mpeg", "mpga", "m4a", "wav", "webm", "amr")
)
AUDIO_LIMIT = 30 * MB
DEFAULT_TRANSCRIPT = "请问年假怎么申请"


def file_type(extension: str) -> str:
    if extension in IMAGE:
        return "image"
    if extension in DOCUMENT:
        return "document"
    if extension in AUDIO:
        return "audio"
    if extension in VIDEO:
        return "video"
    return "custom"


def _error(status: int, code: str, message: str) -> Response:
    response = jsonify({"code": code, "message": message, "status": status})
    response.status_code = status
    return response


@dataclass
class DifyFiles:
    """Uploaded files and the app's file and speech settings; all access under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    upload_calls: int = 0
    transcriptions: list[dict[str, Any]] = field(default_factory=list)
    # The app's settings (Dify's default app: file upload and speech to text off).
    enabled: bool = False
    allowed_file_types: list[str] = field(default_factory=lambda: ["image"])
    allowed_file_extensions: list[str] = field(default_factory=list)
    allowed_file_upload_methods: list[str] = field(
        default_factory=lambda: ["local_file", "remote_url"]
    )
    number_limits: int = 3
    speech_to_text: bool = False
    transcript: str = DEFAULT_TRANSCRIPT
    # The server's limits in MB (Dify's defaults).
    limits: dict[str, int] = field(
        default_factory=lambda: {"image": 10, "video": 100, "audio": 50, "file": 15}
    )

    def configure(self, **settings: Any) -> None:
        """Change the app's settings (the names of the fields above)."""
        with self.lock:
            for name, value in settings.items():
                if name not in _SETTINGS:
                    raise ValueError(f"unknown file setting {name!r}; known: {sorted(_SETTINGS)}")
                setattr(self, name, value)

    def reset(self) -> None:
        fresh = DifyFiles()
        with self.lock:
            for name in (*_SETTINGS, "upload_calls"):
                setattr(self, name, getattr(fresh, name))
            self.uploads.clear()
            self.transcriptions.clear()

    def parameters(self) -> dict[str, Any]:
        """/v1/parameters' file_upload, speech_to_text and system_parameters."""
        with self.lock:
            limits = {
                "file_size_limit": self.limits["file"],
                "image_file_size_limit": self.limits["image"],
                "video_file_size_limit": self.limits["video"],
                "audio_file_size_limit": self.limits["audio"],
                "batch_count_limit": 5,
                "workflow_file_upload_limit": 10,
            }
            image_on = self.enabled and "image" in self.allowed_file_types
            return {
                "file_upload": {
                    "enabled": self.enabled,
                    "image": {
                        "enabled": image_on,
                        "number_limits": self.number_limits,
                        "detail": "high",
                        "transfer_methods": list(self.allowed_file_upload_methods),
                    },
                    "allowed_file_types": list(self.allowed_file_types),
                    "allowed_file_extensions": list(self.allowed_file_extensions),
                    "allowed_file_upload_methods": list(self.allowed_file_upload_methods),
                    "number_limits": self.number_limits,
                    "fileUploadConfig": limits,
                },
                "speech_to_text": {"enabled": self.speech_to_text},
                "system_parameters": limits,
            }

    def limit_for(self, extension: str) -> int:
        kind = file_type(extension)
        with self.lock:
            return self.limits.get(kind if kind in ("image", "video", "audio") else "file", 15)

    def check_message_files(self, body: dict[str, Any]) -> list[dict[str, Any]] | Response:
        """The files a chat message uses, as Dify takes them (see the module doc)."""
        given = body.get("files") or []
        if not isinstance(given, list):
            return _error(400, "invalid_param", "files must be a list")
        with self.lock:
            if not self.enabled or not given:
                return []  # file upload off: Dify drops the files silently
            used = []
            for mapping in given:
                if not isinstance(mapping, dict):
                    return _error(400, "invalid_param", "a file must be an object")
                upload = self.uploads.get(str(mapping.get("upload_file_id") or ""))
                if mapping.get("transfer_method") != "local_file" or upload is None:
                    return _error(400, "invalid_param", "Invalid upload file id.")
                declared = str(mapping.get("type") or "")
                if not self._valid(declared, upload["extension"]):
                    return _error(
                        400, "invalid_param", f"File validation failed for file: {upload['name']}"
                    )
                used.append({**upload, "type": declared})
            return used

    def _valid(self, declared: str, extension: str) -> bool:
        """file_factory's check against the app's config (lock held)."""
        if declared != "custom" and file_type(extension) != declared:
            return False  # Dify: "Detected file type does not match the specified type"
        if declared != "custom" and declared not in self.allowed_file_types:
            return False
        if declared == "custom":
            allowed = {e.lower().lstrip(".") for e in self.allowed_file_extensions}
            if "custom" not in self.allowed_file_types or extension not in allowed:
                return False
        return "local_file" in self.allowed_file_upload_methods


_SETTINGS = frozenset(
    {
        "enabled",
        "allowed_file_types",
        "allowed_file_extensions",
        "allowed_file_upload_methods",
        "number_limits",
        "speech_to_text",
        "transcript",
        "limits",
    }
)


def describe(files: list[dict[str, Any]]) -> str:
    """What the double's answer says it received (so tests can see the files arrived)."""
    if not files:
        return ""
    return " [files: " + ", ".join(f"{f['type']}:{f['name']}" for f in files) + "]"


def _is_audio(head: bytes) -> bool:
    mp3 = head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    return mp3 or (head[:4] == b"RIFF" and head[8:12] == b"WAVE")


def mount_files(app: Flask, files: DifyFiles) -> None:
    """/v1/files/upload, /v1/audio-to-text and the control route of the settings."""

    @app.post("/v1/files/upload")
    def upload() -> Response:
        if "file" not in request.files:
            return _error(400, "no_file_uploaded", "Please upload your file.")
        if len(request.files) > 1:
            return _error(400, "too_many_files", "Only one file is allowed.")
        part = request.files["file"]
        name = part.filename or ""
        if not name:
            return _error(400, "filename_not_exists", "The specified filename does not exist.")
        if "/" in name or "\\" in name:
            return _error(400, "invalid_param", "Filename contains invalid characters")
        content = part.read()
        extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        limit = files.limit_for(extension)
        if len(content) > limit * MB:
            return _error(413, "file_too_large", f"File size exceeded. {limit} MB")
        record = {
            "id": str(uuid.uuid4()),
            "name": name,
            "size": len(content),
            "extension": extension,
            "mime_type": part.mimetype,
            "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, request.form.get("user", ""))),
            "created_at": int(time.time()),
        }
        with files.lock:
            files.upload_calls += 1
            files.uploads[str(record["id"])] = {**record, "_user": request.form.get("user", "")}
        response = jsonify(record)
        response.status_code = 201
        return response

    @app.post("/v1/audio-to-text")
    def audio_to_text() -> Response:
        with files.lock:
            enabled, transcript = files.speech_to_text, files.transcript
        if not enabled:
            return _error(400, "invalid_param", "Speech to text is not enabled")
        part = request.files.get("file")
        if part is None:
            return _error(400, "no_audio_uploaded", "Please upload your audio.")
        if part.mimetype not in AUDIO_TYPES:
            return _error(415, "unsupported_audio_type", "Audio type not allowed.")
        content = part.read()
        if len(content) > AUDIO_LIMIT:
            return _error(413, "audio_too_large", "Audio size larger than 30 mb")
        if not _is_audio(content[:16]):
            # A real model provider fails on bytes that are not the audio they claim.
            return _error(400, "completion_request_error", "the audio could not be decoded")
        with files.lock:
            files.transcriptions.append(
                {"user": request.form.get("user", ""), "bytes": len(content)}
            )
        return jsonify({"text": transcript})

    @app.post("/_double/files")
    def configure() -> Response | tuple[Response, int]:
        """JSON with any of the settings (enabled, allowed_file_types, …, speech_to_text)."""
        body = request.get_json(force=True, silent=True) or {}
        try:
            files.configure(**body)
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        return jsonify(files.parameters())
