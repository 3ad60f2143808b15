"""Proactive messages (the article's 发送消息): who gets what, validated once for API and CLI.

A SendRequest is what a `send` job carries in its payload and what the CLI sends at once. The
same checks apply to both, so a message the CLI accepts is one the API accepts and vice versa.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from wecom_bridge.config import AppConfig, BridgeConfig, pick_app
from wecom_bridge.errors import ConfigError, SendRequestError

MSGTYPES = ("text", "markdown")
# message/send accepts at most 1000 members, 100 parties and 100 tags per call.
MAX_RECIPIENTS = {"touser": 1000, "toparty": 100, "totag": 100}
# WeCom: the duplicate check interval is at most 4 hours.
MAX_DUPLICATE_CHECK_INTERVAL = 4 * 3600
DEFAULT_DUPLICATE_CHECK_INTERVAL = 1800
# Longer texts go out as several messages; beyond this a notification is a document.
MAX_CONTENT_BYTES = 64 * 1024
FIELDS = frozenset(
    {
        "touser",
        "toparty",
        "totag",
        "msgtype",
        "content",
        "safe",
        "enable_duplicate_check",
        "duplicate_check_interval",
        "app",
    }
)

# A userid: 1-64 bytes, no whitespace or control characters ("@all" is WeCom's everyone).
_MEMBER = re.compile(r"^[^\s|\x00-\x1f\x7f]{1,64}$")
_NUMERIC_ID = re.compile(r"^[0-9]{1,20}$")


@dataclass(frozen=True)
class Recipients:
    touser: str = ""  # userids joined by "|"
    toparty: str = ""  # department ids joined by "|"
    totag: str = ""  # tag ids joined by "|"

    @property
    def members(self) -> list[str]:
        return [m for m in self.touser.split("|") if m]

    def key(self) -> str:
        """The job's `user` column, so messages to the same recipients go out in order.

        A send to one member shares the line with that member's chat answers.
        """
        if not (self.toparty or self.totag):
            return self.touser
        named = (("touser", self.touser), ("toparty", self.toparty), ("totag", self.totag))
        return ";".join(f"{name}={value}" for name, value in named if value)

    def limit_keys(self, app_name: str) -> list[str]:
        """Rate limiter keys: one per member (shared with chat answers); a party or tag send
        has no member to key on, so the whole recipient string stands for it."""
        keys = [f"{app_name}:{member}" for member in self.members]
        if self.toparty or self.totag:
            keys.append(f"{app_name}:{self.key()}")
        return keys


@dataclass(frozen=True)
class SendRequest:
    recipients: Recipients
    msgtype: str
    content: str
    safe: int = 0
    enable_duplicate_check: int = 0
    duplicate_check_interval: int = DEFAULT_DUPLICATE_CHECK_INTERVAL

    def payload(self) -> dict[str, object]:
        """The job payload (stored as JSON)."""
        return {
            "touser": self.recipients.touser,
            "toparty": self.recipients.toparty,
            "totag": self.recipients.totag,
            "msgtype": self.msgtype,
            "content": self.content,
            "safe": self.safe,
            "enable_duplicate_check": self.enable_duplicate_check,
            "duplicate_check_interval": self.duplicate_check_interval,
        }


# --- validation ---------------------------------------------------------------------------------


def _recipient_list(doc: Mapping[str, object], name: str) -> str:
    value = doc.get(name)
    if value is None or value == "":
        return ""
    numeric = name != "touser"
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = value.split("|")
    elif numeric and isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        kind = "a string of ids joined by '|' or a list" if numeric else "a string or a list"
        raise SendRequestError(name, f"must be {kind}")
    ids: list[str] = []
    for item in items:
        if numeric and isinstance(item, int) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise SendRequestError(name, "every recipient must be a string")
        item = item.strip()
        pattern = _NUMERIC_ID if numeric else _MEMBER
        if not pattern.match(item) or (not numeric and len(item.encode()) > 64):
            what = "a numeric id" if numeric else "a userid (1-64 bytes, no spaces)"
            raise SendRequestError(name, f"{item!r} is not {what}")
        if item not in ids:
            ids.append(item)
    if len(ids) > MAX_RECIPIENTS[name]:
        raise SendRequestError(name, f"at most {MAX_RECIPIENTS[name]} per message")
    return "|".join(ids)


def _flag(doc: Mapping[str, object], name: str) -> int:
    value = doc.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise SendRequestError(name, "must be 0 or 1 (or true/false)")


def _interval(doc: Mapping[str, object]) -> int:
    value = doc.get("duplicate_check_interval")
    if value is None:
        return DEFAULT_DUPLICATE_CHECK_INTERVAL
    if isinstance(value, bool) or not isinstance(value, int):
        raise SendRequestError("duplicate_check_interval", "must be an integer (seconds)")
    if not 1 <= value <= MAX_DUPLICATE_CHECK_INTERVAL:
        raise SendRequestError(
            "duplicate_check_interval", f"must be 1-{MAX_DUPLICATE_CHECK_INTERVAL} seconds"
        )
    return value


def parse_send_request(doc: Mapping[str, object]) -> tuple[SendRequest, str | None]:
    """Validate an API body (or the CLI's arguments as one); returns the request and the app
    name asked for (None: the default app). Raises SendRequestError naming the field."""
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        raise SendRequestError(unknown[0], f"unknown field; known: {', '.join(sorted(FIELDS))}")
    recipients = Recipients(
        touser=_recipient_list(doc, "touser"),
        toparty=_recipient_list(doc, "toparty"),
        totag=_recipient_list(doc, "totag"),
    )
    if not (recipients.touser or recipients.toparty or recipients.totag):
        raise SendRequestError("touser", "give at least one of touser, toparty, totag")
    msgtype = doc.get("msgtype")
    if msgtype not in MSGTYPES:
        raise SendRequestError("msgtype", f"must be one of {', '.join(MSGTYPES)}")
    content = doc.get("content")
    if not isinstance(content, str) or not content.strip():
        raise SendRequestError("content", "must be a non-empty string")
    if len(content.encode("utf-8", "surrogatepass")) > MAX_CONTENT_BYTES:
        raise SendRequestError("content", f"must be at most {MAX_CONTENT_BYTES} bytes (UTF-8)")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in content):
        raise SendRequestError("content", "contains unpaired surrogates (not valid UTF-8)")
    app = doc.get("app")
    if app is not None and (not isinstance(app, str) or not app.strip()):
        raise SendRequestError("app", "must be the name of a configured app")
    request = SendRequest(
        recipients=recipients,
        msgtype=str(msgtype),
        content=content,
        safe=_flag(doc, "safe"),
        enable_duplicate_check=_flag(doc, "enable_duplicate_check"),
        duplicate_check_interval=_interval(doc),
    )
    return request, app.strip() if isinstance(app, str) else None


def resolve_app(config: BridgeConfig, name: str | None) -> AppConfig:
    """The app (agent) that sends: by name, or the only one configured."""
    try:
        return pick_app(config.apps, name)
    except ConfigError as exc:
        raise SendRequestError("app", exc.problem) from None
