"""What WeCom sends to the callback URL: the signed GET handshake and encrypted POST callbacks."""

from __future__ import annotations

import secrets
import time

import requests

from wecom_bridge.wecom.crypto import (
    WeComCrypto,
    build_url_verification,
    default_nonce,
    default_timestamp,
)
from wecom_bridge.wecom.messages import message_xml


def new_msg_id() -> str:
    """A MsgId-like 19-digit number, unique enough for tests and benchmarks."""
    return str(10**18 + secrets.randbelow(9 * 10**18))


def build_callback(
    crypto: WeComCrypto,
    fields: dict[str, str | int],
    *,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> tuple[dict[str, str], bytes]:
    """Encrypt a message of any MsgType; returns (query params, POST body).

    `fields` is the decrypted XML's content; ToUserName defaults to the crypto's receive id.
    """
    inner = {"ToUserName": crypto.receive_id, **fields}
    encrypt = crypto.encrypt(message_xml(inner))
    ts, nc = default_timestamp(timestamp), default_nonce(nonce)
    params = {"msg_signature": crypto.sign(ts, nc, encrypt), "timestamp": ts, "nonce": nc}
    # Same shape as WeCom's envelope; base64 and ids never contain "]]>".
    body = (
        f"<xml><ToUserName><![CDATA[{inner['ToUserName']}]]></ToUserName>"
        f"<Encrypt><![CDATA[{encrypt}]]></Encrypt>"
        f"<AgentID><![CDATA[{inner.get('AgentID', '')}]]></AgentID></xml>"
    )
    return params, body.encode("utf-8")


def _common_fields(
    crypto: WeComCrypto, to_user: str | None, from_user: str, create_time: int | None, msg_type: str
) -> dict[str, str | int]:
    return {
        "ToUserName": to_user if to_user is not None else crypto.receive_id,
        "FromUserName": from_user,
        "CreateTime": create_time if create_time is not None else int(time.time()),
        "MsgType": msg_type,
    }


def build_text_callback(
    crypto: WeComCrypto,
    *,
    from_user: str,
    content: str,
    msg_id: str,
    agent_id: str,
    create_time: int | None = None,
    timestamp: str | None = None,
    nonce: str | None = None,
    to_user: str | None = None,
) -> tuple[dict[str, str], bytes]:
    fields = _common_fields(crypto, to_user, from_user, create_time, "text") | {
        "Content": content,
        "MsgId": msg_id,
        "AgentID": agent_id,
    }
    return build_callback(crypto, fields, timestamp=timestamp, nonce=nonce)


def build_event_callback(
    crypto: WeComCrypto,
    *,
    from_user: str,
    event: str,
    agent_id: str,
    event_key: str = "",
    create_time: int | None = None,
    timestamp: str | None = None,
    nonce: str | None = None,
    to_user: str | None = None,
) -> tuple[dict[str, str], bytes]:
    fields = _common_fields(crypto, to_user, from_user, create_time, "event") | {
        "AgentID": agent_id,
        "Event": event,
        "EventKey": event_key,
    }
    return build_callback(crypto, fields, timestamp=timestamp, nonce=nonce)


def build_media_callback(
    crypto: WeComCrypto,
    *,
    from_user: str,
    msg_type: str,
    media_id: str,
    msg_id: str,
    agent_id: str,
    create_time: int | None = None,
) -> tuple[dict[str, str], bytes]:
    """An image (PicUrl, MediaId), voice (MediaId, Format amr) or file (MediaId) message."""
    fields = _common_fields(crypto, None, from_user, create_time, msg_type) | {
        "MediaId": media_id,
        "MsgId": msg_id,
        "AgentID": agent_id,
    }
    if msg_type == "image":
        fields["PicUrl"] = f"https://wework.qpic.cn/wwpic/{media_id}/0"
    if msg_type == "voice":
        fields["Format"] = "amr"
    return build_callback(crypto, fields)


class CallbackClient:
    """Plays WeCom's callback side against a bridge URL (tests, demo, simulator)."""

    def __init__(
        self,
        url: str,
        crypto: WeComCrypto,
        agent_id: str,
        session: requests.Session | None = None,
        verify: bool | str = True,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.crypto = crypto
        self.agent_id = agent_id
        self.session = session or requests.Session()
        self.verify = verify
        self.timeout = timeout

    def verify_url(self, echostr_plaintext: str | None = None) -> requests.Response:
        plaintext = echostr_plaintext if echostr_plaintext is not None else new_msg_id()
        params = build_url_verification(self.crypto, plaintext)
        return self.session.get(self.url, params=params, verify=self.verify, timeout=self.timeout)

    def send_text(
        self,
        from_user: str,
        content: str,
        msg_id: str | None = None,
        create_time: int | None = None,
    ) -> requests.Response:
        params, body = build_text_callback(
            self.crypto,
            from_user=from_user,
            content=content,
            msg_id=msg_id or new_msg_id(),
            agent_id=self.agent_id,
            create_time=create_time,
        )
        return self.post(params, body)

    def send_event(
        self, from_user: str, event: str, event_key: str = "", create_time: int | None = None
    ) -> requests.Response:
        params, body = build_event_callback(
            self.crypto,
            from_user=from_user,
            event=event,
            agent_id=self.agent_id,
            event_key=event_key,
            create_time=create_time,
        )
        return self.post(params, body)

    def send_media(
        self, from_user: str, msg_type: str, media_id: str, msg_id: str | None = None
    ) -> requests.Response:
        """An image, voice or file message whose MediaId the WeCom double serves."""
        params, body = build_media_callback(
            self.crypto,
            from_user=from_user,
            msg_type=msg_type,
            media_id=media_id,
            msg_id=msg_id or new_msg_id(),
            agent_id=self.agent_id,
        )
        return self.post(params, body)

    def post(self, params: dict[str, str], body: bytes) -> requests.Response:
        """POST an already built callback (e.g. to replay it as WeCom's redelivery)."""
        return self.session.post(
            self.url,
            params=params,
            data=body,
            headers={"Content-Type": "text/xml; charset=utf-8"},
            verify=self.verify,
            timeout=self.timeout,
        )


__all__ = ["build_url_verification"]  # also what WeCom sends; doctor signs it the same way
