"""What the pipeline does with an inbound message, whichever channel it came from.

The rules members notice — reset words, the welcome, the answer to a message type the bridge
cannot handle — live here once, not in each channel's HTTP handler.
"""

from __future__ import annotations

from wecom_bridge.channels.base import InboundKind, InboundMessage
from wecom_bridge.config import Replies
from wecom_bridge.jobs.kinds import ChatJob, JobSpec, MediaJob, NoticeJob, ResetJob


def route(message: InboundMessage, replies: Replies) -> JobSpec | None:
    """The job for `message`; None: nothing to answer (it is still deduplicated)."""
    if message.kind is InboundKind.TEXT:
        text = message.text.strip()
        if not text:
            return None
        if text in replies.reset_words:
            return ResetJob(msg_id=message.msg_id, context=message.context)
        return ChatJob(query=text, msg_id=message.msg_id, context=message.context)
    if message.kind is InboundKind.MEDIA and message.media:
        return MediaJob(
            media=message.media,
            text=message.text.strip(),
            msg_id=message.msg_id,
            context=message.context,
        )
    if message.kind is InboundKind.ENTER:
        if not replies.welcome_text:
            return None
        return NoticeJob(text=replies.welcome_text, context=message.context)
    if message.kind is InboundKind.UNSUPPORTED and replies.unsupported_reply:
        return NoticeJob(
            text=replies.unsupported_reply,
            msg_id=message.msg_id,
            msg_type=message.msg_type,
            context=message.context,
        )
    return None
