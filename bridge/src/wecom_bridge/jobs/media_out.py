"""Dify's images and files in an answer: planned as parts, then transferred part by part.

Planning: the answer's text and Dify's `message_file` events become one ordered list of parts.
Markdown images `![alt](url)` and links `[name](url)` to Dify's files (/files/…) are cut out of
the text as media parts, in the answer's order; the text around them is split as usual; the
event files follow the text (unless the text already showed them). Relative links are resolved
against the app's files base. Every media part is stored as the text that replaces it when it
cannot be sent (a working link), and the job's result says which parts are media, so the text
parts and the counter of parts sent work as for any answer.

Transfer (one media part): download from Dify (dify/files.py: safe address, size cap, deadline),
check the bytes against what they claim and WeCom's limits (an image that is too large or not
JPG/PNG goes as a file, a file over 20 MB as a link), upload, send. Progress is stored on the job
(`media_<index>`: downloaded, then uploaded with the media_id and its creation time) before the
next step, so a job resumed after a crash neither uploads nor sends twice; a media_id older than
three days is uploaded again. Anything that fails to transfer is sent as its link text, never
silence; a WeCom error that may pass (network, busy) retries the job instead.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from wecom_bridge.channels.base import (
    MediaOutbound,
    Outbound,
    StreamFinish,
    StreamImageOutbound,
    Target,
)
from wecom_bridge.config import MediaSettings
from wecom_bridge.dify.client import DifyFile, DifySettings
from wecom_bridge.dify.files import DifyFileFetcher, FileFetchError, absolute, origin_of
from wecom_bridge.errors import BridgeError, WeComApiError
from wecom_bridge.jobs.splitter import split_message
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.aibot_frames import STREAM_IMAGE_LIMIT, StreamImage
from wecom_bridge.wecom.messages import SendResult
from wecom_bridge.wecom.uploads import (
    ERR_MEDIA_ID,
    FILE_LIMIT,
    IMAGE_LIMIT,
    MIN_BYTES,
    UploadedMedia,
)

log = logging.getLogger("wecom_bridge.media")

MEDIA_KEY = "media"  # the job result's {index: MediaRef} of the parts that are media
STREAM_IMAGES_KEY = "stream_images"  # the job result's [MediaRef] riding on the stream finish
STREAM_TEXT_KEY = "stream_text"  # the job result's text of that finish, once decided
# The bytes of all the images of one finishing reply: a refresh after the finish is answered
# with all of them from the store, as base64 in an encrypted envelope (about ×1.8 on the wire).
STREAM_IMAGES_BUDGET = STREAM_IMAGE_LIMIT
PROGRESS_PREFIX = "media_"  # the job result's media_<index>: that part's transfer progress
IMAGE, FILE = "image", "file"
# Downloads at once (each at most FILE_LIMIT): bounds the data dir's temporary files.
MAX_PARALLEL_DOWNLOADS = 4
STALE_SECONDS = 24 * 3600.0  # temporary files left by a crash are removed after this
MEDIA_DIR = "media-out"  # in the data dir: files between download and upload

# ![alt](url "title") and [name](url "title"); the URL may be in <…>.
_MARKDOWN_LINK = re.compile(
    r"(?P<bang>!?)\[(?P<label>[^\]\n]{0,200})\]\(\s*<?(?P<url>[^\s)<>]+)>?(?:\s+\"[^\"\n]*\")?\s*\)"
)
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
SENDABLE_IMAGES = frozenset({"png", "jpeg"})  # what WeCom takes as an image message


@dataclass(frozen=True)
class MediaRef:
    """One media part: what Dify claims it is, where it is (absolute), what it is called."""

    kind: str  # image | file
    url: str
    name: str

    def payload(self) -> dict[str, str]:
        return {"kind": self.kind, "url": self.url, "name": self.name}


@dataclass(frozen=True)
class AnswerPlan:
    parts: list[str]
    media: dict[int, MediaRef]
    # The images the first part's stream finish carries (a StreamImageOutbound), in order.
    images: tuple[MediaRef, ...] = ()

    def result(self) -> dict[str, object]:
        """What the job's result keeps of the plan (empty when the answer has no media)."""
        kept: dict[str, object] = {}
        if self.media:
            kept[MEDIA_KEY] = {str(i): ref.payload() for i, ref in self.media.items()}
        if self.images:
            kept[STREAM_IMAGES_KEY] = [ref.payload() for ref in self.images]
        return kept


def _ref_of(value: Mapping[str, object]) -> MediaRef:
    return MediaRef(
        kind=str(value.get("kind") or FILE),
        url=str(value.get("url") or ""),
        name=str(value.get("name") or ""),
    )


def stored_media(result: Mapping[str, object]) -> dict[int, MediaRef]:
    """The media parts a stored job result names (a result without any: none)."""
    raw = result.get(MEDIA_KEY)
    refs: dict[int, MediaRef] = {}
    if not isinstance(raw, dict):
        return refs
    for key, value in raw.items():
        if str(key).isdigit() and isinstance(value, dict):
            refs[int(key)] = _ref_of(value)
    return refs


def stored_stream_images(result: Mapping[str, object]) -> tuple[MediaRef, ...]:
    """The images a stored job result attaches to its stream's finish (none: empty)."""
    raw = result.get(STREAM_IMAGES_KEY)
    if not isinstance(raw, list):
        return ()
    return tuple(_ref_of(value) for value in raw if isinstance(value, dict))


def is_dify_file(url: str, settings: DifySettings) -> bool:
    """A link to Dify's own files: relative /files/…, or /files/… at one of Dify's origins."""
    if url.startswith("/files/"):
        return True
    if not url.startswith(("http://", "https://")):
        return False
    origins = {origin_of(settings.files_base), origin_of(settings.api_base)}
    path = url.split("://", 1)[1].partition("/")[2]
    return origin_of(url) in origins and path.startswith("files/")


def fetch_url(url: str, settings: DifySettings) -> str:
    """Where the bridge downloads a file from: a link at the files base (Dify's public
    FILES_URL, often unreachable from inside) goes to the same path at DIFY_API_BASE's origin,
    where Dify's nginx serves /files too; the signature does not name the host."""
    files_origin = settings.files_base.rstrip("/")
    if settings.files_url and url.startswith(files_origin + "/files/"):
        parts = urlsplit(settings.api_base)
        return f"{parts.scheme}://{parts.netloc}" + url[len(files_origin) :]
    return url


def _name_of(url: str, label: str, kind: str) -> str:
    if label.strip():
        return label.strip()
    last = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return last or ("图片" if kind == IMAGE else "文件")


def _path_of(url: str) -> str:
    return url.split("?", 1)[0].split("://", 1)[-1].partition("/")[2]


def plan_answer(
    text: str,
    files: Sequence[DifyFile],
    settings: DifySettings,
    media: MediaSettings,
    limit: int,
    *,
    inline: bool = False,
    stream_images: int = 0,
) -> AnswerPlan:
    """The answer as ordered parts (see the module doc). `inline`: the channel sends no media
    (or media is off): each file becomes its link text within the text, which is split as
    usual — as few parts as before (微信客服 allows 5 messages, a webhook bot 2).
    `stream_images`: the channel's finishing stream reply carries up to that many images;
    they leave the text and ride on the first part, the rest is as `inline`."""
    pieces = _pieces(text, files, settings)
    if not any(isinstance(piece, MediaRef) for piece in pieces):
        return AnswerPlan(split_message(text, limit) if text else [], {})
    if stream_images > 0:
        return _plan_stream(pieces, media, limit, stream_images)
    if inline:
        return AnswerPlan(split_message(_linked(pieces, media), limit), {})
    parts: list[str] = []
    refs: dict[int, MediaRef] = {}
    for piece in pieces:
        if isinstance(piece, MediaRef):
            refs[len(parts)] = piece
            parts.append(media.link_text.format(name=piece.name, url=piece.url))
        elif piece.strip():
            parts.extend(split_message(piece.strip(), limit))
    return AnswerPlan(parts, refs)


def _linked(pieces: Sequence[str | MediaRef], media: MediaSettings) -> str:
    """The pieces as one text, each media piece as its link text."""
    linked = "\n\n".join(
        (media.link_text.format(name=p.name, url=p.url) if isinstance(p, MediaRef) else p).strip()
        for p in pieces
    )
    return re.sub(r"\n{3,}", "\n\n", linked).strip()


def link_texts(refs: Sequence[MediaRef], media: MediaSettings) -> str:
    """The link texts of media that could not be sent as media, to follow a text."""
    return "\n\n".join(media.link_text.format(name=r.name, url=r.url) for r in refs)


def _plan_stream(
    pieces: Sequence[str | MediaRef], media: MediaSettings, limit: int, most: int
) -> AnswerPlan:
    images = [p for p in pieces if isinstance(p, MediaRef) and p.kind == IMAGE][:most]
    if not images:  # files only: links, as on any channel without media
        return AnswerPlan(split_message(_linked(pieces, media), limit), {})
    rest = [p for p in pieces if not any(p is image for image in images)]
    text = _linked(rest, media) or images[0].name
    # Room in the first part for the images' links, should some not go as images.
    reserve = min(limit // 2, len(link_texts(images, media).encode()) + 2)
    parts = split_message(text, limit - reserve)
    return AnswerPlan(parts, {}, tuple(images))


def _pieces(text: str, files: Sequence[DifyFile], settings: DifySettings) -> list[str | MediaRef]:
    """The answer's text cut at its media (markdown images, links to Dify's files), then the
    event files it does not show already."""
    base = settings.files_base
    pieces: list[str | MediaRef] = []
    seen: set[str] = set()
    cursor = 0
    for match in _MARKDOWN_LINK.finditer(text):
        url = match.group("url")
        image = bool(match.group("bang"))
        relative_or_http = url.startswith(("/", "http://", "https://"))
        if not relative_or_http or not (image or is_dify_file(url, settings)):
            continue  # an ordinary link stays text
        kind = IMAGE if image else FILE
        full = absolute(url, base)
        pieces.append(text[cursor : match.start()])
        pieces.append(MediaRef(kind, full, _name_of(full, match.group("label"), kind)))
        seen.add(_path_of(full))
        cursor = match.end()
    pieces.append(text[cursor:])
    for attached in files:
        full = absolute(attached.url, base)
        if _path_of(full) in seen:
            continue  # the text already shows it
        seen.add(_path_of(full))
        kind = IMAGE if attached.type == IMAGE else FILE
        pieces.append(MediaRef(kind, full, _name_of(full, attached.filename, kind)))
    return pieces


def without_images(text: str) -> str:
    """`text` without its markdown images (a stream shows the text while it is written; the
    images follow as images once the answer is complete), nor one still being written."""
    cleaned = _MARKDOWN_LINK.sub(lambda m: "" if m.group("bang") else m.group(0), text)
    unfinished = cleaned.rfind("![")
    return cleaned[:unfinished] if unfinished >= 0 else cleaned


def sniff(head: bytes) -> str | None:
    """The image format the first bytes say, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


class MediaRefusedError(BridgeError):
    """A media part that will not be sent as media: `text` is what the member gets instead
    (None: the part's link text)."""

    def __init__(self, reason: str, detail: str, text: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.text = text


class _MediaIdGoneError(BridgeError):
    """WeCom refused a stored media_id (40007)."""


@dataclass(frozen=True)
class Prepared:
    path: Path
    kind: str  # what it is sent as: image | file
    filename: str


# The processor's "write until it lands" (jobs/processor.py JobProcessor._until_recorded).
Recorder = Callable[[str, Callable[[], None]], None]


@dataclass(frozen=True)
class PartTransfer:
    """What one media part's transfer needs of its job."""

    job_id: int
    result: Mapping[str, object]
    note: Callable[[str, object], None]  # store one more fact on the job's result
    record: Recorder


class MediaSender:
    """Transfers media parts (see the module doc); one per job process."""

    def __init__(
        self,
        directory: Path,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        fetcher_for: Callable[[DifySettings, MediaSettings], DifyFileFetcher] | None = None,
    ) -> None:
        self.directory = directory
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._fetcher_for = fetcher_for or _fetcher
        self._downloads = threading.BoundedSemaphore(MAX_PARALLEL_DOWNLOADS)
        self._ready = False  # the directory is made (and swept) at the first download
        self._ready_lock = threading.Lock()

    def send(
        self,
        job: PartTransfer,
        index: int,
        ref: MediaRef,
        target: Target,
        outbound: Outbound,
        settings: tuple[DifySettings | None, MediaSettings],
        link_text: str,
    ) -> SendResult:
        """Send part `index` as media, or as its link text when it cannot be."""
        dify, media = settings
        fields = {"job_id": job.job_id, "part": index + 1, "url": _loggable(ref.url)}
        if not media.enabled or dify is None or not isinstance(outbound, MediaOutbound):
            return outbound.send_part(target, link_text)
        try:
            result, kind = self._transfer(job, index, ref, target, outbound, (dify, media), fields)
        except (MediaRefusedError, OSError) as problem:
            self._discard(job.job_id, index)
            return outbound.send_part(target, self._degraded(problem, ref, link_text, fields))
        self._discard(job.job_id, index)
        self._sent(kind, fields)
        return result

    def _degraded(
        self, problem: Exception, ref: MediaRef, link_text: str, fields: Mapping[str, object]
    ) -> str:
        """Log and count a media part that goes as a text, and say which text."""
        refused = (
            problem
            if isinstance(problem, MediaRefusedError)
            else MediaRefusedError("storage", f"temporary file: {problem}")
        )
        log.warning(
            "media not sent as media (%s); sending a text instead",
            refused,
            extra={**fields, "event": "media_degraded", "reason": refused.reason},
        )
        self._metrics.inc(
            "wecom_bridge_media_out_total", {"outcome": "degraded", "reason": refused.reason}
        )
        return refused.text.format(name=ref.name, url=ref.url) if refused.text else link_text

    def _sent(self, kind: str, fields: Mapping[str, object]) -> None:
        self._metrics.inc("wecom_bridge_media_out_total", {"outcome": "sent", "reason": ""})
        log.info("media sent", extra={**fields, "event": "media_sent", "kind": kind})

    def _transfer(
        self,
        job: PartTransfer,
        index: int,
        ref: MediaRef,
        target: Target,
        outbound: MediaOutbound,
        settings: tuple[DifySettings, MediaSettings],
        fields: Mapping[str, object],
    ) -> tuple[SendResult, str]:
        """Upload (unless a fresh media_id is stored) and send; (WeCom's answer, the kind)."""
        progress = job.result.get(f"{PROGRESS_PREFIX}{index}")
        uploaded = _uploaded(progress if isinstance(progress, dict) else {})
        if uploaded is None or uploaded[0].expired(self._clock()):
            uploaded = self._upload(job, index, ref, outbound, settings, fields)
        try:
            return self._send_uploaded(target, outbound, uploaded, ref.name), uploaded[1]
        except _MediaIdGoneError:
            # WeCom no longer knows the media_id (expired early): upload once more.
            log.info("WeCom refused the media_id; uploading again", extra=dict(fields))
        uploaded = self._upload(job, index, ref, outbound, settings, fields)
        try:
            return self._send_uploaded(target, outbound, uploaded, ref.name), uploaded[1]
        except _MediaIdGoneError:
            raise MediaRefusedError("send_refused", "WeCom refused a fresh media_id") from None

    def finish_stream(
        self,
        job: PartTransfer,
        images: Sequence[MediaRef],
        target: Target,
        outbound: StreamImageOutbound,
        settings: tuple[DifySettings | None, MediaSettings],
        text: str,
    ) -> SendResult:
        """The first part on a StreamImageOutbound: `text` finishing the stream with the
        answer's images; one that cannot go as an image follows the text as its link. The
        text the finish carries is stored first, so a job resumed after the finish knows it
        was delivered."""
        dify, media = settings
        fallback = _joined(text, link_texts(images, media))
        done = job.result.get(STREAM_TEXT_KEY)
        finish = outbound.stream_finish(target, done if isinstance(done, str) else text)
        if finish is StreamFinish.DELIVERED:
            return SendResult(msgid="")
        if dify is None or finish is StreamFinish.CLOSED:
            return outbound.send_part(target, fallback)  # too late for images: their links
        attached, instead = self._stream_images(job, images, (dify, media))
        final = _joined(text, "\n\n".join(instead))
        job.record("stream text", lambda: job.note(STREAM_TEXT_KEY, final))
        sent = outbound.finish_with_images(target, final, attached, fallback)
        for n in range(len(images)):
            self._discard(job.job_id, f"s{n}")
        return sent

    def _stream_images(
        self,
        job: PartTransfer,
        images: Sequence[MediaRef],
        settings: tuple[DifySettings, MediaSettings],
    ) -> tuple[list[StreamImage], list[str]]:
        """The images that can ride on the finish (JPG/PNG within WeCom's limits and the
        reply's budget), and the texts that follow the answer for those that cannot."""
        attached: list[StreamImage] = []
        instead: list[str] = []
        budget = STREAM_IMAGES_BUDGET
        for n, ref in enumerate(images):
            fields = {"job_id": job.job_id, "image": n + 1, "url": _loggable(ref.url)}
            try:
                prepared = self._prepare(job, f"s{n}", ref, settings, fields)
                data = prepared.path.read_bytes()
                if prepared.kind != IMAGE or len(data) > budget:
                    raise MediaRefusedError(
                        "not_for_stream", f"{len(data)} bytes, sent as {prepared.kind}"
                    )
            except (MediaRefusedError, OSError) as problem:
                link = settings[1].link_text.format(name=ref.name, url=ref.url)
                instead.append(self._degraded(problem, ref, link, fields))
                continue
            budget -= len(data)
            attached.append(StreamImage.of(data))
            self._sent(IMAGE, fields)
        return attached, instead

    def cleanup(self, job_id: int) -> None:
        """Remove what a finished job left (a part that failed mid-way, a .part file)."""
        if not self.directory.is_dir():
            return
        for leftover in self.directory.glob(f"{job_id}-*"):
            leftover.unlink(missing_ok=True)

    # --- the steps --------------------------------------------------------------------------

    def _upload(
        self,
        job: PartTransfer,
        index: int,
        ref: MediaRef,
        outbound: MediaOutbound,
        settings: tuple[DifySettings, MediaSettings],
        fields: Mapping[str, object],
    ) -> tuple[UploadedMedia, str]:
        prepared = self._prepare(job, str(index), ref, settings, fields)
        try:
            uploaded = outbound.upload_media(prepared.kind, prepared.path, prepared.filename)
        except WeComApiError as exc:
            if exc.retryable:
                raise  # the job is retried; what was downloaded is kept
            raise MediaRefusedError("upload_refused", f"WeCom refused the upload: {exc}") from None
        progress = {
            "stage": "uploaded",
            "media_id": uploaded.media_id,
            "created_at": uploaded.created_at,
            "kind": prepared.kind,
        }
        key = f"{PROGRESS_PREFIX}{index}"
        job.record(f"part {index + 1} uploaded", lambda: job.note(key, progress))
        return uploaded, prepared.kind

    def _prepare(
        self,
        job: PartTransfer,
        slot: str,
        ref: MediaRef,
        settings: tuple[DifySettings, MediaSettings],
        fields: Mapping[str, object],
    ) -> Prepared:
        """Download (unless kept from before a crash) and check; `slot` names the file and
        its progress key (a part's index, or s<n> for a stream's image n)."""
        dify, media = settings
        dest = self.directory / f"{job.job_id}-{slot}"
        progress = job.result.get(f"{PROGRESS_PREFIX}{slot}")
        kept = progress if isinstance(progress, dict) else {}
        downloaded_before = kept.get("stage") == "downloaded" and dest.exists()
        if downloaded_before and dest.stat().st_size == kept.get("size"):
            return Prepared(dest, str(kept.get("kind") or FILE), str(kept.get("filename")))
        self._prepare_directory()
        with self._downloads:
            try:
                fetched = self._fetcher_for(dify, media).fetch(
                    fetch_url(ref.url, dify), dest, FILE_LIMIT
                )
            except FileFetchError as exc:
                text = {"too_large": media.too_large_text, "refused": media.refused_text}.get(
                    exc.reason
                )
                raise MediaRefusedError(exc.reason, exc.detail, text) from None
        kind = self._kind_of(ref, dest, fetched.size, media)
        filename = _filename(ref, fetched.filename, dest)
        prepared = Prepared(dest, kind, filename)
        downloaded = {
            "stage": "downloaded",
            "size": fetched.size,
            "kind": kind,
            "filename": filename,
        }
        key = f"{PROGRESS_PREFIX}{slot}"
        job.record(f"media {slot} downloaded", lambda: job.note(key, downloaded))
        log.info(
            "media downloaded",
            extra={**fields, "event": "media_downloaded", "bytes": fetched.size, "kind": kind},
        )
        return prepared

    @staticmethod
    def _kind_of(ref: MediaRef, path: Path, size: int, media: MediaSettings) -> str:
        """What the bytes may be sent as; MediaRefusedError when they may not be sent."""
        if size < MIN_BYTES:
            raise MediaRefusedError("empty", f"{size} bytes", media.refused_text)
        with path.open("rb") as head_file:
            found = sniff(head_file.read(16))
        if ref.kind != IMAGE:
            return FILE
        if found is None:
            raise MediaRefusedError(
                "not_an_image",
                "claims to be an image, the bytes say otherwise",
                media.refused_text,
            )
        # WeCom shows JPG/PNG up to 10 MB as an image; a GIF, WebP, BMP or a larger one is
        # still worth sending, as a file.
        return IMAGE if found in SENDABLE_IMAGES and size <= IMAGE_LIMIT else FILE

    @staticmethod
    def _send_uploaded(
        target: Target, outbound: MediaOutbound, uploaded: tuple[UploadedMedia, str], caption: str
    ) -> SendResult:
        try:
            return outbound.send_media(target, uploaded[1], uploaded[0].media_id, caption)
        except WeComApiError as exc:
            if exc.errcode == ERR_MEDIA_ID:
                raise _MediaIdGoneError from None
            if exc.retryable:
                raise
            raise MediaRefusedError("send_refused", str(exc)) from None

    def _discard(self, job_id: int, slot: int | str) -> None:
        (self.directory / f"{job_id}-{slot}").unlink(missing_ok=True)

    def _prepare_directory(self) -> None:
        """Made when first needed: the data dir may be unusable when the bridge starts (the
        operator fixes the volume later); a file that cannot be stored goes as its link."""
        with self._ready_lock:
            if self._ready:
                return
            try:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise MediaRefusedError("storage", f"{self.directory}: {exc}") from None
            self._sweep()
            self._ready = True

    def _sweep(self) -> None:
        cutoff = self._clock() - STALE_SECONDS
        for leftover in self.directory.iterdir():
            try:
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
            except OSError:
                continue


def _uploaded(progress: Mapping[str, object]) -> tuple[UploadedMedia, str] | None:
    media_id = progress.get("media_id")
    created_at = progress.get("created_at")
    if progress.get("stage") != "uploaded" or not isinstance(media_id, str) or not media_id:
        return None
    if not isinstance(created_at, int | float):
        return None
    kind = str(progress.get("kind") or FILE)
    return UploadedMedia(media_id, float(created_at), kind), kind


def _filename(ref: MediaRef, served: str, dest: Path) -> str:
    """The name the member sees: the link's text when it has an extension, else the server's."""
    for name in (ref.name, served):
        if "." in name and "/" not in name and len(name) <= 128:
            return name
    return served or dest.name


def _joined(text: str, links: str) -> str:
    return f"{text}\n\n{links}" if text and links else text or links


def _loggable(url: str) -> str:
    """A URL without its query (Dify's signature)."""
    return url.split("?", 1)[0]


def _fetcher(dify: DifySettings, media: MediaSettings) -> DifyFileFetcher:
    return DifyFileFetcher((dify.files_base, dify.api_base), timeout=media.timeout)
