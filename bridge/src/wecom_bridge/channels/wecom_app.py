"""The self-built app channel (自建应用): encrypted XML callbacks in, message/send out.

Inbound: WeCom calls the callback URL with a signed GET when the admin saves it (answer: the
decrypted echostr, exactly) and a signed, AES-encrypted XML POST for every message or event.
Outbound: each part is one message/send call to the member (or, for the send API, to the
recipients the request names), within the app's per-member rate limit.
"""

from __future__ import annotations

import dataclasses
import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wecom_bridge.channels.base import (
    MEDIA_FILE,
    MEDIA_IMAGE,
    MEDIA_VOICE,
    InboundKind,
    InboundMessage,
    MediaRef,
    Reply,
    Target,
)
from wecom_bridge.config import AppConfig
from wecom_bridge.errors import MissingParameterError
from wecom_bridge.wecom.api import WeComClient
from wecom_bridge.wecom.crypto import WeComCrypto
from wecom_bridge.wecom.messages import (
    WECOM_TEXT_LIMIT,
    CallbackMessage,
    OutboundMessage,
    SendResult,
    parse_envelope,
    parse_message,
)
from wecom_bridge.wecom.uploads import UploadedMedia

# Events that mean "the member opened the app": the moment for a welcome text.
WELCOME_EVENTS = frozenset({"enter_agent", "subscribe"})
SIGNED_QUERY = ("msg_signature", "timestamp", "nonce")
# The message types whose MediaId the bridge downloads (media/get) and hands to Dify.
MEDIA_TYPES = {"image": MEDIA_IMAGE, "file": MEDIA_FILE, "voice": MEDIA_VOICE}


def signed_query(args: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    values = {name: args.get(name, "") for name in names}
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise MissingParameterError(f"missing query parameter(s): {', '.join(missing)}")
    return values


def _kind(message: CallbackMessage) -> InboundKind:
    if message.msg_type == "text":
        return InboundKind.TEXT
    if message.is_event:
        return InboundKind.ENTER if message.event in WELCOME_EVENTS else InboundKind.EVENT
    if message.msg_type in MEDIA_TYPES and message.extra.get("MediaId"):
        return InboundKind.MEDIA
    return InboundKind.UNSUPPORTED


def _media(message: CallbackMessage) -> tuple[MediaRef, ...]:
    """The MediaId of an image, file or voice message (the bytes are fetched by the job)."""
    kind = MEDIA_TYPES.get(message.msg_type)
    media_id = message.extra.get("MediaId", "")
    if kind is None or not media_id:
        return ()
    name = message.extra.get("FileName") or message.extra.get("Title") or ""
    return (MediaRef(kind, media_id=media_id, name=name, format=message.extra.get("Format", "")),)


class WeComAppInbound:
    """Verifies, decrypts and normalises the app's callbacks; knows nothing of Dify or jobs."""

    def __init__(self, app: AppConfig) -> None:
        self.app = app
        self.crypto = WeComCrypto(app.token, app.encoding_aes_key, app.corp_id)

    @property
    def path(self) -> str:
        return self.app.callback_path

    def handshake(self, args: Mapping[str, str]) -> str:
        """The URL verification: the decrypted echostr (raises CallbackError when forged)."""
        q = signed_query(args, (*SIGNED_QUERY, "echostr"))
        return self.crypto.verify_url(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"])

    def decode(self, args: Mapping[str, str], body: bytes) -> InboundMessage:
        """One callback POST as the pipeline's message (raises CallbackError when refused)."""
        q = signed_query(args, SIGNED_QUERY)
        envelope = parse_envelope(body)
        self.crypto.verify_signature(
            q["msg_signature"], q["timestamp"], q["nonce"], envelope.encrypt
        )
        message = parse_message(self.crypto.decrypt(envelope.encrypt))
        return InboundMessage(
            app=self.app.name,
            sender=message.from_user,
            kind=_kind(message),
            dedupe_key=message.dedupe_key(),
            text=message.content,
            msg_id=message.msg_id,
            msg_type=message.msg_type,
            media=_media(message),
        )


def outbound_message(
    target: Target, agent_id: str, reply_msgtype: str, text: str
) -> OutboundMessage:
    """The message/send body of one part to `target`."""
    if isinstance(target, Reply):
        return OutboundMessage(
            agent_id=agent_id, content=text, msgtype=reply_msgtype, touser=target.user
        )
    return OutboundMessage(
        agent_id=agent_id,
        content=text,
        msgtype=target.msgtype,
        touser=target.recipients.touser,
        toparty=target.recipients.toparty,
        totag=target.recipients.totag,
        safe=target.safe,
        enable_duplicate_check=target.enable_duplicate_check,
        duplicate_check_interval=target.duplicate_check_interval,
    )


@dataclass(frozen=True)
class WeComAppOutbound:
    """Answers through message/send, as the app (AgentId) the member wrote to."""

    app: AppConfig
    client: WeComClient
    part_limit_bytes: int = WECOM_TEXT_LIMIT
    max_parts: int | None = None

    def pacing_keys(self, target: Target) -> list[str]:
        # WeCom silently drops more than 30 messages a minute from one app to one member.
        if isinstance(target, Reply):
            return [f"{self.app.name}:{target.user}"]
        return target.recipients.limit_keys(self.app.name)

    def send_part(self, target: Target, text: str) -> SendResult:
        return self.client.send(
            outbound_message(target, self.app.agent_id, self.app.reply_msgtype, text)
        )

    def upload_media(self, kind: str, path: Path, filename: str) -> UploadedMedia:
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return self.client.upload_media(kind, path.read_bytes(), filename, content_type)

    def send_media(self, target: Target, kind: str, media_id: str, caption: str) -> SendResult:
        text = outbound_message(target, self.app.agent_id, self.app.reply_msgtype, "")
        return self.client.send(dataclasses.replace(text, msgtype=kind, media_id=media_id))
