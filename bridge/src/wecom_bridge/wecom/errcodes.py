"""WeCom API errcodes: what each one means, what to do about it, and how the client handles it.

The one table the client (retry, refresh or stop), the `send` CLI (its explanation) and `doctor`
(its hints) all read, so an operator reads the same words wherever an errcode shows up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

LOOKUP_URL = "https://open.work.weixin.qq.com/devtool/query"

_FROM_IP = re.compile(r"from ip:\s*([0-9A-Fa-f.:]+)")


class Handling(StrEnum):
    TOKEN = "token"  # noqa: S105 - a category, not a secret. The access token is invalid or expired: refresh once, then retry
    RETRY = "retry"  # transient (busy, frequency limits): back off and retry
    ADMIN = "admin"  # only the admin can fix it: report once, do not hammer gettoken
    PERMANENT = "permanent"  # this request will never succeed as it is


@dataclass(frozen=True)
class Errcode:
    code: int
    handling: Handling
    meaning: str = ""  # plain words, for an operator
    hint: str = ""  # what to do; "{ip}" is replaced by the IP WeCom named (60020)
    # A frequency limit blocks for a window (WeCom's doc 90454: a minute, an hour or a day,
    # by the limit hit): retrying sooner only burns calls. Seconds before the first retry.
    blocked_for: float = 0.0


_TABLE = (
    Errcode(-1, Handling.RETRY, "WeCom's system is busy", "try again in a few seconds"),
    Errcode(
        40001,
        Handling.ADMIN,
        "wrong secret: WeCom refused WECOM_SECRET (the app's Secret)",
        "WECOM_SECRET is wrong: copy this app's Secret again from 应用管理 › the app › Secret "
        "(another app's secret does not work)",
    ),
    Errcode(
        40013,
        Handling.ADMIN,
        "invalid corp id",
        "WECOM_CORP_ID is wrong: copy 企业ID from 我的企业",
    ),
    Errcode(40014, Handling.TOKEN, "invalid access token"),
    Errcode(42001, Handling.TOKEN, "access token expired"),
    Errcode(42007, Handling.TOKEN, "access token invalidated"),
    Errcode(42009, Handling.TOKEN, "access token invalidated"),
    Errcode(
        45009,
        Handling.RETRY,
        "WeCom's API rate limit was reached (too many calls); WeCom blocks for a minute, an "
        "hour or a day depending on the limit hit",
        "try again later (in a minute at the earliest); see WeCom's 频率限制 page (doc 90454)",
        blocked_for=60.0,
    ),
    Errcode(45033, Handling.RETRY, "too many concurrent calls", "try again later"),
    Errcode(
        60020,
        Handling.ADMIN,
        "this server's IP is not trusted by WeCom",
        "add {ip} to 企业可信IP in the app's settings (应用管理 › the app › 企业可信IP; the "
        "console allows it only after the trusted domain or the callback URL is set); it takes "
        "about a minute to apply",
    ),
    # The AI bot's long connection (智能机器人, doc 101463); codes as WeCom's servers and its
    # Node SDK (WecomTeam/aibot-node-sdk) report them.
    Errcode(
        846605,
        Handling.PERMANENT,
        "AI bot: invalid req_id (the message was delivered on an earlier connection, or the "
        "reply window is over)",
        "nothing to fix: the bridge sends the answer as a new message instead",
    ),
    Errcode(
        846608,
        Handling.PERMANENT,
        "AI bot: the stream message can no longer be updated (expired or finished)",
        "nothing to fix: the bridge sends the answer as a new message instead",
    ),
    Errcode(
        81013,
        Handling.PERMANENT,
        "no valid recipient: the users, parties and tags given are all invalid (unknown, or "
        "outside the app's 可见范围)",
        "check the userids (通讯录 › the member › 账号) and the party/tag ids",
    ),
    # 微信客服 (kf). 95018 is checked against WeCom's answers (errmsg "send msg session status
    # invalid"); the others follow WeCom's global errcode list (doc 90313).
    Errcode(
        95000,
        Handling.PERMANENT,
        "invalid open_kfid: not a 微信客服 account of this corp",
        "check the account in 微信客服 › the account; it must be managed through the API",
    ),
    Errcode(
        95001,
        Handling.PERMANENT,
        "the customer's reply window is used up: at most 5 messages within 48 hours after the "
        "customer's last message (微信客服)",
        "nothing to fix: the bridge can answer again once the customer writes again",
    ),
    Errcode(
        95004,
        Handling.PERMANENT,
        "no such 微信客服 account (open_kfid)",
        "the account was deleted or belongs to another corp",
    ),
    Errcode(
        95007,
        Handling.PERMANENT,
        "invalid or expired pull token (kf/sync_msg: a callback's Token is valid 10 minutes)",
        "nothing to fix: the bridge pulls again without the token",
    ),
    Errcode(
        95013,
        Handling.PERMANENT,
        "the 微信客服 session has ended",
        "nothing to fix: a new message from the customer opens a new session",
    ),
    Errcode(
        95016,
        Handling.PERMANENT,
        "this change of the 微信客服 session state is not allowed (e.g. a human already has it)",
        "nothing to fix: the session is already with a human servicer or ended",
    ),
    Errcode(
        95018,
        Handling.PERMANENT,
        "the 微信客服 session state does not allow the bot to send (a human servicer holds it, "
        "it waits in the servicer pool, or it ended)",
        "nothing to fix: the bot answers again when the session returns to it or the customer "
        "starts a new one",
    ),
    # media/get of what a member sent (doc 90254): a MediaId lives 3 days.
    Errcode(
        40007,
        Handling.PERMANENT,
        "invalid media_id: unknown, or older than WeCom's 3 days",
        "nothing to fix: the member is asked to send the file again",
    ),
)
ERRCODES: dict[int, Errcode] = {entry.code: entry for entry in _TABLE}


def lookup(code: int) -> Errcode:
    """The table's entry, or a permanent one that points at WeCom's errcode lookup."""
    return ERRCODES.get(code) or Errcode(
        code, Handling.PERMANENT, hint=f"look up errcode {code} at {LOOKUP_URL}"
    )


def codes(handling: Handling) -> frozenset[int]:
    return frozenset(entry.code for entry in _TABLE if entry.handling is handling)


def ip_in(errmsg: str) -> str | None:
    """The IP WeCom names in a 60020 errmsg ("… from ip: 203.0.113.7 …")."""
    match = _FROM_IP.search(errmsg)
    return match.group(1) if match else None


def hint_for(code: int, errmsg: str = "") -> str:
    return lookup(code).hint.replace("{ip}", ip_in(errmsg) or "the server's egress IP")
