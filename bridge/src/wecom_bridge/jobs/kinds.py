"""The job kinds: one dataclass each, with the payload that is stored for it.

A payload is parsed once when the job is stored (`encode` of a typed job) and once when it is
claimed (`decode`). Payloads carry a version: a field added later has a default, so a job queued
by an older release still runs after an upgrade; fields a newer release added are ignored by an
older one after a roll-back. A payload that cannot be read is a `JobPayloadError`, never a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from wecom_bridge.channels.base import MEDIA_KINDS, MediaRef, Reply, Target
from wecom_bridge.channels.proactive import FIELDS as SEND_FIELDS
from wecom_bridge.channels.proactive import SendRequest, parse_send_request
from wecom_bridge.errors import JobPayloadError, SendRequestError
from wecom_bridge.jobs.store import NewJob

PAYLOAD_VERSION = 1
VERSION_FIELD = "v"


@dataclass(frozen=True)
class ChatJob:
    """A member's question for Dify."""

    KIND: ClassVar[str] = "chat"
    query: str
    msg_id: str = ""
    context: Mapping[str, str] = field(default_factory=dict)  # the channel's (InboundMessage)


@dataclass(frozen=True)
class ResetJob:
    """A reset word: forget the member's Dify conversation, then confirm."""

    KIND: ClassVar[str] = "reset"
    msg_id: str = ""
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NoticeJob:
    """A fixed text of the bridge's own (welcome, unsupported message type)."""

    KIND: ClassVar[str] = "notice"
    text: str
    msg_id: str = ""
    msg_type: str = ""
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MediaJob:
    """A member's image, file or voice note (and its caption): fetched, checked and handed to
    Dify by the job's media stage (jobs/media.py). The payload keeps where the media can be
    fetched, never its bytes."""

    KIND: ClassVar[str] = "media"
    media: tuple[MediaRef, ...]
    text: str = ""  # the caption that came with it (the AI bot's mixed message)
    msg_id: str = ""
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SendJob:
    """A proactive message from the send API."""

    KIND: ClassVar[str] = "send"
    request: SendRequest


@dataclass(frozen=True)
class KfPullJob:
    """微信客服: pull what waits for one kf account (kf/sync_msg from the stored cursor)."""

    KIND: ClassVar[str] = "kf_pull"
    open_kfid: str  # "": every account the kf secret manages
    token: str = ""  # the callback's one-time pull token (valid 10 minutes)


@dataclass(frozen=True)
class KfHandoverJob:
    """微信客服: hand the customer's session to the human servicer pool."""

    KIND: ClassVar[str] = "kf_handover"
    msg_id: str = ""


@dataclass(frozen=True)
class KfWelcomeJob:
    """微信客服: the welcome text, through send_msg_on_event with the event's code."""

    KIND: ClassVar[str] = "kf_welcome"
    welcome_code: str
    text: str
    msg_id: str = ""


KfJobSpec = KfPullJob | KfHandoverJob | KfWelcomeJob
JobSpec = ChatJob | ResetJob | NoticeJob | MediaJob | SendJob | KfJobSpec


def target_of(spec: JobSpec, user: str) -> Target:
    """Where the job's text goes: a send request names its recipients, the rest answer `user`."""
    if isinstance(spec, SendJob):
        return spec.request
    if isinstance(spec, ChatJob | ResetJob | NoticeJob | MediaJob):
        return Reply(user, spec.context)
    return Reply(user)  # 微信客服's own kinds: the customer, with no channel context


def encode(spec: JobSpec) -> tuple[str, dict[str, object]]:
    """(kind, payload) as the store keeps them."""
    fields: dict[str, object]
    if isinstance(spec, SendJob):
        fields = spec.request.payload()
    elif isinstance(spec, ChatJob):
        fields = {"query": spec.query, "msg_id": spec.msg_id}
    elif isinstance(spec, ResetJob | KfHandoverJob):
        fields = {"msg_id": spec.msg_id}
    elif isinstance(spec, KfPullJob):
        fields = {"open_kfid": spec.open_kfid, "token": spec.token}
    elif isinstance(spec, MediaJob):
        fields = {"media": [_media_fields(m) for m in spec.media], "text": spec.text}
        fields["msg_id"] = spec.msg_id
    elif isinstance(spec, KfWelcomeJob):
        fields = {"welcome_code": spec.welcome_code, "text": spec.text, "msg_id": spec.msg_id}
    else:
        fields = {"text": spec.text, "msg_id": spec.msg_id, "msg_type": spec.msg_type}
    if isinstance(spec, ChatJob | ResetJob | NoticeJob | MediaJob) and spec.context:
        fields["context"] = dict(spec.context)
    return spec.KIND, {VERSION_FIELD: PAYLOAD_VERSION, **fields}


def decode(kind: str, payload: Mapping[str, object]) -> JobSpec:
    """The typed job of a stored (kind, payload); JobPayloadError when it cannot be one."""
    try:
        reader = _READERS[kind]
    except KeyError:
        raise JobPayloadError(f"unknown job kind {kind!r}") from None
    # Version 0 is a payload stored before versioning: the same fields as version 1.
    fields = {k: v for k, v in payload.items() if k != VERSION_FIELD}
    return reader(fields)


def _text(fields: Mapping[str, object], name: str, *, required: bool = False) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise JobPayloadError(f"payload field {name!r} is not a string")
    if required and not value:
        raise JobPayloadError(f"payload field {name!r} is missing")
    return value


def _context(fields: Mapping[str, object]) -> dict[str, str]:
    value = fields.get("context", {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise JobPayloadError("payload field 'context' is not an object of strings")
    return {str(k): v for k, v in value.items()}


def _chat(fields: Mapping[str, object]) -> JobSpec:
    return ChatJob(
        query=_text(fields, "query", required=True),
        msg_id=_text(fields, "msg_id"),
        context=_context(fields),
    )


def _reset(fields: Mapping[str, object]) -> JobSpec:
    return ResetJob(msg_id=_text(fields, "msg_id"), context=_context(fields))


def _notice(fields: Mapping[str, object]) -> JobSpec:
    return NoticeJob(
        text=_text(fields, "text", required=True),
        msg_id=_text(fields, "msg_id"),
        msg_type=_text(fields, "msg_type"),
        context=_context(fields),
    )


_MEDIA_FIELDS = ("media_id", "url", "aeskey", "name", "format")


def _media_fields(ref: MediaRef) -> dict[str, str]:
    return {"kind": ref.kind, **{k: getattr(ref, k) for k in _MEDIA_FIELDS if getattr(ref, k)}}


def _media_ref(value: object) -> MediaRef:
    if not isinstance(value, dict):
        raise JobPayloadError("payload field 'media' holds a non-object")
    kind = _text(value, "kind", required=True)
    if kind not in MEDIA_KINDS:
        raise JobPayloadError(f"unknown media kind {kind!r}")
    ref = MediaRef(kind, **{k: _text(value, k) for k in _MEDIA_FIELDS})
    if not (ref.media_id or ref.url):
        raise JobPayloadError("media without media_id or url")
    return ref


def _media(fields: Mapping[str, object]) -> JobSpec:
    items = fields.get("media")
    if not isinstance(items, list) or not items:
        raise JobPayloadError("payload field 'media' is missing")
    return MediaJob(
        media=tuple(_media_ref(item) for item in items),
        text=_text(fields, "text"),
        msg_id=_text(fields, "msg_id"),
        context=_context(fields),
    )


def _send(fields: Mapping[str, object]) -> JobSpec:
    known = {k: v for k, v in fields.items() if k in SEND_FIELDS}
    try:
        request, _ = parse_send_request(known)
    except SendRequestError as exc:
        raise JobPayloadError(f"invalid send request: {exc}") from None
    return SendJob(request)


def _kf_pull(fields: Mapping[str, object]) -> JobSpec:
    return KfPullJob(open_kfid=_text(fields, "open_kfid"), token=_text(fields, "token"))


def _kf_handover(fields: Mapping[str, object]) -> JobSpec:
    return KfHandoverJob(msg_id=_text(fields, "msg_id"))


def _kf_welcome(fields: Mapping[str, object]) -> JobSpec:
    return KfWelcomeJob(
        welcome_code=_text(fields, "welcome_code", required=True),
        text=_text(fields, "text", required=True),
        msg_id=_text(fields, "msg_id"),
    )


_READERS = {
    ChatJob.KIND: _chat,
    ResetJob.KIND: _reset,
    NoticeJob.KIND: _notice,
    MediaJob.KIND: _media,
    SendJob.KIND: _send,
    KfPullJob.KIND: _kf_pull,
    KfHandoverJob.KIND: _kf_handover,
    KfWelcomeJob.KIND: _kf_welcome,
}


def new_job(user: str, spec: JobSpec) -> NewJob:
    """The store's row for `spec`, in `user`'s line (answered after their earlier jobs)."""
    kind, payload = encode(spec)
    return NewJob(kind, user, payload)
