"""微信客服 (kf): the callback signal, the pulled messages and the kf API calls.

The kf callback carries no message, only a signal (event `kf_msg_or_event`, a one-time `Token`
valid 10 minutes, the `OpenKfId`); the messages are pulled with kf/sync_msg from a cursor the
caller keeps. Answers go out through kf/send_msg (welcome texts through send_msg_on_event), and
the session's state (bot, servicer pool, human servicer) is read and changed through
service_state/get and /trans (WeCom's docs 94670, 94677, 94698).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from wecom_bridge.errors import MalformedXmlError, WeComApiError, WeComConfigError
from wecom_bridge.wecom.api import WeComClient
from wecom_bridge.wecom.errcodes import lookup
from wecom_bridge.wecom.messages import parse_xml

KF_EVENT = "kf_msg_or_event"
SYNC_LIMIT = 1000  # sync_msg's default and maximum page size
KF_TEXT_LIMIT = 2048  # bytes of one text message
# kf/send_msg takes at most 5 messages within 48 h of the customer's last message (then 95018).
KF_REPLIES_PER_MESSAGE = 5
PULL_TOKEN_SECONDS = 600.0  # a callback's Token is valid for 10 minutes


class Origin(IntEnum):
    """Who a pulled message is from."""

    CUSTOMER = 3
    SYSTEM = 4  # events
    SERVICER = 5  # a human servicer's reply in the WeCom client


class ServiceState(IntEnum):
    NEW = 0  # 未处理: the API may answer
    BOT = 1  # 由智能助手接待: the API answers
    POOL = 2  # 待接入池排队中: waits for a human servicer
    HUMAN = 3  # 由人工接待
    ENDED = 4  # 已结束/未开始

    @property
    def bot_may_answer(self) -> bool:
        return self in (ServiceState.NEW, ServiceState.BOT)


@dataclass(frozen=True)
class KfSignal:
    """The decrypted kf callback: messages wait to be pulled (for `open_kfid`; "" when WeCom
    did not name the account — older callbacks carry no OpenKfId: then all are pulled)."""

    open_kfid: str
    token: str = field(repr=False)
    create_time: int = 0


def parse_signal(plaintext: bytes) -> KfSignal | None:
    """The kf callback's decrypted XML; None for anything else the app's callback URL receives
    (a self-built app bound to 微信客服 also gets its own events there)."""
    fields = parse_xml(plaintext)
    if fields.get("MsgType") != "event" or fields.get("Event") != KF_EVENT:
        return None
    token = fields.get("Token", "")
    if not token:
        raise MalformedXmlError("kf callback without Token")
    created = fields.get("CreateTime", "0")
    return KfSignal(fields.get("OpenKfId", ""), token, int(created) if created.isdigit() else 0)


@dataclass(frozen=True)
class KfMessage:
    """One entry of sync_msg's msg_list (the fields the bridge uses)."""

    msgid: str
    open_kfid: str
    external_userid: str
    send_time: int
    origin: int
    msgtype: str
    text: str = ""  # text messages
    event_type: str = ""  # events
    welcome_code: str = ""  # enter_session events


def parse_kf_message(item: Mapping[str, Any]) -> KfMessage:
    msgtype = str(item.get("msgtype", ""))
    event = item.get("event") if msgtype == "event" else None
    event = event if isinstance(event, Mapping) else {}
    text = item.get("text") if msgtype == "text" else None
    text = text if isinstance(text, Mapping) else {}
    return KfMessage(
        msgid=str(item.get("msgid", "")),
        open_kfid=str(item.get("open_kfid") or event.get("open_kfid", "")),
        external_userid=str(item.get("external_userid") or event.get("external_userid", "")),
        send_time=int(item.get("send_time", 0) or 0),
        origin=int(item.get("origin", 0) or 0),
        msgtype=msgtype,
        text=str(text.get("content", "")),
        event_type=str(event.get("event_type", "")),
        welcome_code=str(event.get("welcome_code", "")),
    )


@dataclass(frozen=True)
class SyncPage:
    messages: tuple[KfMessage, ...]
    next_cursor: str
    has_more: bool


class KfClient:
    """The kf API, with the access token of the 微信客服 secret (not an app's secret)."""

    def __init__(self, wecom: WeComClient) -> None:
        self.wecom = wecom

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.wecom.call("POST", path, json=body)
        except WeComConfigError:
            raise  # already names what to change
        except WeComApiError as exc:
            meaning = lookup(exc.errcode).meaning if exc.errcode is not None else ""
            if not meaning:
                raise
            # What an operator reads on a failed job: the errcode table's words first.
            raise WeComApiError(
                exc.errcode,
                f"{meaning} (WeCom: {exc.errmsg})",
                retryable=exc.retryable,
                retry_after=exc.retry_after,
            ) from None

    def sync_msg(self, open_kfid: str, cursor: str, token: str = "") -> SyncPage:
        body: dict[str, Any] = {"limit": SYNC_LIMIT}
        if open_kfid:  # else every account this secret manages
            body["open_kfid"] = open_kfid
        if cursor:
            body["cursor"] = cursor
        if token:
            body["token"] = token
        data = self._post("/cgi-bin/kf/sync_msg", body)
        items = data.get("msg_list") or []
        if not isinstance(items, list):
            raise WeComApiError(None, "sync_msg: msg_list is not a list", retryable=True)
        return SyncPage(
            messages=tuple(parse_kf_message(i) for i in items if isinstance(i, Mapping)),
            next_cursor=str(data.get("next_cursor", "") or ""),
            has_more=bool(int(data.get("has_more", 0) or 0)),
        )

    def send_text(self, open_kfid: str, external_userid: str, text: str) -> str:
        """kf/send_msg of one text; the msgid WeCom gave it."""
        body = {
            "touser": external_userid,
            "open_kfid": open_kfid,
            "msgtype": "text",
            "text": {"content": text},
        }
        return str(self._post("/cgi-bin/kf/send_msg", body).get("msgid", ""))

    def send_welcome(self, welcome_code: str, text: str) -> str:
        """send_msg_on_event with an enter_session event's welcome_code (usable once)."""
        body = {"code": welcome_code, "msgtype": "text", "text": {"content": text}}
        return str(self._post("/cgi-bin/kf/send_msg_on_event", body).get("msgid", ""))

    def service_state(self, open_kfid: str, external_userid: str) -> ServiceState:
        body = {"open_kfid": open_kfid, "external_userid": external_userid}
        data = self._post("/cgi-bin/kf/service_state/get", body)
        try:
            return ServiceState(int(data.get("service_state", 0) or 0))
        except ValueError:
            raise WeComApiError(None, "service_state/get: unknown state", retryable=True) from None

    def transfer(
        self, open_kfid: str, external_userid: str, state: ServiceState, servicer: str = ""
    ) -> None:
        """service_state/trans (to the servicer pool, or to a servicer with `servicer`)."""
        body: dict[str, Any] = {
            "open_kfid": open_kfid,
            "external_userid": external_userid,
            "service_state": int(state),
        }
        if servicer:
            body["servicer_userid"] = servicer
        self._post("/cgi-bin/kf/service_state/trans", body)

    def accounts(self) -> list[str]:
        """The open_kfids this secret manages (kf/account/list), for doctor."""
        data = self._post("/cgi-bin/kf/account/list", {"offset": 0, "limit": 100})
        items = data.get("account_list") or []
        return [str(i.get("open_kfid", "")) for i in items if isinstance(i, Mapping)]
