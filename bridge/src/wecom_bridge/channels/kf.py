"""The 微信客服 (kf) channel: external WeChat customers; callback signal in, kf/send_msg out.

Inbound: the kf callback is verified and decrypted like the self-built app's (same crypto, the
kf's own Token and EncodingAESKey, the corp id as receive id), but it only signals that messages
wait for one kf account: the pipeline stores a pull job for that account and answers 200.
Outbound: each part is one kf/send_msg to the customer, as the kf account they wrote to.

Job lines (the store's `user`): every customer has one per kf account, `kf:<open_kfid>:<external
userid>` — also the user Dify sees, so it never collides with a member's userid (WeCom userids
have no colon) — and every kf account has one pull line, so one puller at a time per account.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wecom_bridge.channels.base import InboundKind, InboundMessage, Reply, Target
from wecom_bridge.channels.wecom_app import SIGNED_QUERY, signed_query
from wecom_bridge.config import KfConfig
from wecom_bridge.errors import WeComApiError
from wecom_bridge.wecom.crypto import WeComCrypto
from wecom_bridge.wecom.kf_api import (
    KF_EVENT,
    KF_REPLIES_PER_MESSAGE,
    KF_TEXT_LIMIT,
    KfClient,
    KfSignal,
    parse_signal,
)
from wecom_bridge.wecom.messages import SendResult, parse_envelope

CUSTOMER_PREFIX = "kf:"
PULL_PREFIX = "kf-pull:"


def customer_line(open_kfid: str, external_userid: str) -> str:
    return f"{CUSTOMER_PREFIX}{open_kfid}:{external_userid}"


def parse_customer_line(user: str) -> tuple[str, str]:
    """(open_kfid, external_userid) of a customer line; ValueError for any other line."""
    kfid, sep, external = user.removeprefix(CUSTOMER_PREFIX).partition(":")
    if not user.startswith(CUSTOMER_PREFIX) or not sep or not kfid or not external:
        raise ValueError(f"not a kf customer line: {user!r}")
    return kfid, external


def pull_line(open_kfid: str) -> str:
    """The pull line of one kf account ("": of all of them, for callbacks naming none)."""
    return f"{PULL_PREFIX}{open_kfid or '*'}"


class KfInbound:
    """Verifies and decrypts the kf callback; knows nothing of jobs or Dify."""

    def __init__(self, kf: KfConfig) -> None:
        self.kf = kf
        self.crypto = WeComCrypto(kf.token, kf.encoding_aes_key, kf.corp_id)

    @property
    def path(self) -> str:
        return self.kf.callback_path

    def handshake(self, args: Mapping[str, str]) -> str:
        q = signed_query(args, (*SIGNED_QUERY, "echostr"))
        return self.crypto.verify_url(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"])

    def signal(self, args: Mapping[str, str], body: bytes) -> KfSignal | None:
        """The callback's signal; None: a genuine callback that is no kf signal (raises
        CallbackError when forged or malformed)."""
        q = signed_query(args, SIGNED_QUERY)
        envelope = parse_envelope(body)
        self.crypto.verify_signature(
            q["msg_signature"], q["timestamp"], q["nonce"], envelope.encrypt
        )
        return parse_signal(self.crypto.decrypt(envelope.encrypt))

    def decode(self, args: Mapping[str, str], body: bytes) -> InboundMessage:
        """The callback as the pipeline's message (an event; of the account's pull line)."""
        return signal_message(self.kf.name, self.signal(args, body))


def signal_message(app: str, signal: KfSignal | None) -> InboundMessage:
    if signal is None:  # nothing to pull: nothing to store either
        return InboundMessage(app, pull_line(""), InboundKind.EVENT, dedupe_key="")
    # A redelivered callback carries the same Token: it is the dedupe key.
    return InboundMessage(
        app=app,
        sender=pull_line(signal.open_kfid),
        kind=InboundKind.EVENT,
        dedupe_key=f"kf-token:{signal.token}",
        msg_type=KF_EVENT,
    )


@dataclass(frozen=True)
class KfOutbound:
    """Answers through kf/send_msg, as the kf account the customer wrote to."""

    app: str
    client: KfClient
    part_limit_bytes: int = KF_TEXT_LIMIT
    max_parts: int | None = KF_REPLIES_PER_MESSAGE

    def pacing_keys(self, target: Target) -> list[str]:
        return [f"{self.app}:{target.user}"] if isinstance(target, Reply) else []

    def send_part(self, target: Target, text: str) -> SendResult:
        if not isinstance(target, Reply):  # the send API names members, never customers
            raise WeComApiError(None, "微信客服 sends only answers to customers")
        try:
            open_kfid, external_userid = parse_customer_line(target.user)
        except ValueError as exc:  # a pull line has no customer to tell anything
            raise WeComApiError(None, str(exc)) from None
        return SendResult(msgid=self.client.send_text(open_kfid, external_userid, text))
