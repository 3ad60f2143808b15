"""The media stage of a job: a member's image, file or voice note, from WeCom to Dify.

A media job runs in stored steps, so a worker killed anywhere resumes without repeating one:
  1. fetch the content into a temporary file in the data dir (self-built app: media/get by
     MediaId; AI bot: the message's URL, decrypted), at most WeCom's limit for the kind;
  2. check it: magic bytes against the declared type (and zip archives against bombs), then
     what the Dify app accepts (GET /parameters → file_upload: types, extensions, methods,
     size limits; speech_to_text for voice), read at most every few minutes;
  3. upload it (POST /files/upload as the member) or, for voice, convert AMR to MP3 with SoX
     and transcribe it (POST /audio-to-text); the upload_file_id or the transcript is stored on
     the job BEFORE Dify is asked — Dify's uploaded files are reusable by id, so a resumed job
     asks with the stored id instead of uploading again;
  4. ask Dify with `files` (local_file, upload_file_id), like a text question.
Refusals (type not accepted, too large, corrupt, expired, …) answer the member with the app's
text for the reason; transient failures (network, 5xx) defer the job and try again.

The caption window: WeCom delivers "image, then the text about it" as two messages. A media
job whose window has not passed yet is deferred (retry_later) instead of asked at once; being
older, it keeps the member's later jobs waiting behind it (the store claims a member's jobs in
order), so when it runs again the following text job, if one arrived within the window, is
still queued: its text is stored on the media job first, then the text job is finished
without an answer of its own. A crash between the two finishes it on the next run. No second
process and no timer: the store's order and its stored progress make it exactly once.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import requests

from wecom_bridge.channels.base import (
    MEDIA_FILE,
    MEDIA_IMAGE,
    MEDIA_VOICE,
    MediaRef,
)
from wecom_bridge.config import AppConfig
from wecom_bridge.dify.client import DifyClient
from wecom_bridge.errors import (
    DecryptError,
    DifyError,
    JobDeferredError,
    JobPayloadError,
    MediaRefusedError,
    MediaTransientError,
    WeComApiError,
)
from wecom_bridge.jobs.kinds import ChatJob, MediaJob, decode
from wecom_bridge.jobs.store import Job, Store
from wecom_bridge.wecom.aibot_media import download_decrypted, media_key
from wecom_bridge.wecom.api import MediaTooLargeError, WeComClient, filename_of

log = logging.getLogger("wecom_bridge.media")

MB = 1024 * 1024
# What WeCom lets members send (doc 90254/90389): image 10 MB, voice 2 MB (60 s AMR), file 20 MB.
WECOM_LIMITS = {MEDIA_IMAGE: 10 * MB, MEDIA_VOICE: 2 * MB, MEDIA_FILE: 20 * MB}
KIND_WORDS = {MEDIA_IMAGE: "图片", MEDIA_FILE: "文件", MEDIA_VOICE: "语音"}
MEDIA_DIR = "media-tmp"
# All temporary media together, at most: beyond it a job waits for others to finish.
TMP_BUDGET = 512 * MB
CONVERT_TIMEOUT = 30.0
VOICE_MAX_SECONDS = "120"  # WeCom's voice notes last at most 60 s
MP3_LIMIT = 8 * MB  # 60 s of voice is well under 1 MB as MP3
# A zip container (docx, xlsx, pptx, epub) unpacked at most this big, this many entries.
ZIP_MAX_UNPACKED = 200 * MB
ZIP_MAX_ENTRIES = 10_000
ZIP_MAX_RATIO = 200
# Result keys of the stored stages.
FILES_KEY = "media_files"
TRANSCRIPT_KEY = "transcript"
CAPTION_KEY = "caption"

# Dify's file types by extension (api/constants/__init__.py; documents as its default ETL).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "svg"})
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "mpeg", "webm"})
AUDIO_EXTENSIONS = frozenset({"mp3", "m4a", "wav", "amr", "mpga"})
DOCUMENT_EXTENSIONS = frozenset(
    {"txt", "markdown", "md", "mdx", "pdf", "html", "htm", "xlsx", "xls", "docx", "csv", "vtt"}
    | {"properties", "doc", "eml", "msg", "pptx", "xml", "epub"}
)
# Dify's default size limits (MB) when /parameters names none (UPLOAD_*_FILE_SIZE_LIMIT).
DIFY_DEFAULT_LIMITS = {"image": 10, "video": 100, "audio": 50, "document": 15, "custom": 15}
_LIMIT_NAMES = {
    "image": "image_file_size_limit",
    "video": "video_file_size_limit",
    "audio": "audio_file_size_limit",
}
TEXT_EXTENSIONS = frozenset(
    {"txt", "markdown", "md", "mdx", "csv", "html", "htm", "xml", "vtt", "properties", "eml"}
)
ZIP_EXTENSIONS = frozenset({"docx", "xlsx", "pptx", "epub"})
OLE_EXTENSIONS = frozenset({"doc", "xls", "msg", "ppt"})


def dify_type(extension: str) -> str:
    """Dify's file type (image, document, audio, video, custom) of an extension."""
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in DOCUMENT_EXTENSIONS:
        return "document"
    if extension in AUDIO_EXTENSIONS:
        return "audio"
    if extension in VIDEO_EXTENSIONS:
        return "video"
    return "custom"


# --- magic bytes -------------------------------------------------------------------------------


def sniff(head: bytes) -> str:
    """The extension the first bytes prove ("" when they prove none)."""
    signatures = (
        (b"\xff\xd8\xff", "jpg"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"GIF87a", "gif"),
        (b"GIF89a", "gif"),
        (b"%PDF-", "pdf"),
        (b"#!AMR\n", "amr"),
        (b"PK\x03\x04", "zip"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),
        (b"ID3", "mp3"),
    )
    for magic, extension in signatures:
        if head.startswith(magic):
            return extension
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[4:8] == b"ftyp":
        return "mp4"
    return ""


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a character cut at the end of the sample
    return True


def check_zip(path: Path) -> None:
    """Refuse a zip container that unpacks into far more than it is (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MediaRefusedError("corrupt", f"not a readable zip container: {exc}") from None
    unpacked = sum(entry.file_size for entry in entries)
    packed = max(1, sum(entry.compress_size for entry in entries))
    if len(entries) > ZIP_MAX_ENTRIES or unpacked > ZIP_MAX_UNPACKED:
        raise MediaRefusedError(
            "corrupt", f"zip container of {len(entries)} entries unpacks to {unpacked} bytes"
        )
    if unpacked / packed > ZIP_MAX_RATIO:
        raise MediaRefusedError("corrupt", f"zip container compressed {unpacked / packed:.0f}:1")


def verify_content(path: Path, extension: str, kind: str) -> str:
    """The extension the content really has (checked against what the message declared);
    MediaRefusedError("corrupt") when the bytes are not what they claim."""
    with path.open("rb") as fh:
        head = fh.read(64 * 1024)
    if not head:
        raise MediaRefusedError("corrupt", "empty content")
    found = sniff(head)
    if kind == MEDIA_IMAGE:
        if found not in ("jpg", "png", "gif", "webp"):
            raise MediaRefusedError("corrupt", f"an image whose bytes are {found or 'unknown'}")
        return found
    if kind == MEDIA_VOICE:
        if found != "amr":
            raise MediaRefusedError("corrupt", f"a voice note whose bytes are {found or 'unknown'}")
        return "amr"
    if not extension:  # a file without a name: what its bytes prove, if anything
        extension = {"zip": "", "ole": ""}.get(found, found)
        if not extension:
            raise MediaRefusedError("type", f"a file without a name whose bytes are {found}")
    _check_declared(path, extension, found, head)
    return extension


def _check_declared(path: Path, extension: str, found: str, head: bytes) -> None:
    expected = {"jpeg": "jpg", "pdf": "pdf", "png": "png", "gif": "gif", "webp": "webp"}
    wanted = "zip" if extension in ZIP_EXTENSIONS else expected.get(extension, extension)
    if extension in OLE_EXTENSIONS:
        wanted = "ole"
    if extension in TEXT_EXTENSIONS:
        if not _looks_like_text(head):
            raise MediaRefusedError("corrupt", f".{extension} that is not UTF-8 text")
        return
    if wanted in ("jpg", "png", "gif", "webp", "pdf", "zip", "ole", "amr", "wav") and (
        found != wanted
    ):
        raise MediaRefusedError("corrupt", f".{extension} whose bytes are {found or 'unknown'}")
    if wanted == "zip":
        check_zip(path)


# --- what the Dify app accepts -----------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    """The app's file_upload settings, as GET /parameters reports them."""

    enabled: bool
    types: frozenset[str]
    extensions: frozenset[str]  # for type custom, lower case without the dot
    methods: frozenset[str]
    image_methods: frozenset[str]
    number_limit: int
    limits_mb: Mapping[str, float]

    @classmethod
    def of(cls, features: Mapping[str, Any]) -> Acceptance:
        upload = _object(features.get("file_upload"))
        image = _object(upload.get("image"))
        types = set(_strings(upload.get("allowed_file_types")))
        image_on = bool(image.get("enabled"))
        if image_on:  # the older image-only setting still enables images
            types.add("image")
        config = _object(upload.get("fileUploadConfig") or features.get("system_parameters"))
        limits = {
            kind: float(config.get(_LIMIT_NAMES.get(kind, "file_size_limit")) or default)
            for kind, default in DIFY_DEFAULT_LIMITS.items()
        }
        return cls(
            enabled=bool(upload.get("enabled")) or image_on,
            types=frozenset(types),
            extensions=frozenset(
                e.lower().lstrip(".") for e in _strings(upload.get("allowed_file_extensions"))
            ),
            methods=frozenset(_strings(upload.get("allowed_file_upload_methods"))),
            image_methods=frozenset(_strings(image.get("transfer_methods"))),
            number_limit=int(upload.get("number_limits") or image.get("number_limits") or 3),
            limits_mb=limits,
        )

    def refusal(self, file_type: str, extension: str) -> str | None:
        """Why the app would not take a local file of this type ("" reasons: it would)."""
        if not self.enabled:
            return "the app has file upload off"
        if file_type == "custom" or file_type not in self.types:
            if "custom" in self.types and extension in self.extensions:
                return None
            return f"the app does not accept {file_type} files (.{extension})"
        methods = (
            self.image_methods if file_type == "image" and self.image_methods else self.methods
        )
        if methods and "local_file" not in methods:
            return "the app takes no uploaded files (local_file), only URLs"
        return None


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def speech_to_text_on(features: Mapping[str, Any]) -> bool:
    speech = features.get("speech_to_text")
    return isinstance(speech, dict) and bool(speech.get("enabled"))


# --- fetching ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    size: int
    filename: str  # as the sender named it, "" when nobody did


class MediaFetcher(Protocol):
    """How one channel gets the bytes of a member's media."""

    def fetch(self, ref: MediaRef, dest: IO[bytes], max_bytes: int) -> Fetched: ...


@dataclass(frozen=True)
class WeComMediaFetcher:
    """The self-built app: media/get with the app's access token."""

    client: WeComClient

    def fetch(self, ref: MediaRef, dest: IO[bytes], max_bytes: int) -> Fetched:
        try:
            media = self.client.download_media(ref.media_id, dest, max_bytes)
        except MediaTooLargeError as exc:
            raise MediaRefusedError("too_large", str(exc), limit=_mb(max_bytes)) from None
        except WeComApiError as exc:
            if exc.errcode == 40007:  # unknown, or older than 3 days
                raise MediaRefusedError("expired", f"media/get: {exc}") from None
            if exc.retryable:
                raise MediaTransientError(f"media/get: {exc}") from None
            raise MediaRefusedError("failed", f"media/get: {exc}") from None
        return Fetched(media.size, media.filename or ref.name)


@dataclass(frozen=True)
class AibotMediaFetcher:
    """The AI bot: the message's URL, decrypted with its aeskey or the bot's EncodingAESKey."""

    encoding_aes_key: str
    session: requests.Session

    def fetch(self, ref: MediaRef, dest: IO[bytes], max_bytes: int) -> Fetched:
        try:
            key = media_key(ref.aeskey, self.encoding_aes_key)
            size, disposition = download_decrypted(self.session, ref.url, key, dest, max_bytes)
        except MediaTooLargeError as exc:
            raise MediaRefusedError("too_large", str(exc), limit=_mb(max_bytes)) from None
        except (DecryptError, ValueError) as exc:
            raise MediaRefusedError("corrupt", f"AI bot media: {exc}") from None
        return Fetched(size, filename_of(disposition) if disposition else ref.name)


def _mb(size: float) -> str:
    return f"{size / MB:g} MB"


# --- the stage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """What to ask Dify: the question, the stored files, and what to show the member first."""

    query: str
    files: list[dict[str, str]]
    echo: str = ""


# Writes a progress record until it lands (JobProcessor._until_recorded).
Recorder = Callable[[Job, str, Callable[[], None]], None]


class MediaStage:
    def __init__(
        self,
        store: Store,
        data_dir: Path,
        fetchers: Mapping[str, MediaFetcher],
        *,
        sox: str = "sox",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`fetchers`: by app name; an app without one refuses media ("failed")."""
        self.store = store
        self.tmp_dir = data_dir / MEDIA_DIR
        self.fetchers = fetchers
        self.sox = sox
        self._clock = clock

    def clean(self) -> int:
        """Remove what a killed process left in the temporary dir (at the job side's start:
        nothing else writes there). Returns how many files went. An unusable data dir is
        not fatal here (the bridge stays up, not ready); media jobs wait until it is usable."""
        removed = 0
        try:
            self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for leftover in self.tmp_dir.iterdir():
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed += 1
        except OSError as exc:
            log.warning(
                "cannot clean the temporary media dir",
                extra={"event": "media_tmp_unusable", "path": str(self.tmp_dir), "error": str(exc)},
            )
            return removed
        if removed:
            log.info("removed %d stale temporary media file(s)", removed)
        return removed

    def prepare(
        self,
        job: Job,
        spec: MediaJob,
        config: AppConfig,
        dify: DifyClient,
        record: Recorder,
        *,
        caption_seconds: float,
    ) -> Prepared:
        """The question for Dify, after the stored stages (each done at most once).
        `caption_seconds`: the caption window (0: none)."""
        result = job.result or {}
        files = result.get(FILES_KEY)
        transcript = result.get(TRANSCRIPT_KEY)
        if not isinstance(files, list) and not isinstance(transcript, str):
            files, transcript = self._transfer(job, spec, dify)
            key, value = (
                (TRANSCRIPT_KEY, transcript) if transcript is not None else (FILES_KEY, files)
            )
            record(job, key, lambda: self.store.note_result(job.id, key, value))
        texts = [spec.text]
        if isinstance(transcript, str):
            texts.append(transcript)
        else:
            texts.append(self._caption(job, spec, caption_seconds, record))
        query = "\n".join(t for t in texts if t) or config.media.default_query.replace(
            "{kind}", KIND_WORDS[spec.media[0].kind]
        )
        echo = ""
        if isinstance(transcript, str) and config.replies.voice_echo:
            echo = config.replies.voice_echo.replace("{text}", transcript)
        stored = files if isinstance(files, list) else []
        return Prepared(query, [dict(f) for f in stored if isinstance(f, dict)], echo)

    # --- caption window ---------------------------------------------------------------------

    def _caption(self, job: Job, spec: MediaJob, window: float, record: Recorder) -> str:
        result = job.result or {}
        taken = result.get(CAPTION_KEY)
        if isinstance(taken, dict):  # taken before a crash: make sure its job is finished
            caption_job = int(taken.get("job_id") or 0)
            record(job, "caption job finished", lambda: self.store.finish(caption_job))
            return str(taken.get("text") or "")
        if window <= 0 or spec.text:
            return ""
        due = job.received_at + window
        following = self.store.next_in_line(job.app, job.user, job.id)
        if following is not None:
            text = _chat_text(following)
            if text is not None and following.received_at <= due:
                return self._absorb(job, following, text, record)
            return ""  # something else comes next: it should not wait
        now = self._clock()
        if now < due:
            raise JobDeferredError(due - now, "waiting for a caption")
        return ""

    def _absorb(self, job: Job, caption: Job, text: str, record: Recorder) -> str:
        value = {"job_id": caption.id, "text": text}
        record(job, "caption", lambda: self.store.note_result(job.id, CAPTION_KEY, value))
        record(job, "caption job finished", lambda: self.store.finish(caption.id))
        log.info(
            "the member's next message is the caption of their media: one question",
            extra={"job_id": job.id, "caption_job": caption.id, "event": "media_caption"},
        )
        return text

    # --- fetch, check, upload -----------------------------------------------------------------

    def _transfer(
        self, job: Job, spec: MediaJob, dify: DifyClient
    ) -> tuple[list[dict[str, str]], str | None]:
        fetcher = self.fetchers.get(job.app)
        if fetcher is None:
            raise MediaRefusedError("failed", f"app {job.app} has no way to fetch media")
        features = _features(dify)
        if spec.media[0].kind == MEDIA_VOICE:
            if not speech_to_text_on(features):
                raise MediaRefusedError("voice_off", "the Dify app has speech to text off")
            return [], self._transcribe(job, spec.media[0], fetcher, dify)
        accepts = Acceptance.of(features)
        refs = list(spec.media)
        if len(refs) > accepts.number_limit:
            log.warning(
                "more files than the app takes at once; asking with the first ones",
                extra={
                    "job_id": job.id,
                    "event": "media_number_limit",
                    "limit": accepts.number_limit,
                },
            )
            refs = refs[: accepts.number_limit]
        return [self._upload(job, ref, fetcher, dify, accepts) for ref in refs], None

    def _upload(
        self, job: Job, ref: MediaRef, fetcher: MediaFetcher, dify: DifyClient, accepts: Acceptance
    ) -> dict[str, str]:
        if ref.kind == MEDIA_IMAGE:  # known before the download: spare it when refused
            refusal = accepts.refusal("image", "jpg")
            if refusal:
                raise MediaRefusedError("type", refusal, kind=KIND_WORDS[ref.kind])
        with self._temporary(job) as path:
            fetched = self._fetch(fetcher, ref, path)
            declared = Path(fetched.filename).suffix.lower().lstrip(".")
            extension = verify_content(path, declared, ref.kind)
            file_type = dify_type(extension)
            refusal = accepts.refusal(file_type, extension)
            if refusal:
                raise MediaRefusedError("type", refusal, kind=KIND_WORDS[ref.kind])
            limit = accepts.limits_mb.get(file_type, DIFY_DEFAULT_LIMITS["document"]) * MB
            if fetched.size > limit:
                raise MediaRefusedError(
                    "too_large",
                    f"{fetched.size} bytes, the app takes {limit:.0f}",
                    limit=_mb(limit),
                )
            name = _upload_name(fetched.filename, ref, extension)
            mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
            with path.open("rb") as content:
                uploaded = _dify_call(lambda: dify.upload_file(job.user, name, content, mime), ref)
        log.info(
            "member's media uploaded to Dify",
            extra={
                "job_id": job.id,
                "event": "media_uploaded",
                "kind": ref.kind,
                "type": file_type,
                "bytes": fetched.size,
            },
        )
        return {
            "type": file_type,
            "transfer_method": "local_file",
            "upload_file_id": str(uploaded.get("id") or ""),
        }

    def _transcribe(self, job: Job, ref: MediaRef, fetcher: MediaFetcher, dify: DifyClient) -> str:
        with self._temporary(job) as amr, self._temporary(job) as mp3:
            self._fetch(fetcher, ref, amr)
            verify_content(amr, "amr", MEDIA_VOICE)
            self._convert(amr, mp3)
            with mp3.open("rb") as content:
                heard = _dify_call(
                    lambda: dify.audio_to_text(job.user, "voice.mp3", content, "audio/mp3"), ref
                )
        text = str(heard).strip()
        if not text:
            raise MediaRefusedError("no_speech", "Dify heard nothing in the voice note")
        log.info(
            "member's voice note transcribed",
            extra={"job_id": job.id, "event": "voice_transcribed", "chars": len(text)},
        )
        return text

    def _fetch(self, fetcher: MediaFetcher, ref: MediaRef, path: Path) -> Fetched:
        with path.open("wb") as dest:
            return fetcher.fetch(ref, dest, WECOM_LIMITS[ref.kind])

    def _convert(self, source: Path, target: Path) -> None:
        """AMR → MP3 (mono, 16 kHz: what speech models take) with SoX (Debian's sox with its
        AMR-NB and MP3 formats, 64 MB in the image where ffmpeg's libraries take 600): an
        argument list, no shell, a timeout, at most VOICE_MAX_SECONDS, the output checked."""
        command = [
            self.sox,
            *("-V1", "-t", "amr-nb", str(source)),
            *("-t", "mp3", "-r", "16000", "-c", "1", str(target)),
            *("trim", "0", VOICE_MAX_SECONDS),
        ]
        try:
            done = subprocess.run(  # noqa: S603 - a fixed argument list, no shell
                command, capture_output=True, timeout=CONVERT_TIMEOUT, check=False
            )
        except FileNotFoundError:  # an image or host without it
            raise MediaRefusedError("voice_off", f"sox not found ({self.sox})") from None
        except subprocess.TimeoutExpired:
            raise MediaRefusedError("corrupt", "sox took too long on the voice note") from None
        size = target.stat().st_size if target.exists() else 0
        if done.returncode != 0 or size == 0 or size > MP3_LIMIT:
            problem = done.stderr[-300:].decode("utf-8", errors="replace").strip()
            raise MediaRefusedError("corrupt", f"sox could not convert the voice: {problem}")

    @contextmanager
    def _temporary(self, job: Job) -> Iterator[Path]:
        """A private temporary file in the data dir, removed afterwards whatever happens."""
        try:
            self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            used = sum(p.stat().st_size for p in self.tmp_dir.iterdir() if p.is_file())
            if used > TMP_BUDGET:
                raise MediaTransientError(f"temporary media uses {used} bytes: waiting for room")
            fd, name = tempfile.mkstemp(prefix=f"job{job.id}-", dir=self.tmp_dir)
        except OSError as exc:  # a full or unwritable data dir: later, not never
            raise MediaTransientError(f"no temporary file in {self.tmp_dir}: {exc}") from None
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


def _chat_text(job: Job) -> str | None:
    """The question of a text job (None: another kind of job)."""
    if job.kind != ChatJob.KIND:
        return None
    try:
        spec = decode(job.kind, job.payload)
    except JobPayloadError:
        return None
    return spec.query if isinstance(spec, ChatJob) else None


def _features(dify: DifyClient) -> dict[str, Any]:
    try:
        return dify.app_features()
    except DifyError as exc:
        if exc.retryable:
            raise MediaTransientError(f"Dify /parameters: {exc}") from None
        raise MediaRefusedError("failed", f"Dify /parameters: {exc}") from None


def _dify_call(call: Callable[[], Any], ref: MediaRef) -> Any:
    """An upload or transcription, its errors as Dify emits them turned into refusals."""
    try:
        return call()
    except DifyError as exc:
        kind = KIND_WORDS[ref.kind]
        if exc.retryable:
            raise MediaTransientError(f"Dify: {exc}") from None
        if exc.code in ("file_too_large", "audio_too_large"):
            raise MediaRefusedError("too_large", f"Dify: {exc}", kind=kind) from None
        if exc.code in (
            "unsupported_file_type",
            "unsupported_audio_type",
            "file_extension_blocked",
        ):
            raise MediaRefusedError("type", f"Dify: {exc}", kind=kind) from None
        if exc.code == "provider_not_support_speech_to_text":
            raise MediaRefusedError("voice_off", f"Dify: {exc}") from None
        raise MediaRefusedError("failed", f"Dify: {exc.code}: {exc}", kind=kind) from None


def _upload_name(filename: str, ref: MediaRef, extension: str) -> str:
    """The name Dify stores: the member's, or one made of the kind and the real extension
    (Dify picks the type and size limit by the extension; no path separators)."""
    base = Path(filename.replace("\\", "/")).name if filename else ""
    stem = Path(base).stem if base else ref.kind
    return f"{stem[:100] or ref.kind}.{extension}"
