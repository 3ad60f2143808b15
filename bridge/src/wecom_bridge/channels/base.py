"""What every channel hands the pipeline, and what the pipeline asks of every channel.

A channel is how messages arrive (an inbound adapter: verify, decode, normalise into one
`InboundMessage`) plus how answers leave (an `Outbound`: one part at a time). The pipeline between
them (store, dedupe, order, workers, Dify, splitting, pacing) sees only these types, so a new
channel is a new pair of classes, not a change to the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

from wecom_bridge.channels.proactive import SendRequest
from wecom_bridge.wecom.aibot_frames import StreamImage
from wecom_bridge.wecom.messages import SendResult
from wecom_bridge.wecom.uploads import UploadedMedia


class InboundKind(StrEnum):
    TEXT = "text"  # a question (or a reset word)
    ENTER = "enter"  # the member opened the conversation (welcome time)
    EVENT = "event"  # any other event: nothing to answer
    UNSUPPORTED = "unsupported"  # a message type the bridge cannot answer yet (video, location, …)
    MEDIA = "media"  # an image, file or voice note (with a caption, for the AI bot's mixed)


# The kinds of media a member can send the bridge.
MEDIA_IMAGE = "image"
MEDIA_FILE = "file"
MEDIA_VOICE = "voice"
MEDIA_KINDS = (MEDIA_IMAGE, MEDIA_FILE, MEDIA_VOICE)


@dataclass(frozen=True)
class MediaRef:
    """Where a member's media can be fetched, not its bytes: the job stores this, and its
    media stage downloads the content when it runs."""

    kind: str  # one of MEDIA_KINDS
    media_id: str = ""  # self-built app: media/get (valid 3 days)
    url: str = ""  # AI bot: an encrypted download (valid 5 minutes)
    aeskey: str = ""  # AI bot long connection: the URL's own key ("": the bot's EncodingAESKey)
    name: str = ""  # the file name, when the message names it
    format: str = ""  # voice: amr


@dataclass(frozen=True)
class InboundMessage:
    """One message or event, as every channel reports it."""

    app: str  # the configured app (channel instance) it arrived at
    sender: str  # the member: the answer goes back to them, in their order
    kind: InboundKind
    dedupe_key: str  # the same for every redelivery of this message
    text: str = ""
    msg_id: str = ""
    msg_type: str = ""  # the channel's own name for the type, for logs
    # The channel's handle on this message, kept with its job for the answer (the AI bot's
    # req_id, chat and stream id); empty for channels that answer a member by id alone.
    context: Mapping[str, str] = field(default_factory=dict)
    media: tuple[MediaRef, ...] = ()  # kind MEDIA: what the member sent


@dataclass(frozen=True)
class Reply:
    """An answer to the member who asked (`context`: the channel's handle on their message)."""

    user: str
    context: Mapping[str, str] = field(default_factory=dict)


# Where a job's text goes: back to the member, or (send API) to the recipients a request names.
Target = Reply | SendRequest


class Outbound(Protocol):
    """How one channel delivers an answer, part by part."""

    @property
    def part_limit_bytes(self) -> int:
        """The longest part (UTF-8 bytes) the channel delivers whole."""
        ...

    @property
    def max_parts(self) -> int | None:
        """The most parts one answer can have on the channel (None: no limit)."""
        ...

    def pacing_keys(self, target: Target) -> list[str]:
        """Keys of the per-recipient rate limit one part to `target` counts against."""
        ...

    def send_part(self, target: Target, text: str) -> SendResult:
        """Deliver one part; raises WeComApiError when the channel refuses it."""
        ...


# Called with the whole answer so far, each time it grows.
TextProgress = Callable[[str], None]


@runtime_checkable
class StreamingOutbound(Protocol):
    """A channel that shows the answer while it is written (the AI bot)."""

    def streaming(self, target: Target) -> AbstractContextManager[TextProgress | None]:
        """While the answer is produced: a callback for its progress (None: not streamed).
        The parts are sent after the block ends."""
        ...


@runtime_checkable
class MediaOutbound(Protocol):
    """A channel that can send images and files (the others get a link instead)."""

    def upload_media(self, kind: str, path: Path, filename: str) -> UploadedMedia:
        """Upload a file as `kind` (image | file); raises WeComApiError when refused."""
        ...

    def send_media(self, target: Target, kind: str, media_id: str, caption: str) -> SendResult:
        """Send an uploaded file; `caption` is for channels that must say something first
        (the AI bot finishes its stream with it when the answer starts with a file)."""
        ...


class StreamFinish(StrEnum):
    """Where an answer's finishing stream reply stands."""

    OPEN = "open"  # WeCom still refreshes the stream: the finish can carry images
    DELIVERED = "delivered"  # this very text finished it already (a job resumed after a crash)
    CLOSED = "closed"  # too late for the stream: the text goes another way, images as links


@runtime_checkable
class StreamImageOutbound(Outbound, Protocol):
    """A channel whose answer's images ride on the reply that finishes its stream (the AI
    bot's webhook mode: `msg_item`); its files still go as links."""

    @property
    def max_stream_images(self) -> int:
        """The most images one finishing reply carries."""
        ...

    def stream_finish(self, target: Target, text: str) -> StreamFinish:
        """Whether `text` can still finish the stream (with images), or already did."""
        ...

    def finish_with_images(
        self, target: Target, text: str, images: Sequence[StreamImage], fallback: str
    ) -> SendResult:
        """Finish the stream with `text` and `images`; `fallback` (the text with the images'
        links) is what is sent instead when the stream closed meanwhile."""
        ...
